//! Conversion to format A (`llama-differential`) on tiny checkpoints built in the test:
//! exact values against the source and the contract of docs/spec.md §3-4.

use std::path::Path;

use diffattn::axolotl::DtypeChoice;
use diffattn::checkpoint::Checkpoint;
use diffattn::config::lambda_init;
use diffattn::convert::{self, ConvertOptions, Init, Layout, Source};
use diffattn::dtype::DType;
use diffattn::Error;
use diffattn_testutil::TinyLlama;

fn options(layout: Layout, init: Init, sublayer_norm: bool) -> ConvertOptions {
    ConvertOptions {
        layout,
        init,
        sublayer_norm,
        seed: 7,
        dtype: DtypeChoice::Keep,
        max_shard_bytes: u64::MAX,
        overwrite: false,
    }
}

fn convert_tiny(
    tiny: &TinyLlama,
    opts: &ConvertOptions,
    root: &Path,
) -> (Checkpoint, Checkpoint, serde_json::Value) {
    let src_dir = root.join("src");
    if !src_dir.exists() {
        tiny.write(&src_dir, 1).unwrap();
    }
    let out_dir = root.join("out");
    let _ = std::fs::remove_dir_all(&out_dir);
    let src = Source::from_dir(&src_dir).unwrap();
    let plan = convert::plan(&src, opts).unwrap();
    convert::execute(&src, &plan, &out_dir, None, &|_| {}).unwrap();
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out_dir.join("config.json")).unwrap())
            .unwrap();
    (
        Checkpoint::open(&src_dir).unwrap(),
        Checkpoint::open(&out_dir).unwrap(),
        cfg,
    )
}

fn geometries() -> Vec<(&'static str, TinyLlama)> {
    vec![
        ("H4/Hkv2", TinyLlama::default()),
        (
            "H4/Hkv1 (MQA)",
            TinyLlama {
                num_key_value_heads: 1,
                ..Default::default()
            },
        ),
        (
            "H6/Hkv3",
            TinyLlama {
                hidden_size: 24,
                num_attention_heads: 6,
                num_key_value_heads: 3,
                ..Default::default()
            },
        ),
        (
            "head_dim 6 != D/H 4",
            TinyLlama {
                head_dim: Some(6),
                ..Default::default()
            },
        ),
        (
            "attention_bias",
            TinyLlama {
                attention_bias: true,
                ..Default::default()
            },
        ),
        (
            "tied",
            TinyLlama {
                tie_word_embeddings: true,
                ..Default::default()
            },
        ),
    ]
}

fn attn(l: usize, name: &str) -> String {
    format!("model.layers.{l}.self_attn.{name}")
}

#[test]
fn lambda_init_matches_the_golden_table() {
    // docs/spec.md §2 golden values.
    let golden = [
        (0, 0.200000),
        (1, 0.355509),
        (2, 0.470713),
        (3, 0.556058),
        (4, 0.619283),
        (7, 0.726526),
        (15, 0.793335),
        (31, 0.799945),
    ];
    for (l, v) in golden {
        assert!(
            (lambda_init(l) - v).abs() < 5e-7,
            "layer {l}: {} vs {v}",
            lambda_init(l)
        );
    }
}

#[test]
fn double_heads_keep_source_rows_bit_for_bit_for_every_init() {
    for (what, tiny) in geometries() {
        let (h, kv, d) = (
            tiny.num_attention_heads,
            tiny.num_key_value_heads,
            tiny.head_dim(),
        );
        for init in [Init::Random, Init::Zero, Init::Mirror] {
            let tmp = tempfile::tempdir().unwrap();
            let (src, out, cfg) =
                convert_tiny(&tiny, &options(Layout::DoubleHeads, init, true), tmp.path());
            for l in 0..tiny.num_hidden_layers {
                for (proj, rows) in [("q_proj", h * d), ("k_proj", kv * d)] {
                    for suffix in ["weight", "bias"] {
                        let name = attn(l, &format!("{proj}.{suffix}"));
                        let Some(info) = src.info(&name) else {
                            assert!(!tiny.attention_bias || suffix == "weight");
                            continue;
                        };
                        let cols = if suffix == "weight" {
                            tiny.hidden_size
                        } else {
                            1
                        };
                        let mut expected_shape = info.shape.clone();
                        expected_shape[0] *= 2;
                        assert_eq!(
                            out.info(&name).unwrap().shape,
                            expected_shape,
                            "{what} {name}"
                        );
                        let s = src.bytes(&name).unwrap();
                        let o = out.bytes(&name).unwrap();
                        assert_eq!(
                            &o[..s.len()],
                            s,
                            "{what} {init:?} {name}: positive rows differ"
                        );
                        let neg = out.to_f32(&name).unwrap()[rows * cols..].to_vec();
                        match init {
                            Init::Zero => assert!(neg.iter().all(|&x| x == 0.0), "{what} {name}"),
                            Init::Mirror => assert_eq!(&o[s.len()..], s, "{what} {name}: mirror"),
                            Init::Random if suffix == "bias" => {
                                assert!(neg.iter().all(|&x| x == 0.0))
                            }
                            Init::PreservingMirror => unreachable!("not part of this loop"),
                            Init::Random => {
                                let (mean, std, _) = convert::stats(&neg);
                                assert!(
                                    mean.abs() < 0.01 && (std - 0.02).abs() < 0.008,
                                    "{what} {name}: mean {mean} std {std}"
                                );
                            }
                        }
                    }
                }
                // v_proj and o_proj untouched.
                for proj in ["v_proj.weight", "o_proj.weight"] {
                    assert_eq!(
                        src.bytes(&attn(l, proj)).unwrap(),
                        out.bytes(&attn(l, proj)).unwrap()
                    );
                }
                let li = out.to_f32(&attn(l, "lambda_init")).unwrap();
                assert!(out.info(&attn(l, "lambda_init")).unwrap().shape.is_empty());
                let expected = if init == Init::Zero {
                    0.0
                } else {
                    lambda_init(l) as f32
                };
                assert_eq!(li, vec![expected], "{what} layer {l}");
                for lname in ["lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2"] {
                    let v = out.to_f32(&attn(l, lname)).unwrap();
                    assert_eq!(v.len(), d);
                    if init == Init::Zero {
                        assert!(v.iter().all(|&x| x == 0.0));
                    } else {
                        assert!(
                            v.iter().all(|&x| x != 0.0 && x.abs() < 0.6),
                            "{lname}: {v:?}"
                        );
                    }
                }
                assert_eq!(out.to_f32(&attn(l, "subln.weight")).unwrap(), vec![1.0; d]);
            }
            // Every non-attention tensor keeps its name and bytes; tied stays tied.
            for name in src.names() {
                if !name.contains("self_attn.q_proj") && !name.contains("self_attn.k_proj") {
                    assert_eq!(
                        src.bytes(name).unwrap(),
                        out.bytes(name).unwrap(),
                        "{what} {name}"
                    );
                }
            }
            assert_eq!(
                out.info("lm_head.weight").is_some(),
                !tiny.tie_word_embeddings,
                "{what}"
            );
            let extra = tiny.num_hidden_layers * (5 + 1);
            assert_eq!(out.names().count(), src.names().count() + extra, "{what}");
            assert_eq!(cfg["model_type"], "llama-differential");
            assert_eq!(cfg["architectures"][0], "LlamaDifferentialForCausalLM");
            assert_eq!(cfg["split_heads"], false);
            assert_eq!(cfg["sublayer_norm"], true);
            assert_eq!(cfg["zero_init"], init == Init::Zero);
            assert_eq!(cfg["mirror_weights"], init == Init::Mirror);
            assert_eq!(
                cfg["custom_unknown_field"]["kept"][2], 3,
                "unknown fields preserved"
            );
        }
    }
}

#[test]
fn split_heads_copy_q_k_and_permute_o_proj_columns() {
    for (what, tiny) in geometries() {
        let tmp = tempfile::tempdir().unwrap();
        if tiny.num_key_value_heads % 2 != 0 {
            tiny.write(&tmp.path().join("src"), 1).unwrap();
            let src = Source::from_dir(&tmp.path().join("src")).unwrap();
            let err = convert::plan(&src, &options(Layout::SplitHeads, Init::Random, true))
                .err()
                .unwrap();
            let msg = err.to_string();
            assert!(matches!(err, Error::OddHeads { .. }), "{what}: {msg}");
            assert!(
                msg.contains(&format!(
                    "num_attention_heads = {}",
                    tiny.num_attention_heads
                )),
                "{msg}"
            );
            assert!(
                msg.contains(&format!(
                    "num_key_value_heads = {}",
                    tiny.num_key_value_heads
                )),
                "{msg}"
            );
            continue;
        }
        let (src, out, cfg) = convert_tiny(
            &tiny,
            &options(Layout::SplitHeads, Init::Random, true),
            tmp.path(),
        );
        let (h, d, dm) = (tiny.num_attention_heads, tiny.head_dim(), tiny.hidden_size);
        for l in 0..tiny.num_hidden_layers {
            for proj in ["q_proj.weight", "k_proj.weight", "v_proj.weight"] {
                assert_eq!(
                    src.bytes(&attn(l, proj)).unwrap(),
                    out.bytes(&attn(l, proj)).unwrap(),
                    "{what} {proj}"
                );
            }
            let so = src.to_f32(&attn(l, "o_proj.weight")).unwrap();
            let oo = out.to_f32(&attn(l, "o_proj.weight")).unwrap();
            let cols = h * d;
            for r in 0..dm {
                for j in 0..h / 2 {
                    for c in 0..d {
                        // new block (j, first half) = old block j; (j, second half) = old block j + H/2
                        assert_eq!(oo[r * cols + 2 * j * d + c], so[r * cols + j * d + c]);
                        assert_eq!(
                            oo[r * cols + 2 * j * d + d + c],
                            so[r * cols + (j + h / 2) * d + c]
                        );
                    }
                }
            }
            assert_eq!(
                out.to_f32(&attn(l, "subln.weight")).unwrap(),
                vec![1.0; 2 * d]
            );
            assert_eq!(
                out.to_f32(&attn(l, "lambda_init")).unwrap(),
                vec![lambda_init(l) as f32]
            );
        }
        assert_eq!(cfg["split_heads"], true);
    }
}

#[test]
fn no_sublayer_norm_writes_no_subln_and_flags_it() {
    let tmp = tempfile::tempdir().unwrap();
    let (_, out, cfg) = convert_tiny(
        &TinyLlama::default(),
        &options(Layout::DoubleHeads, Init::Zero, false),
        tmp.path(),
    );
    assert!(out.names().all(|n| !n.contains("subln")));
    assert_eq!(cfg["sublayer_norm"], false);
}

#[test]
fn conversion_is_byte_reproducible_and_seed_dependent() {
    let tiny = TinyLlama::default();
    let tmp = tempfile::tempdir().unwrap();
    tiny.write(&tmp.path().join("src"), 3).unwrap();
    let src = Source::from_dir(&tmp.path().join("src")).unwrap();
    let run = |seed: u64, name: &str| {
        let mut o = options(Layout::DoubleHeads, Init::Random, true);
        o.seed = seed;
        let plan = convert::plan(&src, &o).unwrap();
        let out = tmp.path().join(name);
        convert::execute(&src, &plan, &out, None, &|_| {}).unwrap();
        std::fs::read(out.join("model.safetensors")).unwrap()
    };
    let a = run(11, "a");
    let b = run(11, "b");
    let c = run(12, "c");
    assert_eq!(a, b, "same seed must give identical bytes");
    assert_ne!(a, c, "another seed must give other random rows");
}

#[test]
fn bf16_output_rounds_source_values_to_nearest_even() {
    let tiny = TinyLlama::default();
    let tmp = tempfile::tempdir().unwrap();
    let mut o = options(Layout::DoubleHeads, Init::Mirror, true);
    o.dtype = DtypeChoice::BF16;
    let (src, out, cfg) = convert_tiny(&tiny, &o, tmp.path());
    assert_eq!(cfg["torch_dtype"], "bfloat16");
    let name = attn(0, "q_proj.weight");
    assert_eq!(out.info(&name).unwrap().dtype, DType::BF16);
    let s = src.to_f32(&name).unwrap();
    let v = out.to_f32(&name).unwrap();
    for (i, x) in s.iter().enumerate() {
        let r = half::bf16::from_f32(*x).to_f32();
        assert_eq!(v[i], r);
        assert_eq!(v[i + s.len()], r);
    }
    // lambda_init is stored in the model dtype, as the plugin does (layer 1: 0.355509 -> 0.35546875).
    assert_eq!(
        out.to_f32(&attn(1, "lambda_init")).unwrap(),
        vec![0.35546875]
    );
}

#[test]
fn sharded_output_holds_the_same_tensors() {
    let tiny = TinyLlama {
        num_hidden_layers: 3,
        ..Default::default()
    };
    let tmp = tempfile::tempdir().unwrap();
    let (_, single, _) = convert_tiny(
        &tiny,
        &options(Layout::DoubleHeads, Init::Mirror, true),
        tmp.path(),
    );
    let mut o = options(Layout::DoubleHeads, Init::Mirror, true);
    o.max_shard_bytes = 4000;
    let src = Source::from_dir(&tmp.path().join("src")).unwrap();
    let plan = convert::plan(&src, &o).unwrap();
    let out = tmp.path().join("sharded");
    convert::execute(&src, &plan, &out, None, &|_| {}).unwrap();
    assert!(out.join("model.safetensors.index.json").is_file());
    assert!(!out.join("model.safetensors").exists());
    let shards = std::fs::read_dir(&out)
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with("model-0")
        })
        .count();
    assert!(shards > 2, "{shards} shards");
    let sharded = Checkpoint::open(&out).unwrap();
    let names: Vec<&str> = single.names().collect();
    assert_eq!(names, sharded.names().collect::<Vec<_>>());
    for n in names {
        assert_eq!(single.bytes(n).unwrap(), sharded.bytes(n).unwrap(), "{n}");
    }
}

#[test]
fn plan_reports_parameters_and_kv_cache() {
    let tiny = TinyLlama::default(); // D 16, H 4, Hkv 2, d 4, L 2
    let tmp = tempfile::tempdir().unwrap();
    tiny.write(&tmp.path().join("src"), 1).unwrap();
    let src = Source::from_dir(&tmp.path().join("src")).unwrap();
    let plan = convert::plan(&src, &options(Layout::DoubleHeads, Init::Random, true)).unwrap();
    // + per layer: q2 16*16, k2 8*16, 4 lambda vectors of 4, lambda_init, subln 4
    assert_eq!(
        plan.params_after - plan.params_before,
        2 * (256 + 128 + 16 + 1 + 4)
    );
    assert_eq!(plan.kv_bytes_per_token_before, 2 * 2 * 8 * 4);
    assert_eq!(plan.kv_bytes_per_token_after, 2 * 3 * 8 * 4);
    assert_eq!(plan.value_head_dim, 4);
    let split = convert::plan(&src, &options(Layout::SplitHeads, Init::Random, true)).unwrap();
    assert_eq!(split.value_head_dim, 8);
    assert_eq!(split.diff_heads, 2);
    assert_eq!(
        split.kv_bytes_per_token_after,
        split.kv_bytes_per_token_before
    );
    let s = plan.summary();
    assert!(s.contains("H = 4, Hkv = 2, d = 4"), "{s}");
}

#[test]
fn flag_combinations_are_refused() {
    assert!(convert::init_from_flags(true, true, false)
        .unwrap_err()
        .to_string()
        .contains("--zero-init and --mirror-weights"));
    let e = options(Layout::SplitHeads, Init::Zero, true)
        .validate()
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("--zero-init") && e.contains("--split-heads"),
        "{e}"
    );
    let e = options(Layout::SplitHeads, Init::Mirror, true)
        .validate()
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("--mirror-weights") && e.contains("--split-heads"),
        "{e}"
    );
}

/// A source truncated after it was opened (another program rewriting it during the run) is
/// reported as the source's fault, naming its file, and nothing is written (the copy from the
/// lost pages used to surface as a failed write of the output).
#[test]
fn a_source_truncated_during_the_conversion_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let src_dir = tmp.path().join("src");
    std::fs::create_dir(&src_dir).unwrap();
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tiny/llama_gqa");
    for e in std::fs::read_dir(fixture).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), src_dir.join(e.file_name())).unwrap();
    }
    let src = Source::from_dir(&src_dir).unwrap();
    let plan = convert::plan(&src, &options(Layout::DoubleHeads, Init::Random, true)).unwrap();
    let st = src_dir.join("model.safetensors");
    let len = std::fs::metadata(&st).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&st)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    let out = tmp.path().join("out");
    let e = convert::execute(&src, &plan, &out, None, &|_| {})
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("src/model.safetensors") && e.contains("truncated while being read"),
        "{e}"
    );
    assert!(!out.exists());
}
