//! Our forward pass against golden logits computed by Hugging Face transformers (Llama cases)
//! and by the PyTorch format-A forward of tools/make_fixtures.py (differential cases); KV-cache
//! decoding against full recomputation; left-padded batches against unbatched runs; gradients.

use std::path::{Path, PathBuf};

mod common;

use candle_core::{DType, Device, Tensor};
use common::{logits_of, max_abs_diff};
use diffattn::model::Model;

fn fixtures() -> Vec<PathBuf> {
    let root = common::fixtures_root().join("tiny");
    let mut v: Vec<PathBuf> = std::fs::read_dir(&root)
        .unwrap_or_else(|e| panic!("{}: {e}", root.display()))
        .map(|e| e.unwrap().path())
        .collect();
    v.sort();
    assert!(v.len() >= 9, "fixtures missing in {}", root.display());
    v
}

struct Expected {
    ids: Vec<u32>,
    logits: Vec<Vec<f32>>,
    mix: f64,
}

fn expected(dir: &Path) -> Expected {
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    Expected {
        ids: v["input_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect(),
        logits: v["logits"]
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
            .collect(),
        mix: v.get("mix").and_then(|m| m.as_f64()).unwrap_or(1.0),
    }
}

fn load(dir: &Path, mix: f64) -> Model {
    let mut m = Model::load(dir, DType::F32, &Device::Cpu).unwrap();
    m.mix = mix;
    m
}

#[test]
fn logits_match_the_python_reference() {
    for dir in fixtures() {
        let e = expected(&dir);
        let m = load(&dir, e.mix);
        let logits = logits_of(&m, &e.ids);
        let diff = max_abs_diff(&logits, &e.logits);
        println!(
            "{}: max |delta logit| = {diff:.2e}",
            dir.file_name().unwrap().to_string_lossy()
        );
        assert!(diff <= 1e-4, "{}: max |delta| {diff}", dir.display());
        let scale = e.logits.iter().flatten().fold(0f32, |a, x| a.max(x.abs()));
        assert!(
            scale > 0.5,
            "fixture logits too small to be a meaningful test: {scale}"
        );
    }
}

#[test]
fn kv_cache_decoding_equals_full_recompute() {
    for dir in fixtures() {
        let e = expected(&dir);
        let m = load(&dir, e.mix);
        let full = logits_of(&m, &e.ids);
        let rows = common::cached_logits(&m, &e.ids, e.ids.len() - 3);
        let diff = max_abs_diff(&rows, &full);
        assert!(diff <= 1e-4, "{}: cached vs full {diff}", dir.display());
    }
}

#[test]
fn left_padded_batch_equals_unbatched_runs() {
    for dir in fixtures() {
        let e = expected(&dir);
        let m = load(&dir, e.mix);
        let short = &e.ids[3..];
        let (row0, row1) = common::left_padded_batch_logits(&m, &e.ids, short);
        assert!(
            max_abs_diff(&row0, &logits_of(&m, &e.ids)) <= 1e-4,
            "{}",
            dir.display()
        );
        let d = max_abs_diff(&row1, &logits_of(&m, short));
        assert!(d <= 1e-4, "{}: padded row differs by {d}", dir.display());
    }
}

#[test]
fn every_trainable_tensor_of_a_format_a_model_gets_a_gradient() {
    let root = common::fixtures_root().join("tiny");
    for case in [
        "diff_double_subln_gqa",
        "diff_split_subln_gqa",
        "diff_double_nosubln_mqa_bias",
    ] {
        let dir = root.join(case);
        let e = expected(&dir);
        let names = common::assert_every_tensor_gets_a_gradient(&dir, &e.ids, case);
        assert!(names.iter().any(|n| n.ends_with("lambda_q2")));
    }
}

/// Loss and the gradient norm of every tensor after one forward/backward, against torch
/// autograd through the PyTorch format-A reference (tests/fixtures/tiny/*/gradients.json):
/// within 1e-4 relative. The loss is the trainer's (`train::nll_sum`, fused cross-entropy).
#[test]
fn loss_and_gradient_norms_match_torch_autograd() {
    let root = common::fixtures_root().join("tiny");
    for case in [
        "diff_double_subln_gqa",
        "diff_split_subln_gqa",
        "diff_double_nosubln_mqa_bias",
    ] {
        let dir = root.join(case);
        let g: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("gradients.json")).unwrap())
                .unwrap();
        let ids: Vec<u32> = g["input_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect();
        let (m, vars) = Model::load_trainable(&dir, &Device::Cpu).unwrap();
        // The trainer's own loss (fused cross-entropy over the positions with a target).
        let sample = diffattn::train::data::Sample {
            input_ids: ids.clone(),
            labels: ids.iter().map(|&t| t as i64).collect(),
        };
        let batch = diffattn::train::data::collate(&[&sample], 0);
        let loss =
            (diffattn::train::nll_sum(&m, &batch, None).unwrap() / batch.n_targets as f64).unwrap();
        let ours = loss.to_scalar::<f32>().unwrap() as f64;
        let theirs = g["loss"].as_f64().unwrap();
        assert!(
            ((ours - theirs) / theirs).abs() <= 1e-4,
            "{case}: loss {ours} vs {theirs}"
        );
        let grads = loss.backward().unwrap();
        let norms = g["grad_norms"].as_object().unwrap();
        assert_eq!(norms.len(), vars.len(), "{case}: same trainable tensors");
        let mut worst = 0f64;
        for (name, var) in &vars {
            let expected = norms[name]
                .as_f64()
                .unwrap_or_else(|| panic!("{case}: {name} not in fixture"));
            let got = grads
                .get(var)
                .unwrap()
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .sqrt()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap() as f64;
            let rel = (got - expected).abs() / expected.max(1e-12);
            worst = worst.max(rel);
            assert!(
                rel <= 1e-4,
                "{case}: grad norm of {name}: {got} vs {expected} (rel {rel:.2e})"
            );
        }
        println!("{case}: loss {ours:.6} (torch {theirs:.6}), worst relative grad-norm error {worst:.2e}");
    }
}

/// Batched generation with left padding: every row's greedy continuation equals its
/// unbatched run, with and without the KV cache.
#[test]
fn batched_generation_rows_equal_unbatched_runs() {
    use diffattn::generate::{generate, generate_batch, Sampling};
    for case in [
        "llama_gqa",
        "diff_double_subln_gqa",
        "diff_split_subln_gqa",
        "diffllama_h8_kv2",
    ] {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures/tiny")
            .join(case);
        let m = load(&dir, 1.0);
        let prompts = vec![vec![1u32, 5, 9, 13, 2, 7], vec![30, 11], vec![42, 3, 8, 19]];
        for cache in [true, false] {
            let batch = generate_batch(
                &m,
                &prompts,
                8,
                &Sampling::default(),
                &[],
                cache,
                &mut |_, _| {},
            )
            .unwrap();
            for (p, g) in prompts.iter().zip(&batch) {
                let alone =
                    generate(&m, p, 8, &Sampling::default(), &[], cache, &mut |_| {}).unwrap();
                assert_eq!(g.ids, alone.ids, "{case} (cache {cache}): prompt {p:?}");
                assert_eq!(g.ids.len(), 8);
            }
        }
    }
}

/// The two attention paths: a model whose weights track gradients runs the composed,
/// differentiable ops; a plain model runs the fused inference kernel (`model::attend`). Both
/// on a left-padded batch of two rows (masking, GQA, every layout), against each other and the
/// Python reference.
#[test]
fn differentiable_and_fused_inference_paths_agree() {
    for dir in fixtures() {
        let e = expected(&dir);
        let fused = load(&dir, e.mix);
        let (mut tracked, _vars) = Model::load_trainable(&dir, &Device::Cpu).unwrap();
        tracked.mix = e.mix;
        let t = e.ids.len();
        let pad = 2;
        let mut padded = vec![0u32; pad];
        padded.extend(&e.ids[pad..]);
        let key_mask = vec![vec![1u8; t], (0..t).map(|j| u8::from(j >= pad)).collect()];
        let positions: Vec<u32> = (0..t as u32)
            .chain((0..t).map(|j| j.saturating_sub(pad) as u32))
            .collect();
        let ids = Tensor::new(
            [e.ids.as_slice(), &padded].concat().as_slice(),
            &Device::Cpu,
        )
        .unwrap()
        .reshape((2, t))
        .unwrap();
        let pos = Tensor::from_vec(positions, (2, t), &Device::Cpu).unwrap();
        let run = |m: &Model| {
            let mask = m.mask(2, t, 0, Some(&key_mask)).unwrap();
            m.forward_full(&ids, &pos, Some(&mask), None, None).unwrap()
        };
        let (a, b) = (run(&fused), run(&tracked));
        let rows = |t: &Tensor| t.flatten_to(1).unwrap().to_vec2::<f32>().unwrap();
        let d = max_abs_diff(&rows(&a), &rows(&b));
        assert!(d <= 1e-5, "{}: paths differ by {d}", dir.display());
        let row0 = a.get(0).unwrap().to_vec2::<f32>().unwrap();
        assert!(max_abs_diff(&row0, &e.logits) <= 1e-4, "{}", dir.display());
    }
}
