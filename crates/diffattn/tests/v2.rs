//! Differential Transformer V2 against its PyTorch reference (tests/fixtures/v2, made by
//! tools/make_v2_fixtures.py: V2 attention written from its definition, checked there against
//! unilm's formulation, run inside transformers' model of each family): our forward ≤ 1e-4;
//! cached decoding = full recompute; a left-padded batch = unbatched runs; every tensor gets
//! a gradient. Our `convert --variant v2`: the preserving start keeps the source's logits
//! (transformers') ≤ 1e-4, in f32 and bf16; the KV cache is the source's, byte for byte.

use std::path::{Path, PathBuf};

mod common;

use candle_core::{DType, Device};
use common::{
    cached_logits, expected_logits, ids_tensor, left_padded_batch_logits, logits, logits_of,
};
use diffattn::axolotl::DtypeChoice;
use diffattn::convert::{self, ConvertOptions, Init, Layout, Source};
use diffattn::model::{AttentionKind, KvCache, Model};

const CASES: [&str; 5] = [
    "llama_gqa",
    "mistral_window",
    "qwen2_window",
    "qwen3_qk_norm",
    "gemma3_sliding",
];

fn v2(case: &str) -> PathBuf {
    common::fixtures_root().join("v2").join(case)
}

fn source(case: &str) -> PathBuf {
    match case {
        "llama_gqa" => common::tiny(case),
        _ => common::fixtures_root().join("families").join(case),
    }
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

/// Max |a - b|; NaN counts as infinitely far.
fn dist(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .flat_map(|(x, y)| x.iter().zip(y).map(|(p, q)| (p - q).abs()))
        .map(|d| if d.is_nan() { f32::INFINITY } else { d })
        .fold(0.0, f32::max)
}

fn load(dir: &Path) -> Model {
    Model::load(dir, DType::F32, &Device::Cpu).unwrap()
}

fn options(init: Init, dtype: DtypeChoice) -> ConvertOptions {
    ConvertOptions {
        layout: Layout::V2,
        init,
        sublayer_norm: false,
        seed: 7,
        dtype,
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

#[test]
fn v2_matches_its_pytorch_reference() {
    for case in CASES {
        let dir = v2(case);
        let m = load(&dir);
        assert_eq!(m.config.attention, AttentionKind::V2, "{case}");
        let ours = logits_of(&m, &ids(&dir));
        let d = dist(&ours, &expected_logits(&dir));
        eprintln!("{case}: max |ours - reference| = {d:.2e}");
        assert!(d <= 1e-4, "{case}: max |ours - reference| = {d}");
        // The fixture is not its source in disguise: the negative heads act.
        let far = dist(&ours, &expected_logits(&source(case)));
        assert!(far > 1e-2, "{case}: V2 fixture within {far} of its source");
    }
}

#[test]
fn v2_cached_decoding_and_padded_batches_equal_full_recompute() {
    for case in CASES {
        let dir = v2(case);
        let ids = ids(&dir);
        let m = load(&dir);
        let full = logits_of(&m, &ids);
        let d = dist(&cached_logits(&m, &ids, 3), &full);
        assert!(d <= 1e-4, "{case}: cached vs full {d}");
        let (row0, row1) = left_padded_batch_logits(&m, &ids, &ids[5..]);
        assert!(dist(&row0, &full) <= 1e-4, "{case}: row 0");
        let d = dist(&row1, &logits_of(&m, &ids[5..]));
        assert!(d <= 1e-4, "{case}: padded row differs by {d}");
    }
}

/// The KV cache holds exactly the source's keys and values: Hkv heads of width d per layer.
#[test]
fn v2_kv_cache_is_the_sources() {
    for case in CASES {
        let src = source(case);
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("out");
        let plan = convert_to(&src, &out, &options(Init::Random, DtypeChoice::Keep));
        assert_eq!(
            plan.kv_bytes_per_token_after, plan.kv_bytes_per_token_before,
            "{case}"
        );
        let bytes = |dir: &Path| {
            let m = load(dir);
            let mut cache = KvCache::new();
            let ids = ids(&src);
            let pos = m.positions(1, ids.len(), 0).unwrap();
            let mask = m.mask(1, ids.len(), 0, None).unwrap();
            m.forward_full(&ids_tensor(&ids), &pos, Some(&mask), Some(&mut cache), None)
                .unwrap();
            cache.bytes() / ids.len()
        };
        let (ours, theirs) = (bytes(&out), bytes(&src));
        assert_eq!(ours, theirs, "{case}: KV bytes per token");
        assert_eq!(ours as u64, plan.kv_bytes_per_token_before, "{case}");
    }
}

#[test]
fn v2_preserving_conversion_keeps_the_source_logits() {
    for case in CASES {
        let src = source(case);
        let reference = expected_logits(&src);
        let ids = ids(&src);
        for dtype in [DtypeChoice::Keep, DtypeChoice::BF16] {
            let tmp = tempfile::tempdir().unwrap();
            let out = tmp.path().join("out");
            convert_to(&src, &out, &options(Init::PreservingMirror, dtype));
            let cfg: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap())
                    .unwrap();
            assert_eq!(cfg["diff_attn_variant"], "v2", "{case}");
            assert_eq!(cfg["preserving_mirror"], true, "{case}");
            assert_eq!(cfg["conversion_seed"], 7, "{case}");
            if dtype == DtypeChoice::Keep {
                let d = dist(&logits(&out, &ids), &reference);
                eprintln!("{case}: preserving V2 vs transformers' source {d:.2e}");
                assert!(d <= 1e-4, "{case}: preserving V2 vs source {d}");
            } else {
                // bf16: the converted model computes what the source rounded to bf16 computes
                // (doubling o_proj and lambda = 1/2 are exact in any dtype).
                let source_bf16 = Model::load(&src, DType::BF16, &Device::Cpu).unwrap();
                let conv_bf16 = Model::load(&out, DType::BF16, &Device::Cpu).unwrap();
                let d = dist(&logits_of(&conv_bf16, &ids), &logits_of(&source_bf16, &ids));
                assert!(d <= 1e-4, "{case}: bf16 preserving V2 vs bf16 source {d}");
            }
        }
    }
}

#[test]
fn v2_default_and_mirror_conversions_are_not_the_source() {
    let src = source("llama_gqa");
    let ids = ids(&src);
    let reference = expected_logits(&src);
    for init in [Init::Random, Init::Mirror] {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("out");
        convert_to(&src, &out, &options(init, DtypeChoice::Keep));
        let d = dist(&logits(&out, &ids), &reference);
        assert!(d > 1e-3, "{init:?}: within {d} of the source");
        // Mirror: the new head copies the source's, so q_proj rows 2i and 2i+1 agree.
        let ck = diffattn::checkpoint::Checkpoint::open(&out).unwrap();
        let q = ck.to_f32("model.layers.0.self_attn.q_proj.weight").unwrap();
        let dm = 32;
        let d_head = q.len() / dm / 8;
        let block = d_head * dm;
        let same = q[..block] == q[block..2 * block];
        assert_eq!(same, init == Init::Mirror, "{init:?}");
    }
}

#[test]
fn every_tensor_of_a_v2_model_gets_a_gradient() {
    for case in CASES {
        let names = common::assert_every_tensor_gets_a_gradient(&v2(case), &ids(&v2(case)), case);
        assert!(names.iter().any(|n| n.ends_with("lambda_proj.weight")));
    }
}

#[test]
fn v2_options_that_have_no_meaning_are_refused() {
    let src = Source::from_dir(&source("llama_gqa")).unwrap();
    let err = |o: ConvertOptions| convert::plan(&src, &o).err().unwrap().to_string();
    assert!(err(options(Init::Zero, DtypeChoice::Keep)).contains("--zero-init has no V2 form"));
    let with_norm = ConvertOptions {
        sublayer_norm: true,
        ..options(Init::Random, DtypeChoice::Keep)
    };
    assert!(err(with_norm).contains("V2 has no sub-layer norm"));
}

/// A config saying V2 with a sub-layer norm, or an unknown variant, is refused by key.
#[test]
fn v2_configs_are_checked_by_key() {
    for (key, value, needle) in [
        (
            "diff_attn_variant",
            serde_json::json!("v3"),
            "expected \"v1\" or \"v2\"",
        ),
        (
            "sublayer_norm",
            serde_json::json!(true),
            "no sub-layer norm",
        ),
        ("split_heads", serde_json::json!(true), "no split heads"),
    ] {
        let tmp = tempfile::tempdir().unwrap();
        for entry in std::fs::read_dir(v2("llama_gqa")).unwrap() {
            let p = entry.unwrap().path();
            std::fs::copy(&p, tmp.path().join(p.file_name().unwrap())).unwrap();
        }
        let path = tmp.path().join("config.json");
        let mut cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        cfg[key] = value;
        std::fs::write(&path, cfg.to_string()).unwrap();
        let e = Model::load(tmp.path(), DType::F32, &Device::Cpu)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains(key) && e.contains(needle), "{key}: {e}");
    }
}

/// `export --to diffllama` and `convert --format diffllama` refuse V2, naming why; nothing is
/// written.
#[test]
fn v2_cannot_be_written_as_diffllama() {
    let tmp = tempfile::tempdir().unwrap();
    let dst = tmp.path().join("b");
    let e = diffattn::export::export(
        &v2("llama_gqa"),
        &dst,
        diffattn::export::Format::DiffLlama,
        false,
        &|_| {},
    )
    .err()
    .unwrap()
    .to_string();
    assert!(e.contains("V2") && e.contains("diffllama"), "{e}");
    assert!(!dst.exists());
    let src = Source::from_dir(&source("llama_gqa")).unwrap();
    let plan = convert::plan(&src, &options(Init::Random, DtypeChoice::Keep)).unwrap();
    let e = diffattn::pipeline::convert_to(
        &src,
        &plan,
        &dst,
        None,
        diffattn::export::Format::DiffLlama,
        &|_| {},
    )
    .err()
    .unwrap()
    .to_string();
    assert!(e.contains("--variant v2"), "{e}");
    assert!(!dst.exists());
}
