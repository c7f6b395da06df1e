//! Every family against transformers (tests/fixtures/families, made by
//! tools/make_family_fixtures.py): our forward ≤ 1e-4 (f32) on prompts longer than the
//! sliding windows; cached decoding past the window = full recompute; a left-padded batch =
//! unbatched runs; zero-init and preserving-mirror conversions keep the source's logits; each
//! converted model is written in a format that expresses it, and every trainable tensor of it
//! gets a gradient.

use std::path::{Path, PathBuf};

mod common;

use candle_core::{DType, Device, Tensor};
use common::{
    cached_logits, expected_logits, left_padded_batch_logits, logits, logits_in, logits_of,
};
use diffattn::axolotl::DtypeChoice;
use diffattn::convert::{self, ConvertOptions, Init, Layout, Source};
use diffattn::model::Model;

const CASES: [&str; 5] = [
    "mistral_window",
    "qwen2_window",
    "qwen2_full",
    "qwen3_qk_norm",
    "gemma3_sliding",
];

fn family(case: &str) -> PathBuf {
    common::fixtures_root().join("families").join(case)
}

fn ids(dir: &Path) -> Vec<u32> {
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    v["input_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// Max |a - b|; NaN anywhere counts as infinitely far (a NaN must never pass).
fn dist(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .flat_map(|(x, y)| {
            assert_eq!(x.len(), y.len());
            x.iter().zip(y).map(|(p, q)| {
                let d = (p - q).abs();
                if d.is_nan() {
                    f32::INFINITY
                } else {
                    d
                }
            })
        })
        .fold(0.0, f32::max)
}

fn load(dir: &Path) -> Model {
    Model::load(dir, DType::F32, &Device::Cpu).unwrap()
}

#[test]
fn each_family_matches_transformers() {
    for case in CASES {
        let dir = family(case);
        let ours = logits(&dir, &ids(&dir));
        let d = dist(&ours, &expected_logits(&dir));
        eprintln!("{case}: max |ours - transformers| = {d:.2e}");
        assert!(d <= 1e-4, "{case}: max |ours - transformers| = {d}");
    }
}

/// The windows bind: the same models with the window ignored are far from transformers
/// (so the check above could fail).
#[test]
fn the_sliding_windows_bind_in_the_fixtures() {
    for case in ["mistral_window", "qwen2_window", "gemma3_sliding"] {
        let src = family(case);
        let tmp = tempfile::tempdir().unwrap();
        for entry in std::fs::read_dir(&src).unwrap() {
            let p = entry.unwrap().path();
            std::fs::copy(&p, tmp.path().join(p.file_name().unwrap())).unwrap();
        }
        let cfg_path = tmp.path().join("config.json");
        let mut cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
        cfg["sliding_window"] = serde_json::json!(1000);
        std::fs::write(&cfg_path, cfg.to_string()).unwrap();
        let d = dist(&logits(tmp.path(), &ids(&src)), &expected_logits(&src));
        assert!(
            d > 1e-2,
            "{case}: without its window the model is still within {d}"
        );
    }
}

#[test]
fn cached_decoding_past_the_window_equals_full_recompute() {
    for case in CASES {
        let dir = family(case);
        let ids = ids(&dir);
        let m = load(&dir);
        // A prefill shorter than every window; decoding then runs past it.
        let rows = cached_logits(&m, &ids, 3);
        let d = dist(&rows, &logits_of(&m, &ids));
        assert!(d <= 1e-4, "{case}: cached vs full {d}");
    }
}

#[test]
fn left_padded_batch_equals_unbatched_runs() {
    for case in CASES {
        let dir = family(case);
        let m = load(&dir);
        let long = ids(&dir);
        let (row0, row1) = left_padded_batch_logits(&m, &long, &long[5..]);
        assert!(dist(&row0, &logits_of(&m, &long)) <= 1e-4, "{case}: row 0");
        let d = dist(&row1, &logits_of(&m, &long[5..]));
        assert!(d <= 1e-4, "{case}: padded row differs by {d}");
    }
}

fn options(layout: Layout, init: Init, sublayer_norm: bool) -> ConvertOptions {
    ConvertOptions {
        layout,
        init,
        sublayer_norm,
        seed: 5,
        dtype: DtypeChoice::Keep,
        max_shard_bytes: u64::MAX,
        overwrite: false,
    }
}

fn convert_to(src: &Path, out: &Path, o: &ConvertOptions) -> convert::Plan {
    let source = Source::from_dir(src).unwrap();
    let plan = convert::plan(&source, o).unwrap();
    convert::execute(&source, &plan, out, None, &|_| {}).unwrap();
    plan
}

fn config_of(dir: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap()
}

#[test]
fn preserving_conversions_keep_the_source_logits() {
    for case in CASES {
        let src = family(case);
        let ids = ids(&src);
        let reference = logits(&src, &ids);
        for init in [Init::Zero, Init::PreservingMirror] {
            let tmp = tempfile::tempdir().unwrap();
            let out = tmp.path().join("out");
            convert_to(&src, &out, &options(Layout::DoubleHeads, init, false));
            let d = dist(&logits(&out, &ids), &reference);
            assert!(d <= 1e-4, "{case} {init:?}: converted vs source {d}");
        }
    }
}

/// Format A only where a Llama config expresses the source; every other source in its
/// family's own format, and `export` refuses that with the reason.
#[test]
fn each_source_gets_a_format_that_expresses_it() {
    for (case, model_type, class) in [
        (
            "mistral_window",
            "mistral-differential",
            "MistralDifferentialForCausalLM",
        ),
        (
            "qwen2_window",
            "qwen2-differential",
            "Qwen2DifferentialForCausalLM",
        ),
        (
            "qwen2_full",
            "llama-differential",
            "LlamaDifferentialForCausalLM",
        ),
        (
            "qwen3_qk_norm",
            "qwen3-differential",
            "Qwen3DifferentialForCausalLM",
        ),
        (
            "gemma3_sliding",
            "gemma3_text-differential",
            "Gemma3DifferentialForCausalLM",
        ),
    ] {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("out");
        let plan = convert_to(
            &family(case),
            &out,
            &options(Layout::DoubleHeads, Init::Random, true),
        );
        let cfg = config_of(&out);
        assert_eq!(cfg["model_type"], model_type, "{case}");
        assert_eq!(cfg["architectures"][0], class, "{case}");
        assert_eq!(cfg["sublayer_norm"], true, "{case}");
        let summary = plan.summary();
        assert!(
            summary.contains(&format!("format: {model_type}")),
            "{case}: {summary}"
        );
        if model_type != "llama-differential" {
            assert!(
                summary.contains("a Llama config cannot express"),
                "{case}: {summary}"
            );
            let err = diffattn::export::export(
                &out,
                &tmp.path().join("b"),
                diffattn::export::Format::DiffLlama,
                false,
                &|_| {},
            )
            .unwrap_err()
            .to_string();
            assert!(
                err.contains("cannot be exported") && err.contains(model_type),
                "{case}: {err}"
            );
        }
    }
}

/// Qwen2 without a window as format A: `attention_bias: true` and explicit zero o biases
/// (named in the plan), so that a Llama-config loader builds the same model.
#[test]
fn qwen2_as_format_a_carries_its_biases() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let plan = convert_to(
        &family("qwen2_full"),
        &out,
        &options(Layout::DoubleHeads, Init::Mirror, true),
    );
    let cfg = config_of(&out);
    assert_eq!(cfg["attention_bias"], true);
    assert!(
        plan.summary()
            .contains("o_proj.bias = 0 [32] in each of the 2 layers"),
        "{}",
        plan.summary()
    );
    let st = std::fs::read(out.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&st).unwrap();
    for l in 0..2 {
        let b = st
            .tensor(&format!("model.layers.{l}.self_attn.o_proj.bias"))
            .unwrap();
        assert_eq!(b.shape(), &[32]);
        assert!(b.data().iter().all(|&x| x == 0));
        let q = st
            .tensor(&format!("model.layers.{l}.self_attn.q_proj.bias"))
            .unwrap();
        assert_eq!(
            q.shape(),
            &[64],
            "double-heads q bias: [positive; negative]"
        );
    }
}

/// The format-A conversion of qwen2_full read by a PyTorch format-A forward built from a
/// Llama config (expected_format_a.json, tools/make_family_fixtures.py --bin): our runtime
/// reads our checkpoint as that loader does.
#[test]
fn qwen2_format_a_is_read_by_a_llama_config_loader_as_we_read_it() {
    let src = family("qwen2_full");
    let e = src.join("expected_format_a.json");
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&e).unwrap()).unwrap();
    assert_eq!(v["conversion"][0], "--mirror-weights");
    let reference = logits_in(&e);
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    // The CLI's defaults: sub-layer norm on, seed 42.
    let mut o = options(Layout::DoubleHeads, Init::Mirror, true);
    o.seed = 42;
    convert_to(&src, &out, &o);
    let d = dist(&logits(&out, &ids(&src)), &reference);
    assert!(d <= 1e-4, "ours vs the PyTorch format-A reader: {d}");
}

/// The same conversion as `--format diffllama` read by transformers' own
/// DiffLlamaForCausalLM (expected_diffllama.json): ours reads it alike.
#[test]
fn qwen2_as_diffllama_is_read_by_transformers_as_we_read_it() {
    let src = family("qwen2_full");
    let e = src.join("expected_diffllama.json");
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&e).unwrap()).unwrap();
    assert_eq!(v["conversion"][2], "diffllama");
    let reference = logits_in(&e);
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let source = Source::from_dir(&src).unwrap();
    let mut o = options(Layout::DoubleHeads, Init::Mirror, true);
    o.seed = 42;
    let plan = convert::plan(&source, &o).unwrap();
    diffattn::pipeline::convert_to(
        &source,
        &plan,
        &out,
        None,
        diffattn::export::Format::DiffLlama,
        &|_| {},
    )
    .unwrap();
    assert_eq!(config_of(&out)["model_type"], "diffllama");
    let d = dist(&logits(&out, &ids(&src)), &reference);
    assert!(d <= 1e-4, "ours vs transformers' DiffLlama: {d}");
}

#[test]
fn every_trainable_tensor_of_each_converted_family_gets_a_gradient() {
    for case in CASES {
        for layout in [Layout::DoubleHeads, Layout::SplitHeads] {
            let tmp = tempfile::tempdir().unwrap();
            let out = tmp.path().join("out");
            let src = family(case);
            convert_to(&src, &out, &options(layout, Init::Random, true));
            let what = format!("{case} {layout:?}");
            let names = common::assert_every_tensor_gets_a_gradient(&out, &ids(&src), &what);
            assert!(names.iter().any(|n| n.ends_with("lambda_q2")), "{case}");
        }
    }
}

/// `--format diffllama` (the pipeline's format B) is refused for a source only its family's
/// format expresses, with the reason, and nothing is written.
#[test]
fn diffllama_is_refused_for_family_formats() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let source = Source::from_dir(&family("qwen3_qk_norm")).unwrap();
    let plan = convert::plan(&source, &options(Layout::DoubleHeads, Init::Random, true)).unwrap();
    let err = diffattn::pipeline::convert_to(
        &source,
        &plan,
        &out,
        None,
        diffattn::export::Format::DiffLlama,
        &|_| {},
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("--format diffllama cannot express"), "{err}");
    assert!(
        err.contains("q_norm/k_norm") && err.contains("qwen3-differential"),
        "{err}"
    );
    assert!(!out.exists());
    assert_eq!(
        std::fs::read_dir(tmp.path()).unwrap().count(),
        0,
        "no scratch left"
    );
}

/// A copy of a family fixture with config.json edited by `edit` and its tensors by `tensors`.
fn edited(
    case: &str,
    edit: impl FnOnce(&mut serde_json::Value),
    tensors: impl FnOnce(&mut std::collections::HashMap<String, Tensor>),
) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    let src = family(case);
    let mut cfg = config_of(&src);
    edit(&mut cfg);
    std::fs::write(tmp.path().join("config.json"), cfg.to_string()).unwrap();
    let mut w =
        candle_core::safetensors::load(src.join("model.safetensors"), &Device::Cpu).unwrap();
    tensors(&mut w);
    candle_core::safetensors::save(&w, tmp.path().join("model.safetensors")).unwrap();
    tmp
}

fn load_err(dir: &Path) -> String {
    Model::load(dir, DType::F32, &Device::Cpu)
        .unwrap_err()
        .to_string()
}

fn convert_err(dir: &Path) -> String {
    let source = match Source::from_dir(dir) {
        Ok(s) => s,
        Err(e) => return e.to_string(),
    };
    convert::plan(&source, &options(Layout::DoubleHeads, Init::Random, true))
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default()
}

/// Qwen2/Qwen3 read `sliding_window` only with `use_sliding_window` (their config classes
/// null it otherwise), whatever `layer_types` says: such a model is full attention.
#[test]
fn qwen_windows_need_use_sliding_window() {
    let off = edited(
        "qwen2_window",
        |c| c["use_sliding_window"] = false.into(),
        |_| {},
    );
    let full = edited(
        "qwen2_window",
        |c| {
            c["layer_types"] =
                serde_json::json!(["full_attention", "full_attention", "full_attention"])
        },
        |_| {},
    );
    let ids = ids(&family("qwen2_window"));
    let a = logits(off.path(), &ids);
    assert!(dist(&a, &logits(full.path(), &ids)) <= 1e-6);
    assert!(dist(&a, &expected_logits(&family("qwen2_window"))) > 1e-2);
    let yes = edited(
        "qwen2_window",
        |c| c["use_sliding_window"] = "yes".into(),
        |_| {},
    );
    assert!(load_err(yes.path()).contains("`use_sliding_window`"));
}

/// A tensor the family's block does not have, or a bias it must have that is missing, is
/// refused by load and by convert, naming the tensor: a checkpoint never runs as another
/// family (a Qwen3 labelled Llama would silently drop its q/k norms).
#[test]
fn tensors_the_family_does_not_have_are_refused() {
    let as_llama = edited(
        "qwen3_qk_norm",
        |c| {
            c["architectures"] = serde_json::json!(["LlamaForCausalLM"]);
            c["model_type"] = "llama".into();
        },
        |_| {},
    );
    for err in [load_err(as_llama.path()), convert_err(as_llama.path())] {
        assert!(
            err.contains("k_norm.weight` is not part of a LlamaForCausalLM"),
            "{err}"
        );
    }
    let o_bias = edited(
        "qwen2_full",
        |_| {},
        |w| {
            w.insert(
                "model.layers.0.self_attn.o_proj.bias".into(),
                Tensor::full(0.5f32, 32, &Device::Cpu).unwrap(),
            );
        },
    );
    for err in [load_err(o_bias.path()), convert_err(o_bias.path())] {
        assert!(
            err.contains("o_proj.bias` is not part of a Qwen2ForCausalLM"),
            "{err}"
        );
    }
    let no_q_bias = edited(
        "qwen2_full",
        |_| {},
        |w| {
            w.remove("model.layers.1.self_attn.q_proj.bias");
        },
    );
    for err in [load_err(no_q_bias.path()), convert_err(no_q_bias.path())] {
        assert!(err.contains("q_proj.bias` is missing"), "{err}");
    }
}

/// Numbers that would make an unusable model or NaN are refused by key: no positions, a
/// per-layer-type RoPE base that is not a number (never replaced by the default), a query
/// scale outside f32.
#[test]
fn family_numbers_are_refused_by_key() {
    for (case, edit, key) in [
        (
            "mistral_window",
            Box::new(|c: &mut serde_json::Value| c["max_position_embeddings"] = 0.into())
                as Box<dyn FnOnce(&mut serde_json::Value)>,
            "`max_position_embeddings`",
        ),
        (
            "gemma3_sliding",
            Box::new(|c: &mut serde_json::Value| {
                c["rope_parameters"]["sliding_attention"]["rope_theta"] = "x".into()
            }),
            "`rope_parameters.sliding_attention.rope_theta`",
        ),
        (
            "gemma3_sliding",
            Box::new(|c: &mut serde_json::Value| c["query_pre_attn_scalar"] = 1e-300.into()),
            "`query_pre_attn_scalar`",
        ),
        (
            "qwen3_qk_norm",
            Box::new(|c: &mut serde_json::Value| c["max_window_layers"] = (-1).into()),
            "`max_window_layers`",
        ),
    ] {
        let dir = edited(case, edit, |_| {});
        let err = load_err(dir.path());
        assert!(err.contains(key), "{case}: {err}");
        assert!(convert_err(dir.path()).contains(key), "{case}");
    }
}

/// A model whose weights hold a NaN never passes as preserved: `compare` reports a NaN
/// maximum and the count of non-finite logits (f32::max used to drop the NaN and report 0),
/// and `generate` refuses to pick a token from NaN logits instead of printing nothing.
#[test]
fn nan_logits_are_reported_never_preserved() {
    use diffattn::generate::{generate, Sampling, TextCodec};
    let src = edited("qwen3_qk_norm", |_| {}, |_| {});
    let nan = edited(
        "qwen3_qk_norm",
        |_| {},
        |w| {
            w.insert(
                "model.layers.1.self_attn.q_norm.weight".into(),
                Tensor::full(f32::NAN, 12, &Device::Cpu).unwrap(),
            );
        },
    );
    for d in [src.path(), nan.path()] {
        diffattn_testutil::write_word_tokenizer(d, 32).unwrap();
    }
    let (a, b) = (load(src.path()), load(nan.path()));
    let codec = TextCodec::load(src.path()).unwrap();
    let r =
        diffattn::compare::compare(&a, &b, &codec, &["the time of the world".into()], 4).unwrap();
    assert!(
        r[0].max_abs_logit_diff.is_nan(),
        "{}",
        r[0].max_abs_logit_diff
    );
    assert_eq!(r[0].non_finite_logits.0, 0);
    assert!(r[0].non_finite_logits.1 > 0);
    assert!(!r[0].preserved());
    let same =
        diffattn::compare::compare(&a, &a, &codec, &["the time of the world".into()], 4).unwrap();
    assert!(same[0].preserved(), "the check can pass");
    let ids = codec.encode("the time of the world").unwrap();
    let err = generate(&b, &ids, 4, &Sampling::default(), &[], true, &mut |_| {})
        .unwrap_err()
        .to_string();
    assert!(err.contains("are NaN or infinite"), "{err}");
}

/// A source weight holding a NaN, or one beyond f16's range with `fp16: true`, is refused by
/// `convert`, naming the tensor (with the count, or the largest value); nothing is written
/// (both used to be copied silently, as NaN or ±inf).
#[test]
fn non_finite_and_overflowing_weights_are_refused_by_convert() {
    let name = "model.layers.0.mlp.up_proj.weight";
    let with = |x: f32| {
        edited(
            "qwen3_qk_norm",
            |_| {},
            move |w| {
                let t = &w[name];
                let mut v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                v[7] = x;
                let shape = t.dims().to_vec();
                w.insert(
                    name.into(),
                    Tensor::from_vec(v, shape, &Device::Cpu).unwrap(),
                );
            },
        )
    };
    for (x, dtype, needles) in [
        (
            f32::NAN,
            DtypeChoice::Keep,
            vec!["holds 1 NaN or infinite values"],
        ),
        (
            f32::INFINITY,
            DtypeChoice::BF16,
            vec!["holds 1 NaN or infinite values"],
        ),
        (
            1e5,
            DtypeChoice::F16,
            vec!["does not fit f16", "1e5", "65504"],
        ),
    ] {
        let src = with(x);
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("out");
        let source = Source::from_dir(src.path()).unwrap();
        let mut o = options(Layout::DoubleHeads, Init::Random, true);
        o.dtype = dtype;
        let plan = convert::plan(&source, &o).unwrap();
        let err = convert::execute(&source, &plan, &out, None, &|_| {})
            .unwrap_err()
            .to_string();
        assert!(err.contains(name), "{err}");
        for n in needles {
            assert!(err.contains(n), "{err}");
        }
        assert!(!out.exists());
    }
    // The same model with 1e5 converts to bf16 (its range holds it).
    let src = with(1e5);
    let tmp = tempfile::tempdir().unwrap();
    let source = Source::from_dir(src.path()).unwrap();
    let mut o = options(Layout::DoubleHeads, Init::Random, true);
    o.dtype = DtypeChoice::BF16;
    let plan = convert::plan(&source, &o).unwrap();
    convert::execute(&source, &plan, &tmp.path().join("out"), None, &|_| {}).unwrap();
}
