//! Importing a llama.cpp GGUF file as a Hugging Face model directory (`import-gguf`).
//!
//! Tensors are dequantized by candle (bit-identical to gguf-py's dequantization), one at a
//! time, and streamed into `model.safetensors`. llama.cpp stores `attn_q`/`attn_k` rows
//! permuted for its interleaved RoPE (`permute()` in llama.cpp's `convert_hf_to_gguf.py`):
//! within a head, GGUF row `2i + j` holds Hugging Face row `j * d/2 + i`; we undo that so the
//! weights fit transformers' rotate-half RoPE. The tokenizer is rebuilt from
//! `tokenizer.ggml.*` (byte-level BPE), as transformers' own GGUF loader does.

use std::borrow::Cow;
use std::cell::RefCell;
use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{Content, Value as GValue};
use candle_core::Device;
use serde_json::{json, Map, Value};

use crate::config::write_json;
use crate::dtype::{self, DType};
use crate::error::{Error, IoContext, Result};
use crate::output::{write_safetensors, PlannedTensor, StagedDir, TensorProducer};

/// GGUF `general.architecture` values we import.
pub const SUPPORTED_ARCHITECTURES: [&str; 1] = ["llama"];

/// A parsed GGUF file (header and metadata; tensor data stays on disk).
pub struct GgufFile {
    pub path: PathBuf,
    content: Content,
    file: RefCell<File>,
}

fn gguf_err(path: &Path, msg: impl Into<String>) -> Error {
    Error::Gguf {
        path: path.to_path_buf(),
        msg: msg.into(),
    }
}

impl GgufFile {
    /// Reads the header, checks the architecture and that every tensor lies inside the file.
    pub fn open(path: &Path) -> Result<Self> {
        let mut file = File::open(path).at(path)?;
        let len = file.metadata().at(path)?.len();
        // candle can panic on some malformed headers (e.g. general.alignment = 0): report those
        // as unreadable files too.
        let read =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| Content::read(&mut file)));
        let content = match read {
            Ok(r) => {
                r.map_err(|e| gguf_err(path, format!("not a readable GGUF file: {}", message(&e))))?
            }
            Err(_) => {
                return Err(gguf_err(
                    path,
                    "not a readable GGUF file: malformed header (e.g. general.alignment 0)",
                ))
            }
        };
        let g = Self {
            path: path.to_path_buf(),
            content,
            file: RefCell::new(file),
        };
        let arch = g.string("general.architecture")?;
        if !SUPPORTED_ARCHITECTURES.contains(&arch.as_str()) {
            return Err(gguf_err(
                path,
                format!(
                    "unsupported general.architecture {arch:?}; supported: {}",
                    SUPPORTED_ARCHITECTURES.join(", ")
                ),
            ));
        }
        for (name, info) in &g.content.tensor_infos {
            let elems = info.shape.elem_count();
            let bs = info.ggml_dtype.block_size();
            let bytes = (elems / bs * info.ggml_dtype.type_size()) as u64;
            let end = g.content.tensor_data_offset + info.offset + bytes;
            if end > len {
                return Err(gguf_err(
                    path,
                    format!(
                        "truncated: tensor `{name}` ends at byte {end}, but the file has {len} bytes"
                    ),
                ));
            }
        }
        Ok(g)
    }

    fn get(&self, key: &str) -> Option<&GValue> {
        self.content.metadata.get(key)
    }

    fn require(&self, key: &str) -> Result<&GValue> {
        self.get(key)
            .ok_or_else(|| gguf_err(&self.path, format!("metadata key `{key}` is missing")))
    }

    fn string(&self, key: &str) -> Result<String> {
        match self.require(key)? {
            GValue::String(s) => Ok(s.clone()),
            other => Err(gguf_err(
                &self.path,
                format!("metadata `{key}` is {other:?}, expected a string"),
            )),
        }
    }

    fn number(&self, key: &str) -> Result<Option<f64>> {
        Ok(match self.get(key) {
            None => None,
            Some(v) => Some(as_f64(v).ok_or_else(|| {
                gguf_err(
                    &self.path,
                    format!("metadata `{key}` is {v:?}, expected a number"),
                )
            })?),
        })
    }

    fn usize(&self, key: &str) -> Result<usize> {
        self.number(key)?
            .map(|v| v as usize)
            .ok_or_else(|| gguf_err(&self.path, format!("metadata key `{key}` is missing")))
    }

    fn strings(&self, key: &str) -> Result<Vec<String>> {
        match self.require(key)? {
            GValue::Array(a) => a
                .iter()
                .map(|v| match v {
                    GValue::String(s) => Ok(s.clone()),
                    other => Err(gguf_err(
                        &self.path,
                        format!("`{key}` holds {other:?}, expected strings"),
                    )),
                })
                .collect(),
            other => Err(gguf_err(
                &self.path,
                format!("`{key}` is {other:?}, expected an array"),
            )),
        }
    }

    fn bool(&self, key: &str) -> Option<bool> {
        match self.get(key) {
            Some(GValue::Bool(b)) => Some(*b),
            _ => None,
        }
    }

    /// Tensor names, sorted.
    pub fn tensor_names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.content.tensor_infos.keys().cloned().collect();
        v.sort();
        v
    }

    /// Dequantizes one tensor to f32 (row-major, PyTorch dimension order).
    pub fn dequantize(&self, name: &str) -> Result<Vec<f32>> {
        let mut f = self.file.borrow_mut();
        let q = self
            .content
            .tensor(&mut *f, name, &Device::Cpu)
            .map_err(|e| gguf_err(&self.path, format!("tensor `{name}`: {}", message(&e))))?;
        let t = q.dequantize(&Device::Cpu)?;
        Ok(t.flatten_all()?.to_vec1::<f32>()?)
    }
}

/// A candle error's message without the backtrace candle appends when RUST_BACKTRACE is set.
fn message(e: &candle_core::Error) -> String {
    e.to_string().lines().next().unwrap_or_default().to_string()
}

fn as_f64(v: &GValue) -> Option<f64> {
    Some(match v {
        GValue::U8(x) => *x as f64,
        GValue::I8(x) => *x as f64,
        GValue::U16(x) => *x as f64,
        GValue::I16(x) => *x as f64,
        GValue::U32(x) => *x as f64,
        GValue::I32(x) => *x as f64,
        GValue::U64(x) => *x as f64,
        GValue::I64(x) => *x as f64,
        GValue::F32(x) => *x as f64,
        GValue::F64(x) => *x,
        _ => return None,
    })
}

/// Maps a llama.cpp tensor name to its Hugging Face name; `None` for tensors transformers
/// does not store (`rope_freqs.weight`, recomputed from `rope_scaling`).
pub fn hf_tensor_name(gguf: &str) -> std::result::Result<Option<String>, ()> {
    let fixed = match gguf {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        "rope_freqs.weight" => return Ok(None),
        _ => None,
    };
    if let Some(f) = fixed {
        return Ok(Some(f.to_string()));
    }
    let rest = gguf.strip_prefix("blk.").ok_or(())?;
    let (layer, rest) = rest.split_once('.').ok_or(())?;
    let layer: usize = layer.parse().map_err(|_| ())?;
    let (kind, suffix) = rest.rsplit_once('.').ok_or(())?;
    let hf = match kind {
        "attn_norm" => "input_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        _ => return Err(()),
    };
    Ok(Some(format!("model.layers.{layer}.{hf}.{suffix}")))
}

/// Undoes llama.cpp's RoPE row permutation of a `[n_head * d, cols]` (or bias `[n_head * d]`)
/// tensor: HF row `h*d + j*d/2 + i` = GGUF row `h*d + 2i + j`.
pub fn unpermute_rows(w: &[f32], n_head: usize, cols: usize) -> Vec<f32> {
    let rows = w.len() / cols;
    let d = rows / n_head;
    let half = d / 2;
    let mut out = vec![0.0f32; w.len()];
    for h in 0..n_head {
        for i in 0..half {
            for j in 0..2 {
                let src = h * d + 2 * i + j;
                let dst = h * d + j * half + i;
                out[dst * cols..(dst + 1) * cols].copy_from_slice(&w[src * cols..(src + 1) * cols]);
            }
        }
    }
    out
}

struct GgufProducer<'a> {
    g: &'a GgufFile,
    /// HF name -> (GGUF name, heads to un-permute with)
    sources: HashMap<String, (String, Option<usize>)>,
    on_tensor: &'a dyn Fn(&str),
}

impl TensorProducer for GgufProducer<'_> {
    fn produce(&self, t: &PlannedTensor) -> Result<Cow<'_, [u8]>> {
        let (gname, heads) = &self.sources[&t.name];
        let mut v = self.g.dequantize(gname)?;
        if let Some(n_head) = heads {
            let cols = if t.shape.len() == 2 { t.shape[1] } else { 1 };
            v = unpermute_rows(&v, *n_head, cols);
        }
        Ok(Cow::Owned(dtype::from_f32(&v, t.dtype)))
    }
    fn done(&self, t: &PlannedTensor) {
        (self.on_tensor)(&t.name);
    }
}

/// What `import-gguf` wrote.
#[derive(Debug)]
pub struct ImportReport {
    pub output_dir: PathBuf,
    pub config: Value,
    pub tensors: usize,
}

/// Imports `gguf_path` into the Hugging Face directory `out_dir` (staged, renamed into place).
pub fn import_gguf(
    gguf_path: &Path,
    out_dir: &Path,
    out_dtype: DType,
    overwrite: bool,
    on_tensor: &dyn Fn(&str),
) -> Result<ImportReport> {
    let g = GgufFile::open(gguf_path)?;
    let config = hf_config(&g, out_dtype)?;
    // The metadata must describe the tensors: validate as a Llama checkpoint would be.
    let mc = crate::config::ModelConfig::from_str(&config.to_string(), gguf_path)?;
    mc.check_supported()?;
    let mut expected = mc.expected_tensors()?;
    let n_head = config["num_attention_heads"].as_u64().unwrap_or(0) as usize;
    let n_kv = config["num_key_value_heads"].as_u64().unwrap_or(0) as usize;
    let mut planned = Vec::new();
    let mut sources = HashMap::new();
    for gname in g.tensor_names() {
        let hf = hf_tensor_name(&gname).map_err(|_| {
            gguf_err(
                gguf_path,
                format!("tensor `{gname}` has no Llama equivalent"),
            )
        })?;
        let Some(hf) = hf else {
            tracing::warn!("skipping `{gname}` (transformers recomputes it from rope_scaling)");
            continue;
        };
        let info = &g.content.tensor_infos[&gname];
        let heads = if hf.contains(".q_proj.") {
            Some(n_head)
        } else if hf.contains(".k_proj.") {
            Some(n_kv)
        } else {
            None
        };
        let shape = info.shape.dims().to_vec();
        let want = match expected.remove(&hf) {
            Some(w) => w,
            None if hf == "lm_head.weight" => vec![mc.typed.vocab_size, mc.typed.hidden_size],
            None if sources.contains_key(&hf) => {
                return Err(gguf_err(gguf_path, format!("tensor `{gname}` appears twice")))
            }
            None => {
                return Err(gguf_err(
                    gguf_path,
                    format!("tensor `{gname}` does not fit the metadata (block_count {}, no such tensor in a Llama layer)", mc.typed.num_hidden_layers),
                ))
            }
        };
        if shape != want {
            return Err(gguf_err(
                gguf_path,
                format!("tensor `{gname}` has shape {shape:?}, but the metadata implies {want:?}"),
            ));
        }
        planned.push(PlannedTensor {
            name: hf.clone(),
            dtype: out_dtype,
            shape,
        });
        sources.insert(hf, (gname, heads));
    }
    if let Some((missing, _)) = expected.into_iter().next() {
        return Err(gguf_err(
            gguf_path,
            format!("no tensor for `{missing}` (metadata and tensors disagree)"),
        ));
    }
    let tokenizer = build_tokenizer(&g)?;
    let staged = StagedDir::create(out_dir, overwrite, &[gguf_path])?;
    let producer = GgufProducer {
        g: &g,
        sources,
        on_tensor,
    };
    let count = planned.len();
    write_safetensors(staged.path(), planned, u64::MAX, &producer)?;
    write_json(&staged.path().join("config.json"), &config)?;
    let tok_path = staged.path().join("tokenizer.json");
    tokenizer
        .tokenizer
        .save(&tok_path, false)
        .map_err(|e| Error::Tokenizer(format!("{}: {e}", tok_path.display())))?;
    write_json(
        &staged.path().join("tokenizer_config.json"),
        &tokenizer.tokenizer_config,
    )?;
    write_json(
        &staged.path().join("special_tokens_map.json"),
        &tokenizer.special_tokens_map,
    )?;
    write_json(
        &staged.path().join("generation_config.json"),
        &generation_config(&g),
    )?;
    let output_dir = staged.commit()?;
    Ok(ImportReport {
        output_dir,
        config,
        tensors: count,
    })
}

/// The LlamaForCausalLM config.json implied by the GGUF metadata.
pub fn hf_config(g: &GgufFile, dtype: DType) -> Result<Value> {
    let a = g.string("general.architecture")?;
    let key = |k: &str| format!("{a}.{k}");
    let hidden = g.usize(&key("embedding_length"))?;
    let heads = g.usize(&key("attention.head_count"))?;
    let kv = g
        .number(&key("attention.head_count_kv"))?
        .map(|v| v as usize)
        .unwrap_or(heads);
    let head_dim = g
        .number(&key("attention.key_length"))?
        .map(|v| v as usize)
        .unwrap_or(hidden / heads.max(1));
    let vocab = match g.number(&key("vocab_size"))? {
        Some(v) => v as usize,
        None => g.strings("tokenizer.ggml.tokens")?.len(),
    };
    let has_output = g.content.tensor_infos.contains_key("output.weight");
    let has_bias = g.content.tensor_infos.contains_key("blk.0.attn_q.bias");
    let rope_scaling = match g.get(&key("rope.scaling.type")) {
        Some(GValue::String(t)) if t == "linear" => {
            let factor = g.number(&key("rope.scaling.factor"))?.unwrap_or(1.0);
            json!({"type": "linear", "factor": factor})
        }
        Some(GValue::String(t)) if t != "none" => {
            return Err(gguf_err(
                &g.path,
                format!("unsupported rope.scaling.type {t:?}; supported: linear, none"),
            ))
        }
        _ => Value::Null,
    };
    let mut m = Map::new();
    m.insert("architectures".into(), json!(["LlamaForCausalLM"]));
    m.insert("attention_bias".into(), json!(has_bias));
    m.insert("attention_dropout".into(), json!(0.0));
    m.insert(
        "bos_token_id".into(),
        opt_u(g, "tokenizer.ggml.bos_token_id"),
    );
    m.insert(
        "eos_token_id".into(),
        opt_u(g, "tokenizer.ggml.eos_token_id"),
    );
    m.insert("head_dim".into(), json!(head_dim));
    m.insert("hidden_act".into(), json!("silu"));
    m.insert("hidden_size".into(), json!(hidden));
    m.insert("initializer_range".into(), json!(0.02));
    m.insert(
        "intermediate_size".into(),
        json!(g.usize(&key("feed_forward_length"))?),
    );
    m.insert(
        "max_position_embeddings".into(),
        json!(g.number(&key("context_length"))?.unwrap_or(2048.0) as u64),
    );
    m.insert("mlp_bias".into(), json!(false));
    m.insert("model_type".into(), json!("llama"));
    m.insert("num_attention_heads".into(), json!(heads));
    m.insert(
        "num_hidden_layers".into(),
        json!(g.usize(&key("block_count"))?),
    );
    m.insert("num_key_value_heads".into(), json!(kv));
    if let Some(p) = g.get("tokenizer.ggml.padding_token_id").and_then(as_f64) {
        m.insert("pad_token_id".into(), json!(p as u64));
    }
    m.insert("pretraining_tp".into(), json!(1));
    m.insert(
        "rms_norm_eps".into(),
        json!(g
            .number(&key("attention.layer_norm_rms_epsilon"))?
            // GGUF stores an f32: write its shortest decimal form (1e-5, not
            // 9.999999747378752e-6); the two differ by ~2e-13 relatively.
            .map(|e| format!("{}", e as f32).parse::<f64>().unwrap_or(e))
            .unwrap_or(1e-5)),
    );
    m.insert("rope_scaling".into(), rope_scaling);
    m.insert(
        "rope_theta".into(),
        json!(g.number(&key("rope.freq_base"))?.unwrap_or(10000.0)),
    );
    m.insert("tie_word_embeddings".into(), json!(!has_output));
    m.insert("torch_dtype".into(), json!(dtype.torch_name()));
    m.insert("use_cache".into(), json!(true));
    m.insert("vocab_size".into(), json!(vocab));
    Ok(Value::Object(m))
}

fn opt_u(g: &GgufFile, key: &str) -> Value {
    g.get(key)
        .and_then(as_f64)
        .map(|v| json!(v as u64))
        .unwrap_or(Value::Null)
}

fn generation_config(g: &GgufFile) -> Value {
    let mut m = Map::new();
    m.insert("_from_model_config".into(), json!(true));
    m.insert(
        "bos_token_id".into(),
        opt_u(g, "tokenizer.ggml.bos_token_id"),
    );
    m.insert(
        "eos_token_id".into(),
        opt_u(g, "tokenizer.ggml.eos_token_id"),
    );
    if let Some(p) = g.get("tokenizer.ggml.padding_token_id").and_then(as_f64) {
        m.insert("pad_token_id".into(), json!(p as u64));
    }
    Value::Object(m)
}

/// A tokenizer rebuilt from GGUF metadata and its transformers config files.
pub struct ImportedTokenizer {
    pub tokenizer: tokenizers::Tokenizer,
    pub tokenizer_config: Value,
    pub special_tokens_map: Value,
}

/// GGUF `token_type` values (llama.cpp `llama_token_type`).
const TOKEN_TYPE_CONTROL: i32 = 3;
const TOKEN_TYPE_USER_DEFINED: i32 = 4;

/// Builds the byte-level BPE tokenizer of a `tokenizer.ggml.model = gpt2` GGUF.
///
/// Pre-tokenizer by `tokenizer.ggml.pre`: `smollm` (and other StarCoder-style vocabularies)
/// split digits individually before the GPT-2 byte-level regex, as llama.cpp does; other
/// values use the plain GPT-2 byte-level regex. Control and user-defined tokens become
/// special added tokens; BOS is prepended only when `add_bos_token` is true.
pub fn build_tokenizer(g: &GgufFile) -> Result<ImportedTokenizer> {
    use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
    use tokenizers::models::bpe::{Vocab, BPE};
    use tokenizers::pre_tokenizers::byte_level::ByteLevel;
    use tokenizers::pre_tokenizers::digits::Digits;
    use tokenizers::pre_tokenizers::sequence::Sequence;
    use tokenizers::processors::template::TemplateProcessing;
    use tokenizers::{AddedToken, PreTokenizerWrapper, Tokenizer};

    let model = g.string("tokenizer.ggml.model")?;
    if model != "gpt2" {
        return Err(gguf_err(
            &g.path,
            format!("unsupported tokenizer.ggml.model {model:?}; supported: gpt2 (byte-level BPE)"),
        ));
    }
    let tokens = g.strings("tokenizer.ggml.tokens")?;
    let merges_raw = g.strings("tokenizer.ggml.merges")?;
    let types: Vec<i32> = match g.get("tokenizer.ggml.token_type") {
        Some(GValue::Array(a)) => a.iter().map(|v| as_f64(v).unwrap_or(1.0) as i32).collect(),
        _ => vec![1; tokens.len()],
    };
    let vocab: Vocab = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), i as u32))
        .collect();
    let merges: Vec<(String, String)> = merges_raw
        .iter()
        .map(|m| {
            m.split_once(' ')
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .ok_or_else(|| gguf_err(&g.path, format!("merge {m:?} has no space")))
        })
        .collect::<Result<_>>()?;
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .build()
        .map_err(|e| Error::Tokenizer(e.to_string()))?;
    let mut tok = Tokenizer::new(bpe);
    let pre = g.string("tokenizer.ggml.pre").unwrap_or_default();
    let byte_level = ByteLevel::new(false, true, true);
    let digits_first = matches!(
        pre.as_str(),
        "smollm" | "starcoder" | "refact" | "deepseek-coder"
    );
    let pre_tok: PreTokenizerWrapper = if digits_first {
        Sequence::new(vec![Digits::new(true).into(), byte_level.into()]).into()
    } else {
        byte_level.into()
    };
    tok.with_pre_tokenizer(Some(pre_tok));
    tok.with_decoder(Some(ByteLevelDecoder::default()));

    let special: Vec<(u32, String)> = types
        .iter()
        .enumerate()
        .filter(|(_, &t)| t == TOKEN_TYPE_CONTROL || t == TOKEN_TYPE_USER_DEFINED)
        .map(|(i, _)| (i as u32, tokens[i].clone()))
        .collect();
    let added: Vec<AddedToken> = special
        .iter()
        .map(|(_, c)| AddedToken::from(c.clone(), true))
        .collect();
    tok.add_special_tokens(added)
        .map_err(|e| Error::Tokenizer(e.to_string()))?;

    let token_of = |key: &str| -> Option<String> {
        g.get(key)
            .and_then(as_f64)
            .and_then(|id| tokens.get(id as usize).cloned())
    };
    let bos = token_of("tokenizer.ggml.bos_token_id");
    let eos = token_of("tokenizer.ggml.eos_token_id");
    let unk = token_of("tokenizer.ggml.unknown_token_id");
    let pad = token_of("tokenizer.ggml.padding_token_id");
    let add_bos = g.bool("tokenizer.ggml.add_bos_token").unwrap_or(false);
    let add_eos = g.bool("tokenizer.ggml.add_eos_token").unwrap_or(false);
    if add_bos || add_eos {
        let bos_id = g
            .get("tokenizer.ggml.bos_token_id")
            .and_then(as_f64)
            .map(|v| v as u32);
        let eos_id = g
            .get("tokenizer.ggml.eos_token_id")
            .and_then(as_f64)
            .map(|v| v as u32);
        let mut single = Vec::new();
        let mut specials = Vec::new();
        if let (true, Some(b), Some(id)) = (add_bos, &bos, bos_id) {
            single.push(b.clone());
            specials.push((b.clone(), id));
        }
        single.push("$A".to_string());
        if let (true, Some(e), Some(id)) = (add_eos, &eos, eos_id) {
            single.push(e.clone());
            specials.push((e.clone(), id));
        }
        let tp = TemplateProcessing::builder()
            .try_single(single.join(" "))
            .map_err(|e| Error::Tokenizer(e.to_string()))?
            .special_tokens(specials)
            .build()
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        tok.with_post_processor(Some(tp));
    }

    let mut decoder = Map::new();
    for (id, content) in &special {
        decoder.insert(
            id.to_string(),
            json!({"content": content, "lstrip": false, "normalized": false,
                   "rstrip": false, "single_word": false, "special": true}),
        );
    }
    let mut cfg = Map::new();
    cfg.insert("add_bos_token".into(), json!(add_bos));
    cfg.insert("add_eos_token".into(), json!(add_eos));
    cfg.insert("added_tokens_decoder".into(), Value::Object(decoder));
    let mut stm = Map::new();
    for (k, v) in [
        ("bos_token", &bos),
        ("eos_token", &eos),
        ("pad_token", &pad),
        ("unk_token", &unk),
    ] {
        cfg.insert(
            k.into(),
            v.clone().map(Value::String).unwrap_or(Value::Null),
        );
        if let Some(v) = v {
            stm.insert(k.into(), json!(v));
        }
    }
    if let Ok(t) = g.string("tokenizer.chat_template") {
        cfg.insert("chat_template".into(), json!(t));
    }
    cfg.insert("clean_up_tokenization_spaces".into(), json!(false));
    if let Some(ctx) = g.number(&format!(
        "{}.context_length",
        g.string("general.architecture")?
    ))? {
        cfg.insert("model_max_length".into(), json!(ctx as u64));
    }
    cfg.insert("tokenizer_class".into(), json!("PreTrainedTokenizerFast"));
    Ok(ImportedTokenizer {
        tokenizer: tok,
        tokenizer_config: Value::Object(cfg),
        special_tokens_map: Value::Object(stm),
    })
}
