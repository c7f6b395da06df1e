//! `config.json` of the Llama family: a typed view over the raw JSON object.
//!
//! The raw object is kept (key order included, `serde_json` is built with `preserve_order`) so
//! that a rewritten config differs from its source only in the keys we change; unknown fields and
//! `rope_scaling` are carried verbatim.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::{Map, Value};

use crate::error::{Error, IoContext, Result};
use crate::families::{Activation, Family, LayerAttention, Shapes, WindowRule, FAMILIES, LLAMA};

/// How a checkpoint's attention is laid out on disk, read from `architectures[0]` (or
/// `model_type`): a source model of its family, or one of the differential formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// A source checkpoint of its family (standard attention).
    Source,
    /// Format A, `llama-differential` (`LlamaDifferentialForCausalLM`; the axolotl plugin's).
    LlamaDifferential,
    /// Format B, `diffllama` (`DiffLlamaForCausalLM`, native in transformers).
    DiffLlama,
    /// The family's own differential format, `<model_type>-differential`
    /// (`<Family>DifferentialForCausalLM`), for sources a Llama config cannot express.
    FamilyDifferential,
}

impl Format {
    /// The name users see: `source`, `llama-differential`, `diffllama` or
    /// `<model_type>-differential` of `family`.
    pub fn name(self, family: &Family) -> String {
        match self {
            Self::Source => format!("{} source", family.model_type),
            Self::LlamaDifferential => "llama-differential".into(),
            Self::DiffLlama => "diffllama".into(),
            Self::FamilyDifferential => family.differential_model_type(),
        }
    }

    /// Whether the attention is already differential.
    pub fn is_differential(self) -> bool {
        self != Self::Source
    }
}

/// The config key naming the differential-attention version (V1 when absent).
pub const VARIANT_KEY: &str = "diff_attn_variant";

/// Which Differential Transformer a differential checkpoint holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Variant {
    /// Ye et al. 2024 (arXiv:2410.05258): two softmax maps per head, a shared scalar lambda.
    V1,
    /// Differential Transformer V2 (2026): 2H query heads over unchanged K/V, a per-token,
    /// per-head `sigmoid(lambda_proj(x))`, no sub-layer norm.
    V2,
}

/// Every accepted `architectures` value, for error messages.
pub fn supported_architectures() -> String {
    let mut v: Vec<String> = FAMILIES.iter().map(|f| f.class.to_string()).collect();
    v.push("LlamaDifferentialForCausalLM".into());
    v.push("DiffLlamaForCausalLM".into());
    v.extend(FAMILIES[1..].iter().map(|f| f.differential_class()));
    v.join(", ")
}

/// The family and format of an `architectures[0]` class name.
pub fn from_class_name(name: &str) -> Option<(&'static Family, Format)> {
    if let Some(f) = Family::from_class(name) {
        return Some((f, Format::Source));
    }
    match name {
        // The plugin itself writes `LlamaDifferentialModel`; accept both.
        "LlamaDifferentialForCausalLM" | "LlamaDifferentialModel" => {
            return Some((&LLAMA, Format::LlamaDifferential))
        }
        "DiffLlamaForCausalLM" => return Some((&LLAMA, Format::DiffLlama)),
        _ => {}
    }
    FAMILIES[1..]
        .iter()
        .copied()
        .find(|f| f.differential_class() == name)
        .map(|f| (f, Format::FamilyDifferential))
}

/// The family and format of a `model_type` (used when `architectures` is absent).
pub fn from_model_type(model_type: &str) -> Option<(&'static Family, Format)> {
    if let Some(f) = Family::from_model_type(model_type) {
        return Some((f, Format::Source));
    }
    match model_type {
        "llama-differential" => return Some((&LLAMA, Format::LlamaDifferential)),
        "diffllama" => return Some((&LLAMA, Format::DiffLlama)),
        _ => {}
    }
    FAMILIES[1..]
        .iter()
        .copied()
        .find(|f| f.differential_model_type() == model_type)
        .map(|f| (f, Format::FamilyDifferential))
}

/// Typed mirror of the config.json fields every family shares (names as in config.json);
/// family-specific keys are read from [`ModelConfig::raw`] by the family's rules.
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

/// A config.json as read from disk: the raw object, its typed view, the family and the format.
#[derive(Debug, Clone)]
pub struct ModelConfig {
    /// Where it was read from (for error messages).
    pub path: PathBuf,
    /// The whole JSON object, key order preserved.
    pub raw: Map<String, Value>,
    pub typed: LlamaConfig,
    pub family: &'static Family,
    pub format: Format,
}

/// Attention geometry resolved from a config (docs/spec.md §1 notation).
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
        let unsupported = |value: String| Error::UnsupportedArchitecture {
            path: path.to_path_buf(),
            value,
            supported: supported_architectures(),
        };
        let (family, format) = match typed.architectures.as_deref() {
            Some([name]) => from_class_name(name).ok_or_else(|| unsupported(name.clone()))?,
            Some(other) => return Err(unsupported(format!("{other:?}"))),
            None => match typed.model_type.as_deref() {
                Some(t) => from_model_type(t).ok_or_else(|| {
                    unsupported(format!("architectures missing, model_type {t:?}"))
                })?,
                None => return Err(unsupported("architectures missing, model_type None".into())),
            },
        };
        let cfg = Self {
            path: path.to_path_buf(),
            raw,
            typed,
            family,
            format,
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
            let key = match self.rope_key("full_attention").as_str() {
                "rope_scaling" => "rope_theta".to_string(),
                k => format!("{k}.rope_theta"),
            };
            return Err(invalid(
                &key,
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
            if !v.as_u64().is_some_and(|n| n > 0) {
                return Err(invalid(
                    "max_position_embeddings",
                    short(v),
                    "must be a positive integer",
                ));
            }
        }
        self.check_rope_parameters()?;
        self.inv_freq(head_dim)?;
        // The sliding layers' own RoPE (Gemma); nothing here is sized by num_hidden_layers,
        // which is checked against the weights before the layers are resolved.
        if let Some(v) = self
            .family
            .local_rope
            .and_then(|(key, _)| self.raw.get(key).map(|v| (key, v)))
            .filter(|(_, v)| !v.is_null())
        {
            if !v.1.as_f64().is_some_and(|x| x.is_finite() && x > 0.0) {
                return Err(invalid(v.0, short(v.1), "must be a positive number"));
            }
        }
        if let Some((theta, scaling)) = self.local_rope()? {
            if !(theta.is_finite() && theta > 0.0) {
                return Err(invalid(
                    &match self.rope_key("sliding_attention").as_str() {
                        "rope_scaling" => "rope_local_base_freq".to_string(),
                        k => format!("{k}.rope_theta"),
                    },
                    theta.to_string(),
                    "must be a positive number",
                ));
            }
            self.rope_inv_freq(head_dim, theta, scaling)?;
        }
        self.sliding_window()?;
        Ok(())
    }

    /// RoPE inverse frequencies `[head_dim / 2]` of [`ModelConfig::rope`] (see
    /// `model::rope::inv_freq`); an unsupported or incomplete `rope_scaling` is refused by key.
    pub fn inv_freq(&self, head_dim: usize) -> Result<Vec<f32>> {
        let (theta, scaling) = self.rope();
        self.rope_inv_freq(head_dim, theta, scaling)
    }

    /// The config.json key a RoPE scaling object came from, for messages: `rope_scaling`
    /// (4.x), `rope_parameters` (5.x) or `rope_parameters.<layer type>` (Gemma 3, 5.x).
    fn rope_key(&self, layer_type: &str) -> String {
        match self.typed.rope_parameters.as_ref() {
            Some(Value::Object(p)) if p.contains_key(layer_type) => {
                format!("rope_parameters.{layer_type}")
            }
            Some(Value::Object(_)) => "rope_parameters".into(),
            _ => "rope_scaling".into(),
        }
    }

    /// `rope_parameters` (transformers 5.x), when present: an object, flat or keyed by layer
    /// type, whose `rope_theta` values are positive numbers (never silently replaced by the
    /// default).
    fn check_rope_parameters(&self) -> Result<()> {
        let Some(p) = self.raw.get("rope_parameters").filter(|v| !v.is_null()) else {
            return Ok(());
        };
        let Value::Object(map) = p else {
            return Err(self.invalid("rope_parameters", short(p), "must be an object"));
        };
        let check = |obj: &Map<String, Value>, key: String| -> Result<()> {
            if let Some(t) = obj.get("rope_theta") {
                if !t.as_f64().is_some_and(|x| x.is_finite() && x > 0.0) {
                    return Err(self.invalid(
                        &format!("{key}.rope_theta"),
                        short(t),
                        "must be a positive number",
                    ));
                }
            }
            Ok(())
        };
        check(map, "rope_parameters".into())?;
        for layer_type in ["full_attention", "sliding_attention"] {
            match map.get(layer_type) {
                None => {}
                Some(Value::Object(o)) => check(o, format!("rope_parameters.{layer_type}"))?,
                Some(v) => {
                    return Err(self.invalid(
                        &format!("rope_parameters.{layer_type}"),
                        short(v),
                        "must be an object",
                    ))
                }
            }
        }
        Ok(())
    }

    /// RoPE inverse frequencies of a layer's (theta, scaling) (see [`Self::layer_attention`]).
    pub fn rope_inv_freq(
        &self,
        head_dim: usize,
        theta: f64,
        scaling: Option<Value>,
    ) -> Result<Vec<f32>> {
        let layer_type = match scaling.as_ref() {
            Some(s)
                if self.family.local_rope.is_some()
                    && self
                        .typed
                        .rope_parameters
                        .as_ref()
                        .and_then(|p| p.get("sliding_attention"))
                        == Some(s) =>
            {
                "sliding_attention"
            }
            _ => "full_attention",
        };
        let inv =
            crate::model::rope::inv_freq(head_dim, theta, scaling.as_ref()).map_err(|reason| {
                Error::InvalidValue {
                    path: self.path.clone(),
                    key: self.rope_key(layer_type),
                    value: scaling.clone().map(|s| short(&s)).unwrap_or_default(),
                    reason,
                }
            })?;
        if inv.iter().any(|f| !f.is_finite()) {
            return Err(self.invalid(
                &self.rope_key(layer_type),
                theta.to_string(),
                "gives RoPE frequencies that are not finite in f32 (rope_theta out of range)",
            ));
        }
        Ok(inv)
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

    /// Shapes the family's tensor names are sized by.
    pub fn shapes(&self) -> Result<Shapes> {
        let d = self.dims()?;
        Ok(Shapes {
            hidden_size: d.hidden_size,
            intermediate_size: self.typed.intermediate_size,
            num_attention_heads: d.num_attention_heads,
            num_key_value_heads: d.num_key_value_heads,
            head_dim: d.head_dim,
            num_hidden_layers: d.num_hidden_layers,
            vocab_size: self.typed.vocab_size,
            attention_bias: self.typed.attention_bias.unwrap_or(false),
        })
    }

    /// Every tensor a source checkpoint of this config must hold, with its shape (HF names;
    /// see [`Family::expected_tensors`]). `lm_head.weight` is optional (tied embeddings) and
    /// not listed.
    pub fn expected_tensors(&self) -> Result<std::collections::BTreeMap<String, Vec<usize>>> {
        Ok(self.family.expected_tensors(&self.shapes()?))
    }

    fn invalid(&self, key: &str, value: String, reason: impl Into<String>) -> Error {
        Error::InvalidValue {
            path: self.path.clone(),
            key: key.into(),
            value,
            reason: reason.into(),
        }
    }

    /// The MLP activation (the family's key, e.g. `hidden_act` or `hidden_activation`).
    pub fn activation(&self) -> Result<Activation> {
        let key = self.family.activation_key;
        match self.raw.get(key) {
            None | Some(Value::Null) => Ok(self.family.default_activation),
            Some(Value::String(name)) => Activation::from_name(name)
                .filter(|a| *a == self.family.default_activation)
                .ok_or_else(|| {
                    self.invalid(
                        key,
                        format!("{name:?}"),
                        format!(
                            "{} models use {}",
                            self.family.class,
                            self.family.default_activation.names()[0]
                        ),
                    )
                }),
            Some(v) => Err(self.invalid(key, short(v), "expected a string")),
        }
    }

    /// Checks the non-shape fields a forward of this family depends on.
    pub fn check_supported(&self) -> Result<()> {
        self.activation()?;
        if self.typed.num_hidden_layers == 0 {
            return Err(self.invalid("num_hidden_layers", "0".into(), "must be positive"));
        }
        for key in ["attn_logit_softcapping"] {
            if let Some(v) = self.raw.get(key).filter(|v| !v.is_null()) {
                return Err(self.invalid(
                    key,
                    short(v),
                    "attention-score soft capping is not supported",
                ));
            }
        }
        if self.flag("use_bidirectional_attention", false)? {
            return Err(self.invalid(
                "use_bidirectional_attention",
                "true".into(),
                "only causal language models are supported",
            ));
        }
        self.final_logit_softcapping()?;
        self.query_scale()?;
        Ok(())
    }

    /// A positive number of config.json (`key`), None when absent or null.
    fn positive(&self, key: &str) -> Result<Option<f64>> {
        match self.raw.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => match v.as_f64() {
                // Used in f32 arithmetic: its square root's inverse and itself must stay
                // finite and non-zero there.
                Some(x)
                    if x.is_finite()
                        && x > 0.0
                        && (x as f32).is_normal()
                        && ((1.0 / x) as f32).is_normal() =>
                {
                    Ok(Some(x))
                }
                _ => Err(self.invalid(key, short(v), "must be a positive number within f32 range")),
            },
        }
    }

    /// `final_logit_softcapping` of families that read it (logits = c·tanh(logits / c)).
    pub fn final_logit_softcapping(&self) -> Result<Option<f64>> {
        if !self.family.final_logit_softcapping {
            return Ok(None);
        }
        self.positive("final_logit_softcapping")
    }

    /// The factor scores are multiplied by: `query_pre_attn_scalar ** -0.5` (Gemma), else
    /// `head_dim ** -0.5` (transformers' `self.scaling`).
    pub fn query_scale(&self) -> Result<f64> {
        let d = self.dims()?.head_dim as f64;
        Ok(match self.family.query_pre_attn_scalar {
            Some((key, default)) => self.positive(key)?.unwrap_or(default).powf(-0.5),
            None => d.powf(-0.5),
        })
    }

    /// `sliding_window` as a positive integer, None when null or absent.
    fn sliding_window(&self) -> Result<Option<usize>> {
        match self.raw.get("sliding_window") {
            None | Some(Value::Null) => Ok(None),
            Some(v) => match v.as_u64() {
                Some(w) if w > 0 => Ok(Some(w as usize)),
                _ => Err(self.invalid(
                    "sliding_window",
                    short(v),
                    "must be a positive integer or null",
                )),
            },
        }
    }

    /// Whether layer l is a sliding-window layer, per the family's [`WindowRule`].
    fn sliding_layers(&self) -> Result<Vec<bool>> {
        let n = self.typed.num_hidden_layers;
        let from_types = || -> Result<Option<Vec<bool>>> {
            let Some(v) = self.raw.get("layer_types").filter(|v| !v.is_null()) else {
                return Ok(None);
            };
            let bad = |reason: &str| self.invalid("layer_types", short(v), reason);
            let list = v.as_array().ok_or_else(|| bad("expected a list"))?;
            if list.len() != n {
                return Err(bad(&format!(
                    "has {} entries for num_hidden_layers = {n}",
                    list.len()
                )));
            }
            list.iter()
                .map(|t| match t.as_str() {
                    Some("sliding_attention") => Ok(true),
                    Some("full_attention") => Ok(false),
                    _ => Err(bad(
                        "entries must be \"sliding_attention\" or \"full_attention\"",
                    )),
                })
                .collect::<Result<Vec<bool>>>()
                .map(Some)
        };
        Ok(match self.family.windows {
            WindowRule::None => vec![false; n],
            WindowRule::EveryLayer => vec![true; n],
            WindowRule::UseSlidingWindow => {
                let on = self.flag("use_sliding_window", false)?;
                let first = match self.raw.get("max_window_layers") {
                    None | Some(Value::Null) => 28,
                    Some(v) => v.as_u64().ok_or_else(|| {
                        self.invalid(
                            "max_window_layers",
                            short(v),
                            "must be a non-negative integer",
                        )
                    })? as usize,
                };
                match from_types()? {
                    Some(v) => v,
                    None => (0..n).map(|l| on && l >= first).collect(),
                }
            }
            WindowRule::Pattern => match from_types()? {
                Some(v) => v,
                None => {
                    let pattern = match self.raw.get("sliding_window_pattern") {
                        None | Some(Value::Null) => 6,
                        Some(v) => match v.as_u64() {
                            Some(p) if p > 0 => p as usize,
                            _ => {
                                return Err(self.invalid(
                                    "sliding_window_pattern",
                                    short(v),
                                    "must be a positive integer",
                                ))
                            }
                        },
                    };
                    (0..n).map(|l| (l + 1) % pattern != 0).collect()
                }
            },
        })
    }

    /// Per layer: sliding window (None = full attention) and RoPE (base, scaling), as the
    /// family's config class resolves them (transformers 4.x keys or 5.x `rope_parameters`,
    /// flat or keyed by layer type).
    pub fn layer_attention(&self) -> Result<Vec<LayerAttention>> {
        let window = match self.family.windows {
            WindowRule::None => None,
            // Qwen2/Qwen3: `sliding_window` only counts with `use_sliding_window`, as their
            // config classes null it otherwise (`layer_types` then marks layers whose
            // "window" is None: full attention).
            WindowRule::UseSlidingWindow => {
                let on = self.flag("use_sliding_window", false)?;
                let w = self.sliding_window()?;
                on.then_some(w).flatten()
            }
            _ => self.sliding_window()?,
        };
        let sliding = self.sliding_layers()?;
        let (full_theta, full_scaling) = self.rope();
        let local = self.local_rope()?;
        Ok(sliding
            .into_iter()
            .map(|is_sliding| {
                let (rope_theta, rope_scaling) = match (&local, is_sliding) {
                    (Some((theta, scaling)), true) => (*theta, scaling.clone()),
                    _ => (full_theta, full_scaling.clone()),
                };
                LayerAttention {
                    sliding_window: if is_sliding { window } else { None },
                    rope_theta,
                    rope_scaling,
                }
            })
            .collect())
    }

    /// RoPE of the sliding layers for families that give them their own base: 5.x
    /// `rope_parameters.sliding_attention`, else 4.x `rope_local_base_freq` (default scaling).
    fn local_rope(&self) -> Result<Option<(f64, Option<Value>)>> {
        let Some((key, default)) = self.family.local_rope else {
            return Ok(None);
        };
        if let Some(Value::Object(p)) = self.typed.rope_parameters.as_ref() {
            if let Some(Value::Object(sliding)) = p.get("sliding_attention") {
                let theta = sliding
                    .get("rope_theta")
                    .and_then(Value::as_f64)
                    .unwrap_or(default);
                return Ok(Some((theta, Some(Value::Object(sliding.clone())))));
            }
        }
        Ok(Some((self.positive(key)?.unwrap_or(default), None)))
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

    /// `diff_attn_variant` of a differential config: `"v1"` (absent or null: the paper's first
    /// version) or `"v2"` (Differential Transformer V2, docs/formats.md "V2"); any other value
    /// is refused by key. A source config with the key is refused too: it names a variant of
    /// an attention the model does not have.
    pub fn diff_attn_variant(&self) -> Result<Variant> {
        let v = match self.raw.get(VARIANT_KEY) {
            None | Some(Value::Null) => return Ok(Variant::V1),
            Some(v) => v,
        };
        let bad = |reason: &str| Error::InvalidValue {
            path: self.path.clone(),
            key: VARIANT_KEY.into(),
            value: short(v),
            reason: reason.into(),
        };
        let variant = match v.as_str() {
            Some("v1") => Variant::V1,
            Some("v2") => Variant::V2,
            _ => return Err(bad("expected \"v1\" or \"v2\"")),
        };
        match self.format {
            Format::Source => Err(bad("a source (non-differential) config has no variant")),
            Format::DiffLlama if variant == Variant::V2 => Err(bad(
                "the diffllama format cannot express V2 (its attention is V1 split heads)",
            )),
            _ => Ok(variant),
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

    /// `tie_word_embeddings`, default the family's (false for Llama's config class, true for
    /// Gemma 3); a checkpoint without `lm_head.weight` whose config does not say false is read
    /// as tied (see [`ModelConfig::check_lm_head`]).
    pub fn tie_word_embeddings(&self) -> bool {
        self.typed
            .tie_word_embeddings
            .unwrap_or(self.family.default_tie_word_embeddings)
    }

    /// `max_position_embeddings`, default the family's.
    pub fn max_position_embeddings(&self) -> usize {
        self.raw
            .get("max_position_embeddings")
            .and_then(Value::as_u64)
            .map(|v| v as usize)
            .unwrap_or(self.family.default_max_position_embeddings)
    }

    /// `initializer_range`, default 0.02 (transformers' LlamaConfig default).
    pub fn initializer_range(&self) -> f64 {
        self.typed.initializer_range.unwrap_or(0.02)
    }

    /// RoPE parameters of the model's (full-attention) layers from either convention:
    /// (`rope_theta`, scaling object or None). transformers 4.x: `rope_theta` +
    /// `rope_scaling`; 5.x: `rope_parameters` holding `rope_type`, `rope_theta` and the
    /// scaling keys, or (Gemma 3) one such object per layer type, `full_attention` here.
    /// Default theta: the family's (10000; Gemma 3 1e6).
    pub fn rope(&self) -> (f64, Option<Value>) {
        let t = &self.typed;
        let default = self.family.default_rope_theta;
        if let Some(Value::Object(p)) = &t.rope_parameters {
            let p = match p.get("full_attention") {
                Some(Value::Object(full)) => full,
                _ => p,
            };
            let theta = p
                .get("rope_theta")
                .and_then(Value::as_f64)
                .or(t.rope_theta)
                .unwrap_or(default);
            return (theta, Some(Value::Object(p.clone())));
        }
        (
            t.rope_theta.unwrap_or(default),
            t.rope_scaling.clone().filter(|v| !v.is_null()),
        )
    }

    /// `rms_norm_eps`, default the family's (1e-6 in every family read here).
    pub fn rms_norm_eps(&self) -> f64 {
        self.typed
            .rms_norm_eps
            .unwrap_or(self.family.default_rms_norm_eps)
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
/// (paper eq. 2 and section 2.1; docs/spec.md §2). Computed in f64 like Python's `math.exp`,
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
