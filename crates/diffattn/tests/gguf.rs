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
