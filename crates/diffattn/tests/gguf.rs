//! GGUF import pieces that need no real file: name mapping and the RoPE row un-permutation.

use diffattn::gguf::{hf_tensor_name, unpermute_rows};
use diffattn_testutil::permute_rows as permute;

#[test]
fn unpermute_inverts_llama_cpp_permute() {
    let (n_head, d, cols) = (3, 8, 5);
    let hf: Vec<f32> = (0..n_head * d * cols).map(|x| x as f32).collect();
    let gguf = permute(&hf, n_head, cols);
    assert_ne!(gguf, hf);
    assert_eq!(unpermute_rows(&gguf, n_head, cols), hf);
    // Row 1 of head 0 in GGUF is HF row d/2 (the first element of the second half).
    assert_eq!(gguf[cols], hf[(d / 2) * cols]);
}

#[test]
fn tensor_names_map_to_transformers_names() {
    let cases = [
        ("token_embd.weight", "model.embed_tokens.weight"),
        ("output_norm.weight", "model.norm.weight"),
        ("output.weight", "lm_head.weight"),
        (
            "blk.0.attn_norm.weight",
            "model.layers.0.input_layernorm.weight",
        ),
        (
            "blk.12.ffn_norm.weight",
            "model.layers.12.post_attention_layernorm.weight",
        ),
        (
            "blk.3.attn_q.weight",
            "model.layers.3.self_attn.q_proj.weight",
        ),
        ("blk.3.attn_k.bias", "model.layers.3.self_attn.k_proj.bias"),
        (
            "blk.3.attn_v.weight",
            "model.layers.3.self_attn.v_proj.weight",
        ),
        (
            "blk.3.attn_output.weight",
            "model.layers.3.self_attn.o_proj.weight",
        ),
        (
            "blk.29.ffn_gate.weight",
            "model.layers.29.mlp.gate_proj.weight",
        ),
        ("blk.29.ffn_up.weight", "model.layers.29.mlp.up_proj.weight"),
        (
            "blk.29.ffn_down.weight",
            "model.layers.29.mlp.down_proj.weight",
        ),
    ];
    for (g, hf) in cases {
        assert_eq!(hf_tensor_name(g).unwrap().as_deref(), Some(hf), "{g}");
    }
    assert_eq!(hf_tensor_name("rope_freqs.weight").unwrap(), None);
    assert!(hf_tensor_name("blk.0.ssm_conv1d.weight").is_err());
}

#[test]
fn import_restores_the_hf_checkpoint_exactly() {
    use diffattn::checkpoint::Checkpoint;
    use diffattn::dtype::DType;
    use diffattn_testutil::{write_gguf_from_hf, TinyLlama};
    for tiny in [
        TinyLlama {
            tie_word_embeddings: true,
            ..Default::default()
        },
        TinyLlama {
            num_key_value_heads: 1,
            head_dim: Some(6),
            ..Default::default()
        },
    ] {
        let tmp = tempfile::tempdir().unwrap();
        let hf = tmp.path().join("hf");
        tiny.write(&hf, 9).unwrap();
        let gguf = tmp.path().join("m.gguf");
        write_gguf_from_hf(&hf, &gguf, "llama").unwrap();
        let out = tmp.path().join("imported");
        let report = diffattn::gguf::import_gguf(&gguf, &out, DType::F32, false, &|_| {}).unwrap();
        let a = Checkpoint::open(&hf).unwrap();
        let b = Checkpoint::open(&out).unwrap();
        assert_eq!(a.names().collect::<Vec<_>>(), b.names().collect::<Vec<_>>());
        for n in a.names() {
            assert_eq!(a.info(n).unwrap().shape, b.info(n).unwrap().shape, "{n}");
            assert_eq!(a.bytes(n).unwrap(), b.bytes(n).unwrap(), "{n}");
        }
        let c = &report.config;
        assert_eq!(c["tie_word_embeddings"], tiny.tie_word_embeddings);
        assert_eq!(c["num_key_value_heads"], tiny.num_key_value_heads);
        assert_eq!(c["head_dim"], tiny.head_dim());
        assert_eq!(c["architectures"][0], "LlamaForCausalLM");
        // The written config is readable by our own loader.
        diffattn::config::ModelConfig::from_file(&out.join("config.json")).unwrap();
        let tok = tokenizers::Tokenizer::from_file(out.join("tokenizer.json")).unwrap();
        let enc = tok.encode("ab a<s>1", false).unwrap();
        assert_eq!(enc.get_ids(), &[5, 7, 1, 8]);
        let tc: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(out.join("tokenizer_config.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(tc["bos_token"], "<s>");
        assert_eq!(tc["eos_token"], "</s>");
        assert_eq!(tc["add_bos_token"], false);
        assert_eq!(tc["chat_template"], "{{ messages }}");
        assert_eq!(tc["added_tokens_decoder"]["2"]["special"], true);
    }
}

// ---- Qwen2, Qwen3, Gemma 3: tiny GGUFs written here in llama.cpp's layout ----

use candle_core::quantized::gguf_file::Value as G;

/// llama.cpp tensor kind -> transformers module, per architecture (llama.cpp's
/// `gguf-py/gguf/tensor_mapping.py`), written out independently of the importer's table.
const QWEN2_NAMES: &[(&str, &str)] = &[
    ("attn_norm", "input_layernorm"),
    ("ffn_norm", "post_attention_layernorm"),
    ("attn_q", "self_attn.q_proj"),
    ("attn_k", "self_attn.k_proj"),
    ("attn_v", "self_attn.v_proj"),
    ("attn_output", "self_attn.o_proj"),
    ("ffn_gate", "mlp.gate_proj"),
    ("ffn_up", "mlp.up_proj"),
    ("ffn_down", "mlp.down_proj"),
];
const QWEN3_EXTRA: &[(&str, &str)] = &[
    ("attn_q_norm", "self_attn.q_norm"),
    ("attn_k_norm", "self_attn.k_norm"),
];
const GEMMA3_NAMES: &[(&str, &str)] = &[
    ("attn_norm", "input_layernorm"),
    ("post_attention_norm", "post_attention_layernorm"),
    ("ffn_norm", "pre_feedforward_layernorm"),
    ("post_ffw_norm", "post_feedforward_layernorm"),
    ("attn_q", "self_attn.q_proj"),
    ("attn_k", "self_attn.k_proj"),
    ("attn_v", "self_attn.v_proj"),
    ("attn_output", "self_attn.o_proj"),
    ("attn_q_norm", "self_attn.q_norm"),
    ("attn_k_norm", "self_attn.k_norm"),
    ("ffn_gate", "mlp.gate_proj"),
    ("ffn_up", "mlp.up_proj"),
    ("ffn_down", "mlp.down_proj"),
];

struct Tiny {
    arch: &'static str,
    layers: usize,
    /// D, H, Hkv, d, I
    dims: (usize, usize, usize, usize, usize),
    names: Vec<(&'static str, &'static str)>,
    qkv_bias: bool,
    tied: bool,
}

fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            ((x >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.4
        })
        .collect()
}

fn str_array(v: &[&str]) -> G {
    G::Array(v.iter().map(|s| G::String(s.to_string())).collect())
}

/// The tokenizer metadata: a byte-level vocabulary for Qwen, a SentencePiece one for Gemma.
fn tokenizer_metadata(arch: &str) -> (Vec<(String, G)>, usize) {
    if arch == "gemma3" {
        let mut tokens: Vec<String> = [
            "<pad>",
            "<eos>",
            "<bos>",
            "<unk>",
            "<mask>",
            "[multimodal]",
            "\n",
            "  ",
            "\u{2581}",
            "a",
            "b",
            "ab",
            "\u{2581}a",
            "\u{2581}ab",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let mut types = vec![3, 3, 3, 3, 3, 4, 4, 4, 1, 1, 1, 1, 1, 1];
        for b in 0..=255u8 {
            tokens.push(format!("<0x{b:02X}>"));
            types.push(6);
        }
        let n = tokens.len();
        let md = vec![
            ("tokenizer.ggml.model".into(), G::String("llama".into())),
            ("tokenizer.ggml.pre".into(), G::String("default".into())),
            (
                "tokenizer.ggml.tokens".into(),
                G::Array(tokens.into_iter().map(G::String).collect()),
            ),
            (
                "tokenizer.ggml.scores".into(),
                G::Array((0..n).map(|i| G::F32(-(i as f32))).collect()),
            ),
            (
                "tokenizer.ggml.token_type".into(),
                G::Array(types.into_iter().map(G::I32).collect()),
            ),
            ("tokenizer.ggml.bos_token_id".into(), G::U32(2)),
            ("tokenizer.ggml.eos_token_id".into(), G::U32(1)),
            ("tokenizer.ggml.unknown_token_id".into(), G::U32(3)),
            ("tokenizer.ggml.padding_token_id".into(), G::U32(0)),
            ("tokenizer.ggml.add_bos_token".into(), G::Bool(true)),
            ("tokenizer.ggml.add_eos_token".into(), G::Bool(false)),
            (
                "tokenizer.chat_template".into(),
                G::String("{{ bos_token }}{{ messages }}".into()),
            ),
        ];
        (md, n)
    } else {
        let tokens = [
            "<|endoftext|>",
            "a",
            "b",
            "ab",
            "\u{120}",
            "\u{120}a",
            "1",
            "2",
            "<think>",
        ];
        let md = vec![
            ("tokenizer.ggml.model".into(), G::String("gpt2".into())),
            ("tokenizer.ggml.pre".into(), G::String("qwen2".into())),
            ("tokenizer.ggml.tokens".into(), str_array(&tokens)),
            (
                "tokenizer.ggml.token_type".into(),
                G::Array(
                    [3, 1, 1, 1, 1, 1, 1, 1, 4]
                        .into_iter()
                        .map(G::I32)
                        .collect(),
                ),
            ),
            (
                "tokenizer.ggml.merges".into(),
                str_array(&["a b", "\u{120} a"]),
            ),
            ("tokenizer.ggml.eos_token_id".into(), G::U32(0)),
            ("tokenizer.ggml.padding_token_id".into(), G::U32(0)),
            ("tokenizer.ggml.add_bos_token".into(), G::Bool(false)),
        ];
        (md, tokens.len())
    }
}

impl Tiny {
    /// Writes the GGUF; returns HF name -> (shape, the values the import must produce).
    fn write(
        &self,
        path: &std::path::Path,
        skip: Option<&str>,
    ) -> std::collections::BTreeMap<String, (Vec<usize>, Vec<f32>)> {
        use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
        use candle_core::{Device, Tensor};
        let (dm, h, kv, d, i) = self.dims;
        let (tok_md, vocab) = tokenizer_metadata(self.arch);
        let gemma = self.arch == "gemma3";
        let shape_of = |hf: &str| -> Vec<usize> {
            match hf {
                "self_attn.q_proj" => vec![h * d, dm],
                "self_attn.k_proj" | "self_attn.v_proj" => vec![kv * d, dm],
                "self_attn.o_proj" => vec![dm, h * d],
                "self_attn.q_norm" | "self_attn.k_norm" => vec![d],
                "mlp.gate_proj" | "mlp.up_proj" => vec![i, dm],
                "mlp.down_proj" => vec![dm, i],
                _ => vec![dm],
            }
        };
        let mut all: Vec<(String, String, Vec<usize>)> = vec![
            (
                "token_embd.weight".into(),
                "model.embed_tokens.weight".into(),
                vec![vocab, dm],
            ),
            (
                "output_norm.weight".into(),
                "model.norm.weight".into(),
                vec![dm],
            ),
        ];
        if !self.tied {
            all.push((
                "output.weight".into(),
                "lm_head.weight".into(),
                vec![vocab, dm],
            ));
        }
        for l in 0..self.layers {
            for (g, hf) in &self.names {
                let shape = shape_of(hf);
                all.push((
                    format!("blk.{l}.{g}.weight"),
                    format!("model.layers.{l}.{hf}.weight"),
                    shape.clone(),
                ));
                if self.qkv_bias && matches!(*g, "attn_q" | "attn_k" | "attn_v") {
                    all.push((
                        format!("blk.{l}.{g}.bias"),
                        format!("model.layers.{l}.{hf}.bias"),
                        vec![shape[0]],
                    ));
                }
            }
        }
        let mut expected = std::collections::BTreeMap::new();
        let mut tensors = Vec::new();
        for (k, (g, hf, shape)) in all.into_iter().enumerate() {
            if skip == Some(g.as_str()) {
                continue;
            }
            let mut v = values(shape.iter().product(), k as u64 + 1);
            let mut want = v.clone();
            if gemma && hf.ends_with("norm.weight") {
                // llama.cpp's Gemma converter stores norms as 1 + w; transformers subtracts 1.
                v.iter_mut().for_each(|x| *x += 1.0);
                want = v.iter().map(|x| x - 1.0).collect();
            }
            let t = Tensor::from_vec(v, shape.clone(), &Device::Cpu).unwrap();
            tensors.push((g, QTensor::quantize(&t, GgmlDType::F32).unwrap()));
            expected.insert(hf, (shape, want));
        }
        let a = self.arch;
        let mut md: Vec<(String, G)> = vec![
            ("general.architecture".into(), G::String(a.into())),
            (format!("{a}.context_length"), G::U32(256)),
            (format!("{a}.embedding_length"), G::U32(dm as u32)),
            (format!("{a}.block_count"), G::U32(self.layers as u32)),
            (format!("{a}.feed_forward_length"), G::U32(i as u32)),
            (format!("{a}.attention.head_count"), G::U32(h as u32)),
            (format!("{a}.attention.head_count_kv"), G::U32(kv as u32)),
            (format!("{a}.attention.key_length"), G::U32(d as u32)),
            (format!("{a}.attention.value_length"), G::U32(d as u32)),
            (
                format!("{a}.attention.layer_norm_rms_epsilon"),
                G::F32(1e-6),
            ),
            (format!("{a}.rope.freq_base"), G::F32(1_000_000.0)),
        ];
        if gemma {
            md.push((format!("{a}.attention.sliding_window"), G::U32(4)));
        }
        md.extend(tok_md);
        let md_refs: Vec<(&str, &G)> = md.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let t_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let mut f = std::fs::File::create(path).unwrap();
        gguf_file::write(&mut f, &md_refs, &t_refs).unwrap();
        expected
    }
}

fn qwen2() -> Tiny {
    Tiny {
        arch: "qwen2",
        layers: 2,
        dims: (16, 4, 2, 4, 24),
        names: QWEN2_NAMES.to_vec(),
        qkv_bias: true,
        tied: false,
    }
}

fn qwen3() -> Tiny {
    Tiny {
        arch: "qwen3",
        layers: 2,
        dims: (16, 4, 2, 8, 24),
        names: QWEN2_NAMES.iter().chain(QWEN3_EXTRA).copied().collect(),
        qkv_bias: false,
        tied: true,
    }
}

fn gemma3() -> Tiny {
    Tiny {
        arch: "gemma3",
        layers: 7,
        dims: (16, 4, 1, 8, 24),
        names: GEMMA3_NAMES.to_vec(),
        qkv_bias: false,
        tied: true,
    }
}

/// Imports `tiny`; checks every tensor's name, shape and values (no row permutation, Gemma
/// norms shifted back); returns the output directory's config.json and the tempdir.
fn import_tiny(tiny: &Tiny) -> (serde_json::Value, tempfile::TempDir) {
    use diffattn::checkpoint::Checkpoint;
    use diffattn::dtype::DType;
    let tmp = tempfile::tempdir().unwrap();
    let gguf = tmp.path().join("m.gguf");
    let expected = tiny.write(&gguf, None);
    let out = tmp.path().join("imported");
    let report = diffattn::gguf::import_gguf(&gguf, &out, DType::F32, false, &|_| {}).unwrap();
    assert_eq!(report.tensors, expected.len());
    let ck = Checkpoint::open(&out).unwrap();
    let names: Vec<&str> = ck.names().collect();
    assert_eq!(
        names,
        expected.keys().map(String::as_str).collect::<Vec<_>>(),
        "{}",
        tiny.arch
    );
    for (name, (shape, want)) in &expected {
        assert_eq!(&ck.info(name).unwrap().shape, shape, "{name}");
        assert_eq!(&ck.to_f32(name).unwrap(), want, "{}: {name}", tiny.arch);
    }
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg, report.config);
    (cfg, tmp)
}

fn read_json(p: std::path::PathBuf) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

#[test]
fn qwen2_gguf_imports_with_biases_and_no_permutation() {
    let (c, tmp) = import_tiny(&qwen2());
    assert_eq!(c["architectures"][0], "Qwen2ForCausalLM");
    assert_eq!(c["model_type"], "qwen2");
    assert_eq!(c["hidden_size"], 16);
    assert_eq!(c["num_key_value_heads"], 2);
    assert_eq!(c["head_dim"], 4);
    assert_eq!(c["intermediate_size"], 24);
    assert_eq!(c["max_position_embeddings"], 256);
    assert_eq!(c["rms_norm_eps"], 1e-6);
    assert_eq!(c["rope_theta"], 1e6);
    assert_eq!(c["rope_parameters"]["rope_theta"], 1e6);
    assert_eq!(c["hidden_act"], "silu");
    assert_eq!(c["tie_word_embeddings"], false);
    assert_eq!(c["vocab_size"], 9);
    assert_eq!(c["eos_token_id"], 0);
    assert!(
        c.get("attention_bias").is_none(),
        "Qwen2Config has no attention_bias"
    );
    // Our own loader reads Qwen2 and finds the q/k/v biases it expects.
    let out = tmp.path().join("imported");
    let mc = diffattn::config::ModelConfig::from_file(&out.join("config.json")).unwrap();
    assert!(mc
        .expected_tensors()
        .unwrap()
        .contains_key("model.layers.1.self_attn.v_proj.bias"));
    // Tokenizer: transformers' Qwen2 split regex, `<think>` a plain added token.
    let tok = tokenizers::Tokenizer::from_file(out.join("tokenizer.json")).unwrap();
    let enc = tok.encode("ab a12<think><|endoftext|>", true).unwrap();
    assert_eq!(enc.get_ids(), &[3, 5, 6, 7, 8, 0]);
    assert_eq!(tok.decode(&[3, 5, 6, 7], true).unwrap(), "ab a12");
    let tc = read_json(out.join("tokenizer_config.json"));
    assert_eq!(tc["added_tokens_decoder"]["0"]["special"], true);
    assert_eq!(tc["added_tokens_decoder"]["8"]["special"], false);
    assert_eq!(tc["eos_token"], "<|endoftext|>");
}

#[test]
fn qwen3_gguf_imports_q_k_norms_and_head_dim() {
    let (c, _tmp) = import_tiny(&qwen3());
    assert_eq!(c["architectures"][0], "Qwen3ForCausalLM");
    assert_eq!(c["model_type"], "qwen3");
    assert_eq!(
        c["head_dim"], 8,
        "head_dim from attention.key_length, not hidden / heads"
    );
    assert_eq!(c["num_attention_heads"], 4);
    assert_eq!(c["attention_bias"], false);
    assert_eq!(c["tie_word_embeddings"], true);
}

#[test]
fn gemma3_gguf_imports_norms_layer_types_and_sentencepiece() {
    let (c, tmp) = import_tiny(&gemma3());
    assert_eq!(c["architectures"][0], "Gemma3ForCausalLM");
    assert_eq!(c["model_type"], "gemma3_text");
    assert_eq!(c["head_dim"], 8);
    assert_eq!(c["num_key_value_heads"], 1);
    assert_eq!(c["sliding_window"], 4);
    assert_eq!(c["rope_theta"], 1e6);
    assert_eq!(c["rope_local_base_freq"], 10000.0);
    assert_eq!(
        c["rope_parameters"]["sliding_attention"]["rope_theta"],
        10000.0
    );
    assert_eq!(c["rope_parameters"]["full_attention"]["rope_theta"], 1e6);
    assert_eq!(c["query_pre_attn_scalar"], 256);
    assert_eq!(c["hidden_activation"], "gelu_pytorch_tanh");
    assert_eq!(c["tie_word_embeddings"], true);
    assert_eq!(c["rms_norm_eps"], 1e-6);
    assert_eq!(
        (c["bos_token_id"].clone(), c["eos_token_id"].clone()),
        (2.into(), 1.into())
    );
    assert_eq!(
        (c["pad_token_id"].clone(), c["unk_token_id"].clone()),
        (0.into(), 3.into())
    );
    let types: Vec<&str> = c["layer_types"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    let mut want = vec!["sliding_attention"; 7];
    want[5] = "full_attention";
    assert_eq!(types, want);

    let out = tmp.path().join("imported");
    let tok = tokenizers::Tokenizer::from_file(out.join("tokenizer.json")).unwrap();
    let ids = |s: &str| tok.encode(s, true).unwrap().get_ids().to_vec();
    // Merges from vocabulary order: "ab" then "▁ab" (ids worked out by hand).
    assert_eq!(ids("ab ab"), vec![2, 11, 13]);
    // "  " is stored with real spaces and respelled "▁▁".
    assert_eq!(ids("a  b"), vec![2, 9, 7, 10]);
    // "\n" is a user-defined token, "<eos>" a control token.
    assert_eq!(ids("a\nb<eos>"), vec![2, 9, 6, 10, 1]);
    // Byte fallback: é = C3 A9, the byte tokens start at id 14.
    assert_eq!(ids("é"), vec![2, 14 + 0xC3, 14 + 0xA9]);
    assert_eq!(
        tok.decode(&[2, 11, 13, 6, 14 + 0xC3, 14 + 0xA9], true)
            .unwrap(),
        "ab ab\né"
    );
    let tc = read_json(out.join("tokenizer_config.json"));
    assert_eq!(tc["bos_token"], "<bos>");
    assert_eq!(tc["mask_token"], "<mask>");
    assert_eq!(tc["add_bos_token"], true);
    assert_eq!(tc["chat_template"], "{{ bos_token }}{{ messages }}");
    assert_eq!(tc["added_tokens_decoder"]["5"]["special"], false);
    assert_eq!(tc["added_tokens_decoder"]["4"]["special"], true);
    assert!(tc["added_tokens_decoder"].get("7").is_none());
    let stm = read_json(out.join("special_tokens_map.json"));
    assert_eq!(stm["eos_token"], "<eos>");
    let gc = read_json(out.join("generation_config.json"));
    assert_eq!(gc["bos_token_id"], 2);
}

#[test]
fn new_architectures_refuse_missing_tensors() {
    for (tiny, skip, needle) in [
        (
            gemma3(),
            "blk.0.post_ffw_norm.weight",
            "post_feedforward_layernorm.weight",
        ),
        (
            qwen2(),
            "blk.1.attn_q.bias",
            "model.layers.1.self_attn.q_proj.bias",
        ),
        (
            qwen3(),
            "blk.0.attn_k_norm.weight",
            "model.layers.0.self_attn.k_norm.weight",
        ),
    ] {
        let tmp = tempfile::tempdir().unwrap();
        let gguf = tmp.path().join("m.gguf");
        tiny.write(&gguf, Some(skip));
        let err = diffattn::gguf::import_gguf(
            &gguf,
            &tmp.path().join("o"),
            diffattn::dtype::DType::F32,
            false,
            &|_| {},
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("no tensor for") && err.contains(needle),
            "{err}"
        );
        assert!(err.contains("m.gguf"), "{err}");
    }
}

#[test]
fn merges_follow_vocabulary_order() {
    let toks: Vec<String> = ["a", "b", "c", "bc", "ab", "abc"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let m = diffattn::gguf::merges_from_vocab_order(&toks);
    let pairs: Vec<(&str, &str)> = m.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
    assert_eq!(
        pairs,
        vec![("b", "c"), ("a", "b"), ("ab", "c"), ("a", "bc")]
    );
}
