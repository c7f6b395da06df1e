//! Fixtures for the tests of `diffattn` and `diff-transformer` (a dev-dependency only): tiny
//! random Llama checkpoints (written like transformers' `save_pretrained`: config.json +
//! model.safetensors with HF tensor names), GGUF files made from them, and word-level
//! tokenizers.

use std::collections::BTreeMap;
use std::path::Path;

use rand::SeedableRng;
use rand_distr::{Distribution, Normal};
use rand_xoshiro::Xoshiro256PlusPlus;
use serde_json::json;

use diffattn::config::write_json;
use diffattn::dtype::{self, DType};
use diffattn::error::{Error, Result};

/// Geometry of a tiny Llama.
#[derive(Debug, Clone)]
pub struct TinyLlama {
    pub hidden_size: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    /// `head_dim` written explicitly (may differ from hidden / heads).
    pub head_dim: Option<usize>,
    pub num_hidden_layers: usize,
    pub vocab_size: usize,
    pub intermediate_size: usize,
    pub attention_bias: bool,
    pub tie_word_embeddings: bool,
    pub dtype: DType,
}

impl Default for TinyLlama {
    fn default() -> Self {
        Self {
            hidden_size: 16,
            num_attention_heads: 4,
            num_key_value_heads: 2,
            head_dim: None,
            num_hidden_layers: 2,
            vocab_size: 32,
            intermediate_size: 24,
            attention_bias: false,
            tie_word_embeddings: false,
            dtype: DType::F32,
        }
    }
}

impl TinyLlama {
    /// d
    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads)
    }

    /// The config.json object.
    pub fn config(&self) -> serde_json::Value {
        let mut c = json!({
            "architectures": ["LlamaForCausalLM"],
            "attention_bias": self.attention_bias,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "hidden_act": "silu",
            "hidden_size": self.hidden_size,
            "initializer_range": 0.02,
            "intermediate_size": self.intermediate_size,
            "max_position_embeddings": 128,
            "model_type": "llama",
            "num_attention_heads": self.num_attention_heads,
            "num_hidden_layers": self.num_hidden_layers,
            "num_key_value_heads": self.num_key_value_heads,
            "rms_norm_eps": 1e-5,
            "rope_scaling": null,
            "rope_theta": 10000.0,
            "tie_word_embeddings": self.tie_word_embeddings,
            "torch_dtype": self.dtype.torch_name(),
            "vocab_size": self.vocab_size,
            "custom_unknown_field": {"kept": [1, 2, 3]}
        });
        if let Some(d) = self.head_dim {
            c["head_dim"] = json!(d);
        }
        c
    }

    /// All tensors with their shapes (HF names).
    pub fn shapes(&self) -> BTreeMap<String, Vec<usize>> {
        let (dm, h, kv, d, v, i) = (
            self.hidden_size,
            self.num_attention_heads,
            self.num_key_value_heads,
            self.head_dim(),
            self.vocab_size,
            self.intermediate_size,
        );
        let mut m = BTreeMap::new();
        m.insert("model.embed_tokens.weight".to_string(), vec![v, dm]);
        m.insert("model.norm.weight".to_string(), vec![dm]);
        if !self.tie_word_embeddings {
            m.insert("lm_head.weight".to_string(), vec![v, dm]);
        }
        for l in 0..self.num_hidden_layers {
            let p = format!("model.layers.{l}.");
            m.insert(format!("{p}input_layernorm.weight"), vec![dm]);
            m.insert(format!("{p}post_attention_layernorm.weight"), vec![dm]);
            m.insert(format!("{p}self_attn.q_proj.weight"), vec![h * d, dm]);
            m.insert(format!("{p}self_attn.k_proj.weight"), vec![kv * d, dm]);
            m.insert(format!("{p}self_attn.v_proj.weight"), vec![kv * d, dm]);
            m.insert(format!("{p}self_attn.o_proj.weight"), vec![dm, h * d]);
            if self.attention_bias {
                m.insert(format!("{p}self_attn.q_proj.bias"), vec![h * d]);
                m.insert(format!("{p}self_attn.k_proj.bias"), vec![kv * d]);
                m.insert(format!("{p}self_attn.v_proj.bias"), vec![kv * d]);
                m.insert(format!("{p}self_attn.o_proj.bias"), vec![dm]);
            }
            m.insert(format!("{p}mlp.gate_proj.weight"), vec![i, dm]);
            m.insert(format!("{p}mlp.up_proj.weight"), vec![i, dm]);
            m.insert(format!("{p}mlp.down_proj.weight"), vec![dm, i]);
        }
        m
    }

    /// Writes config.json and model.safetensors with N(0, 0.2) weights (norm weights around 1).
    pub fn write(&self, dir: &Path, seed: u64) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|source| Error::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        write_json(&dir.join("config.json"), &self.config())?;
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(seed);
        let normal = Normal::new(0.0f32, 0.2).expect("valid std");
        let mut data: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
        for (name, shape) in self.shapes() {
            let n: usize = shape.iter().product();
            let mut v: Vec<f32> = (0..n).map(|_| normal.sample(&mut rng)).collect();
            if name.ends_with("norm.weight") {
                v.iter_mut().for_each(|x| *x += 1.0);
            }
            data.push((name, shape, dtype::from_f32(&v, self.dtype)));
        }
        let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = data
            .iter()
            .map(|(n, s, b)| {
                (
                    n.clone(),
                    safetensors::tensor::TensorView::new(self.dtype.to_safetensors(), s.clone(), b)
                        .expect("consistent view"),
                )
            })
            .collect();
        let meta = std::collections::HashMap::from([("format".to_string(), "pt".to_string())]);
        let path = dir.join("model.safetensors");
        safetensors::serialize_to_file(views, Some(meta), &path).map_err(|e| Error::Safetensors {
            path,
            msg: e.to_string(),
        })
    }
}

/// Writes a GGUF file (llama.cpp layout: `blk.N.attn_q.weight`..., q/k rows permuted for
/// llama.cpp's RoPE, F32 tensors) holding the weights of the HF checkpoint in `hf_dir`, with a
/// tiny byte-level BPE vocabulary. `architecture` is written as `general.architecture`.
pub fn write_gguf_from_hf(hf_dir: &Path, gguf: &Path, architecture: &str) -> Result<()> {
    write_gguf_with(hf_dir, gguf, architecture, &[])
}

/// [`write_gguf_from_hf`] with some u32 metadata values replaced or added (`{arch}.block_count`,
/// `general.alignment`, ...),
/// to build inconsistent files for tests.
pub fn write_gguf_with(
    hf_dir: &Path,
    gguf: &Path,
    architecture: &str,
    overrides: &[(&str, u32)],
) -> Result<()> {
    use candle_core::quantized::gguf_file::{self, Value};
    use candle_core::quantized::{GgmlDType, QTensor};
    use candle_core::{Device, Tensor};

    let cfg = diffattn::config::ModelConfig::from_file(&hf_dir.join("config.json"))?;
    let dims = cfg.dims()?;
    let ck = diffattn::checkpoint::Checkpoint::open(hf_dir)?;
    let mut tensors: Vec<(String, QTensor)> = Vec::new();
    for name in ck.names() {
        let info = ck.require(name)?;
        let mut v = ck.to_f32(name)?;
        let gname = gguf_name(name);
        let cols = if info.shape.len() == 2 {
            info.shape[1]
        } else {
            1
        };
        if name.contains("q_proj") {
            v = permute_rows(&v, dims.num_attention_heads, cols);
        } else if name.contains("k_proj") {
            v = permute_rows(&v, dims.num_key_value_heads, cols);
        }
        let t = Tensor::from_vec(v, info.shape.clone(), &Device::Cpu)?;
        tensors.push((gname, QTensor::quantize(&t, GgmlDType::F32)?));
    }
    let a = architecture;
    let tokens = ["<unk>", "<s>", "</s>", "a", "b", "ab", "Ġ", "Ġa", "1"];
    let md: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String(a.into())),
        (format!("{a}.context_length"), Value::U32(128)),
        (
            format!("{a}.embedding_length"),
            Value::U32(dims.hidden_size as u32),
        ),
        (
            format!("{a}.block_count"),
            Value::U32(dims.num_hidden_layers as u32),
        ),
        (
            format!("{a}.feed_forward_length"),
            Value::U32(cfg.typed.intermediate_size as u32),
        ),
        (
            format!("{a}.attention.head_count"),
            Value::U32(dims.num_attention_heads as u32),
        ),
        (
            format!("{a}.attention.head_count_kv"),
            Value::U32(dims.num_key_value_heads as u32),
        ),
        (
            format!("{a}.attention.key_length"),
            Value::U32(dims.head_dim as u32),
        ),
        (
            format!("{a}.attention.layer_norm_rms_epsilon"),
            Value::F32(1e-5),
        ),
        (format!("{a}.rope.freq_base"), Value::F32(10000.0)),
        (
            format!("{a}.vocab_size"),
            Value::U32(cfg.typed.vocab_size as u32),
        ),
        ("tokenizer.ggml.model".into(), Value::String("gpt2".into())),
        ("tokenizer.ggml.pre".into(), Value::String("smollm".into())),
        (
            "tokenizer.ggml.tokens".into(),
            Value::Array(
                tokens
                    .iter()
                    .map(|t| Value::String(t.to_string()))
                    .collect(),
            ),
        ),
        (
            "tokenizer.ggml.token_type".into(),
            Value::Array(
                [3, 3, 3, 1, 1, 1, 1, 1, 1]
                    .iter()
                    .map(|&t| Value::I32(t))
                    .collect(),
            ),
        ),
        (
            "tokenizer.ggml.merges".into(),
            Value::Array(vec![
                Value::String("a b".into()),
                Value::String("Ġ a".into()),
            ]),
        ),
        ("tokenizer.ggml.bos_token_id".into(), Value::U32(1)),
        ("tokenizer.ggml.eos_token_id".into(), Value::U32(2)),
        ("tokenizer.ggml.add_bos_token".into(), Value::Bool(false)),
        (
            "tokenizer.chat_template".into(),
            Value::String("{{ messages }}".into()),
        ),
    ];
    let md: Vec<(String, Value)> = md
        .into_iter()
        .map(|(k, v)| match overrides.iter().find(|(o, _)| *o == k) {
            Some((_, x)) => (k, Value::U32(*x)),
            None => (k, v),
        })
        .collect();
    // Overrides of keys the file does not have otherwise (`general.alignment`) are added.
    let mut md = md;
    for (k, x) in overrides {
        if !md.iter().any(|(m, _)| m == k) {
            md.push((k.to_string(), Value::U32(*x)));
        }
    }
    let md_refs: Vec<(&str, &Value)> = md.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let t_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut f = std::fs::File::create(gguf).map_err(|source| Error::Io {
        path: gguf.to_path_buf(),
        source,
    })?;
    gguf_file::write(&mut f, &md_refs, &t_refs)?;
    Ok(())
}

fn gguf_name(hf: &str) -> String {
    match hf {
        "model.embed_tokens.weight" => return "token_embd.weight".into(),
        "model.norm.weight" => return "output_norm.weight".into(),
        "lm_head.weight" => return "output.weight".into(),
        _ => {}
    }
    let rest = hf.strip_prefix("model.layers.").expect("layer tensor");
    let (layer, rest) = rest.split_once('.').expect("layer index");
    let (kind, suffix) = rest.rsplit_once('.').expect("suffix");
    let g = match kind {
        "input_layernorm" => "attn_norm",
        "post_attention_layernorm" => "ffn_norm",
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        other => panic!("no GGUF name for {other}"),
    };
    format!("blk.{layer}.{g}.{suffix}")
}

/// llama.cpp's `permute()` from convert_hf_to_gguf.py: HF row h*d + j*d/2 + i goes to
/// GGUF row h*d + 2i + j.
pub fn permute_rows(hf: &[f32], n_head: usize, cols: usize) -> Vec<f32> {
    let d = hf.len() / cols / n_head;
    let mut out = vec![0.0; hf.len()];
    for h in 0..n_head {
        for j in 0..2 {
            for i in 0..d / 2 {
                let src = h * d + j * (d / 2) + i;
                let dst = h * d + 2 * i + j;
                out[dst * cols..(dst + 1) * cols]
                    .copy_from_slice(&hf[src * cols..(src + 1) * cols]);
            }
        }
    }
    out
}

/// Writes a word-level `tokenizer.json` with `vocab_size` ids into `dir`: `<unk>` = 0,
/// `<s>` = 1, `</s>` = 2 (special), then common lower-case English words; every other word
/// maps to `<unk>`. Enough for training tests on the tiny fixture models.
pub fn write_word_tokenizer(dir: &Path, vocab_size: usize) -> Result<()> {
    const WORDS: &str = "the a an of to and in is it that for on with as are was be by this \
        at from or not but what which one all were when we there can they has more if no \
        out so up said time about into than them only other new some could these two may \
        then do first any like now my over such our man me even most made after also did \
        many before must through back years where much your way well down should because \
        each just those people how too little state good very make world still own see \
        men work long get here between both life being under never day same another know";
    let mut vocab = serde_json::Map::new();
    for (i, t) in ["<unk>", "<s>", "</s>"].iter().enumerate() {
        vocab.insert(t.to_string(), serde_json::json!(i));
    }
    for w in WORDS.split_whitespace() {
        if vocab.len() >= vocab_size {
            break;
        }
        if !vocab.contains_key(w) {
            let id = vocab.len();
            vocab.insert(w.to_string(), serde_json::json!(id));
        }
    }
    let special = |id: u32, content: &str| {
        serde_json::json!({"id": id, "content": content, "single_word": false, "lstrip": false,
            "rstrip": false, "normalized": false, "special": true})
    };
    let tok = serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [special(0, "<unk>"), special(1, "<s>"), special(2, "</s>")],
        "normalizer": {"type": "Lowercase"},
        "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": null,
        "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}
    });
    diffattn::config::write_json(&dir.join("tokenizer.json"), &tok)?;
    diffattn::config::write_json(
        &dir.join("tokenizer_config.json"),
        &serde_json::json!({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}),
    )
}
