//! Model families as data: each family is one [`Family`] value (a block spec plus the
//! rules that resolve its per-layer attention from config.json), in its own file. Load,
//! convert, export and the format choice all read these specs; nothing else in the crate
//! matches on a family by name.
//!
//! Semantics follow Hugging Face transformers 5.x, `models/<family>/modeling_<family>.py` and
//! `configuration_<family>.py` (the file each spec names in its `source` field).

mod gemma3;
mod llama;
mod mistral;
mod qwen2;
mod qwen3;

use std::collections::BTreeMap;

use serde_json::Value;

pub use gemma3::GEMMA3;
pub use llama::LLAMA;
pub use mistral::MISTRAL;
pub use qwen2::QWEN2;
pub use qwen3::QWEN3;

/// Every family we read, in the order error messages list them.
pub const FAMILIES: [&Family; 5] = [&LLAMA, &MISTRAL, &QWEN2, &QWEN3, &GEMMA3];

/// How an RMS norm applies its weight `w` to `x / rms(x)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NormForm {
    /// `w * (x / rms)`, normalised in f32 and cast back before the weight (LlamaRMSNorm).
    Weight,
    /// `(x / rms) * (1 + w)` computed in f32 (Gemma3RMSNorm).
    OnePlusWeight,
}

/// Where a decoder block's norms sit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockNorms {
    /// `x += attn(input_layernorm(x)); x += mlp(post_attention_layernorm(x))` (Llama: the
    /// norm called `post_attention_layernorm` is the MLP's input norm).
    PreNorm,
    /// Four norms: `x += post_attention_layernorm(attn(input_layernorm(x)));
    /// x += post_feedforward_layernorm(mlp(pre_feedforward_layernorm(x)))` (Gemma 2/3).
    Sandwich,
}

/// The gated MLP's activation: `down(act(gate(x)) * up(x))`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `silu` (SwiGLU).
    Silu,
    /// `gelu_pytorch_tanh` (GELU, tanh approximation).
    GeluTanh,
}

impl Activation {
    /// The transformers `ACT2FN` names this activation answers to.
    pub fn names(self) -> &'static [&'static str] {
        match self {
            Self::Silu => &["silu", "swish"],
            Self::GeluTanh => &["gelu_pytorch_tanh", "gelu_tanh"],
        }
    }

    /// Parses an `ACT2FN` name.
    pub fn from_name(name: &str) -> Option<Self> {
        [Self::Silu, Self::GeluTanh]
            .into_iter()
            .find(|a| a.names().contains(&name))
    }
}

/// Which projections carry a bias.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BiasPattern {
    /// q, k, v and o when config.json's `attention_bias` is true (Llama, Mistral, Qwen3,
    /// Gemma 3).
    AttentionBiasKey,
    /// q, k and v always, never o (Qwen2; no `attention_bias` key).
    QkvAlways,
    /// None (Mistral: `bias=False` in its attention whatever config.json says).
    Never,
}

/// How the layers' attention types (full or sliding window) are read from config.json.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WindowRule {
    /// Full attention in every layer (`sliding_window` is not read).
    None,
    /// `sliding_window` (null = full attention) in every layer (Mistral).
    EveryLayer,
    /// `layer_types` when given; else `sliding_attention` for layers
    /// `>= max_window_layers` when `use_sliding_window` (Qwen2, Qwen3).
    UseSlidingWindow,
    /// `layer_types` when given; else every layer sliding except each
    /// `sliding_window_pattern`-th (default 6) (Gemma 3).
    Pattern,
}

/// One model family: its block, its attention rules and its config defaults.
#[derive(Debug)]
pub struct Family {
    /// Short name (`llama`, `qwen3`...).
    pub name: &'static str,
    /// `architectures[0]` of a source checkpoint.
    pub class: &'static str,
    /// `model_type` of a source checkpoint.
    pub model_type: &'static str,
    /// The transformers file whose semantics this spec follows.
    pub source: &'static str,
    pub norm: NormForm,
    pub block_norms: BlockNorms,
    /// config.json key naming the MLP activation, and its default.
    pub activation_key: &'static str,
    pub default_activation: Activation,
    /// Embeddings multiplied by `sqrt(hidden_size)` (rounded to the weights' dtype).
    pub embed_scale: bool,
    /// `q_norm` / `k_norm` (RMS norm over each head, weight `[head_dim]`) before RoPE.
    pub qk_norm: bool,
    pub bias: BiasPattern,
    pub windows: WindowRule,
    /// config.json key of the sliding layers' own RoPE base (transformers 4.x form), and its
    /// default; None = sliding layers use the model's RoPE.
    pub local_rope: Option<(&'static str, f64)>,
    /// Query scale `query_pre_attn_scalar ** -0.5` (key, default) instead of `head_dim ** -0.5`.
    pub query_pre_attn_scalar: Option<(&'static str, f64)>,
    /// `final_logit_softcapping` is read (tanh soft cap of the logits).
    pub final_logit_softcapping: bool,
    /// Defaults of the config class for absent keys.
    pub default_rope_theta: f64,
    pub default_rms_norm_eps: f64,
    pub default_tie_word_embeddings: bool,
    pub default_max_position_embeddings: usize,
}

/// The attention type of one layer, resolved from config.json.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerAttention {
    /// Sliding window (a query at index i sees keys j with i - window < j <= i); None = full.
    pub sliding_window: Option<usize>,
    /// RoPE base and scaling object of this layer.
    pub rope_theta: f64,
    pub rope_scaling: Option<Value>,
}

/// Tensor names of decoder layer `l` (Hugging Face names, shared by every family).
pub struct LayerNames {
    pub prefix: String,
}

impl LayerNames {
    pub fn new(l: usize) -> Self {
        Self {
            prefix: format!("model.layers.{l}."),
        }
    }
    /// `model.layers.{l}.{rest}`
    pub fn name(&self, rest: &str) -> String {
        format!("{}{rest}", self.prefix)
    }
    /// `model.layers.{l}.self_attn.{rest}`
    pub fn attn(&self, rest: &str) -> String {
        format!("{}self_attn.{rest}", self.prefix)
    }
}

/// Input norm of the block.
pub const INPUT_NORM: &str = "input_layernorm.weight";
/// Llama: the MLP's input norm; Gemma: the norm of the attention output.
pub const POST_ATTENTION_NORM: &str = "post_attention_layernorm.weight";
pub const PRE_FEEDFORWARD_NORM: &str = "pre_feedforward_layernorm.weight";
pub const POST_FEEDFORWARD_NORM: &str = "post_feedforward_layernorm.weight";
/// Projections of the attention, in order q, k, v, o.
pub const PROJECTIONS: [&str; 4] = ["q_proj", "k_proj", "v_proj", "o_proj"];
pub const MLP: [&str; 3] = ["gate_proj", "up_proj", "down_proj"];

/// Shapes the family needs to name its tensors.
#[derive(Debug, Clone, Copy)]
pub struct Shapes {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub num_hidden_layers: usize,
    pub vocab_size: usize,
    /// Whether config.json's `attention_bias` is true.
    pub attention_bias: bool,
}

impl Family {
    /// The family of a source `architectures[0]` class name.
    pub fn from_class(class: &str) -> Option<&'static Family> {
        FAMILIES.iter().copied().find(|f| f.class == class)
    }

    /// The family of a source `model_type`.
    pub fn from_model_type(model_type: &str) -> Option<&'static Family> {
        FAMILIES
            .iter()
            .copied()
            .find(|f| f.model_type == model_type)
    }

    /// `model_type` of this family's differential format (`qwen3-differential`).
    pub fn differential_model_type(&self) -> String {
        format!("{}-differential", self.model_type)
    }

    /// `architectures[0]` of this family's differential format
    /// (`Qwen3DifferentialForCausalLM`).
    pub fn differential_class(&self) -> String {
        let stem = self.class.strip_suffix("ForCausalLM").unwrap_or(self.class);
        format!("{stem}DifferentialForCausalLM")
    }

    /// Whether projection `proj` (`q_proj`...) has a bias.
    pub fn has_bias(&self, proj: &str, attention_bias: bool) -> bool {
        match self.bias {
            BiasPattern::AttentionBiasKey => attention_bias,
            BiasPattern::QkvAlways => proj != "o_proj",
            BiasPattern::Never => false,
        }
    }

    /// The norms of a block, by name, in forward order.
    pub fn block_norm_names(&self) -> &'static [&'static str] {
        match self.block_norms {
            BlockNorms::PreNorm => &[INPUT_NORM, POST_ATTENTION_NORM],
            BlockNorms::Sandwich => &[
                INPUT_NORM,
                POST_ATTENTION_NORM,
                PRE_FEEDFORWARD_NORM,
                POST_FEEDFORWARD_NORM,
            ],
        }
    }

    /// Every tensor a source checkpoint of this family must hold, with its shape (HF names).
    /// `lm_head.weight` is optional (tied embeddings) and not listed.
    pub fn expected_tensors(&self, s: &Shapes) -> BTreeMap<String, Vec<usize>> {
        let (dm, h, kv, hd, i) = (
            s.hidden_size,
            s.num_attention_heads,
            s.num_key_value_heads,
            s.head_dim,
            s.intermediate_size,
        );
        let mut m = BTreeMap::new();
        m.insert(
            "model.embed_tokens.weight".to_string(),
            vec![s.vocab_size, dm],
        );
        m.insert("model.norm.weight".to_string(), vec![dm]);
        for l in 0..s.num_hidden_layers {
            let n = LayerNames::new(l);
            for norm in self.block_norm_names() {
                m.insert(n.name(norm), vec![dm]);
            }
            for (proj, rows, cols) in [
                ("q_proj", h * hd, dm),
                ("k_proj", kv * hd, dm),
                ("v_proj", kv * hd, dm),
                ("o_proj", dm, h * hd),
            ] {
                m.insert(n.attn(&format!("{proj}.weight")), vec![rows, cols]);
                if self.has_bias(proj, s.attention_bias) {
                    m.insert(n.attn(&format!("{proj}.bias")), vec![rows]);
                }
            }
            if self.qk_norm {
                m.insert(n.attn("q_norm.weight"), vec![hd]);
                m.insert(n.attn("k_norm.weight"), vec![hd]);
            }
            for (proj, rows, cols) in [
                ("gate_proj", i, dm),
                ("up_proj", i, dm),
                ("down_proj", dm, i),
            ] {
                m.insert(n.name(&format!("mlp.{proj}.weight")), vec![rows, cols]);
            }
        }
        m
    }
}
