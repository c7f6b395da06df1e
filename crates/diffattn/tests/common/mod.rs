//! Helpers shared by the integration tests: fixture paths, reference logits, our logits.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use diffattn::model::Model;

/// `tests/fixtures` of the repository.
pub fn fixtures_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

/// A tiny fixture model directory.
pub fn tiny(name: &str) -> PathBuf {
    fixtures_root().join("tiny").join(name)
}

/// `[1, s]` ids on the CPU.
pub fn ids_tensor(ids: &[u32]) -> Tensor {
    Tensor::new(ids, &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap()
}

/// Our logits `[s, vocab]` of one unpadded sequence.
pub fn logits_of(m: &Model, ids: &[u32]) -> Vec<Vec<f32>> {
    m.forward(&ids_tensor(ids))
        .unwrap()
        .squeeze(0)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap()
}

/// Loads `dir` (f32, CPU) and returns [`logits_of`].
pub fn logits(dir: &Path, ids: &[u32]) -> Vec<Vec<f32>> {
    logits_of(&Model::load(dir, DType::F32, &Device::Cpu).unwrap(), ids)
}

/// The reference logits `[s, vocab]` of a fixture's expected.json.
pub fn expected_logits(dir: &Path) -> Vec<Vec<f32>> {
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    v["logits"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            r.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap() as f32)
                .collect()
        })
        .collect()
}

/// Max |a - b| over two `[s, vocab]` matrices.
pub fn max_abs_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    a.iter()
        .zip(b)
        .flat_map(|(x, y)| x.iter().zip(y).map(|(p, q)| (p - q).abs()))
        .fold(0.0, f32::max)
}
