//! A source checkpoint of any family -> differential attention (`docs/spec.md`), written as
//! format A (`llama-differential`, the axolotl plugin's format) where a Llama config
//! expresses the source exactly, else as the family's `<model_type>-differential`
//! ([`crate::format`]).
//!
//! The conversion is a plan (every output tensor's name, dtype, shape and recipe, validated
//! against config.json before anything is written) executed by a streaming writer that makes
//! one tensor at a time. Random draws come from generators keyed by (seed, layer,
//! tensor), so the bytes do not depend on the order tensors are produced in.

use std::borrow::Cow;
use std::path::{Path, PathBuf};

use rand::SeedableRng;
use rand_distr::{Distribution, Normal};
use rand_xoshiro::Xoshiro256PlusPlus;
use serde_json::{json, Value};

use crate::axolotl::{self, AxolotlConfig, DtypeChoice};
use crate::checkpoint::Checkpoint;
use crate::config::{lambda_init, write_json, AttentionDims, ModelConfig};
use crate::dtype::{self, DType};
use crate::error::{Error, IoContext, Result};
use crate::format::Target;
use crate::output::{write_safetensors, PlannedTensor, StagedDir, TensorProducer};

/// Tokenizer files copied from the source when present.
pub const TOKENIZER_FILES: [&str; 8] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
];

/// Default `--seed` when neither the flag nor the YAML `seed` is given.
pub const DEFAULT_SEED: u64 = 42;

/// Std of fresh lambda vectors (paper; transformers' `lambda_std_dev` default).
pub const LAMBDA_STD: f32 = 0.1;

/// How the H source heads become differential heads (docs/spec.md §3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// Keep the H heads as positive components, add H negative query heads and Hkv negative
    /// key heads (`q_proj` and `k_proj` double their rows).
    DoubleHeads,
    /// First half of the heads positive, second half negative; values of width 2d.
    SplitHeads,
    /// Differential Transformer V2 (`--variant v2`, docs/formats.md "V2"): source head i
    /// becomes query head 2i, a new query head 2i+1 is its negative partner, `lambda_proj`
    /// `[H, hidden]` is added; K/V heads, `o_proj`'s shape and the KV cache are unchanged.
    V2,
}

/// Initialisation of what the source model does not have (docs/spec.md §4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Init {
    /// Negative q/k rows ~ N(0, initializer_range), lambda vectors ~ N(0, 0.1).
    Random,
    /// Negative q/k rows, lambda vectors and lambda_init all zero (the plugin's `--zero-init`).
    Zero,
    /// Negative q/k rows copy the positive rows; lambda vectors ~ N(0, 0.1).
    Mirror,
    /// Output-preserving and trainable (`--preserving-mirror`, double heads without sub-layer
    /// norm): negative q/k rows copy the positive rows, so A2 = A1 and the layer computes
    /// `(1 - lambda) A1 V`; `o_proj` is divided by `(1 - lambda)` so the source's function is
    /// kept exactly, while lambda != 0 and non-zero lambda vectors give every new parameter a
    /// gradient. See docs/preserving-init.md.
    PreservingMirror,
}

/// What to convert and how.
#[derive(Debug, Clone)]
pub struct ConvertOptions {
    pub layout: Layout,
    pub init: Init,
    pub sublayer_norm: bool,
    pub seed: u64,
    pub dtype: DtypeChoice,
    pub max_shard_bytes: u64,
    pub overwrite: bool,
}

impl ConvertOptions {
    /// Rejects the flag combinations docs/spec.md §4 forbids.
    pub fn validate(&self) -> Result<()> {
        match (self.layout, self.init) {
            (Layout::SplitHeads, Init::Zero) => Err(Error::InvalidOptions(
                "--zero-init cannot be combined with --split-heads: split heads reuse the \
                 source heads as negative components, there are no new rows to zero"
                    .into(),
            )),
            (Layout::SplitHeads, Init::Mirror) => Err(Error::InvalidOptions(
                "--mirror-weights has no meaning with --split-heads: split heads create no \
                 new rows to mirror"
                    .into(),
            )),
            (Layout::SplitHeads, Init::PreservingMirror) => Err(Error::InvalidOptions(
                "--preserving-mirror needs double heads: split heads can never preserve outputs"
                    .into(),
            )),
            (Layout::V2, Init::Zero) => Err(Error::InvalidOptions(
                "--zero-init has no V2 form: zero negative query rows attend uniformly, which \
                 preserves nothing; --variant v2 --preserving-mirror preserves outputs and learns"
                    .into(),
            )),
            (Layout::V2, _) if self.sublayer_norm => Err(Error::InvalidOptions(
                "--sublayer-norm with --variant v2: V2 has no sub-layer norm".into(),
            )),
            (_, Init::PreservingMirror) if self.sublayer_norm => Err(Error::InvalidOptions(
                "--preserving-mirror needs --no-sublayer-norm: the per-head RMS norm changes \
                 the source's function"
                    .into(),
            )),
            _ => Ok(()),
        }
    }
}

/// Builds options from the flags, rejecting `--zero-init` with `--mirror-weights` and
/// `--preserving-mirror` with either.
pub fn init_from_flags(
    zero_init: bool,
    mirror_weights: bool,
    preserving_mirror: bool,
) -> Result<Init> {
    match (zero_init, mirror_weights, preserving_mirror) {
        (true, true, _) => Err(Error::InvalidOptions(
            "--zero-init and --mirror-weights are mutually exclusive".into(),
        )),
        (true, _, true) | (_, true, true) => Err(Error::InvalidOptions(
            "--preserving-mirror replaces --zero-init and --mirror-weights; give only one".into(),
        )),
        (true, false, false) => Ok(Init::Zero),
        (false, true, false) => Ok(Init::Mirror),
        (false, false, true) => Ok(Init::PreservingMirror),
        (false, false, false) => Ok(Init::Random),
    }
}

/// Rows appended below the source rows in the double-heads layout.
#[derive(Debug, Clone)]
pub(crate) enum NegRows {
    Zeros,
    Mirror,
    Normal { std: f32, stream: u64 },
}

#[derive(Debug, Clone)]
pub(crate) enum Recipe {
    /// The source tensor, re-encoded in the output dtype.
    Copy(String),
    /// `[source; negative rows]` along dim 0 (double-heads q/k weights and biases).
    AppendRows { src: String, neg: NegRows },
    /// Split heads `o_proj`: column block (j, first half) <- old block j, (j, second half)
    /// <- old block j + H/2 (docs/spec.md §3).
    PermuteOProj {
        src: String,
        heads: usize,
        head_dim: usize,
    },
    /// A small new tensor whose f32 values are fixed at plan time.
    Values(Vec<f32>),
    /// V2 `q_proj` weight or bias: per head i, the source's block of `block` elements (d rows),
    /// then the new head's block (`neg`).
    InterleaveHeads {
        src: String,
        block: usize,
        neg: NegRows,
    },
    /// `[source; source]` along dim 0 (format B's duplicated `v_proj` rows).
    RepeatRows(String),
    /// Output column c = source column `map[c].0` times `map[c].1`, for every row of a 2-D
    /// source (folding norm weights and scales into `o_proj`, computed in f32).
    MapColumns { src: String, map: Vec<(usize, f32)> },
}

/// The resolved inputs of a conversion.
pub struct Source {
    pub config: ModelConfig,
    pub checkpoint: Checkpoint,
    /// Directory holding config.json.
    pub config_dir: PathBuf,
    /// Directory holding the weights.
    pub model_dir: PathBuf,
    /// Directory the tokenizer files are copied from.
    pub tokenizer_dir: PathBuf,
}

impl Source {
    /// Resolves `base_model`, `base_model_config` and `tokenizer_config` of an axolotl config
    /// and opens the checkpoint.
    pub fn from_axolotl(cfg: &AxolotlConfig) -> Result<Self> {
        let model_dir = crate::hub::resolve_model(&cfg.base_model, true, "base_model", &cfg.path)?;
        let config_file = match &cfg.base_model_config {
            Some(c) if c.ends_with(".json") && Path::new(c).is_file() => PathBuf::from(c),
            Some(c) => crate::hub::resolve_model(c, false, "base_model_config", &cfg.path)?
                .join("config.json"),
            None => model_dir.join("config.json"),
        };
        let tokenizer_dir = match &cfg.tokenizer_config {
            Some(t) => crate::hub::resolve_model(t, false, "tokenizer_config", &cfg.path)?,
            None => model_dir.clone(),
        };
        Self::open(&model_dir, &config_file, &tokenizer_dir)
    }

    /// Opens a local model directory with its own config and tokenizer.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        Self::open(dir, &dir.join("config.json"), dir)
    }

    fn open(model_dir: &Path, config_file: &Path, tokenizer_dir: &Path) -> Result<Self> {
        let config = ModelConfig::from_file(config_file)?;
        let checkpoint = Checkpoint::open(model_dir)?;
        Ok(Self {
            config,
            checkpoint,
            config_dir: config_file.parent().unwrap_or(Path::new(".")).to_path_buf(),
            model_dir: model_dir.to_path_buf(),
            tokenizer_dir: tokenizer_dir.to_path_buf(),
        })
    }
}

/// The full conversion plan, printed before writing.
pub struct Plan {
    pub dims: AttentionDims,
    /// The source's family (`llama`, `qwen3`...).
    pub family: &'static crate::families::Family,
    /// The format written, and why format A could not be (None when it is format A).
    pub target: Target,
    pub not_llama: Option<String>,
    /// Tensors the source does not have that the format needs besides the differential
    /// ones (zero `o_proj.bias` of Qwen2 in format A), for the plan.
    pub added: Vec<String>,
    /// `--preserving-mirror`: layers whose `o_proj` scale 1/(1 − λ) is negative (λ > 1) or
    /// above 4 (λ > 0.75), with the scale: outputs are still preserved, but training starts
    /// from amplified (or sign-flipped) `o_proj` weights. Wide heads (Gemma's d = 256) draw
    /// λ further from λ_init; another `--seed` draws again.
    pub preserving_scales_far_from_one: Vec<(usize, f32)>,
    pub options: ConvertOptions,
    pub out_dtype: DType,
    /// Width of the value vector a differential head reads: d (double) or 2d (split).
    pub value_head_dim: usize,
    /// Differential heads per layer: H (double) or H/2 (split).
    pub diff_heads: usize,
    pub params_before: u64,
    pub params_after: u64,
    /// K and V bytes cached per token over all layers, in the output dtype.
    pub kv_bytes_per_token_before: u64,
    pub kv_bytes_per_token_after: u64,
    tensors: Vec<(PlannedTensor, Recipe)>,
}

impl Plan {
    /// Output tensors (name, dtype, shape), sorted by name.
    pub fn tensors(&self) -> impl Iterator<Item = &PlannedTensor> {
        self.tensors.iter().map(|(t, _)| t)
    }

    /// A human-readable summary.
    pub fn summary(&self) -> String {
        let d = &self.dims;
        let layout = match self.options.layout {
            Layout::DoubleHeads => "double heads",
            Layout::SplitHeads => "split heads",
            Layout::V2 => {
                "V2 (2H query heads, K/V heads unchanged, lambda = sigmoid(lambda_proj(x)))"
            }
        };
        let init = match self.options.init {
            Init::Random if self.options.layout == Layout::V2 => {
                "random (new query heads and lambda_proj ~ N(0, initializer_range))"
            }
            Init::Mirror if self.options.layout == Layout::V2 => {
                "mirror-weights (new query heads = source heads, lambda_proj ~ N(0, initializer_range))"
            }
            Init::PreservingMirror if self.options.layout == Layout::V2 => {
                "preserving-mirror (new query heads = source heads, lambda_proj = 0 so lambda = 1/2, o_proj x 2)"
            }
            // Split heads draw no q/k: the second half of the source heads is the negative part.
            Init::Random if self.options.layout == Layout::SplitHeads => {
                "random lambda (q/k copied: heads H/2..H are the negative components; lambda ~ N(0, 0.1))"
            }
            Init::Random => "random (negative q/k ~ N(0, initializer_range), lambda ~ N(0, 0.1))",
            Init::Zero => "zero-init (negative q/k = 0, lambda = 0, lambda_init = 0)",
            Init::Mirror => "mirror-weights (negative q/k = positive q/k, lambda ~ N(0, 0.1))",
            Init::PreservingMirror if self.out_dtype != DType::F32 => {
                "preserving-mirror in half precision (negative q/k = positive q/k, lambda_q2/k2 = lambda_q1/k1 ~ N(0, 0.1), lambda_init 0.5 or 0.75, o_proj x 2 or 4: exact in bf16/f16)"
            }
            Init::PreservingMirror => {
                "preserving-mirror (negative q/k = positive q/k, lambda ~ N(0, 0.1), o_proj / (1 - lambda))"
            }
        };
        let (model_type, _) = self.format_names();
        let format = match &self.not_llama {
            None => model_type,
            Some(why) => format!("{model_type} (a Llama config cannot express {why})"),
        };
        let added = if self.added.is_empty() {
            String::new()
        } else {
            format!("\nadded: {}", self.added.join("; "))
        };
        format!(
            "family: {} ({})\nformat: {format}{added}\n\
             layout: {layout}\ninit: {init}\nsublayer_norm: {}\nseed: {}\n\
             H = {}, Hkv = {}, d = {}, layers = {}, hidden = {}\n\
             differential heads per layer: {}, value head dim: {}\n\
             dtype: {}\nparameters: {} -> {} ({:+})\n\
             KV-cache bytes per token: {} -> {}",
            self.family.name,
            self.family.class,
            self.options.sublayer_norm,
            self.options.seed,
            d.num_attention_heads,
            d.num_key_value_heads,
            d.head_dim,
            d.num_hidden_layers,
            d.hidden_size,
            self.diff_heads,
            self.value_head_dim,
            self.out_dtype,
            self.params_before,
            self.params_after,
            self.params_after as i64 - self.params_before as i64,
            self.kv_bytes_per_token_before,
            self.kv_bytes_per_token_after,
        )
    }
}

impl Plan {
    /// `model_type` and `architectures[0]` the converted config gets.
    pub fn format_names(&self) -> (String, String) {
        match &self.target {
            Target::LlamaDifferential { .. } => (
                "llama-differential".into(),
                "LlamaDifferentialForCausalLM".into(),
            ),
            Target::Family => (
                self.family.differential_model_type(),
                self.family.differential_class(),
            ),
        }
    }
}

fn attn_prefix(layer: usize) -> String {
    format!("model.layers.{layer}.self_attn.")
}

/// Values drawn per independent block of [`normal_values`].
const NORMAL_BLOCK: usize = 4096;

/// `n` draws from N(0, std²), reproducible from (`seed`, `stream`).
///
/// Block b of [`NORMAL_BLOCK`] values comes from its own Xoshiro256++ generator, seeded
/// (through SplitMix64, `seed_from_u64`) with a hash of (seed, stream, b); blocks are filled
/// in parallel and the values do not depend on the number of threads. Normal samples use
/// `rand_distr`'s ziggurat.
fn normal_values(std: f32, seed: u64, stream: u64, n: usize) -> Vec<f32> {
    use rayon::prelude::*;
    let dist = Normal::new(0.0f32, std).expect("std is finite and non-negative");
    let mut out = vec![0.0f32; n];
    out.par_chunks_mut(NORMAL_BLOCK)
        .enumerate()
        .for_each(|(b, chunk)| {
            let key = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15)
                ^ stream.wrapping_mul(0xBF58_476D_1CE4_E5B9).rotate_left(17)
                ^ (b as u64)
                    .wrapping_mul(0x94D0_49BB_1331_11EB)
                    .rotate_left(41);
            let mut rng = Xoshiro256PlusPlus::seed_from_u64(key);
            chunk.iter_mut().for_each(|x| *x = dist.sample(&mut rng));
        });
    out
}

/// Stream ids: 16 per layer, fixed per tensor kind.
fn stream(layer: usize, kind: u64) -> u64 {
    layer as u64 * 16 + kind
}

/// Validates the source against its config and builds the plan.
pub fn plan(src: &Source, options: &ConvertOptions) -> Result<Plan> {
    options.validate()?;
    let dims = src.config.dims()?;
    let ck = &src.checkpoint;
    let (h, hkv, d, dm) = (
        dims.num_attention_heads,
        dims.num_key_value_heads,
        dims.head_dim,
        dims.hidden_size,
    );
    if options.layout == Layout::SplitHeads && (h % 2 != 0 || hkv % 2 != 0) {
        return Err(Error::OddHeads {
            num_attention_heads: h,
            num_key_value_heads: hkv,
        });
    }
    if src.config.format.is_differential() {
        return Err(Error::UnsupportedArchitecture {
            path: src.config.path.clone(),
            value: src
                .config
                .typed
                .architectures
                .clone()
                .unwrap_or_default()
                .join(","),
            supported: format!(
                "{} (the model is already differential)",
                crate::families::FAMILIES.map(|f| f.class).join(", ")
            ),
        });
    }
    for name in ck.names() {
        if name.contains(".lambda_") || name.ends_with("subln.weight") {
            return Err(Error::Safetensors {
                path: ck.file_of(name).unwrap_or(&ck.dir).to_path_buf(),
                msg: format!("tensor `{name}` shows this checkpoint is already differential"),
            });
        }
    }
    let vocab = src.config.typed.vocab_size;
    src.config.check_supported()?;
    ck.check_layer_count(dims.num_hidden_layers, &src.config.path)?;
    src.config
        .check_lm_head(ck.info("lm_head.weight").is_some(), &ck.dir)?;
    let expected = src.config.expected_tensors()?;
    ck.check_against(&expected, &[vocab, dm])?;
    // Every tensor is copied: one the family's block does not have would be carried into the
    // output and read by some loader and not by another (a q_norm in a Llama, an o bias in a
    // Qwen2). transformers' recomputed RoPE buffers are the one known extra.
    if let Some(name) = ck.names().find(|n| {
        !expected.contains_key(*n) && *n != "lm_head.weight" && !n.ends_with("rotary_emb.inv_freq")
    }) {
        return Err(Error::UnexpectedTensor {
            path: ck.file_of(name).unwrap_or(&ck.dir).to_path_buf(),
            name: name.to_string(),
            model: format!("{} checkpoint", src.config.family.class),
        });
    }
    let embed = ck.require("model.embed_tokens.weight")?;
    let out_dtype = options.dtype.resolve(embed.dtype);

    let mut recipes: std::collections::BTreeMap<String, (Vec<usize>, Recipe)> = Default::default();
    for name in ck.names() {
        let info = ck.require(name)?;
        recipes.insert(
            name.to_string(),
            (info.shape.clone(), Recipe::Copy(name.to_string())),
        );
    }
    src.config.layer_attention()?;
    // The tokenizer is copied as it is: one that does not load would fail only later, in
    // generate or train, far from its cause.
    // Checked for its shape only (JSON with a `model` holding a `vocab`, as every tokenizers
    // model has): loading Gemma's 33 MB tokenizer takes seconds, parsing past it ~0.1 s.
    let tok = src.tokenizer_dir.join("tokenizer.json");
    if tok.is_file() {
        #[derive(serde::Deserialize)]
        struct TokenizerShape {
            #[allow(dead_code)]
            model: ModelShape,
        }
        #[derive(serde::Deserialize)]
        struct ModelShape {
            #[allow(dead_code)]
            vocab: serde::de::IgnoredAny,
        }
        let bytes = std::fs::read(&tok).at(&tok)?;
        serde_json::from_slice::<TokenizerShape>(&bytes).map_err(|e| {
            Error::Tokenizer(format!(
                "{}: not a tokenizer.json of the tokenizers library ({e}); it would be copied into the converted model as it is",
                tok.display()
            ))
        })?;
    }
    let target = crate::format::target(&src.config);
    let not_llama = crate::format::why_not_llama(&src.config);
    let mut added = Vec::new();
    if target == (Target::LlamaDifferential { zero_o_bias: true }) {
        for layer in 0..dims.num_hidden_layers {
            let name = format!("{}o_proj.bias", attn_prefix(layer));
            if ck.info(&name).is_none() {
                recipes.insert(name, (vec![dm], Recipe::Values(vec![0.0; dm])));
            }
        }
        added.push(format!(
            "o_proj.bias = 0 [{dm}] in each of the {} layers (format A's attention_bias: true puts a bias on o_proj as well; {} has none)",
            dims.num_hidden_layers, src.config.family.class
        ));
    }
    let seed = options.seed;
    let mut far_scales = Vec::new();
    let neg_rows = |layer: usize, kind: u64, is_bias: bool| match options.init {
        Init::Zero => NegRows::Zeros,
        Init::Mirror | Init::PreservingMirror => NegRows::Mirror,
        Init::Random if is_bias => NegRows::Zeros,
        Init::Random => NegRows::Normal {
            std: src.config.initializer_range() as f32,
            stream: stream(layer, kind),
        },
    };
    for layer in 0..dims.num_hidden_layers {
        let p = attn_prefix(layer);
        let shapes = [
            ("q_proj", h * d, dm),
            ("k_proj", hkv * d, dm),
            ("v_proj", hkv * d, dm),
            ("o_proj", dm, h * d),
        ];
        for (proj, rows, cols) in shapes {
            ck.require_shape(&format!("{p}{proj}.weight"), &[rows, cols])?;
            let bias = format!("{p}{proj}.bias");
            if ck.info(&bias).is_some() {
                ck.require_shape(&bias, &[rows])?;
            }
        }
        match options.layout {
            Layout::DoubleHeads => {
                for (kind, proj, rows) in [(0u64, "q_proj", h * d), (1, "k_proj", hkv * d)] {
                    let w = format!("{p}{proj}.weight");
                    recipes.insert(
                        w.clone(),
                        (
                            vec![2 * rows, dm],
                            Recipe::AppendRows {
                                src: w,
                                neg: neg_rows(layer, kind, false),
                            },
                        ),
                    );
                    let b = format!("{p}{proj}.bias");
                    if ck.info(&b).is_some() {
                        recipes.insert(
                            b.clone(),
                            (
                                vec![2 * rows],
                                Recipe::AppendRows {
                                    src: b,
                                    neg: neg_rows(layer, kind + 8, true),
                                },
                            ),
                        );
                    }
                }
            }
            Layout::V2 => {
                for (b, suffix, block) in [(0u64, "weight", d * dm), (8, "bias", d)] {
                    let name = format!("{p}q_proj.{suffix}");
                    let Some(info) = ck.info(&name) else { continue };
                    let mut shape = info.shape.clone();
                    shape[0] *= 2;
                    recipes.insert(
                        name.clone(),
                        (
                            shape,
                            Recipe::InterleaveHeads {
                                src: name,
                                block,
                                neg: neg_rows(layer, b, b == 8),
                            },
                        ),
                    );
                }
                // lambda = sigmoid(x W^T): N(0, initializer_range) as every new projection,
                // 0 (lambda = 1/2) for the preserving start, whose o_proj doubles (SPEC: exact
                // in any dtype, a power of two).
                let lp = match options.init {
                    Init::PreservingMirror => vec![0.0; h * dm],
                    _ => normal_values(
                        src.config.initializer_range() as f32,
                        seed,
                        stream(layer, 6),
                        h * dm,
                    ),
                };
                recipes.insert(
                    format!("{p}lambda_proj.weight"),
                    (vec![h, dm], Recipe::Values(lp)),
                );
                if options.init == Init::PreservingMirror {
                    let o = format!("{p}o_proj.weight");
                    let map = (0..h * d).map(|c| (c, 2.0)).collect();
                    recipes.insert(
                        o.clone(),
                        (vec![dm, h * d], Recipe::MapColumns { src: o, map }),
                    );
                }
                continue;
            }
            Layout::SplitHeads => {
                let o = format!("{p}o_proj.weight");
                recipes.insert(
                    o.clone(),
                    (
                        vec![dm, h * d],
                        Recipe::PermuteOProj {
                            src: o,
                            heads: h,
                            head_dim: d,
                        },
                    ),
                );
            }
        }
        // A preserving conversion written in bf16/f16 (`exact_fold`) rounds what it stores:
        // the fold 1/(1 − λ) is made exact there instead (docs/preserving-init.md, "Half
        // precision"): λq2 = λq1 and λk2 = λk1 (so the two exponentials cancel exactly,
        // λ = λ_init), and λ_init = 1 − 2^-j (0.5 or 0.75), whose 1/(1 − λ) = 2^j multiplies
        // `o_proj` without rounding in any dtype.
        let exact_fold = options.init == Init::PreservingMirror && out_dtype != DType::F32;
        let mut lambda_vectors: Vec<Vec<f32>> = Vec::with_capacity(4);
        for (kind, lname) in [
            (2u64, "lambda_q1"),
            (3, "lambda_k1"),
            (4, "lambda_q2"),
            (5, "lambda_k2"),
        ] {
            let values = match options.init {
                Init::Zero => vec![0.0; d],
                _ if exact_fold && kind >= 4 => lambda_vectors[kind as usize - 4].clone(),
                _ if exact_fold => {
                    let v = normal_values(LAMBDA_STD, seed, stream(layer, kind), d);
                    crate::dtype::to_f32(&crate::dtype::from_f32(&v, out_dtype), out_dtype)
                }
                Init::Random | Init::Mirror | Init::PreservingMirror => {
                    normal_values(LAMBDA_STD, seed, stream(layer, kind), d)
                }
            };
            lambda_vectors.push(values.clone());
            recipes.insert(format!("{p}{lname}"), (vec![d], Recipe::Values(values)));
        }
        let li = match options.init {
            Init::Zero => 0.0,
            _ if exact_fold => {
                // The power of two nearest 1 − λ_init(l) (0.2 to 0.8), at most 1/2.
                let j = (-(1.0 - lambda_init(layer)).log2()).round().max(1.0);
                (1.0 - 0.5f64.powi(j as i32)) as f32
            }
            _ => lambda_init(layer) as f32,
        };
        if options.init == Init::PreservingMirror {
            // lambda as the forward computes it (f32 dot products and exp).
            let dot = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f32>();
            let v = &lambda_vectors;
            let lambda = dot(&v[0], &v[1]).exp() - dot(&v[2], &v[3]).exp() + li;
            let scale = 1.0 / (1.0 - lambda);
            if !(0.0..=4.0).contains(&scale) {
                far_scales.push((layer, scale));
            }
            let o = format!("{p}o_proj.weight");
            let map = (0..h * d).map(|c| (c, scale)).collect();
            recipes.insert(
                o.clone(),
                (vec![dm, h * d], Recipe::MapColumns { src: o, map }),
            );
        }
        recipes.insert(
            format!("{p}lambda_init"),
            (vec![], Recipe::Values(vec![li])),
        );
        if options.sublayer_norm {
            let width = match options.layout {
                Layout::DoubleHeads | Layout::V2 => d,
                Layout::SplitHeads => 2 * d,
            };
            recipes.insert(
                format!("{p}subln.weight"),
                (vec![width], Recipe::Values(vec![1.0; width])),
            );
        }
    }
    let params_before: u64 = ck
        .names()
        .map(|n| ck.require(n).map(|i| i.numel() as u64))
        .sum::<Result<u64>>()?;
    let params_after: u64 = recipes
        .values()
        .map(|(s, _)| s.iter().product::<usize>() as u64)
        .sum();
    let l = dims.num_hidden_layers as u64;
    let es = out_dtype.size() as u64;
    let kv_before = l * 2 * (hkv * d) as u64 * es;
    let kv_after = match options.layout {
        Layout::DoubleHeads => l * 3 * (hkv * d) as u64 * es,
        Layout::SplitHeads | Layout::V2 => kv_before,
    };
    let tensors = recipes
        .into_iter()
        .map(|(name, (shape, recipe))| {
            (
                PlannedTensor {
                    name,
                    dtype: out_dtype,
                    shape,
                },
                recipe,
            )
        })
        .collect();
    Ok(Plan {
        dims,
        preserving_scales_far_from_one: far_scales,
        family: src.config.family,
        target,
        not_llama,
        added,
        options: options.clone(),
        out_dtype,
        value_head_dim: match options.layout {
            Layout::DoubleHeads | Layout::V2 => d,
            Layout::SplitHeads => 2 * d,
        },
        diff_heads: match options.layout {
            Layout::DoubleHeads | Layout::V2 => h,
            Layout::SplitHeads => h / 2,
        },
        params_before,
        params_after,
        kv_bytes_per_token_before: kv_before,
        kv_bytes_per_token_after: kv_after,
        tensors,
    })
}

/// Makes planned tensors from a checkpoint, one at a time.
pub(crate) struct Producer<'a> {
    pub ck: &'a Checkpoint,
    /// Sorted by name.
    pub tensors: &'a [(PlannedTensor, Recipe)],
    pub out_dtype: DType,
    pub seed: u64,
    pub on_tensor: &'a dyn Fn(&str),
}

impl Producer<'_> {
    fn recipe(&self, name: &str) -> &Recipe {
        let i = self
            .tensors
            .binary_search_by(|(t, _)| t.name.as_str().cmp(name))
            .expect("the writer only asks for planned tensors");
        &self.tensors[i].1
    }

    fn source_bytes(&self, name: &str) -> Result<Cow<'_, [u8]>> {
        let info = self.ck.require(name)?;
        Ok(dtype::convert(
            self.ck.bytes(name)?,
            info.dtype,
            self.out_dtype,
        ))
    }
}

impl TensorProducer for Producer<'_> {
    fn produce(&self, t: &PlannedTensor) -> Result<Cow<'_, [u8]>> {
        // One stat per shard and tensor: a source truncated under us is named as such.
        self.ck.check_unchanged()?;
        let bytes = self.produce_unchecked(t)?;
        self.check_finite(t, &bytes)?;
        Ok(bytes)
    }

    fn done(&self, t: &PlannedTensor) {
        self.release(t)
    }

    fn inputs_changed(&self) -> Option<Error> {
        self.ck.check_unchanged().err()
    }
}

impl Producer<'_> {
    /// Refuses an output tensor holding NaN or infinite values, naming it: a source tensor
    /// that holds them (counted), or values beyond the output dtype's range (f16's 65504 with
    /// `fp16: true`; the largest source |value| named). Nothing like that is written silently.
    fn check_finite(&self, t: &PlannedTensor, bytes: &Cow<'_, [u8]>) -> Result<()> {
        // A tensor copied as it is (borrowed from the map) is scanned from the file.
        let (bad, _) = match (self.recipe(&t.name), bytes) {
            (Recipe::Copy(src), Cow::Borrowed(_)) => self.ck.scan(src)?,
            _ => dtype::scan(bytes, self.out_dtype),
        };
        if bad == 0 {
            return Ok(());
        }
        let src = match self.recipe(&t.name) {
            Recipe::Copy(src)
            | Recipe::AppendRows { src, .. }
            | Recipe::InterleaveHeads { src, .. }
            | Recipe::PermuteOProj { src, .. }
            | Recipe::RepeatRows(src)
            | Recipe::MapColumns { src, .. } => Some(src.as_str()),
            Recipe::Values(_) => None,
        };
        let path = src
            .and_then(|s| self.ck.file_of(s))
            .unwrap_or(&self.ck.dir)
            .to_path_buf();
        let msg = match src {
            Some(s) => {
                let info = self.ck.require(s)?;
                let (src_bad, src_max) = self.ck.scan(s)?;
                if src_bad > 0 {
                    format!("tensor `{s}` holds {src_bad} NaN or infinite values (of {}); a conversion of it would carry them", info.numel())
                } else {
                    format!(
                        "tensor `{}` does not fit {}: {bad} of its values overflow to infinity (the largest |value| of `{s}` is {src_max:e}{}); keep the source dtype or use bf16",
                        t.name,
                        self.out_dtype,
                        if self.out_dtype == DType::F16 { ", f16 holds at most 65504" } else { "" }
                    )
                }
            }
            None => format!("tensor `{}`: {bad} values are not finite", t.name),
        };
        Err(Error::Safetensors { path, msg })
    }

    fn produce_unchecked(&self, t: &PlannedTensor) -> Result<Cow<'_, [u8]>> {
        let out = self.out_dtype;
        match self.recipe(&t.name) {
            Recipe::Copy(src) => self.source_bytes(src),
            Recipe::AppendRows { src, neg } => {
                let pos = self.source_bytes(src)?;
                let mut data = Vec::with_capacity(pos.len() * 2);
                data.extend_from_slice(&pos);
                match neg {
                    NegRows::Zeros => data.resize(pos.len() * 2, 0),
                    NegRows::Mirror => data.extend_from_slice(&pos),
                    NegRows::Normal { std, stream } => {
                        let n = pos.len() / out.size();
                        let v = normal_values(*std, self.seed, *stream, n);
                        dtype::extend_from_f32(&mut data, &v, out);
                    }
                }
                Ok(Cow::Owned(data))
            }
            Recipe::InterleaveHeads { src, block, neg } => {
                let pos = self.source_bytes(src)?;
                let es = out.size();
                let n = pos.len() / es;
                let fresh = match neg {
                    NegRows::Normal { std, stream } => {
                        dtype::from_f32(&normal_values(*std, self.seed, *stream, n), out)
                    }
                    NegRows::Zeros => vec![0u8; pos.len()],
                    NegRows::Mirror => Vec::new(),
                };
                let mut data = Vec::with_capacity(pos.len() * 2);
                for (i, head) in pos.chunks(block * es).enumerate() {
                    data.extend_from_slice(head);
                    match neg {
                        NegRows::Mirror => data.extend_from_slice(head),
                        _ => data.extend_from_slice(&fresh[i * block * es..][..head.len()]),
                    }
                }
                Ok(Cow::Owned(data))
            }
            Recipe::PermuteOProj {
                src,
                heads,
                head_dim,
            } => {
                let bytes = self.source_bytes(src)?;
                let es = out.size();
                let cols = heads * head_dim;
                let block = head_dim * es;
                let half = heads / 2;
                let mut data = vec![0u8; bytes.len()];
                for (src_row, dst_row) in bytes
                    .chunks_exact(cols * es)
                    .zip(data.chunks_exact_mut(cols * es))
                {
                    for j in 0..half {
                        let first = &src_row[j * block..(j + 1) * block];
                        let second = &src_row[(j + half) * block..(j + half + 1) * block];
                        dst_row[2 * j * block..(2 * j + 1) * block].copy_from_slice(first);
                        dst_row[(2 * j + 1) * block..(2 * j + 2) * block].copy_from_slice(second);
                    }
                }
                Ok(Cow::Owned(data))
            }
            Recipe::Values(v) => Ok(Cow::Owned(dtype::from_f32(v, out))),
            Recipe::RepeatRows(src) => {
                let b = self.source_bytes(src)?;
                Ok(Cow::Owned([&b[..], &b[..]].concat()))
            }
            Recipe::MapColumns { src, map } => {
                let info = self.ck.require(src)?;
                let cols = info.shape[1];
                let w = self.ck.to_f32(src)?;
                let mut v = Vec::with_capacity(info.shape[0] * map.len());
                for row in w.chunks_exact(cols) {
                    v.extend(map.iter().map(|&(c, f)| row[c] * f));
                }
                Ok(Cow::Owned(dtype::from_f32(&v, out)))
            }
        }
    }

    fn release(&self, t: &PlannedTensor) {
        match self.recipe(&t.name) {
            Recipe::Copy(src)
            | Recipe::AppendRows { src, .. }
            | Recipe::InterleaveHeads { src, .. }
            | Recipe::PermuteOProj { src, .. }
            | Recipe::RepeatRows(src)
            | Recipe::MapColumns { src, .. } => self.ck.release(src),
            Recipe::Values(_) => {}
        }
        (self.on_tensor)(&t.name);
    }
}

/// The config.json of the converted model (`docs/formats.md`): the source config (as a Llama
/// config for format A) plus the differential keys.
pub fn converted_config(src: &ModelConfig, plan: &Plan) -> Value {
    let mut raw = match plan.target {
        Target::LlamaDifferential { zero_o_bias } => {
            crate::format::as_llama_config(src, zero_o_bias)
        }
        Target::Family => src.raw.clone(),
    };
    let (model_type, class) = plan.format_names();
    raw.insert("architectures".into(), json!([class]));
    raw.insert("model_type".into(), json!(model_type));
    raw.insert("torch_dtype".into(), json!(plan.out_dtype.torch_name()));
    if raw.contains_key("dtype") {
        // transformers >= 5 writes `dtype` instead of `torch_dtype`.
        raw.insert("dtype".into(), json!(plan.out_dtype.torch_name()));
    }
    raw.insert(
        "split_heads".into(),
        json!(plan.options.layout == Layout::SplitHeads),
    );
    if plan.options.layout == Layout::V2 {
        raw.insert(crate::config::VARIANT_KEY.into(), json!("v2"));
    }
    // The seed of the random draws: with the flags above, what reproduces this checkpoint.
    raw.insert("conversion_seed".into(), json!(plan.options.seed));
    raw.insert("sublayer_norm".into(), json!(plan.options.sublayer_norm));
    raw.insert("zero_init".into(), json!(plan.options.init == Init::Zero));
    if plan.options.init == Init::PreservingMirror {
        raw.insert("preserving_mirror".into(), json!(true));
    }
    raw.insert(
        "mirror_weights".into(),
        json!(matches!(
            plan.options.init,
            Init::Mirror | Init::PreservingMirror
        )),
    );
    crate::remote_code::set_auto_map(&mut raw);
    Value::Object(raw)
}

/// Copies the tokenizer files and generation_config.json that exist in the source.
pub fn copy_side_files(src: &Source, dst: &Path) -> Result<Vec<String>> {
    copy_tokenizer_files(&src.tokenizer_dir, &[&src.model_dir, &src.config_dir], dst)
}

/// Copies the [`TOKENIZER_FILES`] present in `tokenizer_dir`, and the first
/// `generation_config.json` found in `generation_dirs`, into `dst`; returns the names copied.
pub fn copy_tokenizer_files(
    tokenizer_dir: &Path,
    generation_dirs: &[&Path],
    dst: &Path,
) -> Result<Vec<String>> {
    SideFiles::read(tokenizer_dir, generation_dirs)?.write(dst)
}

/// The tokenizer and generation files a model directory carries besides its weights and
/// config, held in memory (a few MB): training reads them once and writes them with every
/// checkpoint.
pub(crate) struct SideFiles(Vec<(&'static str, Vec<u8>)>);

impl SideFiles {
    /// The [`TOKENIZER_FILES`] present in `tokenizer_dir` and the first
    /// `generation_config.json` found in `generation_dirs`.
    pub(crate) fn read(tokenizer_dir: &Path, generation_dirs: &[&Path]) -> Result<Self> {
        let mut files = Vec::new();
        let found = TOKENIZER_FILES
            .iter()
            .map(|&name| (name, tokenizer_dir.join(name)))
            .chain(
                generation_dirs
                    .iter()
                    .map(|d| d.join("generation_config.json"))
                    .find(|p| p.is_file())
                    .map(|p| ("generation_config.json", p)),
            );
        for (name, from) in found {
            if from.is_file() {
                files.push((name, std::fs::read(&from).at(&from)?));
            }
        }
        Ok(Self(files))
    }

    /// Writes the files into `dst`; returns their names.
    pub(crate) fn write(&self, dst: &Path) -> Result<Vec<String>> {
        for (name, bytes) in &self.0 {
            let to = dst.join(name);
            std::fs::write(&to, bytes).at(&to)?;
        }
        Ok(self.0.iter().map(|(n, _)| n.to_string()).collect())
    }
}

/// What a finished conversion wrote.
#[derive(Debug)]
pub struct ConvertReport {
    pub output_dir: PathBuf,
    pub files: Vec<String>,
    /// Changes made to what was asked, each one line (printed as warnings).
    pub warnings: Vec<String>,
}

/// The warm-up key of docs/spec.md §5, which an output-preserving init cannot take (§6).
pub const WARMUP_KEY: &str = "diff_attn_warmup_steps";

/// Runs a planned conversion into `output_dir` (staged, renamed into place at the end).
/// `axolotl` is the input YAML (its edited copy is written as `axolotl_config.yml`);
/// `on_tensor` is called after each tensor is written (progress).
pub fn execute(
    src: &Source,
    plan: &Plan,
    output_dir: &Path,
    axolotl: Option<&AxolotlConfig>,
    on_tensor: &dyn Fn(&str),
) -> Result<ConvertReport> {
    let mut inputs: Vec<&Path> = vec![&src.model_dir, &src.config_dir, &src.tokenizer_dir];
    if let Some(a) = axolotl {
        inputs.push(&a.path);
        // axolotl_config.yml names the output (YAML is UTF-8): a path that is not UTF-8 would
        // be written as another path (U+FFFD in place of its bytes).
        let absolute = std::path::absolute(output_dir).at(output_dir)?;
        if absolute.to_str().is_none() {
            return Err(Error::InvalidOptions(format!(
                "output directory {}: its path is not valid UTF-8, so the axolotl_config.yml written into it could not name it (YAML is UTF-8); choose a UTF-8 path",
                output_dir.display()
            )));
        }
    }
    let staged = StagedDir::create(output_dir, plan.options.overwrite, &inputs)?;
    let producer = Producer {
        ck: &src.checkpoint,
        tensors: &plan.tensors,
        out_dtype: plan.out_dtype,
        seed: plan.options.seed,
        on_tensor,
    };
    let mut files = write_safetensors(
        staged.path(),
        plan.tensors().cloned().collect(),
        plan.options.max_shard_bytes,
        &producer,
    )?;
    write_json(
        &staged.path().join("config.json"),
        &converted_config(&src.config, plan),
    )?;
    files.push("config.json".into());
    files.extend(crate::remote_code::write_files(staged.path())?);
    files.extend(copy_side_files(src, staged.path())?);
    let mut warnings = Vec::new();
    if let Some(a) = axolotl {
        // Every format this tool writes as a differential checkpoint loads through our plugin
        // (format B, `--format diffllama`, is written by export, without it).
        let mut text =
            axolotl::converted_config_text(&a.text, &staged.dest().to_string_lossy(), true)?;
        if plan.options.init == Init::PreservingMirror {
            let (stripped, old) = axolotl::without_key(&text, WARMUP_KEY)?;
            if let Some(old) = old {
                text = stripped;
                let fold = if plan.options.layout == Layout::V2 {
                    "--variant v2 --preserving-mirror doubles o_proj (lambda = 1/2)"
                } else {
                    "--preserving-mirror folds 1/(1 - lambda) into o_proj"
                };
                warnings.push(format!(
                    "{WARMUP_KEY}: {old} removed from axolotl_config.yml: {fold}, so the model computes its source only at mix = 1, and a warm-up from mix = 0 would start training from a rescaled attention output"
                ));
            }
        }
        let path = staged.path().join("axolotl_config.yml");
        std::fs::write(&path, text).at(&path)?;
        files.push("axolotl_config.yml".into());
    }
    let output_dir = staged.commit()?;
    Ok(ConvertReport {
        output_dir,
        files,
        warnings,
    })
}

/// Mean, standard deviation (population) and max |x| of a slice.
pub fn stats(v: &[f32]) -> (f64, f64, f64) {
    if v.is_empty() {
        return (0.0, 0.0, 0.0);
    }
    let n = v.len() as f64;
    let mean = v.iter().map(|&x| x as f64).sum::<f64>() / n;
    let var = v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n;
    let max = v.iter().fold(0.0f64, |m, &x| m.max((x as f64).abs()));
    (mean, var.sqrt(), max)
}

/// Per-layer statistics of a written format-A checkpoint's attention parameters, for
/// `--debug`: one line per layer with q/k positive and negative halves, lambda vectors,
/// lambda_init and the resulting lambda.
pub fn layer_statistics(dir: &Path) -> Result<Vec<String>> {
    let cfg = crate::config::ModelConfig::from_str(
        &std::fs::read_to_string(dir.join("config.json"))
            .at(dir.join("config.json"))?
            .replace("LlamaDifferentialForCausalLM", "LlamaForCausalLM"),
        &dir.join("config.json"),
    )?;
    let ck = Checkpoint::open(dir)?;
    let split = cfg
        .raw
        .get("split_heads")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let v2 = cfg
        .raw
        .get(crate::config::VARIANT_KEY)
        .and_then(Value::as_str)
        == Some("v2");
    let head_rows = cfg.dims()?.head_dim * cfg.typed.hidden_size;
    let mut lines = Vec::new();
    for layer in 0..cfg.typed.num_hidden_layers {
        let p = attn_prefix(layer);
        let mut parts = vec![format!("layer {layer:>3}")];
        if v2 {
            // q_proj: head 2i (the source's head i), head 2i+1 (its new partner), alternating.
            let w = ck.to_f32(&format!("{p}q_proj.weight"))?;
            let (mut pos, mut neg) = (Vec::new(), Vec::new());
            for (i, head) in w.chunks(head_rows).enumerate() {
                if i % 2 == 0 {
                    pos.extend_from_slice(head)
                } else {
                    neg.extend_from_slice(head)
                }
            }
            let (_, s1, _) = stats(&pos);
            let (_, s2, m2) = stats(&neg);
            let (_, sl, ml) = stats(&ck.to_f32(&format!("{p}lambda_proj.weight"))?);
            parts.push(format!(
                "q_proj heads 2i/2i+1 std {s1:.4}/{s2:.4} new max {m2:.4}  lambda_proj std {sl:.4} max {ml:.4}"
            ));
            lines.push(parts.join("  "));
            continue;
        }
        for proj in ["q_proj", "k_proj"] {
            let w = ck.to_f32(&format!("{p}{proj}.weight"))?;
            let (a, b) = w.split_at(w.len() / 2);
            let (_, s1, _) = stats(a);
            let (_, s2, m2) = stats(b);
            let label = if split {
                "first/second half"
            } else {
                "pos/neg"
            };
            parts.push(format!(
                "{proj} {label} std {s1:.4}/{s2:.4} neg max {m2:.4}"
            ));
        }
        let lv: Vec<Vec<f32>> = ["lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2"]
            .iter()
            .map(|n| ck.to_f32(&format!("{p}{n}")))
            .collect::<Result<_>>()?;
        let dot = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f32>();
        let li = ck.to_f32(&format!("{p}lambda_init"))?[0];
        let lambda = dot(&lv[0], &lv[1]).exp() - dot(&lv[2], &lv[3]).exp() + li;
        let norms: Vec<String> = lv
            .iter()
            .map(|v| format!("{:.3}", v.iter().map(|x| x * x).sum::<f32>().sqrt()))
            .collect();
        parts.push(format!(
            "|lambda_q1,k1,q2,k2| {} lambda_init {li:.6} lambda {lambda:.6}",
            norms.join(",")
        ));
        lines.push(parts.join("  "));
    }
    Ok(lines)
}
