//! `Gemma3ForCausalLM`, text only (`gemma3_text`; transformers
//! `models/gemma3/modeling_gemma3.py`, `configuration_gemma3.py`): RMS norms `(x/rms)(1 + w)`
//! in f32, four per block, embeddings scaled by `sqrt(hidden_size)`, GELU-tanh MLP, Gemma-form
//! `q_norm`/`k_norm`, query scale `query_pre_attn_scalar ** -0.5`, sliding and full layers
//! (`layer_types`, else five sliding to one full) with the sliding layers' own RoPE base
//! (`rope_local_base_freq`, default 10000; full layers 1e6), optional final logit soft cap,
//! tied embeddings.

use super::*;

pub const GEMMA3: Family = Family {
    name: "gemma3",
    class: "Gemma3ForCausalLM",
    model_type: "gemma3_text",
    source: "models/gemma3/modeling_gemma3.py",
    norm: NormForm::OnePlusWeight,
    block_norms: BlockNorms::Sandwich,
    activation_key: "hidden_activation",
    default_activation: Activation::GeluTanh,
    embed_scale: true,
    qk_norm: true,
    bias: BiasPattern::AttentionBiasKey,
    windows: WindowRule::Pattern,
    local_rope: Some(("rope_local_base_freq", 10000.0)),
    query_pre_attn_scalar: Some(("query_pre_attn_scalar", 256.0)),
    final_logit_softcapping: true,
    default_rope_theta: 1_000_000.0,
    default_rms_norm_eps: 1e-6,
    default_tie_word_embeddings: true,
    default_max_position_embeddings: 131_072,
};
