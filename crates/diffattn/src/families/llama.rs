//! `LlamaForCausalLM` (transformers `models/llama/modeling_llama.py`): the reference block —
//! pre-norm RMS norms `w * x/rms`, SwiGLU MLP, RoPE with `linear`/`llama3` scaling,
//! `attention_bias` on q, k, v and o.

use super::*;

pub const LLAMA: Family = Family {
    name: "llama",
    class: "LlamaForCausalLM",
    model_type: "llama",
    source: "models/llama/modeling_llama.py",
    norm: NormForm::Weight,
    block_norms: BlockNorms::PreNorm,
    activation_key: "hidden_act",
    default_activation: Activation::Silu,
    embed_scale: false,
    qk_norm: false,
    bias: BiasPattern::AttentionBiasKey,
    windows: WindowRule::None,
    local_rope: None,
    query_pre_attn_scalar: None,
    final_logit_softcapping: false,
    default_rope_theta: 10000.0,
    default_rms_norm_eps: 1e-6,
    default_tie_word_embeddings: false,
    default_max_position_embeddings: 2048,
};
