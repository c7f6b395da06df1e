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
    logits_in(&dir.join("expected.json"))
}

/// The `logits` `[s, vocab]` of a reference JSON file (expected.json, expected_format_a.json...).
pub fn logits_in(file: &Path) -> Vec<Vec<f32>> {
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(file).unwrap()).unwrap();
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

/// Logits `[n, vocab]` of `ids` decoded with the KV cache: a forward of the first `prefill`
/// ids, then one id at a time.
pub fn cached_logits(m: &Model, ids: &[u32], prefill: usize) -> Vec<Vec<f32>> {
    let mut cache = diffattn::model::KvCache::new();
    let pos = m.positions(1, prefill, 0).unwrap();
    let mask = m.mask(1, prefill, 0, None).unwrap();
    let mut rows = m
        .forward_full(
            &ids_tensor(&ids[..prefill]),
            &pos,
            Some(&mask),
            Some(&mut cache),
            None,
        )
        .unwrap()
        .squeeze(0)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    for i in prefill..ids.len() {
        let pos = m.positions(1, 1, i).unwrap();
        let step = m
            .forward_full(
                &ids_tensor(&ids[i..i + 1]),
                &pos,
                None,
                Some(&mut cache),
                None,
            )
            .unwrap()
            .squeeze(0)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        rows.extend(step);
    }
    assert_eq!(cache.seq_len(), ids.len());
    rows
}

/// Logits of `long` and of `short` (left-padded to `long`'s length) run as one batch:
/// (long's rows, short's rows without the padding).
pub fn left_padded_batch_logits(
    m: &Model,
    long: &[u32],
    short: &[u32],
) -> (Vec<Vec<f32>>, Vec<Vec<f32>>) {
    let t = long.len();
    let pad = t - short.len();
    let mut padded = vec![0u32; pad];
    padded.extend(short);
    let key_mask = vec![vec![1u8; t], (0..t).map(|j| u8::from(j >= pad)).collect()];
    let positions: Vec<u32> = (0..t as u32)
        .chain((0..t).map(|j| j.saturating_sub(pad) as u32))
        .collect();
    let ids = Tensor::new([long, padded.as_slice()].concat().as_slice(), &Device::Cpu)
        .unwrap()
        .reshape((2, t))
        .unwrap();
    let pos = Tensor::from_vec(positions, (2, t), &Device::Cpu).unwrap();
    let mask = m.mask(2, t, 0, Some(&key_mask)).unwrap();
    let batch = m.forward_full(&ids, &pos, Some(&mask), None, None).unwrap();
    let row0 = batch.get(0).unwrap().to_vec2::<f32>().unwrap();
    let row1 = batch.get(1).unwrap().to_vec2::<f32>().unwrap();
    (row0, row1[pad..].to_vec())
}

/// Max |a - b| over two `[s, vocab]` matrices.
pub fn max_abs_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    a.iter()
        .zip(b)
        .flat_map(|(x, y)| x.iter().zip(y).map(|(p, q)| (p - q).abs()))
        .fold(0.0, f32::max)
}

/// Loads `dir` with every tensor trainable, takes the next-token loss of `ids` (mean over the
/// s − 1 targets) and asserts that every variable gets a finite, non-zero gradient (`what`
/// names the case in failures); returns the variables' names.
pub fn assert_every_tensor_gets_a_gradient(dir: &Path, ids: &[u32], what: &str) -> Vec<String> {
    use candle_core::D;
    let (m, vars) = Model::load_trainable(dir, &Device::Cpu).unwrap();
    let s = ids.len();
    let logits = m.forward(&ids_tensor(ids)).unwrap();
    let inputs = logits.narrow(1, 0, s - 1).unwrap().squeeze(0).unwrap();
    let targets = Tensor::new(&ids[1..], &Device::Cpu).unwrap();
    let loss = candle_nn::ops::log_softmax(&inputs, D::Minus1)
        .unwrap()
        .gather(&targets.unsqueeze(1).unwrap(), 1)
        .unwrap()
        .mean_all()
        .unwrap()
        .neg()
        .unwrap();
    let grads = loss.backward().unwrap();
    for (name, var) in &vars {
        let g = grads
            .get(var)
            .unwrap_or_else(|| panic!("{what}: no gradient for {name}"));
        let norm = g
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(
            norm > 0.0 && norm.is_finite(),
            "{what}: gradient of {name} is {norm}"
        );
    }
    vars.into_iter().map(|(n, _)| n).collect()
}
