//! Importing a llama.cpp GGUF file as a Hugging Face model directory (`import-gguf`).
//!
//! Tensors are dequantized by candle (bit-identical to gguf-py's dequantization), one at a
//! time, and streamed into `model.safetensors`. llama.cpp stores `attn_q`/`attn_k` rows
//! permuted for its interleaved RoPE (`permute()` in llama.cpp's `convert_hf_to_gguf.py`):
//! within a head, GGUF row `2i + j` holds Hugging Face row `j * d/2 + i`; we undo that so the
//! weights fit transformers' rotate-half RoPE (only for `llama`: llama.cpp does not permute
//! Qwen2/Qwen3/Gemma 3, whose RoPE is NEOX-style). Per-architecture rules are data, one
//! [`ArchSpec`] each in [`ARCHITECTURES`]. The tokenizer is rebuilt from
//! `tokenizer.ggml.*` (byte-level BPE, or Gemma's SentencePiece), as transformers' own GGUF
//! loader does.

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
use crate::families::{self, Family};
use crate::output::{write_safetensors, PlannedTensor, StagedDir, TensorProducer};

/// GGUF `general.architecture` values we import.
pub const SUPPORTED_ARCHITECTURES: [&str; 4] = ["llama", "qwen2", "qwen3", "gemma3"];

/// A parsed GGUF file (header and metadata; tensor data stays on disk).
pub struct GgufFile {
    pub path: PathBuf,
    /// The entry of `general.architecture` in [`ARCHITECTURES`].
    pub arch: &'static ArchSpec,
    content: Content,
    file: RefCell<File>,
}

fn gguf_err(path: &Path, msg: impl Into<String>) -> Error {
    Error::Gguf {
        path: path.to_path_buf(),
        msg: msg.into(),
    }
}

/// Walks a GGUF header (docs: ggml `docs/gguf.md`: magic, version, tensor and metadata
/// counts, key/value pairs, tensor infos) checking every declared count and length against
/// what is left of the file before anything is allocated: a corrupt count (a string of 2^40
/// bytes, an array of 2^60 values) is refused here instead of making the reader allocate it.
fn check_header_layout(file: &mut File, len: u64) -> std::result::Result<(), String> {
    use std::io::{BufReader, Read, Seek, SeekFrom};
    struct R<'a> {
        r: BufReader<&'a mut File>,
        pos: u64,
        len: u64,
        wide: bool,
    }
    impl R<'_> {
        fn need(&self, n: u64, what: &str) -> std::result::Result<(), String> {
            match self.pos.checked_add(n) {
                Some(end) if end <= self.len => Ok(()),
                _ => Err(format!(
                    "{what} at byte {} declares {n} bytes, beyond the end of the file ({} bytes)",
                    self.pos, self.len
                )),
            }
        }
        fn bytes<const N: usize>(&mut self, what: &str) -> std::result::Result<[u8; N], String> {
            self.need(N as u64, what)?;
            let mut b = [0u8; N];
            self.r.read_exact(&mut b).map_err(|e| e.to_string())?;
            self.pos += N as u64;
            Ok(b)
        }
        fn u32(&mut self, what: &str) -> std::result::Result<u32, String> {
            Ok(u32::from_le_bytes(self.bytes::<4>(what)?))
        }
        fn u64(&mut self, what: &str) -> std::result::Result<u64, String> {
            Ok(u64::from_le_bytes(self.bytes::<8>(what)?))
        }
        /// A count or length: u64 from version 2, u32 in version 1.
        fn size(&mut self, what: &str) -> std::result::Result<u64, String> {
            if self.wide {
                self.u64(what)
            } else {
                self.u32(what).map(u64::from)
            }
        }
        fn skip(&mut self, n: u64, what: &str) -> std::result::Result<(), String> {
            self.need(n, what)?;
            self.r.seek_relative(n as i64).map_err(|e| e.to_string())?;
            self.pos += n;
            Ok(())
        }
        fn string(&mut self, what: &str) -> std::result::Result<(), String> {
            let n = self.size(what)?;
            self.skip(n, what)
        }
        fn value(&mut self, ty: u32, depth: usize, what: &str) -> std::result::Result<(), String> {
            let fixed = |ty: u32| -> Option<u64> {
                Some(match ty {
                    0 | 1 | 7 => 1,
                    2 | 3 => 2,
                    4..=6 => 4,
                    10..=12 => 8,
                    _ => return None,
                })
            };
            match ty {
                8 => self.string(what),
                9 => {
                    if depth > 8 {
                        return Err(format!("{what}: arrays nested more than 8 deep"));
                    }
                    let inner = self.u32(what)?;
                    let n = self.size(what)?;
                    match fixed(inner) {
                        Some(w) => self.skip(
                            n.checked_mul(w)
                                .ok_or_else(|| format!("{what}: {n} values"))?,
                            what,
                        ),
                        None => {
                            // Each string or array element takes at least 4 bytes.
                            self.need(n.saturating_mul(4), what)?;
                            for _ in 0..n {
                                self.value(inner, depth + 1, what)?;
                            }
                            Ok(())
                        }
                    }
                }
                t => match fixed(t) {
                    Some(w) => self.skip(w, what),
                    None => Err(format!("{what}: unknown value type {t}")),
                },
            }
        }
    }
    file.seek(SeekFrom::Start(0)).map_err(|e| e.to_string())?;
    let mut r = R {
        r: BufReader::new(file),
        pos: 0,
        len,
        wide: true,
    };
    if &r.bytes::<4>("the magic number")? != b"GGUF" {
        return Err("no GGUF magic number".into());
    }
    let version = r.u32("the version")?;
    r.wide = version >= 2;
    let tensors = r.size("the tensor count")?;
    let kvs = r.size("the metadata count")?;
    // A key/value pair takes at least 13 bytes, a tensor info at least 24.
    r.need(
        kvs.saturating_mul(13)
            .saturating_add(tensors.saturating_mul(24)),
        &format!("{tensors} tensors and {kvs} metadata entries"),
    )?;
    for i in 0..kvs {
        let what = format!("metadata entry {i}");
        r.string(&what)?;
        let ty = r.u32(&what)?;
        r.value(ty, 0, &what)?;
    }
    for i in 0..tensors {
        let what = format!("tensor info {i}");
        r.string(&what)?;
        let dims = r.u32(&what)?;
        if dims > 8 {
            return Err(format!("{what}: {dims} dimensions"));
        }
        r.skip(u64::from(dims) * if r.wide { 8 } else { 4 }, &what)?;
        r.skip(4 + 8, &what)?;
    }
    drop(r);
    file.seek(SeekFrom::Start(0)).map_err(|e| e.to_string())?;
    Ok(())
}

impl GgufFile {
    /// Reads the header, checks the architecture and that every tensor lies inside the file.
    pub fn open(path: &Path) -> Result<Self> {
        let mut file = File::open(path).at(path)?;
        let len = file.metadata().at(path)?.len();
        check_header_layout(&mut file, len)
            .map_err(|m| gguf_err(path, format!("not a readable GGUF file: {m}")))?;
        // candle can panic on some malformed headers (e.g. general.alignment = 0): report those
        // as unreadable files too.
        // The panic hook is silenced meanwhile: the panic becomes the error below, and the
        // default hook's message would otherwise reach the user first.
        let hook = std::panic::take_hook();
        std::panic::set_hook(Box::new(|_| {}));
        let read =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| Content::read(&mut file)));
        std::panic::set_hook(hook);
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
        let mut g = Self {
            path: path.to_path_buf(),
            arch: &ARCHITECTURES[0],
            content,
            file: RefCell::new(file),
        };
        let arch = g.string("general.architecture")?;
        g.arch = arch_spec(&arch).ok_or_else(|| {
            gguf_err(
                path,
                format!(
                    "unsupported general.architecture {arch:?}; supported: {}",
                    SUPPORTED_ARCHITECTURES.join(", ")
                ),
            )
        })?;
        for (name, info) in &g.content.tensor_infos {
            // Checked: a corrupt header can declare dimensions whose product overflows.
            let too_large = || {
                gguf_err(
                    path,
                    format!(
                        "tensor `{name}` declares shape {:?} at offset {}, beyond any file",
                        info.shape.dims(),
                        info.offset
                    ),
                )
            };
            let elems = info
                .shape
                .dims()
                .iter()
                .try_fold(1usize, |a, &d| a.checked_mul(d))
                .ok_or_else(too_large)?;
            let bs = info.ggml_dtype.block_size().max(1);
            let end = (elems / bs)
                .checked_mul(info.ggml_dtype.type_size())
                .and_then(|b| u64::try_from(b).ok())
                .and_then(|b| b.checked_add(info.offset))
                .and_then(|b| b.checked_add(g.content.tensor_data_offset))
                .ok_or_else(too_large)?;
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

/// How a tensor's shape follows from the config (`D` hidden, `H`/`Hkv` heads, `d` head_dim,
/// `I` intermediate, `V` vocabulary).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// `[V, D]`
    Embedding,
    /// `[D]`
    Hidden,
    /// `[d]` (Qwen3/Gemma 3 per-head q/k norms)
    HeadDim,
    /// `[H d, D]`
    Query,
    /// `[Hkv d, D]`
    KeyValue,
    /// `[D, H d]`
    Output,
    /// `[I, D]`
    FfnIn,
    /// `[D, I]`
    FfnOut,
}

/// A tensor of every layer: llama.cpp's name (`blk.N.<gguf>.weight`), transformers' name
/// (`model.layers.N.<hf>.weight`), its shape, and whether llama.cpp permuted its rows for RoPE
/// (a `.bias` maps by the same names; which biases a layer must have is the family's rule).
#[derive(Debug, Clone, Copy)]
pub struct LayerTensor {
    pub gguf: &'static str,
    pub hf: &'static str,
    pub shape: Shape,
    pub rope_permuted: bool,
}

const fn lt(gguf: &'static str, hf: &'static str, shape: Shape) -> LayerTensor {
    LayerTensor {
        gguf,
        hf,
        shape,
        rope_permuted: false,
    }
}

/// A config.json field read from GGUF metadata `{arch}.<gguf>`, and what to write when the
/// file lacks it.
#[derive(Debug, Clone, Copy)]
pub struct ConfigKey {
    pub gguf: &'static str,
    pub hf: &'static str,
    pub num: Num,
    pub missing: Missing,
}

/// How a [`ConfigKey`]'s number is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Num {
    Int,
    Float,
    /// GGUF stores an f32: its shortest decimal form (1e-5, not 9.999999747378752e-6); the two
    /// differ by ~2e-13 relatively.
    ShortestF32,
}

/// What a [`ConfigKey`] becomes when its metadata key is absent.
#[derive(Debug, Clone, Copy)]
pub enum Missing {
    /// The import fails, naming the key.
    Required,
    /// This value.
    Value(f64),
    /// The value of another (already filled) config field.
    Field(&'static str),
    /// `hidden_size / num_attention_heads`.
    HiddenPerHead,
    /// The length of `tokenizer.ggml.tokens`.
    TokenCount,
}

const fn ck(gguf: &'static str, hf: &'static str, num: Num, missing: Missing) -> ConfigKey {
    ConfigKey {
        gguf,
        hf,
        num,
        missing,
    }
}

/// How `tokenizer.json` is rebuilt from `tokenizer.ggml.*`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenizerStyle {
    /// Byte-level BPE (`tokenizer.ggml.model = gpt2`), control and user-defined tokens special,
    /// as the Llama path always did.
    ByteLevel,
    /// Byte-level BPE split like transformers' GGUF converter does (`tokenizer.ggml.pre`
    /// regexes), user-defined tokens added as non-special tokens.
    ByteLevelTransformers,
    /// Gemma's SentencePiece vocabulary (`tokenizer.ggml.model = llama`) as a byte-fallback
    /// BPE with merges rebuilt from the vocabulary order (transformers' `gemma_tokenizer` in
    /// `integrations/gguf/gguf_tokenizer_mapping.py`).
    GemmaSentencePiece,
}

/// Everything that differs between the GGUF architectures we import.
///
/// Sources: transformers' GGUF loader (`integrations/ggml.py` GGUF_CONFIG_MAPPING and its
/// tensor processors in `modeling_gguf_pytorch_utils.py`: only `llama` un-permutes q/k rows,
/// `gemma2`/`gemma3` subtract 1 from every `*norm.weight`), gguf-py's tensor name map
/// (`gguf/tensor_mapping.py`) and the defaults of transformers' config classes
/// (`Qwen2Config`, `Qwen3Config`, `Gemma3TextConfig`), which fill what a GGUF does not state.
#[derive(Debug)]
pub struct ArchSpec {
    /// `general.architecture`
    pub gguf: &'static str,
    /// The family the import is a checkpoint of: its `architectures[0]` and `model_type` are
    /// written, and its tensor list (`Family::expected_tensors`) is what the GGUF must hold.
    pub family: &'static Family,
    /// Name in messages
    pub display: &'static str,
    pub layer_tensors: &'static [LayerTensor],
    /// Subtracted from every `*norm.weight` (llama.cpp stores Gemma norms as `1 + w`).
    pub norm_offset: f32,
    pub config_keys: &'static [ConfigKey],
    /// Fixed config.json fields (a JSON object): the config class's defaults for what the
    /// GGUF does not state.
    pub constants: &'static str,
    /// `attention_bias` written from whether `blk.0.attn_q.bias` exists.
    pub attention_bias_field: bool,
    /// `rope.scaling.type` (linear) read into `rope_scaling`.
    pub rope_scaling: bool,
    /// transformers 5 fields written too: `rope_parameters` next to the flat `rope_theta`
    /// (and `rope_local_base_freq`), `unk_token_id`.
    pub transformers5_fields: bool,
    /// Every n-th layer full attention, the others sliding (`layer_types`, Gemma 3's
    /// `_sliding_window_pattern` 6); `None`: no `layer_types` written.
    pub sliding_pattern: Option<usize>,
    /// RoPE base of the sliding layers when the GGUF has none (`rope_local_base_freq`).
    pub local_rope_base: Option<f64>,
    pub tokenizer: TokenizerStyle,
}

const LLAMA_KEYS: &[ConfigKey] = &[
    ck(
        "embedding_length",
        "hidden_size",
        Num::Int,
        Missing::Required,
    ),
    ck(
        "attention.head_count",
        "num_attention_heads",
        Num::Int,
        Missing::Required,
    ),
    ck(
        "attention.head_count_kv",
        "num_key_value_heads",
        Num::Int,
        Missing::Field("num_attention_heads"),
    ),
    ck(
        "attention.key_length",
        "head_dim",
        Num::Int,
        Missing::HiddenPerHead,
    ),
    ck("vocab_size", "vocab_size", Num::Int, Missing::TokenCount),
    ck(
        "feed_forward_length",
        "intermediate_size",
        Num::Int,
        Missing::Required,
    ),
    ck(
        "context_length",
        "max_position_embeddings",
        Num::Int,
        Missing::Value(2048.0),
    ),
    ck(
        "block_count",
        "num_hidden_layers",
        Num::Int,
        Missing::Required,
    ),
    ck(
        "attention.layer_norm_rms_epsilon",
        "rms_norm_eps",
        Num::ShortestF32,
        Missing::Value(1e-5),
    ),
    ck(
        "rope.freq_base",
        "rope_theta",
        Num::Float,
        Missing::Value(10000.0),
    ),
];

/// Qwen2/Qwen3 (transformers' GGUF_CONFIG_MAPPING, `Qwen2Config`/`Qwen3Config` defaults for
/// absent keys). transformers maps no `attention.key_length` for Qwen3 and relies on the
/// class default `head_dim` 128; we read the key (llama.cpp writes it), which equals 128 for
/// every released Qwen3.
const QWEN_KEYS: &[ConfigKey] = &[
    ck(
        "embedding_length",
        "hidden_size",
        Num::Int,
        Missing::Required,
    ),
    ck(
        "attention.head_count",
        "num_attention_heads",
        Num::Int,
        Missing::Required,
    ),
    ck(
        "attention.head_count_kv",
        "num_key_value_heads",
        Num::Int,
        Missing::Field("num_attention_heads"),
    ),
    ck(
        "attention.key_length",
        "head_dim",
        Num::Int,
        Missing::HiddenPerHead,
    ),
    ck("vocab_size", "vocab_size", Num::Int, Missing::TokenCount),
    ck(
        "feed_forward_length",
        "intermediate_size",
        Num::Int,
        Missing::Required,
    ),
    ck(
        "context_length",
        "max_position_embeddings",
        Num::Int,
        Missing::Value(32768.0),
    ),
    ck(
        "block_count",
        "num_hidden_layers",
        Num::Int,
        Missing::Required,
    ),
    ck(
        "attention.layer_norm_rms_epsilon",
        "rms_norm_eps",
        Num::ShortestF32,
        Missing::Value(1e-6),
    ),
    ck(
        "rope.freq_base",
        "rope_theta",
        Num::Float,
        Missing::Value(10000.0),
    ),
];

/// Gemma 3 (transformers' GGUF_CONFIG_MAPPING `gemma3`, `Gemma3TextConfig` defaults).
const GEMMA3_KEYS: &[ConfigKey] = &[
    ck(
        "embedding_length",
        "hidden_size",
        Num::Int,
        Missing::Required,
    ),
    ck(
        "attention.head_count",
        "num_attention_heads",
        Num::Int,
        Missing::Required,
    ),
    ck(
        "attention.head_count_kv",
        "num_key_value_heads",
        Num::Int,
        Missing::Field("num_attention_heads"),
    ),
    ck(
        "attention.key_length",
        "head_dim",
        Num::Int,
        Missing::Value(256.0),
    ),
    ck("vocab_size", "vocab_size", Num::Int, Missing::TokenCount),
    ck(
        "feed_forward_length",
        "intermediate_size",
        Num::Int,
        Missing::Required,
    ),
    ck(
        "context_length",
        "max_position_embeddings",
        Num::Int,
        Missing::Value(131072.0),
    ),
    ck(
        "block_count",
        "num_hidden_layers",
        Num::Int,
        Missing::Required,
    ),
    ck(
        "attention.layer_norm_rms_epsilon",
        "rms_norm_eps",
        Num::ShortestF32,
        Missing::Value(1e-6),
    ),
    ck(
        "rope.freq_base",
        "rope_theta",
        Num::Float,
        Missing::Value(1_000_000.0),
    ),
    ck(
        "attention.sliding_window",
        "sliding_window",
        Num::Int,
        Missing::Value(4096.0),
    ),
];

const LLAMA_LAYER: &[LayerTensor] = &[
    lt("attn_norm", "input_layernorm", Shape::Hidden),
    lt("ffn_norm", "post_attention_layernorm", Shape::Hidden),
    LayerTensor {
        rope_permuted: true,
        ..lt("attn_q", "self_attn.q_proj", Shape::Query)
    },
    LayerTensor {
        rope_permuted: true,
        ..lt("attn_k", "self_attn.k_proj", Shape::KeyValue)
    },
    lt("attn_v", "self_attn.v_proj", Shape::KeyValue),
    lt("attn_output", "self_attn.o_proj", Shape::Output),
    lt("ffn_gate", "mlp.gate_proj", Shape::FfnIn),
    lt("ffn_up", "mlp.up_proj", Shape::FfnIn),
    lt("ffn_down", "mlp.down_proj", Shape::FfnOut),
];

/// Qwen2: q/k/v always carry biases, o none; llama.cpp does not permute (NEOX RoPE).
const QWEN2_LAYER: &[LayerTensor] = &[
    lt("attn_norm", "input_layernorm", Shape::Hidden),
    lt("ffn_norm", "post_attention_layernorm", Shape::Hidden),
    lt("attn_q", "self_attn.q_proj", Shape::Query),
    lt("attn_k", "self_attn.k_proj", Shape::KeyValue),
    lt("attn_v", "self_attn.v_proj", Shape::KeyValue),
    lt("attn_output", "self_attn.o_proj", Shape::Output),
    lt("ffn_gate", "mlp.gate_proj", Shape::FfnIn),
    lt("ffn_up", "mlp.up_proj", Shape::FfnIn),
    lt("ffn_down", "mlp.down_proj", Shape::FfnOut),
];

/// Qwen3: per-head q/k RMS norms, optional biases (`attention_bias`), no permutation.
const QWEN3_LAYER: &[LayerTensor] = &[
    lt("attn_norm", "input_layernorm", Shape::Hidden),
    lt("ffn_norm", "post_attention_layernorm", Shape::Hidden),
    lt("attn_q", "self_attn.q_proj", Shape::Query),
    lt("attn_k", "self_attn.k_proj", Shape::KeyValue),
    lt("attn_v", "self_attn.v_proj", Shape::KeyValue),
    lt("attn_output", "self_attn.o_proj", Shape::Output),
    lt("attn_q_norm", "self_attn.q_norm", Shape::HeadDim),
    lt("attn_k_norm", "self_attn.k_norm", Shape::HeadDim),
    lt("ffn_gate", "mlp.gate_proj", Shape::FfnIn),
    lt("ffn_up", "mlp.up_proj", Shape::FfnIn),
    lt("ffn_down", "mlp.down_proj", Shape::FfnOut),
];

/// Gemma 3: four norms per layer (gguf-py: `post_attention_norm`, `ffn_norm` =
/// pre_feedforward_layernorm, `post_ffw_norm`), per-head q/k norms, no permutation.
const GEMMA3_LAYER: &[LayerTensor] = &[
    lt("attn_norm", "input_layernorm", Shape::Hidden),
    lt(
        "post_attention_norm",
        "post_attention_layernorm",
        Shape::Hidden,
    ),
    lt("ffn_norm", "pre_feedforward_layernorm", Shape::Hidden),
    lt("post_ffw_norm", "post_feedforward_layernorm", Shape::Hidden),
    lt("attn_q", "self_attn.q_proj", Shape::Query),
    lt("attn_k", "self_attn.k_proj", Shape::KeyValue),
    lt("attn_v", "self_attn.v_proj", Shape::KeyValue),
    lt("attn_output", "self_attn.o_proj", Shape::Output),
    lt("attn_q_norm", "self_attn.q_norm", Shape::HeadDim),
    lt("attn_k_norm", "self_attn.k_norm", Shape::HeadDim),
    lt("ffn_gate", "mlp.gate_proj", Shape::FfnIn),
    lt("ffn_up", "mlp.up_proj", Shape::FfnIn),
    lt("ffn_down", "mlp.down_proj", Shape::FfnOut),
];

/// The architectures `import-gguf` reads, one entry each.
pub const ARCHITECTURES: &[ArchSpec] = &[
    ArchSpec {
        gguf: "llama",
        family: &families::LLAMA,
        display: "Llama",
        layer_tensors: LLAMA_LAYER,
        norm_offset: 0.0,
        config_keys: LLAMA_KEYS,
        constants: r#"{"attention_dropout": 0.0, "hidden_act": "silu", "initializer_range": 0.02,
            "mlp_bias": false, "pretraining_tp": 1, "use_cache": true}"#,
        attention_bias_field: true,
        rope_scaling: true,
        transformers5_fields: false,
        sliding_pattern: None,
        local_rope_base: None,
        tokenizer: TokenizerStyle::ByteLevel,
    },
    ArchSpec {
        gguf: "qwen2",
        family: &families::QWEN2,
        display: "Qwen2",
        layer_tensors: QWEN2_LAYER,
        norm_offset: 0.0,
        config_keys: QWEN_KEYS,
        constants: r#"{"attention_dropout": 0.0, "hidden_act": "silu", "initializer_range": 0.02,
            "max_window_layers": 28, "use_cache": true, "use_sliding_window": false,
            "sliding_window": null}"#,
        attention_bias_field: false,
        rope_scaling: false,
        transformers5_fields: true,
        sliding_pattern: None,
        local_rope_base: None,
        tokenizer: TokenizerStyle::ByteLevelTransformers,
    },
    ArchSpec {
        gguf: "qwen3",
        family: &families::QWEN3,
        display: "Qwen3",
        layer_tensors: QWEN3_LAYER,
        norm_offset: 0.0,
        config_keys: QWEN_KEYS,
        constants: r#"{"attention_dropout": 0.0, "hidden_act": "silu", "initializer_range": 0.02,
            "max_window_layers": 28, "use_cache": true, "use_sliding_window": false,
            "sliding_window": null}"#,
        attention_bias_field: true,
        rope_scaling: false,
        transformers5_fields: true,
        sliding_pattern: None,
        local_rope_base: None,
        tokenizer: TokenizerStyle::ByteLevelTransformers,
    },
    ArchSpec {
        gguf: "gemma3",
        family: &families::GEMMA3,
        display: "Gemma 3",
        layer_tensors: GEMMA3_LAYER,
        norm_offset: 1.0,
        config_keys: GEMMA3_KEYS,
        constants: r#"{"attention_bias": false, "attention_dropout": 0.0,
            "attn_logit_softcapping": null, "final_logit_softcapping": null,
            "hidden_activation": "gelu_pytorch_tanh", "initializer_range": 0.02,
            "query_pre_attn_scalar": 256, "use_bidirectional_attention": false,
            "use_cache": true}"#,
        attention_bias_field: false,
        rope_scaling: false,
        transformers5_fields: true,
        sliding_pattern: Some(6),
        local_rope_base: Some(10000.0),
        tokenizer: TokenizerStyle::GemmaSentencePiece,
    },
];

/// The [`ArchSpec`] of a `general.architecture` value.
pub fn arch_spec(gguf_arch: &str) -> Option<&'static ArchSpec> {
    ARCHITECTURES.iter().find(|a| a.gguf == gguf_arch)
}

/// Maps a llama.cpp tensor name of a Llama GGUF to its Hugging Face name; `None` for tensors
/// transformers does not store (`rope_freqs.weight`, recomputed from `rope_scaling`).
pub fn hf_tensor_name(gguf: &str) -> std::result::Result<Option<String>, ()> {
    hf_tensor_name_for(&ARCHITECTURES[0], gguf).map(|o| o.map(|(n, _)| n))
}

/// [`hf_tensor_name`] for any architecture, with the layer tensor's table entry.
pub fn hf_tensor_name_for(
    arch: &ArchSpec,
    gguf: &str,
) -> std::result::Result<Option<(String, Option<&'static LayerTensor>)>, ()> {
    let fixed = match gguf {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        "rope_freqs.weight" => return Ok(None),
        _ => None,
    };
    if let Some(f) = fixed {
        return Ok(Some((f.to_string(), None)));
    }
    let rest = gguf.strip_prefix("blk.").ok_or(())?;
    let (layer, rest) = rest.split_once('.').ok_or(())?;
    let layer: usize = layer.parse().map_err(|_| ())?;
    let (kind, suffix) = rest.rsplit_once('.').ok_or(())?;
    let t = arch
        .layer_tensors
        .iter()
        .find(|t| t.gguf == kind)
        .ok_or(())?;
    // A bias the family does not have is refused by the expected-tensor check.
    if !matches!(suffix, "weight" | "bias") {
        return Err(());
    }
    Ok(Some((
        format!("model.layers.{layer}.{}.{suffix}", t.hf),
        Some(t),
    )))
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

/// Where a written tensor comes from and what is done to it on the way.
struct Source {
    gguf: String,
    /// Heads to un-permute the rows with (llama.cpp's RoPE permutation).
    unpermute: Option<usize>,
    /// Subtracted from every element (Gemma norms).
    offset: f32,
}

struct GgufProducer<'a> {
    g: &'a GgufFile,
    /// HF name -> its source
    sources: HashMap<String, Source>,
    on_tensor: &'a dyn Fn(&str),
}

impl TensorProducer for GgufProducer<'_> {
    fn produce(&self, t: &PlannedTensor) -> Result<Cow<'_, [u8]>> {
        let src = &self.sources[&t.name];
        let mut v = self.g.dequantize(&src.gguf)?;
        if let Some(n_head) = src.unpermute {
            let cols = if t.shape.len() == 2 { t.shape[1] } else { 1 };
            v = unpermute_rows(&v, n_head, cols);
        }
        if src.offset != 0.0 {
            // transformers' Gemma2TensorProcessor: `weights - 1` on the f32 values.
            v.iter_mut().for_each(|x| *x -= src.offset);
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

/// The geometry a GGUF's tensors must have, from the config built out of its metadata.
struct Geometry {
    hidden: usize,
    heads: usize,
    kv: usize,
    head_dim: usize,
    intermediate: usize,
    vocab: usize,
    layers: usize,
}

impl Geometry {
    fn of(config: &Value, path: &Path, arch: &str) -> Result<Self> {
        let get = |k: &str| config[k].as_u64().unwrap_or(0) as usize;
        let geo = Self {
            hidden: get("hidden_size"),
            heads: get("num_attention_heads"),
            kv: get("num_key_value_heads"),
            head_dim: get("head_dim"),
            intermediate: get("intermediate_size"),
            vocab: get("vocab_size"),
            layers: get("num_hidden_layers"),
        };
        for (v, field, key) in [
            (geo.hidden, "hidden_size", "embedding_length"),
            (geo.heads, "num_attention_heads", "attention.head_count"),
            (geo.kv, "num_key_value_heads", "attention.head_count_kv"),
            (geo.head_dim, "head_dim", "attention.key_length"),
            (geo.layers, "num_hidden_layers", "block_count"),
        ] {
            if v == 0 {
                return Err(gguf_err(
                    path,
                    format!("metadata `{arch}.{key}` gives {field} 0; must be positive"),
                ));
            }
        }
        if geo.heads % geo.kv != 0 {
            return Err(gguf_err(
                path,
                format!(
                    "metadata `{arch}.attention.head_count` {} is not a multiple of `{arch}.attention.head_count_kv` {} (num_attention_heads, num_key_value_heads)",
                    geo.heads, geo.kv
                ),
            ));
        }
        Ok(geo)
    }

    fn shape(&self, s: Shape) -> Vec<usize> {
        let (d, hd) = (self.hidden, self.head_dim);
        match s {
            Shape::Embedding => vec![self.vocab, d],
            Shape::Hidden => vec![d],
            Shape::HeadDim => vec![hd],
            Shape::Query => vec![self.heads * hd, d],
            Shape::KeyValue => vec![self.kv * hd, d],
            Shape::Output => vec![d, self.heads * hd],
            Shape::FfnIn => vec![self.intermediate, d],
            Shape::FfnOut => vec![d, self.intermediate],
        }
    }
}

/// Imports `gguf_path` into the Hugging Face directory `out_dir` (staged, renamed into place).
///
/// The written config.json is validated by our own [`crate::config::ModelConfig`] (as a
/// checkpoint of its family would be) before anything is written.
pub fn import_gguf(
    gguf_path: &Path,
    out_dir: &Path,
    out_dtype: DType,
    overwrite: bool,
    on_tensor: &dyn Fn(&str),
) -> Result<ImportReport> {
    let g = GgufFile::open(gguf_path)?;
    let arch = g.arch;
    let config = hf_config(&g, out_dtype)?;
    // The metadata must describe the tensors: validate as a checkpoint would be.
    let mc = crate::config::ModelConfig::from_str(&config.to_string(), gguf_path)?;
    mc.check_supported()?;
    mc.dims()?;
    let geo = Geometry::of(&config, gguf_path, arch.gguf)?;
    // A block count beyond the layers the tensors hold is refused before the family's tensor
    // list is built (a corrupt count of 2^32 layers would list billions of names).
    let layers_in_file = g
        .tensor_names()
        .iter()
        .filter_map(|n| {
            n.strip_prefix("blk.")?
                .split('.')
                .next()?
                .parse::<usize>()
                .ok()
        })
        .max()
        .map_or(0, |m| m + 1);
    let declared = mc.dims()?.num_hidden_layers;
    if declared > layers_in_file {
        return Err(gguf_err(
            gguf_path,
            format!(
                "{}.block_count = {declared}, but the file holds tensors of {layers_in_file} layers: no tensor for layer {layers_in_file}",
                arch.gguf
            ),
        ));
    }
    // What a checkpoint of the family must hold, by the family's own list.
    let mut expected = mc.expected_tensors()?;
    let mut planned = Vec::new();
    let mut sources = HashMap::new();
    for gname in g.tensor_names() {
        let mapped = hf_tensor_name_for(arch, &gname).map_err(|_| {
            gguf_err(
                gguf_path,
                format!("tensor `{gname}` has no {} equivalent", arch.display),
            )
        })?;
        let Some((hf, layer_tensor)) = mapped else {
            tracing::warn!("skipping `{gname}` (transformers recomputes it from rope_scaling)");
            continue;
        };
        let info = &g.content.tensor_infos[&gname];
        let unpermute = match layer_tensor {
            Some(t) if t.rope_permuted => Some(match t.shape {
                Shape::Query => geo.heads,
                _ => geo.kv,
            }),
            _ => None,
        };
        let shape = info.shape.dims().to_vec();
        let want = match expected.remove(&hf) {
            Some(w) => w,
            None if hf == "lm_head.weight" => geo.shape(Shape::Embedding),
            None if sources.contains_key(&hf) => {
                return Err(gguf_err(gguf_path, format!("tensor `{gname}` appears twice")))
            }
            None => {
                return Err(gguf_err(
                    gguf_path,
                    format!(
                        "tensor `{gname}` does not fit the metadata (block_count {}, no such tensor in a {} layer)",
                        geo.layers, arch.display
                    ),
                ))
            }
        };
        if shape != want {
            return Err(gguf_err(
                gguf_path,
                format!("tensor `{gname}` has shape {shape:?}, but the metadata implies {want:?}"),
            ));
        }
        let offset = if hf.ends_with("norm.weight") {
            arch.norm_offset
        } else {
            0.0
        };
        planned.push(PlannedTensor {
            name: hf.clone(),
            dtype: out_dtype,
            shape,
        });
        sources.insert(
            hf,
            Source {
                gguf: gname,
                unpermute,
                offset,
            },
        );
    }
    if let Some((missing, _)) = expected.into_iter().next() {
        return Err(gguf_err(
            gguf_path,
            format!("no tensor for `{missing}` (metadata and tensors disagree)"),
        ));
    }
    // The tokenizers library names neither the file nor the metadata ("Token Ġ out of
    // vocabulary"): both are added here.
    let tokenizer = build_tokenizer(&g).map_err(|e| match e {
        Error::Tokenizer(msg) => gguf_err(
            gguf_path,
            format!(
                "the tokenizer of its metadata (tokenizer.ggml.tokens, tokenizer.ggml.merges, tokenizer.ggml.token_type) does not build: {msg}"
            ),
        ),
        other => other,
    })?;
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

/// The config.json (of the architecture's family) implied by the GGUF metadata: the
/// [`ArchSpec::config_keys`] read or filled, its constants, and the derived fields; keys in
/// sorted order.
pub fn hf_config(g: &GgufFile, dtype: DType) -> Result<Value> {
    let spec = g.arch;
    let a = spec.gguf;
    let key = |k: &str| format!("{a}.{k}");
    let mut m = Map::new();
    m.insert("architectures".into(), json!([spec.family.class]));
    m.insert("model_type".into(), json!(spec.family.model_type));
    for c in spec.config_keys {
        let k = key(c.gguf);
        let (v, from_file) = match g.number(&k)? {
            Some(v) => (v, true),
            None => (
                match c.missing {
                    Missing::Required => {
                        return Err(gguf_err(&g.path, format!("metadata key `{k}` is missing")))
                    }
                    Missing::Value(x) => x,
                    Missing::Field(f) => m.get(f).and_then(Value::as_f64).unwrap_or(0.0),
                    Missing::HiddenPerHead => {
                        let hidden = m.get("hidden_size").and_then(Value::as_u64).unwrap_or(0);
                        let heads = m
                            .get("num_attention_heads")
                            .and_then(Value::as_u64)
                            .unwrap_or(0);
                        (hidden / heads.max(1)) as f64
                    }
                    Missing::TokenCount => g.strings("tokenizer.ggml.tokens")?.len() as f64,
                },
                false,
            ),
        };
        let value = match c.num {
            Num::Int => json!(v as u64),
            Num::Float => json!(v),
            Num::ShortestF32 if from_file => {
                json!(format!("{}", v as f32).parse::<f64>().unwrap_or(v))
            }
            Num::ShortestF32 => json!(v),
        };
        m.insert(c.hf.into(), value);
    }
    let constants: Map<String, Value> = serde_json::from_str(spec.constants)
        .unwrap_or_else(|e| panic!("ArchSpec {a}: constants are not a JSON object: {e}"));
    m.extend(constants);
    if spec.attention_bias_field {
        m.insert(
            "attention_bias".into(),
            json!(g.content.tensor_infos.contains_key("blk.0.attn_q.bias")),
        );
    }
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
    if spec.rope_scaling {
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
        m.insert("rope_scaling".into(), rope_scaling);
    } else if let Some(GValue::String(t)) = g.get(&key("rope.scaling.type")) {
        if t != "none" {
            return Err(gguf_err(
                &g.path,
                format!(
                    "unsupported `{}` {t:?} for {}; supported: none",
                    key("rope.scaling.type"),
                    spec.display
                ),
            ));
        }
    }
    let theta = m.get("rope_theta").cloned().unwrap_or(Value::Null);
    if let Some(pattern) = spec.sliding_pattern {
        // Gemma3TextConfig: layer i is full attention when (i + 1) % pattern == 0.
        let layers = m
            .get("num_hidden_layers")
            .and_then(Value::as_u64)
            .unwrap_or(0);
        let types: Vec<Value> = (0..layers)
            .map(|i| {
                json!(if (i + 1) % pattern as u64 == 0 {
                    "full_attention"
                } else {
                    "sliding_attention"
                })
            })
            .collect();
        m.insert("layer_types".into(), Value::Array(types));
    }
    if spec.transformers5_fields {
        let rope = match spec.local_rope_base {
            Some(local) => {
                m.insert("rope_local_base_freq".into(), json!(local));
                json!({
                    "full_attention": {"rope_theta": theta, "rope_type": "default"},
                    "sliding_attention": {"rope_theta": local, "rope_type": "default"},
                })
            }
            None => json!({"rope_theta": theta, "rope_type": "default"}),
        };
        m.insert("rope_parameters".into(), rope);
        if let Some(u) = g.get("tokenizer.ggml.unknown_token_id").and_then(as_f64) {
            m.insert("unk_token_id".into(), json!(u as u64));
        }
    }
    m.insert(
        "tie_word_embeddings".into(),
        json!(!g.content.tensor_infos.contains_key("output.weight")),
    );
    m.insert("torch_dtype".into(), json!(dtype.torch_name()));
    let mut entries: Vec<(String, Value)> = m.into_iter().collect();
    entries.sort_by(|x, y| x.0.cmp(&y.0));
    Ok(Value::Object(entries.into_iter().collect()))
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

/// The tokenizer of a GGUF, rebuilt as the architecture's [`TokenizerStyle`] says.
pub fn build_tokenizer(g: &GgufFile) -> Result<ImportedTokenizer> {
    match g.arch.tokenizer {
        TokenizerStyle::GemmaSentencePiece => build_gemma_tokenizer(g),
        style => build_byte_level_tokenizer(g, style),
    }
}

/// Qwen2's pre-tokenizer split (transformers' `models/qwen2/tokenization_qwen2.py`
/// PRETOKENIZE_REGEX, which its GGUF converter uses for `tokenizer.ggml.pre = qwen2`): like
/// GPT-2's, but single digits and no leading-space letters group.
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Split regexes by `tokenizer.ggml.pre`, for [`TokenizerStyle::ByteLevelTransformers`]
/// (transformers' GGUF_PRE_TOKENIZER_SPLITS in `integrations/gguf/gguf_tokenizer_mapping.py`).
const PRE_TOKENIZER_SPLITS: &[(&str, &str)] =
    &[("qwen2", QWEN2_SPLIT), ("deepseek-r1-qwen", QWEN2_SPLIT)];

/// Builds the byte-level BPE tokenizer of a `tokenizer.ggml.model = gpt2` GGUF.
///
/// [`TokenizerStyle::ByteLevel`] (Llama): pre-tokenizer by `tokenizer.ggml.pre`: `smollm`
/// (and other StarCoder-style vocabularies) split digits individually before the GPT-2
/// byte-level regex, as llama.cpp does; other values use the plain GPT-2 byte-level regex.
/// Control and user-defined tokens become special added tokens.
/// [`TokenizerStyle::ByteLevelTransformers`] (Qwen): a `tokenizer.ggml.pre` listed in
/// [`PRE_TOKENIZER_SPLITS`] splits with its regex, then byte-level without regex; user-defined
/// tokens are added as non-special tokens, as transformers' GGUF converter does.
/// BOS is prepended only when `add_bos_token` is true.
fn build_byte_level_tokenizer(g: &GgufFile, style: TokenizerStyle) -> Result<ImportedTokenizer> {
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
            format!(
                "unsupported tokenizer.ggml.model {model:?} for {}; supported: gpt2 (byte-level BPE)",
                g.arch.display
            ),
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
    let split = PRE_TOKENIZER_SPLITS
        .iter()
        .find(|(p, _)| *p == pre)
        .filter(|_| style == TokenizerStyle::ByteLevelTransformers);
    let pre_tok: PreTokenizerWrapper = if let Some((_, regex)) = split {
        use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
        let split = Split::new(
            SplitPattern::Regex(regex.to_string()),
            tokenizers::SplitDelimiterBehavior::Isolated,
            false,
        )
        .map_err(|e| Error::Tokenizer(e.to_string()))?;
        Sequence::new(vec![
            split.into(),
            ByteLevel::new(false, true, false).into(),
        ])
        .into()
    } else if digits_first {
        Sequence::new(vec![Digits::new(true).into(), byte_level.into()]).into()
    } else {
        byte_level.into()
    };
    tok.with_pre_tokenizer(Some(pre_tok));
    tok.with_decoder(Some(ByteLevelDecoder::default()));

    // User-defined tokens are special in the Llama path, plain added tokens otherwise.
    let user_special = style == TokenizerStyle::ByteLevel;
    let special: Vec<(u32, String)> = types
        .iter()
        .enumerate()
        .filter(|(_, &t)| t == TOKEN_TYPE_CONTROL || (user_special && t == TOKEN_TYPE_USER_DEFINED))
        .map(|(i, _)| (i as u32, tokens[i].clone()))
        .collect();
    let added: Vec<AddedToken> = special
        .iter()
        .map(|(_, c)| AddedToken::from(c.clone(), true))
        .collect();
    tok.add_special_tokens(added)
        .map_err(|e| Error::Tokenizer(e.to_string()))?;
    let user_defined: Vec<(u32, String)> = if user_special {
        Vec::new()
    } else {
        types
            .iter()
            .enumerate()
            .filter(|(_, &t)| t == TOKEN_TYPE_USER_DEFINED)
            .map(|(i, _)| (i as u32, tokens[i].clone()))
            .collect()
    };
    tok.add_tokens(
        user_defined
            .iter()
            .map(|(_, c)| AddedToken::from(c.clone(), false).normalized(false)),
    )
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
    let mut listed: Vec<(u32, &String, bool)> = special
        .iter()
        .map(|(i, c)| (*i, c, true))
        .chain(user_defined.iter().map(|(i, c)| (*i, c, false)))
        .collect();
    listed.sort_by_key(|x| x.0);
    for (id, content, is_special) in listed {
        decoder.insert(
            id.to_string(),
            json!({"content": content, "lstrip": false, "normalized": false,
                   "rstrip": false, "single_word": false, "special": is_special}),
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
    // A causal LM takes no token_type_ids: without this list transformers 4.x's generic
    // PreTrainedTokenizerFast returns them, and generate() refuses the unused argument.
    cfg.insert(
        "model_input_names".into(),
        json!(["input_ids", "attention_mask"]),
    );
    Ok(ImportedTokenizer {
        tokenizer: tok,
        tokenizer_config: Value::Object(cfg),
        special_tokens_map: Value::Object(stm),
    })
}

/// Python's `str.isspace` for one character: Unicode White_Space plus the information
/// separators U+001C..U+001F, which Python counts as whitespace and Rust does not.
fn py_isspace(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// BPE merges recovered from a SentencePiece vocabulary listed best-first (transformers'
/// `generate_merges` in `tokenization_utils_base.py`, called by its GGUF `gemma_tokenizer`
/// with each token's position as its score): for every token in vocabulary order, each split
/// into two pieces that are both tokens, longest left piece first. A token listed twice counts
/// at its last position, as a Python dict would keep it.
pub fn merges_from_vocab_order(tokens: &[String]) -> Vec<(String, String)> {
    let mut last: HashMap<&str, usize> = HashMap::with_capacity(tokens.len());
    for (i, t) in tokens.iter().enumerate() {
        last.insert(t.as_str(), i);
    }
    let mut merges = Vec::new();
    for (i, t) in tokens.iter().enumerate() {
        if last[t.as_str()] != i {
            continue;
        }
        let mut local: Vec<(String, String)> = t
            .char_indices()
            .skip(1)
            .map(|(b, _)| t.split_at(b))
            .filter(|(l, r)| last.contains_key(l) && last.contains_key(r))
            .map(|(l, r)| (l.to_string(), r.to_string()))
            .collect();
        local.reverse();
        merges.extend(local);
    }
    merges
}

/// The Gemma tokenizer of a `tokenizer.ggml.model = llama` (SentencePiece) GGUF, as
/// transformers' GGUF converter builds it (`gemma_tokenizer` in
/// `integrations/gguf/gguf_tokenizer_mapping.py`, the `GemmaTokenizer` class of
/// `models/gemma/tokenization_gemma.py`):
/// * tokens made only of whitespace that contain a space are respelled as that many `▁`;
/// * a BPE model over the vocabulary with merges from [`merges_from_vocab_order`], byte
///   fallback (`<0xNN>` tokens), `fuse_unk`, the unknown token of `unknown_token_id`;
/// * normalizer: every space becomes `▁` (no prefix space); pre-tokenizer: split on " "
///   merged with the previous piece; decoder: `▁` back to space, byte fallback, fuse;
/// * control tokens (type 3) are special added tokens, user-defined ones (type 4, e.g.
///   `\n`, `[multimodal]`) plain added tokens when spelled as in the vocabulary;
/// * BOS (and EOS) added as `tokenizer.ggml.add_bos_token`/`add_eos_token` say (BOS when the
///   file does not say, as llama.cpp and transformers do for SentencePiece vocabularies).
fn build_gemma_tokenizer(g: &GgufFile) -> Result<ImportedTokenizer> {
    use tokenizers::decoders::byte_fallback::ByteFallback;
    use tokenizers::decoders::fuse::Fuse;
    use tokenizers::decoders::sequence::Sequence as DecoderSequence;
    use tokenizers::models::bpe::{Vocab, BPE};
    use tokenizers::normalizers::replace::Replace;
    use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
    use tokenizers::processors::template::TemplateProcessing;
    use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

    let tk = |e: tokenizers::Error| Error::Tokenizer(e.to_string());
    let model = g.string("tokenizer.ggml.model")?;
    if model != "llama" {
        return Err(gguf_err(
            &g.path,
            format!(
                "unsupported tokenizer.ggml.model {model:?} for {}; supported: llama (SentencePiece)",
                g.arch.display
            ),
        ));
    }
    let tokens = g.strings("tokenizer.ggml.tokens")?;
    let types: Vec<i32> = match g.get("tokenizer.ggml.token_type") {
        Some(GValue::Array(a)) if a.len() == tokens.len() => a
            .iter()
            .map(|v| {
                as_f64(v).map(|x| x as i32).ok_or_else(|| {
                    gguf_err(
                        &g.path,
                        format!("`tokenizer.ggml.token_type` holds {v:?}, expected integers"),
                    )
                })
            })
            .collect::<Result<_>>()?,
        Some(GValue::Array(a)) => {
            return Err(gguf_err(
                &g.path,
                format!(
                    "`tokenizer.ggml.token_type` has {} entries, `tokenizer.ggml.tokens` {}",
                    a.len(),
                    tokens.len()
                ),
            ))
        }
        _ => vec![1; tokens.len()],
    };
    let respelled: Vec<String> = tokens
        .iter()
        .map(|t| {
            if t.contains(' ') && t.chars().all(py_isspace) {
                "\u{2581}".repeat(t.chars().count())
            } else {
                t.clone()
            }
        })
        .collect();
    let merges = merges_from_vocab_order(&respelled);
    let vocab: Vocab = respelled
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), i as u32))
        .collect();
    let token_of = |key: &str| -> Option<String> {
        g.get(key)
            .and_then(as_f64)
            .and_then(|id| tokens.get(id as usize).cloned())
    };
    let bos = token_of("tokenizer.ggml.bos_token_id");
    let eos = token_of("tokenizer.ggml.eos_token_id");
    let unk = token_of("tokenizer.ggml.unknown_token_id");
    let pad = token_of("tokenizer.ggml.padding_token_id");
    let mut builder = BPE::builder()
        .vocab_and_merges(vocab.clone(), merges)
        .fuse_unk(true)
        .byte_fallback(true);
    builder = builder.unk_token(unk.clone().unwrap_or_else(|| "<unk>".to_string()));
    let bpe = builder.build().map_err(tk)?;
    let mut tok = Tokenizer::new(bpe);
    tok.with_normalizer(Some(Replace::new(" ", "\u{2581}").map_err(tk)?))
        .map_err(tk)?;
    tok.with_pre_tokenizer(Some(
        Split::new(
            SplitPattern::String(" ".into()),
            SplitDelimiterBehavior::MergedWithPrevious,
            false,
        )
        .map_err(tk)?,
    ));
    tok.with_decoder(Some(DecoderSequence::new(vec![
        Replace::new("\u{2581}", " ").map_err(tk)?.into(),
        ByteFallback::new().into(),
        Fuse::new().into(),
    ])));

    let control: Vec<(u32, String)> = types
        .iter()
        .enumerate()
        .filter(|(_, &t)| t == TOKEN_TYPE_CONTROL)
        .map(|(i, _)| (i as u32, tokens[i].clone()))
        .collect();
    tok.add_special_tokens(
        control
            .iter()
            .map(|(_, c)| AddedToken::from(c.clone(), true).normalized(false))
            .collect::<Vec<_>>(),
    )
    .map_err(tk)?;
    // As spelled in the file; a respelled whitespace token is no longer in the vocabulary.
    let user_defined: Vec<(u32, String)> = types
        .iter()
        .enumerate()
        .filter(|(i, &t)| t == TOKEN_TYPE_USER_DEFINED && vocab.contains_key(&tokens[*i]))
        .map(|(i, _)| (i as u32, tokens[i].clone()))
        .collect();
    tok.add_tokens(
        user_defined
            .iter()
            .map(|(_, c)| AddedToken::from(c.clone(), false).normalized(false)),
    )
    .map_err(tk)?;

    let add_bos = g.bool("tokenizer.ggml.add_bos_token").unwrap_or(true);
    let add_eos = g.bool("tokenizer.ggml.add_eos_token").unwrap_or(false);
    let id_of = |key: &str| g.get(key).and_then(as_f64).map(|v| v as u32);
    let mut specials = Vec::new();
    let (mut single, mut pair) = (Vec::new(), Vec::new());
    if let (true, Some(b), Some(id)) = (add_bos, &bos, id_of("tokenizer.ggml.bos_token_id")) {
        single.push(format!("{b}:0"));
        specials.push((b.clone(), id));
    }
    single.push("$A:0".to_string());
    if let (true, Some(e), Some(id)) = (add_eos, &eos, id_of("tokenizer.ggml.eos_token_id")) {
        single.push(format!("{e}:0"));
        specials.push((e.clone(), id));
    }
    for piece in &single {
        pair.push(piece.clone());
    }
    for piece in &single {
        pair.push(piece.replace(":0", ":1").replace("$A", "$B"));
    }
    if !specials.is_empty() {
        let tp = TemplateProcessing::builder()
            .try_single(single.join(" "))
            .map_err(|e| Error::Tokenizer(e.to_string()))?
            .try_pair(pair.join(" "))
            .map_err(|e| Error::Tokenizer(e.to_string()))?
            .special_tokens(specials)
            .build()
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        tok.with_post_processor(Some(tp));
    }

    let mut decoder = Map::new();
    let mut listed: Vec<(u32, &String, bool)> = control
        .iter()
        .map(|(i, c)| (*i, c, true))
        .chain(user_defined.iter().map(|(i, c)| (*i, c, false)))
        .collect();
    listed.sort_by_key(|x| x.0);
    for (id, content, is_special) in listed {
        decoder.insert(
            id.to_string(),
            json!({"content": content, "lstrip": false, "normalized": false,
                   "rstrip": false, "single_word": false, "special": is_special}),
        );
    }
    let mask = vocab.contains_key("<mask>").then(|| "<mask>".to_string());
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
        ("mask_token", &mask),
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
    if let Some(ctx) = g.number(&format!("{}.context_length", g.arch.gguf))? {
        cfg.insert("model_max_length".into(), json!(ctx as u64));
    }
    cfg.insert("padding_side".into(), json!("left"));
    cfg.insert("tokenizer_class".into(), json!("GemmaTokenizer"));
    cfg.insert(
        "model_input_names".into(),
        json!(["input_ids", "attention_mask"]),
    );
    Ok(ImportedTokenizer {
        tokenizer: tok,
        tokenizer_config: Value::Object(cfg),
        special_tokens_map: Value::Object(stm),
    })
}
