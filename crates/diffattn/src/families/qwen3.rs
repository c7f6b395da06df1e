//! `Qwen3ForCausalLM` (transformers `models/qwen3/modeling_qwen3.py`): Llama's block with
//! `q_norm`/`k_norm` (RMS norm with weight `[head_dim]` over each head, after the projection
//! and before RoPE), an explicit `head_dim`, and Qwen2's window rule.

use super::*;

pub const QWEN3: Family = Family {
    name: "qwen3",
    class: "Qwen3ForCausalLM",
    model_type: "qwen3",
    source: "models/qwen3/modeling_qwen3.py",
    qk_norm: true,
    windows: WindowRule::UseSlidingWindow,
    default_max_position_embeddings: 32768,
    ..LLAMA
};
