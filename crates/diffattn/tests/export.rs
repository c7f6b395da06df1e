//! Exact export between format A (`llama-differential`) and format B (`diffllama`): our
//! exports of the format-A fixtures are byte-identical to the ones transformers'
//! DiffLlamaForCausalLM was shown to read (tools/make_fixtures.py), logits survive round trips,
//! and what cannot be expressed is refused.

mod common;

use std::path::Path;

use common::{expected_logits, fixtures_root as fixtures, max_abs_diff as max_diff};

const IDS: [u32; 10] = [1, 5, 9, 13, 2, 7, 30, 11, 42, 3];
use diffattn::checkpoint::Checkpoint;
use diffattn::export::{export, Format};

#[test]
fn exports_are_what_transformers_read_and_keep_the_logits() {
    for case in [
        "diff_double_subln_gqa",
        "diff_split_subln_gqa",
        "diff_double_head_dim_llama3",
    ] {
        let src = fixtures().join("tiny").join(case);
        let committed = fixtures()
            .join("exported")
            .join(format!("{case}_to_diffllama"));
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("b");
        export(&src, &out, Format::DiffLlama, false, &|_| {}).unwrap();
        assert!(
            std::fs::read(out.join("model.safetensors")).unwrap()
                == std::fs::read(committed.join("model.safetensors")).unwrap(),
            "{case}: our export differs from the one transformers was checked on"
        );
        let cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap())
                .unwrap();
        assert_eq!(cfg["model_type"], "diffllama");
        assert_eq!(cfg["architectures"][0], "DiffLlamaForCausalLM");
        assert_eq!(cfg["lambda_std_dev"], 0.1);
        assert!(cfg.get("split_heads").is_none());
        let ours = common::logits(&out, &IDS);
        let d_tf = max_diff(&ours, &expected_logits(&committed));
        let d_a = max_diff(&ours, &expected_logits(&src));
        println!("{case}: B vs transformers {d_tf:.2e}, B vs format A reference {d_a:.2e}");
        assert!(d_tf <= 1e-4 && d_a <= 1e-4, "{case}: {d_tf} {d_a}");
        let ck = Checkpoint::open(&out).unwrap();
        assert!(ck
            .names()
            .all(|n| !n.contains("lambda_init") && !n.contains("subln")));
    }
}

#[test]
fn double_heads_become_2h_heads_with_duplicated_values() {
    let src = fixtures().join("tiny/diff_double_subln_gqa");
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("b");
    export(&src, &out, Format::DiffLlama, false, &|_| {}).unwrap();
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["num_attention_heads"], 8);
    assert_eq!(cfg["num_key_value_heads"], 4);
    let (a, b) = (
        Checkpoint::open(&src).unwrap(),
        Checkpoint::open(&out).unwrap(),
    );
    let v = "model.layers.0.self_attn.v_proj.weight";
    let va = a.bytes(v).unwrap();
    assert!(b.bytes(v).unwrap() == [va, va].concat().as_slice());
    for p in ["q_proj.weight", "k_proj.weight", "lambda_q1", "lambda_k2"] {
        let n = format!("model.layers.1.self_attn.{p}");
        assert!(
            a.bytes(&n).unwrap() == b.bytes(&n).unwrap(),
            "{n} is an identity of the mapping"
        );
    }
}

#[test]
fn round_trips_keep_logits_and_identity_tensors() {
    let tmp = tempfile::tempdir().unwrap();
    // A -> B -> A
    for case in ["diff_split_subln_gqa", "diff_double_subln_gqa"] {
        let a = fixtures().join("tiny").join(case);
        let b = tmp.path().join(format!("{case}_b"));
        let a2 = tmp.path().join(format!("{case}_a2"));
        export(&a, &b, Format::DiffLlama, false, &|_| {}).unwrap();
        export(&b, &a2, Format::LlamaDifferential, false, &|_| {}).unwrap();
        let d = max_diff(&common::logits(&a, &IDS), &common::logits(&a2, &IDS));
        assert!(d <= 1e-5, "{case} A->B->A: {d}");
        let (ca, ca2) = (
            Checkpoint::open(&a).unwrap(),
            Checkpoint::open(&a2).unwrap(),
        );
        for n in [
            "model.layers.0.self_attn.q_proj.weight",
            "model.embed_tokens.weight",
            "model.layers.1.mlp.up_proj.weight",
        ] {
            assert!(ca.bytes(n).unwrap() == ca2.bytes(n).unwrap(), "{case}: {n}");
        }
        if case.contains("split") {
            let v = "model.layers.0.self_attn.v_proj.weight";
            assert!(ca.bytes(v).unwrap() == ca2.bytes(v).unwrap());
        }
    }
    // B -> A -> B
    for case in ["diffllama_h4_kv2", "diffllama_h8_kv2", "diffllama_head_dim"] {
        let b = fixtures().join("tiny").join(case);
        let a = tmp.path().join(format!("{case}_a"));
        let b2 = tmp.path().join(format!("{case}_b2"));
        export(&b, &a, Format::LlamaDifferential, false, &|_| {}).unwrap();
        export(&a, &b2, Format::DiffLlama, false, &|_| {}).unwrap();
        let la = common::logits(&a, &IDS);
        assert!(
            max_diff(&la, &expected_logits(&b)) <= 1e-4,
            "{case}: B->A logits"
        );
        let d = max_diff(&common::logits(&b, &IDS), &common::logits(&b2, &IDS));
        assert!(d <= 1e-5, "{case} B->A->B: {d}");
        let (cb, cb2) = (
            Checkpoint::open(&b).unwrap(),
            Checkpoint::open(&b2).unwrap(),
        );
        for n in cb.names().filter(|n| !n.contains("o_proj")) {
            assert!(cb.bytes(n).unwrap() == cb2.bytes(n).unwrap(), "{case}: {n}");
        }
        let ca = Checkpoint::open(&a).unwrap();
        let w = ca.to_f32("model.layers.1.self_attn.subln.weight").unwrap();
        assert!(w
            .iter()
            .all(|&x| x == (1.0 - diffattn::config::lambda_init(1)) as f32));
    }
}

#[test]
fn stored_lambda_init_is_absorbed_exactly() {
    // zero-init stores lambda_init = 0; format B uses the formula.
    let v = [vec![0.0f32; 4], vec![0.0; 4], vec![0.0; 4], vec![0.0; 4]];
    let [q1, k1, q2, k2] = diffattn::export::absorb_lambda_init(v, 0.0, 0.355509).unwrap();
    let dot = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f32>();
    let lambda = dot(&q1, &k1).exp() - dot(&q2, &k2).exp() + 0.355509;
    assert!(lambda.abs() < 1e-6, "{lambda}");
    let v = [
        vec![0.1f32, -0.2],
        vec![0.3, 0.1],
        vec![0.2, 0.05],
        vec![-0.1, 0.4],
    ];
    let before = dot(&v[0], &v[1]).exp() - dot(&v[2], &v[3]).exp() + 0.7;
    let [q1, k1, q2, k2] = diffattn::export::absorb_lambda_init(v, 0.7, 0.2).unwrap();
    let after = dot(&q1, &k1).exp() - dot(&q2, &k2).exp() + 0.2;
    assert!((before - after).abs() < 1e-6, "{before} {after}");
}

#[test]
fn refusals() {
    let tmp = tempfile::tempdir().unwrap();
    let err = |src: &Path, to| {
        export(src, &tmp.path().join("x"), to, false, &|_| {})
            .unwrap_err()
            .to_string()
    };
    // A Llama is not differential.
    let e = err(&fixtures().join("tiny/llama_gqa"), Format::DiffLlama);
    assert!(e.contains("not a differential model"), "{e}");
    // Same format.
    let e = err(&fixtures().join("tiny/diffllama_h4_kv2"), Format::DiffLlama);
    assert!(e.contains("already"), "{e}");
    // No sub-layer norm cannot be expressed in diffllama.
    let e = err(
        &fixtures().join("tiny/diff_double_nosubln_mqa_bias"),
        Format::DiffLlama,
    );
    assert!(
        e.contains("without a sub-layer norm") && e.contains("no off switch"),
        "{e}"
    );
    assert!(!tmp.path().join("x").exists());
}
