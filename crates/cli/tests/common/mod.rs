//! Helpers of the real-model tests (SmolLM2 and Gemma 3): fetching and importing the GGUF once
//! per test binary, running the binary, and the checks against transformers' references.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex, Weak};

use diffattn::checkpoint::Checkpoint;
use serde_json::Value;

pub fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_diff-transformer"))
}

/// Runs `cmd`, asserts success, returns its stdout.
pub fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// A JSON fixture of tests/fixtures.
pub fn fixture(name: &str) -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures")
        .join(name);
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// The GGUF path printed by `scripts/<script>` (None when DIFF_TRANSFORMER_SKIP_REAL_MODEL=1).
pub fn fetch_gguf(script: &str) -> Option<PathBuf> {
    if std::env::var("DIFF_TRANSFORMER_SKIP_REAL_MODEL").as_deref() == Ok("1") {
        eprintln!("skipped: DIFF_TRANSFORMER_SKIP_REAL_MODEL=1");
        return None;
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../scripts")
        .join(script);
    let out = Command::new("bash")
        .arg(&script)
        .output()
        .unwrap_or_else(|e| panic!("run {}: {e}", script.display()));
    assert!(
        out.status.success(),
        "fetching the real model failed (set DIFF_TRANSFORMER_SKIP_REAL_MODEL=1 to skip): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Some(PathBuf::from(String::from_utf8(out.stdout).unwrap().trim()))
}

/// A real GGUF imported once into a temporary directory, shared by the tests that run at the
/// same time (an f32 import is 540 MB for SmolLM2, 1.1 GB for Gemma 3, and each test writes
/// converted checkpoints of the same size beside it). Deleted when the last holder lets go.
pub struct Imported {
    _dir: tempfile::TempDir,
    pub hf: PathBuf,
    pub stdout: String,
}

/// The shared import of the GGUF `script` fetches, kept in `slot` (one static per model);
/// None when the real model is skipped. A test that no longer needs the source drops the `Arc`
/// so that the import can be deleted early.
pub fn shared_import(slot: &Mutex<Weak<Imported>>, script: &str) -> Option<Arc<Imported>> {
    let mut shared = slot.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(imported) = shared.upgrade() {
        return Some(imported);
    }
    let gguf = fetch_gguf(script)?;
    let dir = tempfile::tempdir().unwrap();
    let hf = dir.path().join("hf");
    let start = std::time::Instant::now();
    let stdout = run(bin().args(["import-gguf", gguf.to_str().unwrap(), hf.to_str().unwrap()]));
    println!(
        "import-gguf of {}: {:.2} s",
        gguf.display(),
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

/// The imported tensors against transformers' GGUF loader (`reference["tensors"]`: shape, sum,
/// sum of squares and sampled entries, each within 1e-6); returns the largest sampled |Δ|.
pub fn check_tensors(hf: &Path, reference: &Value) -> f64 {
    let ck = Checkpoint::open(hf).unwrap();
    let mut worst = 0f64;
    for (name, r) in reference["tensors"].as_object().unwrap() {
        let info = ck
            .info(name)
            .unwrap_or_else(|| panic!("{name} not imported"));
        let shape: Vec<usize> = r["shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as usize)
            .collect();
        assert_eq!(info.shape, shape, "{name}");
        let v = ck.to_f32(name).unwrap();
        let cols = if shape.len() == 2 { shape[1] } else { 1 };
        for sample in r["samples"].as_array().unwrap() {
            let (row, col) = (
                sample[0].as_u64().unwrap() as usize,
                sample[1].as_u64().unwrap() as usize,
            );
            let d = (v[row * cols + col] as f64 - sample[2].as_f64().unwrap()).abs();
            worst = worst.max(d);
            assert!(d <= 1e-6, "{name}[{row}, {col}]: off by {d}");
        }
        let sum: f64 = v.iter().map(|&x| x as f64).sum();
        let sum_sq: f64 = v.iter().map(|&x| x as f64 * x as f64).sum();
        for (ours, key) in [(sum, "sum"), (sum_sq, "sum_sq")] {
            let theirs = r[key].as_f64().unwrap();
            assert!(
                (ours - theirs).abs() <= 1e-6 * theirs.abs().max(1.0),
                "{name} {key}: {ours} vs {theirs}"
            );
        }
    }
    println!(
        "import-gguf vs transformers' GGUF loader: max |delta| over sampled entries {worst:.2e}"
    );
    worst
}

/// Our forward on `hf` against transformers' (`reference["prompts"]`: token ids, top-20
/// logits at every position within 1e-3, greedy ids with and without the KV cache).
pub fn check_forward(hf: &Path, reference: &Value) {
    use candle_core::{DType, Device, Tensor};
    use diffattn::generate::{generate, Sampling, TextCodec};
    use diffattn::model::Model;
    let model = Model::load(hf, DType::F32, &Device::Cpu).unwrap();
    let codec = TextCodec::load(hf).unwrap();
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
        let tops = p["top20_ids"].as_array().unwrap();
        assert_eq!(tops.len(), ids.len(), "a reference row per position");
        let mut max = 0f32;
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
