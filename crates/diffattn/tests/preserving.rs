//! `--preserving-mirror`: the converted model computes the source's logits at step 0 and one
//! optimizer step (AdamW, no weight decay, so only gradients move parameters) changes every
//! lambda vector and every negative q/k row. `--zero-init`, by contrast, is a stationary
//! point: the same step leaves the whole negative branch untouched.

use std::path::{Path, PathBuf};

mod common;

use candle_core::{DType, Device, Tensor, D};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use common::{logits, max_abs_diff, tiny as fixture};
use diffattn::axolotl::DtypeChoice;
use diffattn::convert::{self, ConvertOptions, Init, Layout, Source};
use diffattn::model::Model;

fn options(init: Init) -> ConvertOptions {
    ConvertOptions {
        layout: Layout::DoubleHeads,
        init,
        sublayer_norm: false,
        seed: 3,
        dtype: DtypeChoice::Keep,
        max_shard_bytes: u64::MAX,
        overwrite: false,
    }
}

fn convert_to(src_dir: &Path, out: &Path, init: Init) {
    let src = Source::from_dir(src_dir).unwrap();
    let plan = convert::plan(&src, &options(init)).unwrap();
    convert::execute(&src, &plan, out, None, &|_| {}).unwrap();
}

/// One AdamW step (lr 1e-3, no weight decay) of next-token cross-entropy on `ids`; returns
/// (name, before, after) of every parameter.
fn one_step(dir: &Path, ids: &[u32]) -> Vec<(String, Vec<f32>, Vec<f32>)> {
    let (m, vars) = Model::load_trainable(dir, &Device::Cpu).unwrap();
    let before: Vec<Vec<f32>> = vars
        .iter()
        .map(|(_, v)| {
            v.as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        })
        .collect();
    let t = Tensor::new(ids, &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let s = ids.len();
    let logits = m
        .forward(&t)
        .unwrap()
        .narrow(1, 0, s - 1)
        .unwrap()
        .squeeze(0)
        .unwrap();
    let targets = Tensor::new(&ids[1..], &Device::Cpu)
        .unwrap()
        .unsqueeze(1)
        .unwrap();
    let loss = candle_nn::ops::log_softmax(&logits, D::Minus1)
        .unwrap()
        .gather(&targets, 1)
        .unwrap()
        .mean_all()
        .unwrap()
        .neg()
        .unwrap();
    let params = ParamsAdamW {
        lr: 1e-3,
        weight_decay: 0.0,
        ..Default::default()
    };
    let mut opt = AdamW::new(vars.iter().map(|(_, v)| v.clone()).collect(), params).unwrap();
    opt.backward_step(&loss).unwrap();
    vars.iter()
        .zip(before)
        .map(|((n, v), b)| {
            (
                n.clone(),
                b,
                v.as_tensor()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap(),
            )
        })
        .collect()
}

/// For every layer: (all lambda vectors changed, every negative q row changed, every negative
/// k row changed).
fn negative_branch_changes(
    steps: &[(String, Vec<f32>, Vec<f32>)],
    h_d: usize,
    kv_d: usize,
    cols: usize,
) -> Vec<(bool, bool, bool)> {
    let find = |n: &str| {
        steps
            .iter()
            .find(|(name, ..)| name == n)
            .unwrap_or_else(|| panic!("{n}"))
    };
    let rows_changed = |n: &str, first_row: usize| {
        let (_, b, a) = find(n);
        b[first_row * cols..]
            .chunks(cols)
            .zip(a[first_row * cols..].chunks(cols))
            .all(|(rb, ra)| rb != ra)
    };
    let layers = steps
        .iter()
        .filter(|(n, ..)| n.ends_with("lambda_q1"))
        .count();
    (0..layers)
        .map(|l| {
            let p = format!("model.layers.{l}.self_attn.");
            let lambdas = ["lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2"]
                .iter()
                .all(|v| {
                    let (_, b, a) = find(&format!("{p}{v}"));
                    b != a
                });
            (
                lambdas,
                rows_changed(&format!("{p}q_proj.weight"), h_d),
                rows_changed(&format!("{p}k_proj.weight"), kv_d),
            )
        })
        .collect()
}

#[test]
fn preserving_mirror_keeps_logits_and_learns() {
    let ids = [1u32, 5, 9, 13, 2, 7, 30, 11, 42, 3];
    for case in ["llama_gqa", "llama_mqa_tied_bias"] {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("p");
        convert_to(&fixture(case), &out, Init::PreservingMirror);
        preserves_and_learns(case, &fixture(case), &out, &ids);
    }
}

/// The conversion in `out` of `src` computes its logits within 1e-4 on `ids`, and one step
/// changes every lambda vector and every negative q/k row.
fn preserves_and_learns(case: &str, src: &Path, out: &Path, ids: &[u32]) {
    let max = max_abs_diff(&logits(src, ids), &logits(out, ids));
    assert!(max <= 1e-4, "{case}: step-0 logits differ by {max}");
    let cfg = Model::load(out, DType::F32, &Device::Cpu).unwrap().config;
    let (hd, kvd) = (
        cfg.num_attention_heads * cfg.head_dim,
        cfg.num_key_value_heads * cfg.head_dim,
    );
    let steps = one_step(out, ids);
    for (l, &(lam, q, k)) in negative_branch_changes(&steps, hd, kvd, cfg.hidden_size)
        .iter()
        .enumerate()
    {
        assert!(lam && q && k, "{case} layer {l}: lambda vectors changed {lam}, negative q rows {q}, negative k rows {k}");
    }
}

/// A copy of the checkpoint in `src` with every tensor rounded to bf16 (a bf16 source, as most
/// released checkpoints are).
fn bf16_copy(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for entry in std::fs::read_dir(src).unwrap() {
        let p = entry.unwrap().path();
        if p.extension().is_some_and(|e| e == "json") {
            std::fs::copy(&p, dst.join(p.file_name().unwrap())).unwrap();
        }
    }
    let ck = diffattn::checkpoint::Checkpoint::open(src).unwrap();
    let bf = diffattn::dtype::DType::BF16;
    let data: Vec<(String, Vec<usize>, Vec<u8>)> = ck
        .names()
        .map(|n| {
            let info = ck.info(n).unwrap();
            let v = ck.to_f32(n).unwrap();
            (
                n.to_string(),
                info.shape.clone(),
                diffattn::dtype::from_f32(&v, bf),
            )
        })
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView)> = data
        .iter()
        .map(|(n, s, b)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::BF16, s.clone(), b)
                    .unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, &dst.join("model.safetensors")).unwrap();
}

/// Written in bf16 (from a bf16 source), the conversion folds an exact power of two into
/// `o_proj` and stores mirrored lambda vectors: the logits stay within f32 rounding of the
/// source's, where folding 1/(1 − λ) and rounding it to bf16 moved them by ~1e-1 on SmolLM2.
#[test]
fn preserving_mirror_in_bf16_is_exact_and_learns() {
    let ids = [1u32, 5, 9, 13, 2, 7, 30, 11, 42, 3];
    for case in ["llama_gqa", "llama_mqa_tied_bias"] {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("bf16");
        bf16_copy(&fixture(case), &src);
        let out = tmp.path().join("p");
        convert_to(&src, &out, Init::PreservingMirror);
        let ck = diffattn::checkpoint::Checkpoint::open(&out).unwrap();
        let info = ck.info("model.layers.0.self_attn.o_proj.weight").unwrap();
        assert_eq!(info.dtype, diffattn::dtype::DType::BF16);
        for l in 0..2 {
            let li = ck
                .to_f32(&format!("model.layers.{l}.self_attn.lambda_init"))
                .unwrap()[0];
            assert!(
                li == 0.5 || li == 0.75,
                "{case} layer {l}: lambda_init {li}"
            );
        }
        preserves_and_learns(case, &src, &out, &ids);
        // compare judges a half-precision pair by its tokens unless given a tolerance.
        use diffattn::compare::Criterion;
        let crit = |a: &Path, b: &Path, dt, tol| Criterion::for_dirs(a, b, dt, tol).unwrap();
        assert_eq!(crit(&src, &out, DType::F32, None), Criterion::Greedy);
        assert_eq!(
            crit(&src, &out, DType::F32, Some(1e-4)),
            Criterion::MaxAbs(1e-4)
        );
        let f32_pair = (fixture(case), tmp.path().join("p32"));
        convert_to(&f32_pair.0, &f32_pair.1, Init::PreservingMirror);
        assert_eq!(
            crit(&f32_pair.0, &f32_pair.1, DType::F32, None),
            Criterion::MaxAbs(1e-4)
        );
        assert_eq!(
            crit(&f32_pair.0, &f32_pair.1, DType::BF16, None),
            Criterion::Greedy
        );
    }
}

#[test]
fn zero_init_is_a_stationary_start() {
    let ids = [1u32, 5, 9, 13, 2, 7, 30, 11, 42, 3];
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("z");
    convert_to(&fixture("llama_gqa"), &out, Init::Zero);
    let cfg = Model::load(&out, DType::F32, &Device::Cpu).unwrap().config;
    let (hd, kvd) = (
        cfg.num_attention_heads * cfg.head_dim,
        cfg.num_key_value_heads * cfg.head_dim,
    );
    let steps = one_step(&out, &ids);
    for (l, &(lam, q, k)) in negative_branch_changes(&steps, hd, kvd, cfg.hidden_size)
        .iter()
        .enumerate()
    {
        assert!(
            !lam && !q && !k,
            "layer {l}: zero-init moved ({lam}, {q}, {k})"
        );
    }
    // ...while the rest of the model does learn.
    let (_, b, a) = steps
        .iter()
        .find(|(n, ..)| n == "model.layers.0.mlp.up_proj.weight")
        .unwrap();
    assert_ne!(b, a);
}

/// The same on the real SmolLM2 (imported from its GGUF) with a real sentence.
#[test]
fn preserving_mirror_on_smollm2() {
    if std::env::var("DIFF_TRANSFORMER_SKIP_REAL_MODEL").as_deref() == Ok("1") {
        return;
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/fetch-smollm2.sh");
    let out = std::process::Command::new("bash")
        .arg(&script)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let gguf = PathBuf::from(String::from_utf8(out.stdout).unwrap().trim());
    let tmp = tempfile::tempdir().unwrap();
    let hf = tmp.path().join("hf");
    diffattn::gguf::import_gguf(&gguf, &hf, diffattn::dtype::DType::F32, false, &|_| {}).unwrap();
    let conv = tmp.path().join("p");
    convert_to(&hf, &conv, Init::PreservingMirror);
    let codec = diffattn::generate::TextCodec::load(&hf).unwrap();
    let ids = codec
        .encode("Differential attention subtracts two softmax maps to cancel the noise that ordinary attention spreads over irrelevant tokens.")
        .unwrap();
    let a = logits(&hf, &ids);
    let b = logits(&conv, &ids);
    let max = max_abs_diff(&a, &b);
    println!("SmolLM2 --preserving-mirror: step-0 max |delta logit| {max:.2e}");
    assert!(max <= 1e-4, "{max}");
    let steps = one_step(&conv, &ids);
    let changes = negative_branch_changes(&steps, 1152 / 2, 384 / 2, 576);
    assert_eq!(changes.len(), 30);
    for (l, &(lam, q, k)) in changes.iter().enumerate() {
        assert!(lam && q && k, "layer {l}: ({lam}, {q}, {k})");
    }
    // The common case: a bf16 source converted in bf16.
    let hf16 = tmp.path().join("hf-bf16");
    diffattn::gguf::import_gguf(&gguf, &hf16, diffattn::dtype::DType::BF16, false, &|_| {})
        .unwrap();
    let conv16 = tmp.path().join("p-bf16");
    convert_to(&hf16, &conv16, Init::PreservingMirror);
    let max16 = max_abs_diff(&logits(&hf16, &ids), &logits(&conv16, &ids));
    println!("SmolLM2 bf16 --preserving-mirror: step-0 max |delta logit| {max16:.2e}");
    assert!(max16 <= 1e-4, "bf16: {max16}");
}
