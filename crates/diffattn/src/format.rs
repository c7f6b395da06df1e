//! Which on-disk format a converted model is written in, independent of the family and of
//! the attention variant: format A (`llama-differential`) only where a Llama config
//! expresses the source exactly, else the family's own `<model_type>-differential`. A
//! checkpoint must never be read differently by a loader than by our runtime, so the choice
//! is made from what the source's config.json actually does (its windows, its biases, its
//! block), not from its class name alone. See `docs/formats.md`.

use serde_json::{json, Map, Value};

use crate::config::ModelConfig;
use crate::families::{BiasPattern, BlockNorms, NormForm, LLAMA};

/// The format a conversion writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// Format A (`llama-differential`, a Llama config); `zero_o_bias`: the source has q/k/v
    /// biases but no o bias (Qwen2), so explicit zero `o_proj.bias` tensors are added to make
    /// `attention_bias: true` true.
    LlamaDifferential { zero_o_bias: bool },
    /// `<model_type>-differential` of the source's family.
    Family,
}

/// Why a Llama config cannot express `mc`'s source model exactly; None when it can.
pub fn why_not_llama(mc: &ModelConfig) -> Option<String> {
    let f = mc.family;
    if std::ptr::eq(f, &LLAMA) {
        return None;
    }
    let mut reasons = Vec::new();
    if f.norm == NormForm::OnePlusWeight {
        reasons.push("(1 + w) RMS norms".to_string());
    }
    if f.block_norms == BlockNorms::Sandwich {
        reasons.push("four norms per block".to_string());
    }
    if f.embed_scale {
        reasons.push("embeddings scaled by sqrt(hidden_size)".to_string());
    }
    if f.default_activation != LLAMA.default_activation {
        reasons.push(format!("a {} MLP", f.default_activation.names()[0]));
    }
    if f.qk_norm {
        reasons.push("q_norm/k_norm".to_string());
    }
    if let Ok(scale) = mc.query_scale() {
        let d = mc.dims().map(|d| d.head_dim as f64).unwrap_or(0.0);
        if (scale * d.sqrt() - 1.0).abs() > 1e-12 {
            reasons.push("query_pre_attn_scalar != head_dim".to_string());
        }
    }
    if let Ok(layers) = mc.layer_attention() {
        let max_pos = mc.max_position_embeddings();
        if let Some(w) = layers
            .iter()
            .filter_map(|l| l.sliding_window)
            .find(|&w| w < max_pos)
        {
            reasons.push(format!(
                "a sliding window of {w} < max_position_embeddings ({max_pos}) in {} of {} layers",
                layers.iter().filter(|l| l.sliding_window.is_some()).count(),
                layers.len()
            ));
        }
        if layers.iter().any(|l| {
            l.rope_theta != layers[0].rope_theta || l.rope_scaling != layers[0].rope_scaling
        }) {
            reasons.push("a RoPE base per layer type".to_string());
        }
    }
    if let Ok(Some(c)) = mc.final_logit_softcapping() {
        reasons.push(format!("final_logit_softcapping {c}"));
    }
    (!reasons.is_empty()).then(|| reasons.join(", "))
}

/// The format a conversion of `mc` writes.
pub fn target(mc: &ModelConfig) -> Target {
    match why_not_llama(mc) {
        None => Target::LlamaDifferential {
            zero_o_bias: mc.family.bias == BiasPattern::QkvAlways,
        },
        Some(_) => Target::Family,
    }
}

/// The source config rewritten as a Llama config that reads the same (format A): keys whose
/// default differs between the source's config class and Llama's are written explicitly,
/// and `attention_bias: true` where the source has q/k/v biases (zero o biases are added).
pub fn as_llama_config(mc: &ModelConfig, zero_o_bias: bool) -> Map<String, Value> {
    let mut raw = mc.raw.clone();
    let (theta, _) = mc.rope();
    if !raw.contains_key("rope_theta") && !raw.contains_key("rope_parameters") {
        raw.insert("rope_theta".into(), json!(theta));
    }
    raw.entry("max_position_embeddings")
        .or_insert(json!(mc.max_position_embeddings()));
    raw.entry("tie_word_embeddings")
        .or_insert(json!(mc.tie_word_embeddings()));
    raw.entry("rms_norm_eps")
        .or_insert(json!(mc.rms_norm_eps()));
    if zero_o_bias {
        raw.insert("attention_bias".into(), json!(true));
    }
    raw
}
