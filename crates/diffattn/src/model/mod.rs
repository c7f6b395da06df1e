//! Our forward pass (candle, f32 compute by default) for every family of [`crate::families`]
//! (its block: norms and their form, MLP activation, embedding scale, q/k norms, per-layer
//! sliding window and RoPE, query scale, logit soft cap) and, independently of the family,
//! for differential attention as each format lays it out: format A and the family formats
//! (`llama-differential`, `<model_type>-differential`: double and split heads, optional affine
//! sub-layer norm, stored `lambda_init`, warm-up factor `mix`, no `(1 - lambda_init)`) and
//! format B (`diffllama`: split pairing, weightless RMS norm over 2d, `(1 - lambda_init)`
//! scale). See `docs/spec.md` and `docs/formats.md`.
//!
//! Every op on the training path is differentiable (candle ops, or our CPU kernels with their
//! own backward: [`layout`], [`ops`], [`attend::sdpa`]; never candle's gradient-dropping fused
//! ops), so the same code serves training; see [`Model::load_trainable`]. When no input tracks
//! a gradient and no attention map is requested, the attention runs the fused inference kernel
//! [`attend::attend`] instead (checked against the differentiable path in
//! `tests/forward.rs`).
//!
//! Shapes: input ids `[batch, seq]` (u32), positions `[batch, seq]` (u32), additive mask
//! `[batch, 1, seq, past + seq]` (f32, 0 or `f32::MIN`), logits `[batch, seq, vocab]` (f32).

pub mod attend;
pub mod checkpoint;
pub(crate) mod cpu;
pub mod layout;
pub mod ops;
pub mod rope;
pub(crate) mod simd;
pub mod stored;

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor, Var, D};

use crate::config::{lambda_init, Format, ModelConfig};
use crate::error::{Error, Result};
use crate::families::{Activation, BlockNorms, Family, NormForm};

/// How a layer's attention is computed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum AttentionKind {
    /// Standard softmax attention (the source Llama).
    Standard,
    /// Format A, double heads: H positive and H negative query heads, 2·Hkv key heads,
    /// value head dim d.
    DoubleHeads,
    /// Split heads (format A with `split_heads`, and format B): H/2 differential heads pairing
    /// head j with head j + H/2, values `[v_j ; v_{j+H/2}]` of width 2d.
    SplitHeads,
    /// Differential Transformer V2 (`diff_attn_variant: "v2"`, docs/formats.md "V2"): 2H
    /// query heads, pair (2i, 2i+1) in the GQA group of output head i, over the source's Hkv
    /// key and value heads (KV cache unchanged); one softmax attention over the 2H heads, then
    /// `O_i = A_2i V − mix · sigmoid(lambda_proj(x))_i · A_2i+1 V` per token. No sub-layer
    /// norm, no `lambda_init` (unilm `multihead_flashdiffv2.py`).
    V2,
}

/// The per-head normalisation after differential attention.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum SubLayerNorm {
    /// Identity (format A with `sublayer_norm: false`).
    None,
    /// RMS norm with a learned weight `subln.weight` (format A).
    Affine,
    /// RMS norm without weight, then `* (1 - lambda_init(l))` (format B).
    ScaledPlain,
}

/// Runtime configuration resolved from config.json.
#[derive(Debug, Clone)]
pub struct Config {
    pub family: &'static Family,
    pub format: Format,
    pub hidden_size: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub num_hidden_layers: usize,
    pub vocab_size: usize,
    pub rms_norm_eps: f64,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    pub attention: AttentionKind,
    pub sublayer_norm: SubLayerNorm,
    pub inv_freq: Vec<f32>,
    /// Per layer: sliding window (None = full attention) and the index of its RoPE table.
    pub layer_windows: Vec<Option<usize>>,
    pub layer_rope: Vec<usize>,
    /// Distinct RoPE inverse-frequency tables the layers use (`layer_rope` indexes them).
    pub rope_tables: Vec<Vec<f32>>,
    /// Factor queries are multiplied by so that the kernels' `head_dim ** -0.5` gives the
    /// family's query scale (1 except for Gemma's `query_pre_attn_scalar != head_dim`).
    pub query_factor: f64,
    pub activation: Activation,
    /// `final_logit_softcapping` (Gemma): logits = c·tanh(logits / c).
    pub final_logit_softcapping: Option<f64>,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
}

impl Config {
    /// Resolves a config.json (any supported architecture).
    pub fn from_model_config(mc: &ModelConfig) -> Result<Self> {
        mc.check_supported()?;
        let dims = mc.dims()?;
        let raw = &mc.raw;
        let flag = |k: &str, default: bool| mc.flag(k, default);
        let differential = || -> Result<(AttentionKind, SubLayerNorm)> {
            Ok((
                if flag("split_heads", false)? {
                    AttentionKind::SplitHeads
                } else {
                    AttentionKind::DoubleHeads
                },
                if flag("sublayer_norm", true)? {
                    SubLayerNorm::Affine
                } else {
                    SubLayerNorm::None
                },
            ))
        };
        let variant = mc.diff_attn_variant()?;
        let (attention, sublayer_norm) = match mc.format {
            Format::LlamaDifferential | Format::FamilyDifferential
                if variant == crate::config::Variant::V2 =>
            {
                // V2 has neither split heads nor a sub-layer norm: a config saying otherwise
                // describes another model.
                for key in ["split_heads", "sublayer_norm"] {
                    if flag(key, false)? {
                        return Err(Error::InvalidValue {
                            path: mc.path.clone(),
                            key: key.into(),
                            value: "true".into(),
                            reason:
                                "diff_attn_variant \"v2\" has no split heads and no sub-layer norm"
                                    .into(),
                        });
                    }
                }
                (AttentionKind::V2, SubLayerNorm::None)
            }
            Format::LlamaDifferential | Format::FamilyDifferential => differential()?,
            Format::DiffLlama => (AttentionKind::SplitHeads, SubLayerNorm::ScaledPlain),
            Format::Source => (AttentionKind::Standard, SubLayerNorm::None),
        };
        if attention == AttentionKind::SplitHeads
            && (dims.num_attention_heads % 2 != 0 || dims.num_key_value_heads % 2 != 0)
        {
            return Err(Error::OddHeads {
                num_attention_heads: dims.num_attention_heads,
                num_key_value_heads: dims.num_key_value_heads,
            });
        }
        let inv_freq = mc.inv_freq(dims.head_dim)?;
        let mut rope_tables: Vec<Vec<f32>> = Vec::new();
        let mut layer_rope = Vec::new();
        let mut layer_windows = Vec::new();
        for la in mc.layer_attention()? {
            let table = mc.rope_inv_freq(dims.head_dim, la.rope_theta, la.rope_scaling)?;
            let at = match rope_tables.iter().position(|t| *t == table) {
                Some(i) => i,
                None => {
                    rope_tables.push(table);
                    rope_tables.len() - 1
                }
            };
            layer_rope.push(at);
            layer_windows.push(la.sliding_window);
        }
        Ok(Self {
            family: mc.family,
            format: mc.format,
            hidden_size: dims.hidden_size,
            num_attention_heads: dims.num_attention_heads,
            num_key_value_heads: dims.num_key_value_heads,
            head_dim: dims.head_dim,
            num_hidden_layers: dims.num_hidden_layers,
            vocab_size: mc.typed.vocab_size,
            rms_norm_eps: mc.rms_norm_eps(),
            max_position_embeddings: mc.max_position_embeddings(),
            tie_word_embeddings: mc.tie_word_embeddings(),
            attention,
            sublayer_norm,
            inv_freq,
            layer_windows,
            layer_rope,
            rope_tables,
            query_factor: mc.query_scale()? * (dims.head_dim as f64).sqrt(),
            activation: mc.activation()?,
            final_logit_softcapping: mc.final_logit_softcapping()?,
            bos_token_id: crate::config::token_ids(raw.get("bos_token_id"))
                .first()
                .copied(),
            eos_token_ids: crate::config::token_ids(raw.get("eos_token_id")),
        })
    }
}

/// A weight matrix `[out, in]`: a candle tensor (training, GPU), or kept in its stored dtype
/// and read from the checkpoint's map ([`stored`]; inference on the CPU).
#[derive(Debug, Clone)]
pub enum Weight {
    Dense(Tensor),
    Stored(stored::StoredMatrix),
}

impl Weight {
    /// The candle tensor of a dense weight; stored weights are not tensors (training loads
    /// dense weights: [`Model::load_trainable`]).
    pub fn dense(&self) -> Result<&Tensor> {
        match self {
            Weight::Dense(t) => Ok(t),
            Weight::Stored(_) => Err(Error::InvalidOptions(
                "a model loaded for inference (weights in their stored dtype) cannot be trained"
                    .into(),
            )),
        }
    }

    fn detach(&self) -> Self {
        match self {
            Weight::Dense(t) => Weight::Dense(t.detach()),
            Weight::Stored(s) => Weight::Stored(s.clone()),
        }
    }

    /// `x` `[.., in]` -> `[.., out]` = `x Wᵀ` (f32 on the CPU for stored weights).
    pub fn matmul_t(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Weight::Dense(w) => Ok(layout::linear(x, w)?),
            Weight::Stored(w) => {
                let mut dims = x.dims().to_vec();
                let inp = dims.pop().unwrap_or(0);
                if inp != w.cols {
                    return Err(Error::InvalidOptions(format!(
                        "linear: input width {inp}, weight [{}, {}]",
                        w.rows, w.cols
                    )));
                }
                let m: usize = dims.iter().product();
                dims.push(w.rows);
                // The activations' f32 data is read in place (no copy into a Vec).
                let x = x.to_dtype(DType::F32)?.contiguous()?;
                let y = cpu::with_f32(&[&x], "linear", |xs| Ok(w.matmul_t(xs[0], m)))?;
                Ok(Tensor::from_vec(y, dims, x.device())?)
            }
        }
    }

    /// Rows `ids` (u32, any shape) -> `[..ids, in]`.
    pub fn embedding(&self, ids: &Tensor) -> Result<Tensor> {
        match self {
            Weight::Dense(w) => Ok(layout::embedding(w, ids)?),
            Weight::Stored(w) => {
                let mut dims = ids.dims().to_vec();
                let flat = ids.flatten_all()?.to_vec1::<u32>()?;
                let rows = w.gather(&flat).map_err(|bad| {
                    Error::InvalidOptions(format!(
                        "token id {bad} is beyond the vocabulary ({})",
                        w.rows
                    ))
                })?;
                dims.push(w.cols);
                Ok(Tensor::from_vec(rows, dims, ids.device())?)
            }
        }
    }
}

/// A linear map `y = x W^T (+ b)`, `W` `[out, in]`.
#[derive(Debug, Clone)]
pub struct Linear {
    pub weight: Weight,
    pub bias: Option<Tensor>,
}

impl Linear {
    /// `weight` `[out, in]`.
    pub fn new(weight: Weight, bias: Option<Tensor>) -> Self {
        Self { weight, bias }
    }

    /// `x` `[.., in]` -> `[.., out]` (see [`layout::linear`] and [`stored`] for how the
    /// product is formed).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = self.weight.matmul_t(x)?;
        Ok(match &self.bias {
            Some(bias) => y.broadcast_add(bias)?,
            None => y,
        })
    }
}

pub use ops::rms_norm;

/// Differential-attention parameters of one layer.
#[derive(Debug, Clone)]
pub struct Lambda {
    pub q1: Tensor,
    pub k1: Tensor,
    pub q2: Tensor,
    pub k2: Tensor,
    /// Stored (format A) or from the formula (format B); 0-dim.
    pub init: Tensor,
    pub subln: Option<Tensor>,
}

impl Lambda {
    /// `lambda1, lambda2` = `exp(lq1·lk1)`, `exp(lq2·lk2)` (0-dim, f32).
    pub fn parts(&self) -> candle_core::Result<(Tensor, Tensor)> {
        let l1 = (&self.q1 * &self.k1)?.sum_all()?.exp()?;
        let l2 = (&self.q2 * &self.k2)?.sum_all()?.exp()?;
        Ok((l1, l2))
    }

    /// `lambda_full = lambda1 - lambda2 + lambda_init` (docs/spec.md §2, eq. 2), 0-dim.
    pub fn full(&self) -> candle_core::Result<Tensor> {
        let (l1, l2) = self.parts()?;
        (l1 - l2)? + &self.init
    }
}

#[derive(Debug, Clone)]
struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    /// Per-head RMS norms of q and k before RoPE (Qwen3, Gemma 3), weight `[head_dim]`,
    /// shared by every head of the layer (negative heads included).
    q_norm: Option<Tensor>,
    k_norm: Option<Tensor>,
    lambda: Option<Lambda>,
    /// V2's `lambda_proj` `[H, hidden]` (no bias).
    lambda_proj: Option<Linear>,
    /// `1 - lambda_init(l)` for format B.
    out_scale: f64,
}

#[derive(Debug, Clone)]
struct Block {
    input_layernorm: Tensor,
    attn: Attention,
    /// Llama's block: the MLP's input norm; Gemma's: the norm of the attention output.
    post_attention_layernorm: Tensor,
    /// Gemma's MLP input and output norms.
    pre_feedforward_layernorm: Option<Tensor>,
    post_feedforward_layernorm: Option<Tensor>,
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
}

/// Keys and values of past positions, per layer: `k` `[b, kv_heads', t, d]` (double heads
/// store k1 then k2 heads), `v` `[b, Hkv, t, d]`.
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
}

impl KvCache {
    /// An empty cache.
    pub fn new() -> Self {
        Self::default()
    }
    /// Bytes the cached keys and values occupy, over all layers.
    pub fn bytes(&self) -> usize {
        self.layers
            .iter()
            .flatten()
            .map(|(k, v)| (k.elem_count() + v.elem_count()) * k.dtype().size_in_bytes())
            .sum()
    }

    /// Cached positions (t).
    pub fn seq_len(&self) -> usize {
        self.layers
            .first()
            .and_then(|l| l.as_ref())
            .and_then(|(k, _)| k.dim(2).ok())
            .unwrap_or(0)
    }
}

/// Optional per-layer attention probabilities captured during a forward (monitoring).
#[derive(Debug, Clone, Default)]
pub struct AttentionProbs {
    /// layer -> (A1 or A, A2) each `[b, heads, s, t]` (V2: the positive heads 2i and the
    /// negative heads 2i+1, each `[b, H, s, t]`).
    pub layers: HashMap<usize, (Tensor, Option<Tensor>)>,
    /// V2 layers -> the gate `sigmoid(lambda_proj(x))` `[b, s, H]` (without mix).
    pub gates: HashMap<usize, Tensor>,
}

/// What one layer's forward captures for monitoring: A1 (or A), A2, the V2 gate.
pub(crate) type Captured = (Tensor, Option<Tensor>, Option<Tensor>);

/// `sigmoid(x)` = `1 / (1 + exp(-x))` in differentiable candle ops.
fn sigmoid(x: &Tensor) -> candle_core::Result<Tensor> {
    (x.neg()?.exp()? + 1.0)?.recip()
}

/// Heads `[b, 2n, ..]` -> (even heads, odd heads), each `[b, n, ..]` (contiguous).
fn pairs(x: &Tensor) -> candle_core::Result<(Tensor, Tensor)> {
    let mut dims = x.dims().to_vec();
    let n = dims[1] / 2;
    let mut split = vec![dims[0], n, 2];
    split.extend_from_slice(&dims[2..]);
    let x = x.reshape(split)?;
    dims[1] = n;
    let even = x.narrow(2, 0, 1)?.reshape(dims.clone())?;
    let odd = x.narrow(2, 1, 1)?.reshape(dims)?;
    Ok((even, odd))
}

/// Split heads' values: `repeat_kv`, then `[v_j ; v_{j+H/2}]` along features:
/// `v` `[b, Hkv, t, d]` -> `[b, H/2, t, 2d]` (contiguous, differentiable).
fn wide_values(v: &Tensor, h: usize, kv: usize) -> Result<Tensor> {
    let (b, _, t, d) = v.dims4()?;
    let vr = v
        .unsqueeze(2)?
        .broadcast_as((b, kv, h / kv, t, d))?
        .reshape((b, h, t, d))?;
    Ok(Tensor::cat(
        &[&vr.narrow(1, 0, h / 2)?, &vr.narrow(1, h / 2, h / 2)?],
        D::Minus1,
    )?
    .contiguous()?)
}

/// A Llama-family causal LM, standard or differential.
#[derive(Debug, Clone)]
pub struct Model {
    pub config: Config,
    embed_tokens: Weight,
    blocks: Vec<Block>,
    norm: Tensor,
    lm_head: Weight,
    /// One table per distinct RoPE (see [`Config::layer_rope`]).
    ropes: Vec<rope::Rope>,
    /// `sqrt(hidden_size)` rounded to the weights' dtype (Gemma), else None.
    embed_scale: Option<f64>,
    /// Warm-up factor of the negative branch (format A's `diff_attn_mix`), 1 outside warm-up.
    pub mix: f64,
    /// Recompute each layer's activations in the backward instead of keeping them
    /// (axolotl's `gradient_checkpointing`; see [`checkpoint`]).
    pub gradient_checkpointing: bool,
    pub device: Device,
    pub dtype: DType,
}

/// Tensors of a checkpoint by name.
pub type Weights = HashMap<String, Tensor>;

/// Splits `weights` into trainable [`Var`]s (every tensor but `lambda_init`, by name in
/// sorted order) and constants; returns the weights to build the model from (the vars'
/// tensors), the vars and the constants.
pub fn trainable_weights(
    weights: Weights,
) -> Result<(Weights, Vec<(String, Var)>, Vec<(String, Tensor)>)> {
    let mut vars = Vec::new();
    let mut constants = Vec::new();
    let mut w2 = HashMap::new();
    let mut names: Vec<_> = weights.keys().cloned().collect();
    names.sort();
    for name in names {
        let t = &weights[&name];
        if name.ends_with("lambda_init") {
            w2.insert(name.clone(), t.clone());
            constants.push((name, t.clone()));
        } else {
            let v = Var::from_tensor(t)?;
            w2.insert(name.clone(), v.as_tensor().clone());
            vars.push((name, v));
        }
    }
    Ok((w2, vars, constants))
}

/// Reads every tensor of the checkpoint in `dir` into memory as `dtype` on `device`.
pub fn load_weights(dir: &Path, dtype: DType, device: &Device) -> Result<Weights> {
    let ck = crate::checkpoint::Checkpoint::open(dir)?;
    let mut out = HashMap::new();
    for file in ck.files() {
        let tensors =
            candle_core::safetensors::load(&file, device).map_err(|e| Error::Safetensors {
                path: file.clone(),
                msg: e.to_string().lines().next().unwrap_or_default().to_string(),
            })?;
        for (name, t) in tensors {
            out.insert(name, t.to_dtype(dtype)?);
        }
    }
    Ok(out)
}

/// Where [`Model`] reads its tensors from.
enum Source<'a> {
    /// Candle tensors by name (training, GPU), used as they are.
    Tensors(&'a Weights),
    /// A checkpoint read in place (CPU inference): matrices stay in the stored dtype and
    /// mapped when `dtype` is f32 or the stored dtype (else an owned copy rounded to
    /// `dtype`); vectors become f32 tensors of their values rounded to `dtype`.
    Checkpoint {
        ck: &'a crate::checkpoint::Checkpoint,
        dtype: crate::dtype::DType,
        device: &'a Device,
    },
}

impl Source<'_> {
    fn names(&self) -> Vec<String> {
        match self {
            Source::Tensors(w) => w.keys().cloned().collect(),
            Source::Checkpoint { ck, .. } => ck.names().map(str::to_string).collect(),
        }
    }

    fn dims(&self, name: &str) -> Option<Vec<usize>> {
        match self {
            Source::Tensors(w) => w.get(name).map(|t| t.dims().to_vec()),
            Source::Checkpoint { ck, .. } => ck.info(name).map(|i| i.shape.clone()),
        }
    }

    /// The dtype parameters are rounded to (the checkpoint's, or `--dtype`).
    fn param_dtype(&self) -> Result<DType> {
        Ok(match self {
            Source::Tensors(w) => w
                .get("model.embed_tokens.weight")
                .map(Tensor::dtype)
                .unwrap_or(DType::F32),
            Source::Checkpoint { dtype, .. } => match dtype {
                crate::dtype::DType::F32 => DType::F32,
                crate::dtype::DType::BF16 => DType::BF16,
                crate::dtype::DType::F16 => DType::F16,
            },
        })
    }

    /// `x` rounded to the parameters' dtype, as a 0-dim tensor of the activations' dtype.
    fn scalar(&self, x: f32, device: &Device) -> Result<Tensor> {
        let t = Tensor::new(x, device)?.to_dtype(self.param_dtype()?)?;
        Ok(match self {
            Source::Tensors(_) => t,
            Source::Checkpoint { .. } => t.to_dtype(DType::F32)?,
        })
    }

    fn tensor(&self, name: &str) -> Result<Tensor> {
        match self {
            Source::Tensors(w) => Ok(w[name].clone()),
            Source::Checkpoint { ck, dtype, device } => {
                let info = ck.require(name)?;
                let mut v = ck.to_f32(name)?;
                if *dtype != crate::dtype::DType::F32 && *dtype != info.dtype {
                    v = crate::dtype::to_f32(&crate::dtype::from_f32(&v, *dtype), *dtype);
                }
                Ok(Tensor::from_vec(v, info.shape.clone(), device)?)
            }
        }
    }

    fn matrix(&self, name: &str) -> Result<Weight> {
        match self {
            Source::Tensors(w) => Ok(Weight::Dense(w[name].clone())),
            Source::Checkpoint { ck, dtype, .. } => {
                let info = ck.require(name)?;
                Ok(Weight::Stored(
                    if *dtype == crate::dtype::DType::F32 || *dtype == info.dtype {
                        ck.stored_matrix(name)?
                    } else {
                        let [rows, cols] = info.shape[..] else {
                            return ck.stored_matrix(name).map(Weight::Stored);
                        };
                        stored::StoredMatrix::from_f32(&ck.to_f32(name)?, rows, cols, *dtype)
                    },
                ))
            }
        }
    }
}

impl Model {
    /// Loads config.json and weights from `dir`. On the CPU the weight matrices stay in
    /// their stored dtype, read from the file's map ([`stored`]), and arithmetic is f32:
    /// `dtype` f32 uses the stored values exactly; bf16 or f16 rounds the parameters to it
    /// (what a checkpoint of that dtype holds) and still accumulates in f32. Elsewhere
    /// (`cuda`) every tensor is loaded as a candle tensor of `dtype`.
    pub fn load(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        let mc = ModelConfig::from_file(&dir.join("config.json"))?;
        if device.is_cpu() {
            let ck = crate::checkpoint::Checkpoint::open(dir)?;
            let dtype = match dtype {
                DType::BF16 => crate::dtype::DType::BF16,
                DType::F16 => crate::dtype::DType::F16,
                _ => crate::dtype::DType::F32,
            };
            let source = Source::Checkpoint {
                ck: &ck,
                dtype,
                device,
            };
            return Self::from_source(&mc, &source, dir, device);
        }
        let weights = load_weights(dir, dtype, device)?;
        Self::from_weights(&mc, &weights, dir, device)
    }

    /// Like [`Model::load`], but every floating tensor except `lambda_init` becomes a
    /// [`Var`] (returned by name) so that a loss can be differentiated.
    pub fn load_trainable(dir: &Path, device: &Device) -> Result<(Self, Vec<(String, Var)>)> {
        let mc = ModelConfig::from_file(&dir.join("config.json"))?;
        let weights = load_weights(dir, DType::F32, device)?;
        let (w2, vars, _) = trainable_weights(weights)?;
        Ok((Self::from_weights(&mc, &w2, dir, device)?, vars))
    }

    /// Builds the model from named tensors (HF names). `origin` names the source in errors.
    pub fn from_weights(
        mc: &ModelConfig,
        w: &Weights,
        origin: &Path,
        device: &Device,
    ) -> Result<Self> {
        Self::from_source(mc, &Source::Tensors(w), origin, device)
    }

    fn from_source(mc: &ModelConfig, w: &Source, origin: &Path, device: &Device) -> Result<Self> {
        let names = w.names();
        crate::checkpoint::check_layer_count(
            names.iter().map(String::as_str),
            mc.typed.num_hidden_layers,
            &mc.path,
        )?;
        let cfg = Config::from_model_config(mc)?;
        // Every tensor is read through `get`; one the block does not read is refused below
        // (a checkpoint of another family, or a bias the family does not have, must not run
        // silently as something else).
        let used = std::cell::RefCell::new(std::collections::HashSet::<String>::new());
        let check = |name: &str, shape: &[usize]| -> Result<()> {
            used.borrow_mut().insert(name.to_string());
            let dims = w.dims(name).ok_or_else(|| Error::MissingTensor {
                path: origin.to_path_buf(),
                name: name.to_string(),
            })?;
            if dims != shape {
                return Err(Error::ShapeMismatch {
                    path: origin.to_path_buf(),
                    name: name.to_string(),
                    expected: shape.to_vec(),
                    found: dims,
                });
            }
            Ok(())
        };
        let get = |name: &str, shape: &[usize]| -> Result<Tensor> {
            check(name, shape)?;
            w.tensor(name)
        };
        let matrix = |name: &str, shape: &[usize]| -> Result<Weight> {
            check(name, shape)?;
            w.matrix(name)
        };
        let attention_bias = mc.typed.attention_bias.unwrap_or(false);
        let linear = |p: &str, out: usize, inp: usize| -> Result<Linear> {
            let weight = matrix(&format!("{p}.weight"), &[out, inp])?;
            let proj = p.rsplit('.').next().unwrap_or_default();
            let has_bias = p.contains(".self_attn.") && cfg.family.has_bias(proj, attention_bias);
            let bias = if has_bias {
                Some(get(&format!("{p}.bias"), &[out])?)
            } else {
                None
            };
            Ok(Linear::new(weight, bias))
        };
        let (dm, h, kv, d) = (
            cfg.hidden_size,
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
        );
        let (q_factor, k_factor) = match cfg.attention {
            AttentionKind::DoubleHeads => (2, 2),
            AttentionKind::V2 => (2, 1),
            _ => (1, 1),
        };
        let mut blocks = Vec::with_capacity(cfg.num_hidden_layers);
        for l in 0..cfg.num_hidden_layers {
            let p = format!("model.layers.{l}");
            let a = format!("{p}.self_attn");
            let lambda = if matches!(cfg.attention, AttentionKind::Standard | AttentionKind::V2) {
                None
            } else {
                let vec = |n: &str| get(&format!("{a}.{n}"), &[d]);
                let init = match cfg.format {
                    Format::DiffLlama => w.scalar(lambda_init(l) as f32, device)?,
                    _ => get(&format!("{a}.lambda_init"), &[])?,
                };
                let width = if cfg.attention == AttentionKind::SplitHeads {
                    2 * d
                } else {
                    d
                };
                let subln = match cfg.sublayer_norm {
                    SubLayerNorm::Affine => Some(get(&format!("{a}.subln.weight"), &[width])?),
                    _ => None,
                };
                Some(Lambda {
                    q1: vec("lambda_q1")?,
                    k1: vec("lambda_k1")?,
                    q2: vec("lambda_q2")?,
                    k2: vec("lambda_k2")?,
                    init,
                    subln,
                })
            };
            let lambda_proj = if cfg.attention == AttentionKind::V2 {
                let name = format!("{a}.lambda_proj.weight");
                Some(Linear::new(matrix(&name, &[h, dm])?, None))
            } else {
                None
            };
            let out_scale = if cfg.sublayer_norm == SubLayerNorm::ScaledPlain {
                1.0 - lambda_init(l)
            } else {
                1.0
            };
            let inter = mc.typed.intermediate_size;
            let qk_norm = |n: &str| -> Result<Option<Tensor>> {
                cfg.family
                    .qk_norm
                    .then(|| get(&format!("{a}.{n}.weight"), &[d]))
                    .transpose()
            };
            let sandwich = |n: &str| -> Result<Option<Tensor>> {
                (cfg.family.block_norms == BlockNorms::Sandwich)
                    .then(|| get(&format!("{p}.{n}.weight"), &[dm]))
                    .transpose()
            };
            blocks.push(Block {
                input_layernorm: get(&format!("{p}.input_layernorm.weight"), &[dm])?,
                attn: Attention {
                    q_proj: linear(&format!("{a}.q_proj"), q_factor * h * d, dm)?,
                    k_proj: linear(&format!("{a}.k_proj"), k_factor * kv * d, dm)?,
                    v_proj: linear(&format!("{a}.v_proj"), kv * d, dm)?,
                    o_proj: linear(&format!("{a}.o_proj"), dm, h * d)?,
                    q_norm: qk_norm("q_norm")?,
                    k_norm: qk_norm("k_norm")?,
                    lambda,
                    lambda_proj,
                    out_scale,
                },
                post_attention_layernorm: get(
                    &format!("{p}.post_attention_layernorm.weight"),
                    &[dm],
                )?,
                pre_feedforward_layernorm: sandwich("pre_feedforward_layernorm")?,
                post_feedforward_layernorm: sandwich("post_feedforward_layernorm")?,
                gate_proj: linear(&format!("{p}.mlp.gate_proj"), inter, dm)?,
                up_proj: linear(&format!("{p}.mlp.up_proj"), inter, dm)?,
                down_proj: linear(&format!("{p}.mlp.down_proj"), dm, inter)?,
            });
        }
        let embed_tokens = matrix("model.embed_tokens.weight", &[cfg.vocab_size, dm])?;
        let norm = get("model.norm.weight", &[dm])?;
        let lm_head = match w.dims("lm_head.weight") {
            Some(_) => matrix("lm_head.weight", &[cfg.vocab_size, dm])?,
            None => {
                mc.check_lm_head(false, origin)?;
                embed_tokens.clone()
            }
        };
        let used = used.into_inner();
        let mut unread: Vec<&String> = names
            .iter()
            .filter(|n| !used.contains(*n) && !n.ends_with("rotary_emb.inv_freq"))
            .collect();
        unread.sort();
        if let Some(name) = unread.first() {
            return Err(Error::UnexpectedTensor {
                path: origin.to_path_buf(),
                name: name.to_string(),
                model: format!("{} model in the {:?} format", cfg.family.class, cfg.format),
            });
        }
        // Activations: f32 for weights read in place, else the tensors' dtype.
        let dtype = match &embed_tokens {
            Weight::Dense(t) => t.dtype(),
            Weight::Stored(_) => DType::F32,
        };
        let ropes = cfg
            .rope_tables
            .iter()
            .map(|t| rope::Rope::new(t, d, cfg.max_position_embeddings.max(1), device))
            .collect::<candle_core::Result<Vec<_>>>()?;
        // transformers: `embed_scale = torch.tensor(hidden_size ** 0.5)` (f32), cast to the
        // weights' dtype before it multiplies (Gemma3TextScaledWordEmbedding).
        let embed_scale = if cfg.family.embed_scale {
            let s = w.scalar((dm as f64).sqrt() as f32, device)?;
            Some(s.to_dtype(DType::F64)?.to_scalar::<f64>()?)
        } else {
            None
        };
        Ok(Self {
            norm,
            config: cfg,
            embed_tokens,
            blocks,
            lm_head,
            ropes,
            embed_scale,
            mix: mc.diff_attn_mix()?.unwrap_or(1.0),
            gradient_checkpointing: false,
            device: device.clone(),
            dtype,
        })
    }

    /// Additive causal mask `[b, 1, s, past + s]`: 0 where key j <= past + i and the key is
    /// not padding (`key_padding[b][j] == 0` marks padding), `f32::MIN` elsewhere (as
    /// transformers' `min_dtype`, so fully masked rows stay finite).
    pub fn mask(
        &self,
        b: usize,
        s: usize,
        past: usize,
        key_padding: Option<&[Vec<u8>]>,
    ) -> Result<Tensor> {
        let t = past + s;
        let mut m = vec![0f32; b * s * t];
        for bi in 0..b {
            for i in 0..s {
                for j in 0..t {
                    let pad = key_padding.map(|kp| kp[bi][j] == 0).unwrap_or(false);
                    if j > past + i || pad {
                        m[(bi * s + i) * t + j] = f32::MIN;
                    }
                }
            }
        }
        Ok(Tensor::from_vec(m, (b, 1, s, t), &self.device)?.to_dtype(self.dtype)?)
    }

    /// Positions `past..past+s` for every row, `[b, s]`.
    pub fn positions(&self, b: usize, s: usize, past: usize) -> Result<Tensor> {
        let row: Vec<u32> = (past as u32..(past + s) as u32).collect();
        let all: Vec<u32> = (0..b).flat_map(|_| row.iter().copied()).collect();
        Ok(Tensor::from_vec(all, (b, s), &self.device)?)
    }

    /// Final hidden states `[b, s, hidden]` (after the last norm) for `ids` `[b, s]`.
    /// `positions` `[b, s]`; `mask` additive
    /// `[b, 1, s, t]` (None = no masking, valid only for s == 1 without padding); `cache`
    /// appended to when given. `probs`, when given, receives the attention probabilities of
    /// the listed layers.
    pub fn forward_hidden(
        &self,
        ids: &Tensor,
        positions: &Tensor,
        mask: Option<&Tensor>,
        mut cache: Option<&mut KvCache>,
        mut probs: Option<(&[usize], &mut AttentionProbs)>,
    ) -> Result<Tensor> {
        let (b, s) = ids.dims2()?; // [batch, seq]
        let positions_max = positions
            .max_keepdim(1)?
            .max_keepdim(0)?
            .flatten_all()?
            .to_vec1::<u32>()?[0] as usize;
        let max_positions = self.ropes[0].max_positions();
        if positions_max >= max_positions {
            return Err(Error::InvalidOptions(format!(
                "position {positions_max} is beyond max_position_embeddings ({max_positions})"
            )));
        }
        let tables = self
            .ropes
            .iter()
            .map(|r| r.tables(positions))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let mut x = self.embed_tokens.embedding(ids)?;
        if let Some(scale) = self.embed_scale {
            x = x.affine(scale, 0.0)?;
        }
        let past = match cache.as_deref() {
            Some(c) if c.layers.len() == self.blocks.len() => c.seq_len(),
            _ => 0,
        };
        // Sliding-window layers: the causal (and padding) mask with keys at or before
        // `i - window` masked too (transformers' `sliding_window_overlay`: kv > q - window);
        // the KV cache keeps every key and the mask hides the old ones.
        let mut window_masks: Vec<(usize, Option<Tensor>)> = Vec::new();
        for w in self.config.layer_windows.iter().flatten() {
            if window_masks.iter().all(|(x, _)| x != w) {
                window_masks.push((*w, self.window_mask(mask, b, s, past, *w)?));
            }
        }
        if let Some(c) = cache.as_deref_mut() {
            if c.layers.len() != self.blocks.len() {
                c.layers = vec![None; self.blocks.len()];
            }
        }
        // Gradient checkpointing: each layer's forward keeps no graph; its backward recomputes it.
        let checkpointed = (self.gradient_checkpointing && x.track_op())
            .then(|| checkpoint::Checkpointed::new(self));
        for l in 0..self.blocks.len() {
            let layer_mask = match self.config.layer_windows[l] {
                Some(w) => window_masks
                    .iter()
                    .find(|(x, _)| *x == w)
                    .and_then(|(_, m)| m.as_ref())
                    .or(mask),
                None => mask,
            };
            let (cos, sin) = &tables[self.config.layer_rope[l]];
            let want = probs
                .as_ref()
                .map(|(ls, _)| ls.contains(&l))
                .unwrap_or(false);
            if let Some(ck) = &checkpointed {
                if cache.is_none() && !want && x.track_op() {
                    x = ck.block(l, &x, cos, sin, layer_mask)?;
                    continue;
                }
            }
            let layer_cache = cache.as_deref_mut().map(|c| &mut c.layers[l]);
            let (y, p) = self.block(l, &x, cos, sin, layer_mask, layer_cache, want)?;
            if let (Some((a1, a2, gate)), Some((_, store))) = (p, probs.as_mut()) {
                store.layers.insert(l, (a1, a2));
                if let Some(gate) = gate {
                    store.gates.insert(l, gate);
                }
            }
            x = y;
        }
        self.norm(&x, &self.norm)
    }

    /// Decoder layer `l` on the residual stream `x` `[b, s, hidden]`: attention (its probabilities
    /// when `want`), MLP and both residual additions.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn block(
        &self,
        l: usize,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: Option<&Tensor>,
        cache: Option<&mut Option<(Tensor, Tensor)>>,
        want: bool,
    ) -> Result<(Tensor, Option<Captured>)> {
        let block = &self.blocks[l];
        let h = self.norm(x, &block.input_layernorm)?;
        let (a, p) = self.attention(&block.attn, &h, cos, sin, mask, cache, want)?;
        let (a, mlp_norm) = match &block.pre_feedforward_layernorm {
            Some(pre) => (self.norm(&a, &block.post_attention_layernorm)?, pre),
            None => (a, &block.post_attention_layernorm),
        };
        let x = (x + a)?;
        let h = self.norm(&x, mlp_norm)?;
        let gate = block.gate_proj.forward(&h)?;
        let up = block.up_proj.forward(&h)?;
        let m = match self.config.activation {
            Activation::Silu => ops::swiglu(&gate, &up)?,
            Activation::GeluTanh => (gate.gelu()? * up)?,
        };
        let m = block.down_proj.forward(&m)?;
        let m = match &block.post_feedforward_layernorm {
            Some(post) => self.norm(&m, post)?,
            None => m,
        };
        Ok(((x + m)?, p))
    }

    /// The tensors of layer `l` that can be trained (variables when loaded trainable).
    pub(crate) fn block_tensors(&self, l: usize) -> Vec<&Tensor> {
        let b = &self.blocks[l];
        let mut out = vec![&b.input_layernorm, &b.post_attention_layernorm];
        out.extend(b.pre_feedforward_layernorm.iter());
        out.extend(b.post_feedforward_layernorm.iter());
        let a = &b.attn;
        for lin in [
            &a.q_proj,
            &a.k_proj,
            &a.v_proj,
            &a.o_proj,
            &b.gate_proj,
            &b.up_proj,
            &b.down_proj,
        ] {
            if let Weight::Dense(w) = &lin.weight {
                out.push(w);
            }
            out.extend(lin.bias.iter());
        }
        out.extend(a.q_norm.iter());
        out.extend(a.k_norm.iter());
        if let Some(Weight::Dense(w)) = a.lambda_proj.as_ref().map(|l| &l.weight) {
            out.push(w);
        }
        if let Some(lam) = &a.lambda {
            out.extend([&lam.q1, &lam.k1, &lam.q2, &lam.k2]);
            out.extend(lam.subln.iter());
        }
        out
    }

    /// The family's RMS norm of `x` `[.., n]` with weight `w` `[n]`: `w · x/rms` or, for
    /// Gemma, `(1 + w) · x/rms` (the offset added in the forward so that training updates
    /// `w` itself).
    fn norm(&self, x: &Tensor, w: &Tensor) -> Result<Tensor> {
        let eps = self.config.rms_norm_eps;
        Ok(match self.config.family.norm {
            NormForm::Weight => rms_norm(x, Some(w), eps)?,
            NormForm::OnePlusWeight => {
                let w1 = w.to_dtype(DType::F32)?.affine(1.0, 1.0)?;
                let y = rms_norm(&x.to_dtype(DType::F32)?, Some(&w1), eps)?;
                y.to_dtype(x.dtype())?
            }
        })
    }

    /// The additive mask of a layer with sliding window `w` for a forward of `s` queries after
    /// `past` cached positions: `mask` (or no mask) with key j hidden from query i when
    /// `j <= past + i - w`. None when no key is that old (the plain mask serves).
    fn window_mask(
        &self,
        mask: Option<&Tensor>,
        b: usize,
        s: usize,
        past: usize,
        w: usize,
    ) -> Result<Option<Tensor>> {
        let t = match mask {
            Some(m) => m.dim(3)?,
            None => past + s,
        };
        let q0 = t - s; // absolute index of the first query
        if q0 + s <= w {
            return Ok(None);
        }
        let mut m = vec![0f32; s * t];
        for i in 0..s {
            let last_hidden = (q0 + i) as i64 - w as i64; // keys j <= this are hidden
            for j in 0..t {
                if (j as i64) <= last_hidden || j > q0 + i {
                    m[i * t + j] = f32::MIN;
                }
            }
        }
        let overlay = Tensor::from_vec(m, (1, 1, s, t), &self.device)?.to_dtype(self.dtype)?;
        Ok(Some(match mask {
            Some(base) => base.broadcast_minimum(&overlay)?,
            None => overlay.broadcast_as((b, 1, s, t))?.contiguous()?,
        }))
    }

    /// Logits `[b, s, vocab]` (f32) of final hidden states `[b, s, hidden]`.
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        let (b, s, dm) = hidden.dims3()?;
        // A few rows (decoding): the threads split the head's rows (see `layout::linear`);
        // more: candle's product, whose orientation suits this wide weight best.
        let logits = match &self.lm_head {
            Weight::Dense(w) if b * s < 16 => layout::linear(&hidden.reshape((b * s, dm))?, w)?,
            Weight::Dense(w) => hidden.reshape((b * s, dm))?.matmul(&w.t()?)?,
            stored => stored.matmul_t(&hidden.reshape((b * s, dm))?)?,
        };
        let logits = logits
            .reshape((b, s, self.config.vocab_size))?
            .to_dtype(DType::F32)?;
        Ok(match self.config.final_logit_softcapping {
            Some(c) => (logits.affine(1.0 / c, 0.0)?.tanh()? * c)?,
            None => logits,
        })
    }

    /// The same model with every tensor detached from gradient tracking (storage shared, no
    /// copy): its forward takes the fused inference kernels. Evaluation during training uses
    /// it, so that it computes exactly what `evaluate` computes after a reload.
    pub fn detached(&self) -> Self {
        let lin = |l: &Linear| Linear::new(l.weight.detach(), l.bias.as_ref().map(Tensor::detach));
        let mut m = self.clone();
        m.embed_tokens = self.embed_tokens.detach();
        m.norm = self.norm.detach();
        m.lm_head = self.lm_head.detach();
        let opt = |t: &Option<Tensor>| t.as_ref().map(Tensor::detach);
        for b in &mut m.blocks {
            b.input_layernorm = b.input_layernorm.detach();
            b.post_attention_layernorm = b.post_attention_layernorm.detach();
            b.pre_feedforward_layernorm = opt(&b.pre_feedforward_layernorm);
            b.post_feedforward_layernorm = opt(&b.post_feedforward_layernorm);
            b.gate_proj = lin(&b.gate_proj);
            b.up_proj = lin(&b.up_proj);
            b.down_proj = lin(&b.down_proj);
            let a = &mut b.attn;
            a.q_proj = lin(&a.q_proj);
            a.k_proj = lin(&a.k_proj);
            a.v_proj = lin(&a.v_proj);
            a.o_proj = lin(&a.o_proj);
            a.q_norm = opt(&a.q_norm);
            a.k_norm = opt(&a.k_norm);
            a.lambda_proj = a.lambda_proj.as_ref().map(lin);
            if let Some(l) = &mut a.lambda {
                l.q1 = l.q1.detach();
                l.k1 = l.k1.detach();
                l.q2 = l.q2.detach();
                l.k2 = l.k2.detach();
                l.init = l.init.detach();
                l.subln = l.subln.as_ref().map(Tensor::detach);
            }
        }
        m
    }

    /// The output projection `[vocab, hidden]` (the embedding matrix when tied).
    pub fn lm_head(&self) -> &Weight {
        &self.lm_head
    }

    /// Logits `[b, s, vocab]`: [`Model::forward_hidden`] then [`Model::logits`].
    pub fn forward_full(
        &self,
        ids: &Tensor,
        positions: &Tensor,
        mask: Option<&Tensor>,
        cache: Option<&mut KvCache>,
        probs: Option<(&[usize], &mut AttentionProbs)>,
    ) -> Result<Tensor> {
        self.logits(&self.forward_hidden(ids, positions, mask, cache, probs)?)
    }

    /// Logits `[b, s, vocab]` of a fresh (uncached, unpadded) batch.
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        let (b, s) = ids.dims2()?;
        let pos = self.positions(b, s, 0)?;
        let mask = self.mask(b, s, 0, None)?;
        self.forward_full(ids, &pos, Some(&mask), None, None)
    }

    /// The layers' lambda parameters (None for standard attention and V2).
    pub fn lambdas(&self) -> Vec<Option<&Lambda>> {
        self.blocks.iter().map(|b| b.attn.lambda.as_ref()).collect()
    }

    /// The layers' V2 `lambda_proj` weights `[H, hidden]` (None for other attention, and for
    /// weights kept in their stored dtype).
    pub fn lambda_projs(&self) -> Vec<Option<&Tensor>> {
        self.blocks
            .iter()
            .map(|b| match b.attn.lambda_proj.as_ref().map(|l| &l.weight) {
                Some(Weight::Dense(w)) => Some(w),
                _ => None,
            })
            .collect()
    }

    /// Softmax attention probabilities `[b, nq, s, t]` of `q` `[b, nq, s, d]` over `k`
    /// `[b, nk, t, d]` (GQA: query head i reads key head i / (nq / nk)), in f32.
    fn probs(&self, q: &Tensor, k: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let (b, nq, s, d) = q.dims4()?;
        let (_, nk, t, _) = k.dims4()?;
        let g = nq / nk;
        // Group the g query heads of each key head along the sequence axis: no K copy.
        let qg = q.reshape((b, nk, g * s, d))?;
        let scores = qg.matmul(&k.t()?)?.affine(1.0 / (d as f64).sqrt(), 0.0)?;
        let scores = scores.reshape((b, nq, s, t))?;
        let scores = match mask {
            Some(m) => scores.broadcast_add(m)?,
            None => scores,
        };
        Ok(ops::softmax_last_dim(&scores.to_dtype(DType::F32)?)?.to_dtype(self.dtype)?)
    }

    /// `p` `[b, nq, s, t]` times values `v` `[b, nv, t, dv]` (nq a multiple of nv).
    fn apply(&self, p: &Tensor, v: &Tensor) -> Result<Tensor> {
        let (b, nq, s, t) = p.dims4()?;
        let (_, nv, _, dv) = v.dims4()?;
        let g = nq / nv;
        Ok(p.reshape((b, nv, g * s, t))?
            .matmul(v)?
            .reshape((b, nq, s, dv))?)
    }

    /// The per-head normalisation after differential attention (`o` `[b, heads, s, dv]`).
    fn sublayer_norm(&self, at: &Attention, lam: &Lambda, o: Tensor) -> Result<Tensor> {
        let eps = self.config.rms_norm_eps;
        Ok(match self.config.sublayer_norm {
            SubLayerNorm::None => o,
            SubLayerNorm::Affine => rms_norm(&o, lam.subln.as_ref(), eps)?,
            SubLayerNorm::ScaledPlain => rms_norm(&o, None, eps)?.affine(at.out_scale, 0.0)?,
        })
    }

    /// q or k `[b, s, n·d]` with the family's RMS norm applied over each head's `d`
    /// features (`q_norm`/`k_norm`, one weight `[d]` for every head); unchanged without one.
    fn head_norm(&self, x: Tensor, w: Option<&Tensor>) -> Result<Tensor> {
        let Some(w) = w else { return Ok(x) };
        let (b, s, f) = x.dims3()?;
        let d = self.config.head_dim;
        let y = self.norm(&x.reshape((b, s, f / d, d))?, w)?;
        Ok(y.reshape((b, s, f))?)
    }

    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        at: &Attention,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: Option<&Tensor>,
        cache: Option<&mut Option<(Tensor, Tensor)>>,
        want_probs: bool,
    ) -> Result<(Tensor, Option<Captured>)> {
        let c = &self.config;
        let (h, kv) = (c.num_attention_heads, c.num_key_value_heads);
        let (q_heads, k_heads) = match c.attention {
            AttentionKind::DoubleHeads => (2 * h, 2 * kv),
            AttentionKind::V2 => (2 * h, kv),
            _ => (h, kv),
        };
        let q = self.head_norm(at.q_proj.forward(x)?, at.q_norm.as_ref())?;
        let q = if (c.query_factor - 1.0).abs() > 1e-12 {
            q.affine(c.query_factor, 0.0)?
        } else {
            q
        };
        let k = self.head_norm(at.k_proj.forward(x)?, at.k_norm.as_ref())?;
        let v = layout::split_heads(&at.v_proj.forward(x)?, kv)?;
        // Double heads: features [q1 | q2] become heads [0, H) and [H, 2H); V2: heads 2i, 2i+1.
        let q = layout::rope_heads(&q, cos, sin, q_heads)?;
        let k = layout::rope_heads(&k, cos, sin, k_heads)?;
        let (k, v) = match cache {
            Some(slot) => {
                let kv_pair = match slot.take() {
                    Some((pk, pv)) => (Tensor::cat(&[&pk, &k], 2)?, Tensor::cat(&[&pv, &v], 2)?),
                    None => (k, v),
                };
                *slot = Some(kv_pair.clone());
                kv_pair
            }
            None => (k, v),
        };
        let fused = !want_probs && attend::applies(&[&q, &k, &v]);
        let trainable = !fused && !want_probs && cpu::all_cpu_f32(&[&q, &k, &v]);
        if let (AttentionKind::V2, Some(lambda_proj)) = (c.attention, &at.lambda_proj) {
            // One softmax attention over the 2H query heads (GQA groups of 2H/Hkv heads).
            let (both, probs) = if fused {
                (
                    attend::attend(&q, &k, &v, mask, AttentionKind::V2, 0.0)?,
                    None,
                )
            } else if trainable {
                (attend::sdpa(&q, &k, &v, mask, 2 * h, 2 * h / kv)?, None)
            } else {
                let p = self.probs(&q, &k, mask)?;
                let o = self.apply(&p, &v)?;
                (o, want_probs.then_some(p))
            };
            let gate = sigmoid(&lambda_proj.forward(x)?)?; // [b, s, H]
            let (pos, neg) = pairs(&both)?; // [b, H, s, d] each
            let lam = gate.transpose(1, 2)?.unsqueeze(3)?.affine(self.mix, 0.0)?;
            let o = (pos - neg.broadcast_mul(&lam)?)?;
            let captured = match probs {
                Some(p) => {
                    let (a1, a2) = pairs(&p)?;
                    Some((a1, Some(a2), Some(gate.detach())))
                }
                None => None,
            };
            return Ok((at.o_proj.forward(&layout::merge_heads(&o)?)?, captured));
        }
        let (out, probs) = match (&at.lambda, c.attention) {
            (None, _) | (_, AttentionKind::Standard) if fused => (
                attend::attend(&q, &k, &v, mask, AttentionKind::Standard, 0.0)?,
                None,
            ),
            (Some(lam), kind) if fused && attend::applies(&[&lam.q1, &lam.init]) => {
                // As the composed path: lambda_full in f32, times mix in f32.
                let lambda =
                    lam.full()?.to_dtype(DType::F32)?.to_scalar::<f32>()? * self.mix as f32;
                let o = attend::attend(&q, &k, &v, mask, kind, lambda)?;
                (self.sublayer_norm(at, lam, o)?, None)
            }
            (None, _) | (_, AttentionKind::Standard) if trainable => {
                (attend::sdpa(&q, &k, &v, mask, h, h / kv)?, None)
            }
            (Some(lam), kind) if trainable => {
                // O = A1·V − λ·(A2·V): both branches as one softmax attention over 2 sets of
                // heads (value head (i mod P) / G), then the difference.
                let lambda = lam.full()?.to_dtype(self.dtype)?.affine(self.mix, 0.0)?;
                let (both, half) = match kind {
                    AttentionKind::DoubleHeads => (attend::sdpa(&q, &k, &v, mask, h, h / kv)?, h),
                    _ => {
                        let vw = wide_values(&v, h, kv)?;
                        (attend::sdpa(&q, &k, &vw, mask, h / 2, 1)?, h / 2)
                    }
                };
                let o = (both.narrow(1, 0, half)?
                    - both.narrow(1, half, half)?.broadcast_mul(&lambda)?)?;
                (self.sublayer_norm(at, lam, o)?, None)
            }
            (None, _) | (_, AttentionKind::Standard) => {
                let p = self.probs(&q, &k, mask)?;
                let o = self.apply(&p, &v)?;
                (o, want_probs.then(|| (p, None, None)))
            }
            (Some(lam), kind) => {
                let (nq, nk) = match kind {
                    AttentionKind::DoubleHeads => (h, kv),
                    _ => (h / 2, kv / 2),
                };
                let q1 = q.narrow(1, 0, nq)?;
                let q2 = q.narrow(1, nq, nq)?;
                let k1 = k.narrow(1, 0, nk)?.contiguous()?;
                let k2 = k.narrow(1, nk, nk)?.contiguous()?;
                let a1 = self.probs(&q1.contiguous()?, &k1, mask)?;
                let a2 = self.probs(&q2.contiguous()?, &k2, mask)?;
                let lambda = lam.full()?.to_dtype(self.dtype)?.affine(self.mix, 0.0)?;
                let p = (&a1 - a2.broadcast_mul(&lambda)?)?;
                let o = match kind {
                    AttentionKind::DoubleHeads => self.apply(&p, &v)?,
                    _ => p.matmul(&wide_values(&v, h, kv)?)?,
                };
                (
                    self.sublayer_norm(at, lam, o)?,
                    want_probs.then(|| (a1, Some(a2), None)),
                )
            }
        };
        Ok((at.o_proj.forward(&layout::merge_heads(&out)?)?, probs))
    }
}
