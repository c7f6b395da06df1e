//! `Qwen2ForCausalLM` (transformers `models/qwen2/modeling_qwen2.py`): Llama's block with
//! biases on q, k and v (none on o, no `attention_bias` key) and sliding windows in layers
//! `>= max_window_layers` when `use_sliding_window` (or as `layer_types` says).

use super::*;

pub const QWEN2: Family = Family {
    name: "qwen2",
    class: "Qwen2ForCausalLM",
    model_type: "qwen2",
    source: "models/qwen2/modeling_qwen2.py",
    bias: BiasPattern::QkvAlways,
    windows: WindowRule::UseSlidingWindow,
    default_max_position_embeddings: 32768,
    ..LLAMA
};
