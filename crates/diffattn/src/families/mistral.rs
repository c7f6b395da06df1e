//! `MistralForCausalLM` (transformers `models/mistral/modeling_mistral.py`): Llama's block
//! with a `sliding_window` in every layer (null = full attention) and no biases.

use super::*;

pub const MISTRAL: Family = Family {
    name: "mistral",
    class: "MistralForCausalLM",
    model_type: "mistral",
    source: "models/mistral/modeling_mistral.py",
    bias: BiasPattern::Never,
    windows: WindowRule::EveryLayer,
    default_max_position_embeddings: 4096 * 32,
    ..LLAMA
};
