//! `config.json` of the Llama family: a typed view over the raw JSON object.
//!
//! The raw object is kept (key order included, `serde_json` is built with `preserve_order`) so
//! that a rewritten config differs from its source only in the keys we change; unknown fields and
//! `rope_scaling` are carried verbatim.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::{Map, Value};

use crate::error::{Error, IoContext, Result};

/// The architectures we read, dispatched on `architectures[0]` of config.json.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    /// `LlamaForCausalLM`
    Llama,
    /// `MistralForCausalLM` (same tensor layout as Llama)
    Mistral,
    /// `Qwen2ForCausalLM` (Llama layout with q/k/v biases)
    Qwen2,
    /// `LlamaDifferentialForCausalLM`, format A of SPEC §4 (the axolotl plugin's
    /// `llama-differential`).
    LlamaDifferential,
    /// `DiffLlamaForCausalLM`, format B of SPEC §5 (transformers' native `diffllama`).
    DiffLlama,
}

impl Architecture {
    /// Every accepted `architectures` value.
    pub const SUPPORTED: [&'static str; 5] = [
        "LlamaForCausalLM",
        "MistralForCausalLM",
        "Qwen2ForCausalLM",
        "LlamaDifferentialForCausalLM",
        "DiffLlamaForCausalLM",
    ];

    /// Whether the attention is already differential (format A or B).
    pub fn is_differential(self) -> bool {
        matches!(self, Self::LlamaDifferential | Self::DiffLlama)
    }

    /// Maps a Hugging Face class name to the enum; `None` for anything else.
    pub fn from_class_name(name: &str) -> Option<Self> {
        match name {
            "LlamaForCausalLM" => Some(Self::Llama),
            "MistralForCausalLM" => Some(Self::Mistral),
            "Qwen2ForCausalLM" => Some(Self::Qwen2),
            // The plugin itself writes `LlamaDifferentialModel`; accept both.
            "LlamaDifferentialForCausalLM" | "LlamaDifferentialModel" => {
                Some(Self::LlamaDifferential)
            }
            "DiffLlamaForCausalLM" => Some(Self::DiffLlama),
            _ => None,
        }
    }
}

/// Typed mirror of the config.json fields the converter needs (names as in config.json).
#[derive(Debug, Clone, Deserialize)]
pub struct LlamaConfig {
    pub architectures: Option<Vec<String>>,
    pub model_type: Option<String>,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: Option<usize>,
    pub head_dim: Option<usize>,
    pub vocab_size: usize,
    pub rms_norm_eps: Option<f64>,
    pub rope_theta: Option<f64>,
    pub rope_scaling: Option<Value>,
    /// transformers >= 5 writes `rope_parameters` (with `rope_theta` inside) instead of
    /// `rope_theta` + `rope_scaling`.
    pub rope_parameters: Option<Value>,
    pub attention_bias: Option<bool>,
    pub tie_word_embeddings: Option<bool>,
    pub initializer_range: Option<f64>,
    pub torch_dtype: Option<String>,
}

/// A config.json as read from disk: the raw object, its typed view and the architecture.
#[derive(Debug, Clone)]
pub struct ModelConfig {
    /// Where it was read from (for error messages).
    pub path: PathBuf,
    /// The whole JSON object, key order preserved.
    pub raw: Map<String, Value>,
    pub typed: LlamaConfig,
    pub architecture: Architecture,
}

/// Attention geometry resolved from a config (SPEC §1 notation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttentionDims {
    /// D, `hidden_size`
    pub hidden_size: usize,
    /// H, `num_attention_heads`
    pub num_attention_heads: usize,
    /// Hkv, `num_key_value_heads` (missing = H)
    pub num_key_value_heads: usize,
    /// d, `head_dim` if present, else D / H
    pub head_dim: usize,
    /// L, `num_hidden_layers`
    pub num_hidden_layers: usize,
}

impl ModelConfig {
    /// Reads and validates `path` (a config.json of the Llama family).
    ///
    /// Errors: missing file, invalid JSON, missing or non-integer fields, unsupported
    /// `architectures`, inconsistent head counts.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).at(path)?;
        Self::from_str(&text, path)
    }

    /// Parses config.json text; `path` only names the source in errors.
    pub fn from_str(text: &str, path: &Path) -> Result<Self> {
        let value: Value = serde_json::from_str(text).map_err(|source| Error::Json {
            path: path.to_path_buf(),
            source,
        })?;
        let Value::Object(raw) = value else {
            return Err(Error::InvalidValue {
                path: path.to_path_buf(),
                key: "<root>".into(),
                value: short(&value),
                reason: "config.json must be a JSON object".into(),
            });
        };
        let typed: LlamaConfig = typed_from_json(Value::Object(raw.clone()), path)?;
        let architecture = match typed.architectures.as_deref() {
            Some([name]) => Architecture::from_class_name(name).ok_or_else(|| {
                Error::UnsupportedArchitecture {
                    path: path.to_path_buf(),
                    value: name.clone(),
                    supported: Architecture::SUPPORTED.join(", "),
                }
            })?,
            Some(other) => {
                return Err(Error::UnsupportedArchitecture {
                    path: path.to_path_buf(),
                    value: format!("{other:?}"),
                    supported: Architecture::SUPPORTED.join(", "),
                })
            }
            None => match typed.model_type.as_deref() {
                Some("llama") => Architecture::Llama,
                Some("mistral") => Architecture::Mistral,
                Some("qwen2") => Architecture::Qwen2,
                Some("llama-differential") => Architecture::LlamaDifferential,
                Some("diffllama") => Architecture::DiffLlama,
                other => {
                    return Err(Error::UnsupportedArchitecture {
                        path: path.to_path_buf(),
                        value: format!("architectures missing, model_type {other:?}"),
                        supported: Architecture::SUPPORTED.join(", "),
                    })
                }
            },
        };
        let cfg = Self {
            path: path.to_path_buf(),
            raw,
            typed,
            architecture,
        };
        let dims = cfg.dims()?;
        cfg.check_numbers(dims.head_dim)?;
        Ok(cfg)
    }

    /// The numeric fields every forward depends on, checked when the config is read (so that
    /// `convert` refuses what `generate` could not run, and nothing runs into NaN): `rope_theta`
    /// finite and positive, `rms_norm_eps` finite and >= 0, `max_position_embeddings` a
    /// non-negative integer, `rope_scaling` of a supported type with positive parameters.
    fn check_numbers(&self, head_dim: usize) -> Result<()> {
        let invalid = |key: &str, value: String, reason: &str| Error::InvalidValue {
            path: self.path.clone(),
            key: key.into(),
            value,
            reason: reason.into(),
        };
        let (theta, _) = self.rope();
        if !(theta.is_finite() && theta > 0.0) {
            return Err(invalid(
                "rope_theta",
                theta.to_string(),
                "must be a positive number",
            ));
        }
        if let Some(e) = self.typed.rms_norm_eps {
            if !(e.is_finite() && e >= 0.0) {
                return Err(invalid(
                    "rms_norm_eps",
                    e.to_string(),
                    "must be a number >= 0",
                ));
            }
        }
        if let Some(v) = self.raw.get("max_position_embeddings") {
            if v.as_u64().is_none() {
                return Err(invalid(
                    "max_position_embeddings",
                    short(v),
                    "must be a non-negative integer",
                ));
            }
        }
        self.inv_freq(head_dim)?;
        Ok(())
    }

    /// RoPE inverse frequencies `[head_dim / 2]` of [`ModelConfig::rope`] (see
    /// `model::rope::inv_freq`); an unsupported or incomplete `rope_scaling` is refused by key.
    pub fn inv_freq(&self, head_dim: usize) -> Result<Vec<f32>> {
        let (theta, scaling) = self.rope();
        crate::model::rope::inv_freq(head_dim, theta, scaling.as_ref()).map_err(|reason| {
            Error::InvalidValue {
                path: self.path.clone(),
                key: "rope_scaling".into(),
                value: scaling.map(|s| short(&s)).unwrap_or_default(),
                reason,
            }
        })
    }

    /// Resolves and validates the attention geometry.
    pub fn dims(&self) -> Result<AttentionDims> {
        let t = &self.typed;
        let invalid = |key: &str, value: String, reason: &str| Error::InvalidValue {
            path: self.path.clone(),
            key: key.into(),
            value,
            reason: reason.into(),
        };
        if t.num_attention_heads == 0 {
            return Err(invalid(
                "num_attention_heads",
                "0".into(),
                "must be positive",
            ));
        }
        let h = t.num_attention_heads;
        let hkv = t.num_key_value_heads.unwrap_or(h);
        if hkv == 0 || h % hkv != 0 {
            return Err(invalid(
                "num_key_value_heads",
                hkv.to_string(),
                &format!("must divide num_attention_heads ({h})"),
            ));
        }
        let head_dim = match t.head_dim {
            Some(0) => return Err(invalid("head_dim", "0".into(), "must be positive")),
            Some(d) => d,
            None => {
                if t.hidden_size % h != 0 {
                    return Err(invalid(
                        "hidden_size",
                        t.hidden_size.to_string(),
                        &format!(
                            "not divisible by num_attention_heads ({h}) and no head_dim given"
                        ),
                    ));
                }
                t.hidden_size / h
            }
        };
        Ok(AttentionDims {
            hidden_size: t.hidden_size,
            num_attention_heads: h,
            num_key_value_heads: hkv,
            head_dim,
            num_hidden_layers: t.num_hidden_layers,
        })
    }

    /// Every tensor a source checkpoint of this config must hold, with its shape (HF names):
    /// embeddings, final norm, per layer the two norms, q/k/v/o (and their biases when
    /// `attention_bias` is true, q/k/v biases for Qwen2) and the SwiGLU MLP. `lm_head.weight`
    /// is optional (tied embeddings) and not listed.
    pub fn expected_tensors(&self) -> Result<std::collections::BTreeMap<String, Vec<usize>>> {
        let d = self.dims()?;
        let (dm, h, kv, hd) = (
            d.hidden_size,
            d.num_attention_heads,
            d.num_key_value_heads,
            d.head_dim,
        );
        let i = self.typed.intermediate_size;
        let mut m = std::collections::BTreeMap::new();
        m.insert(
            "model.embed_tokens.weight".to_string(),
            vec![self.typed.vocab_size, dm],
        );
        m.insert("model.norm.weight".to_string(), vec![dm]);
        let bias = self.typed.attention_bias.unwrap_or(false);
        for l in 0..d.num_hidden_layers {
            let p = format!("model.layers.{l}.");
            m.insert(format!("{p}input_layernorm.weight"), vec![dm]);
            m.insert(format!("{p}post_attention_layernorm.weight"), vec![dm]);
            for (proj, rows, cols) in [
                ("q_proj", h * hd, dm),
                ("k_proj", kv * hd, dm),
                ("v_proj", kv * hd, dm),
                ("o_proj", dm, h * hd),
            ] {
                m.insert(format!("{p}self_attn.{proj}.weight"), vec![rows, cols]);
                let qkv_bias = self.architecture == Architecture::Qwen2 && proj != "o_proj";
                if bias || qkv_bias {
                    m.insert(format!("{p}self_attn.{proj}.bias"), vec![rows]);
                }
            }
            m.insert(format!("{p}mlp.gate_proj.weight"), vec![i, dm]);
            m.insert(format!("{p}mlp.up_proj.weight"), vec![i, dm]);
            m.insert(format!("{p}mlp.down_proj.weight"), vec![dm, i]);
        }
        Ok(m)
    }

    /// Checks the non-shape fields a Llama-family forward depends on.
    pub fn check_supported(&self) -> Result<()> {
        let act = self
            .raw
            .get("hidden_act")
            .and_then(Value::as_str)
            .unwrap_or("silu");
        if act != "silu" {
            return Err(Error::InvalidValue {
                path: self.path.clone(),
                key: "hidden_act".into(),
                value: format!("{act:?}"),
                reason: "only silu (SwiGLU MLP) is supported".into(),
            });
        }
        if self.typed.num_hidden_layers == 0 {
            return Err(Error::InvalidValue {
                path: self.path.clone(),
                key: "num_hidden_layers".into(),
                value: "0".into(),
                reason: "must be positive".into(),
            });
        }
        Ok(())
    }

    /// `diff_attn_mix` (the warm-up factor in force when a training checkpoint was written;
    /// see [`MIX_KEY`]), validated to lie in [0, 1]; None when absent.
    pub fn diff_attn_mix(&self) -> Result<Option<f64>> {
        match self.raw.get(MIX_KEY) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => match v.as_f64() {
                Some(x) if (0.0..=1.0).contains(&x) => Ok(Some(x)),
                _ => Err(Error::InvalidValue {
                    path: self.path.clone(),
                    key: MIX_KEY.into(),
                    value: v.to_string(),
                    reason: "expected a number in [0, 1]".into(),
                }),
            },
        }
    }

    /// A boolean key of config.json (`split_heads`, `sublayer_norm`...): `default` when absent
    /// or null; any other type is refused by key (not read as the default).
    pub fn flag(&self, key: &str, default: bool) -> Result<bool> {
        match self.raw.get(key) {
            None | Some(Value::Null) => Ok(default),
            Some(Value::Bool(b)) => Ok(*b),
            Some(v) => Err(Error::InvalidValue {
                path: self.path.clone(),
                key: key.into(),
                value: short(v),
                reason: "expected true or false".into(),
            }),
        }
    }

    /// Refuses a checkpoint (`origin`) without `lm_head.weight` (`has_lm_head` false) when
    /// config.json says explicitly `"tie_word_embeddings": false`: transformers would give the
    /// missing head random values.
    pub fn check_lm_head(&self, has_lm_head: bool, origin: &Path) -> Result<()> {
        if !has_lm_head && self.typed.tie_word_embeddings == Some(false) {
            return Err(Error::MissingTensor {
                path: origin.to_path_buf(),
                name: "lm_head.weight (config.json has tie_word_embeddings: false)".into(),
            });
        }
        Ok(())
    }

    /// `tie_word_embeddings`, default false as in transformers' LlamaConfig; a checkpoint
    /// without `lm_head.weight` whose config does not say false is read as tied (see
    /// [`ModelConfig::check_lm_head`]).
    pub fn tie_word_embeddings(&self) -> bool {
        self.typed.tie_word_embeddings.unwrap_or(false)
    }

    /// `initializer_range`, default 0.02 (transformers' LlamaConfig default).
    pub fn initializer_range(&self) -> f64 {
        self.typed.initializer_range.unwrap_or(0.02)
    }

    /// RoPE parameters from either convention: (`rope_theta`, scaling object or None).
    /// transformers 4.x: `rope_theta` + `rope_scaling`; 5.x: `rope_parameters` holding
    /// `rope_type`, `rope_theta` and the scaling keys. Default theta 10000.
    pub fn rope(&self) -> (f64, Option<Value>) {
        let t = &self.typed;
        if let Some(Value::Object(p)) = &t.rope_parameters {
            let theta = p
                .get("rope_theta")
                .and_then(Value::as_f64)
                .or(t.rope_theta)
                .unwrap_or(10000.0);
            return (theta, Some(Value::Object(p.clone())));
        }
        (
            t.rope_theta.unwrap_or(10000.0),
            t.rope_scaling.clone().filter(|v| !v.is_null()),
        )
    }

    /// `rms_norm_eps`, default 1e-6 (transformers' LlamaConfig default).
    pub fn rms_norm_eps(&self) -> f64 {
        self.typed.rms_norm_eps.unwrap_or(1e-6)
    }
}

/// Writes a JSON object with two-space indentation and a trailing newline (transformers' style).
pub fn write_json(path: &Path, value: &Value) -> Result<()> {
    let mut text = serde_json::to_string_pretty(value).expect("JSON values always serialise");
    text.push('\n');
    std::fs::write(path, text).at(path)
}

/// Deserialises valid JSON `value` (read from `path`) into `T`; a wrong type or a missing
/// field is reported with the key that holds it (`num_attention_heads`, `rope_scaling.factor`)
/// and its value, not as invalid JSON.
pub(crate) fn typed_from_json<T: serde::de::DeserializeOwned>(
    value: Value,
    path: &Path,
) -> Result<T> {
    let lookup = value.clone();
    serde_path_to_error::deserialize(value).map_err(|e| {
        let key = e.path().to_string();
        let reason = e.inner().to_string();
        if let Some(field) = reason
            .strip_prefix("missing field `")
            .and_then(|r| r.strip_suffix('`'))
        {
            let key = if key == "." {
                field.to_string()
            } else {
                format!("{key}.{field}")
            };
            return Error::MissingKey {
                path: path.to_path_buf(),
                key,
            };
        }
        let found = e
            .path()
            .iter()
            .try_fold(&lookup, |v, segment| match segment {
                serde_path_to_error::Segment::Seq { index } => v.get(index),
                serde_path_to_error::Segment::Map { key } => v.get(key.as_str()),
                _ => None,
            })
            .map(short)
            .unwrap_or_default();
        Error::InvalidValue {
            path: path.to_path_buf(),
            key,
            value: found,
            reason,
        }
    })
}

fn short(v: &Value) -> String {
    let s = v.to_string();
    if s.len() > 60 {
        format!("{}...", &s[..60])
    } else {
        s
    }
}

/// Key of config.json holding the negative-branch warm-up factor in force when a training
/// checkpoint was written (the plugin's module attribute name); our loader applies it.
pub const MIX_KEY: &str = "diff_attn_mix";

/// `lambda_init(l) = 0.8 - 0.6 * exp(-0.3 * l)`, l the 0-based decoder-layer index
/// (paper eq. 2 and section 2.1; SPEC §2). Computed in f64 like Python's `math.exp`,
/// then stored as f32.
pub fn lambda_init(layer_idx: usize) -> f64 {
    0.8 - 0.6 * (-0.3 * layer_idx as f64).exp()
}

/// Token ids of a config field that is a single id or a list (`eos_token_id`).
pub fn token_ids(v: Option<&Value>) -> Vec<u32> {
    match v {
        Some(Value::Number(n)) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(|x| x.as_u64().map(|x| x as u32))
            .collect(),
        _ => Vec::new(),
    }
}
