//! Memory a command will need, memory this process may use, and the refusal when the first is
//! larger: one line with both figures and what would fit, before anything large is
//! allocated, instead of a kill by the kernel's OOM killer (signal 9, no message).
//!
//! What this process may use ([`Budget::current`]), the smallest of:
//! - `DIFF_TRANSFORMER_MEMORY_LIMIT` (a size as [`crate::output::parse_size`] reads it: `1.5G`,
//!   `1536M`, `2GB`), the tool's own override;
//! - the memory limit of this process's cgroup and of its ancestors (v2 `memory.max`, v1
//!   `memory.limit_in_bytes`);
//! - `MemAvailable` of `/proc/meminfo`.
//!
//! What a command needs ([`Estimate`]) is anonymous memory: weights held in memory
//! (training's f32 weights, gradients and AdamW moments, or weights of a dtype other than the
//! stored one), the KV cache, activations of the largest forward, logits kept. Weights read in
//! place from the checkpoint's map (inference on the CPU, see [`crate::model::stored`]) are
//! file pages the kernel reclaims and re-reads: reported, not counted.

use std::path::Path;

use crate::checkpoint::Checkpoint;
use crate::config::ModelConfig;
use crate::dtype::DType;
use crate::error::{Error, Result};

/// The environment variable that caps the memory a command may plan for.
pub const LIMIT_ENV: &str = "DIFF_TRANSFORMER_MEMORY_LIMIT";

/// Fixed cost of a command besides the model: the binary, the allocator's arenas, thread
/// stacks in use.
const BASE_BYTES: u64 = 96 << 20;

/// Bytes as `1.52 GB` / `830 MB` (powers of 1000, as `free -h --si` and most tools print).
pub fn human(bytes: u64) -> String {
    let b = bytes as f64;
    if b >= 1e9 {
        format!("{:.2} GB", b / 1e9)
    } else if b >= 1e6 {
        format!("{:.0} MB", b / 1e6)
    } else {
        format!("{:.0} kB", b / 1e3)
    }
}

/// What this process may use, and where the figure comes from.
#[derive(Debug, Clone)]
pub struct Budget {
    pub bytes: u64,
    pub source: String,
}

impl Budget {
    /// The smallest of the override, the cgroup limits and the available memory (see the
    /// module's documentation); None when none can be read (then nothing is refused).
    pub fn current() -> Result<Option<Budget>> {
        let mut best: Option<Budget> = None;
        let mut offer = |bytes: u64, source: String| {
            if best.as_ref().is_none_or(|b| bytes < b.bytes) {
                best = Some(Budget { bytes, source });
            }
        };
        if let Some(v) = std::env::var_os(LIMIT_ENV) {
            let text = v.to_string_lossy().to_string();
            let bytes = crate::output::parse_size(&text).ok_or_else(|| {
                Error::InvalidOptions(format!(
                    "{LIMIT_ENV}={text:?}: expected a size such as 1500000000, 800M or 1.5G"
                ))
            })?;
            offer(bytes, format!("{LIMIT_ENV}={text}"));
        }
        if let Some((bytes, file)) = cgroup_limit() {
            offer(bytes, format!("cgroup limit, {file}"));
        }
        if let Some(bytes) = mem_available() {
            offer(bytes, "available memory, /proc/meminfo".into());
        }
        Ok(best)
    }
}

fn read_u64(path: &Path) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// The tightest memory limit on this process's cgroup (v2 or v1) and its ancestors, with the
/// file it was read from.
fn cgroup_limit() -> Option<(u64, String)> {
    let text = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let mut best: Option<(u64, String)> = None;
    for line in text.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        let (root, file) = if controllers.is_empty() {
            ("/sys/fs/cgroup".to_string(), "memory.max")
        } else if controllers.split(',').any(|c| c == "memory") {
            ("/sys/fs/cgroup/memory".to_string(), "memory.limit_in_bytes")
        } else {
            continue;
        };
        // The cgroup's directory and each ancestor up to the mount (inside a container the
        // path may not exist under the mount: its root then holds the limit).
        let mut dir = std::path::PathBuf::from(format!("{root}{path}"));
        loop {
            let f = dir.join(file);
            // v1 writes "no limit" as a huge number (PAGE_COUNTER_MAX pages).
            if let Some(v) = read_u64(&f).filter(|&v| v < (1u64 << 60)) {
                if best.as_ref().is_none_or(|(b, _)| v < *b) {
                    best = Some((v, f.display().to_string()));
                }
            }
            if dir.as_os_str().len() <= root.len() || !dir.pop() {
                break;
            }
        }
    }
    best
}

fn mem_available() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// A refusal: what `command` needs, what this process may use, what would need less.
#[derive(Debug, Clone)]
pub struct Shortfall {
    pub command: String,
    pub needed: String,
    pub parts: String,
    pub budget: String,
    pub source_of_budget: String,
    pub hint: String,
}

impl std::fmt::Display for Shortfall {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} needs about {} of memory ({}), more than the {} this process may use ({}){}",
            self.command, self.needed, self.parts, self.budget, self.source_of_budget, self.hint
        )
    }
}

/// A command's planned anonymous memory, by part.
#[derive(Debug, Clone, Default)]
pub struct Estimate {
    pub parts: Vec<(String, u64)>,
    /// Weight bytes read in place from the checkpoint's map (page cache, not counted).
    pub mapped: u64,
    /// What to change to need less, when one thing dominates (appended to the refusal).
    pub hints: Vec<String>,
}

impl Estimate {
    pub fn add(&mut self, label: impl Into<String>, bytes: u64) {
        if bytes > 0 {
            self.parts.push((label.into(), bytes));
        }
    }

    pub fn total(&self) -> u64 {
        BASE_BYTES + self.parts.iter().map(|(_, b)| b).sum::<u64>()
    }

    /// `label 1.2 GB, label 300 MB` (largest first).
    pub fn describe(&self) -> String {
        let mut parts = self.parts.clone();
        parts.sort_by(|a, b| b.1.cmp(&a.1));
        parts.push(("the program".into(), BASE_BYTES));
        let mut s: Vec<String> = parts
            .iter()
            .map(|(l, b)| format!("{l} {}", human(*b)))
            .collect();
        if self.mapped > 0 {
            s.push(format!(
                "plus {} of weights read from disk as needed",
                human(self.mapped)
            ));
        }
        s.join(", ")
    }

    /// Refuses `command` when [`Estimate::total`] exceeds the [`Budget`]; logs the estimate.
    pub fn check(&self, command: &str) -> Result<()> {
        let total = self.total();
        tracing::info!(
            "{command}: needs about {} ({})",
            human(total),
            self.describe()
        );
        let Some(budget) = Budget::current()? else {
            return Ok(());
        };
        if total <= budget.bytes {
            return Ok(());
        }
        Err(Error::NotEnoughMemory(Box::new(Shortfall {
            command: command.to_string(),
            needed: human(total),
            parts: self.describe(),
            budget: human(budget.bytes),
            source_of_budget: budget.source,
            hint: if self.hints.is_empty() {
                String::new()
            } else {
                format!("; {}", self.hints.join("; "))
            },
        })))
    }
}

/// The shapes an estimate needs, read from `dir`'s config.json and safetensors header (no
/// weights are read).
pub struct ModelShape {
    pub hidden_size: u64,
    pub intermediate_size: u64,
    pub layers: u64,
    pub vocab_size: u64,
    /// Query heads as computed (doubled for double-heads differential attention).
    pub query_heads: u64,
    /// Key and value heads as cached (keys doubled for double heads).
    pub cached_heads: u64,
    pub head_dim: u64,
    pub max_position_embeddings: usize,
    /// Parameters, and bytes that inference on the CPU in `dtype` holds in memory / reads
    /// from the map.
    pub parameters: u64,
    pub stored_bytes: u64,
    checkpoint: Checkpoint,
}

impl ModelShape {
    pub fn read(dir: &Path) -> Result<Self> {
        let mc = ModelConfig::from_file(&dir.join("config.json"))?;
        let ck = Checkpoint::open(dir)?;
        // Before anything is sized by the layer count.
        ck.check_layer_count(mc.typed.num_hidden_layers, &mc.path)?;
        let cfg = crate::model::Config::from_model_config(&mc)?;
        use crate::model::AttentionKind;
        // (query heads, key heads) per KV head group: V1 double heads double both, V2 only
        // the queries.
        let (qf, kf) = match cfg.attention {
            AttentionKind::DoubleHeads => (2, 2),
            AttentionKind::V2 => (2, 1),
            _ => (1, 1),
        };
        let (h, kv) = (
            cfg.num_attention_heads as u64,
            cfg.num_key_value_heads as u64,
        );
        let parameters = ck
            .names()
            .filter_map(|n| ck.info(n))
            .map(|i| i.numel() as u64)
            .sum();
        Ok(Self {
            hidden_size: cfg.hidden_size as u64,
            intermediate_size: mc.typed.intermediate_size as u64,
            layers: cfg.num_hidden_layers as u64,
            vocab_size: cfg.vocab_size as u64,
            query_heads: qf * h,
            cached_heads: kf * kv + kv,
            head_dim: cfg.head_dim as u64,
            max_position_embeddings: cfg.max_position_embeddings,
            parameters,
            stored_bytes: ck.total_bytes() as u64,
            checkpoint: ck,
        })
    }

    /// Inference weights on the CPU computing in `dtype`: (held in memory, read from the
    /// map). Matrices stay mapped in f32 compute or when `dtype` is the stored one; others
    /// are copied rounded to `dtype`; vectors are held as f32.
    pub fn inference_weights(&self, dtype: DType) -> (u64, u64) {
        let (mut held, mut mapped) = (0u64, 0u64);
        for name in self.checkpoint.names() {
            let Some(i) = self.checkpoint.info(name) else {
                continue;
            };
            let n = i.numel() as u64;
            if i.shape.len() == 2 {
                if dtype == DType::F32 || dtype == i.dtype {
                    mapped += n * i.dtype.size() as u64;
                } else {
                    held += n * dtype.size() as u64;
                }
            } else {
                held += 4 * n;
            }
        }
        (held, mapped)
    }

    /// f32 activations of one forward of `rows` new positions in batches of `batch`
    /// attending to `keys` positions, with logits for `logit_rows` of them.
    pub fn forward_activations(&self, batch: u64, rows: u64, keys: u64, logit_rows: u64) -> u64 {
        let t = batch * rows;
        let per_token = 8 * self.hidden_size
            + 2 * (self.query_heads + self.cached_heads) * self.head_dim
            + 3 * self.intermediate_size;
        4 * (t * per_token
            + 2 * batch * self.query_heads * rows * keys
            + 2 * batch * logit_rows * self.vocab_size)
    }

    /// f32 KV cache of `positions` positions for `batch` sequences.
    pub fn kv_cache(&self, batch: u64, positions: u64) -> u64 {
        4 * self.layers * batch * self.cached_heads * self.head_dim * positions
    }

    /// The inference estimate of one model: weights held ([`ModelShape::inference_weights`]),
    /// KV cache and activations of a forward of `batch × rows` positions after `past` cached
    /// ones (logits for `logit_rows` rows per sequence).
    pub fn inference(
        &self,
        dtype: DType,
        batch: u64,
        rows: u64,
        past: u64,
        logit_rows: u64,
    ) -> Estimate {
        let mut e = Estimate::default();
        let (held, mapped) = self.inference_weights(dtype);
        e.add(
            format!("weights held in {}", format!("{dtype:?}").to_lowercase()),
            held,
        );
        e.mapped = mapped;
        e.add("KV cache", self.kv_cache(batch, past + rows));
        e.add(
            "activations",
            self.forward_activations(batch, rows, past + rows, logit_rows),
        );
        if held > 8 * (self.parameters) / 10 && dtype != DType::F32 {
            let (h32, m32) = self.inference_weights(DType::F32);
            e.hints.push(format!(
                "--dtype f32 reads the weights in place ({} held, {} read from disk)",
                human(h32),
                human(m32)
            ));
        }
        e
    }

    /// Training in f32 with AdamW: weights, gradients and both moments (16 bytes per
    /// parameter; loading holds the read tensors and their trainable copies at once, 8), and
    /// the activations one micro-batch keeps for the backward: every layer's when
    /// `gradient_checkpointing` is false, else each layer's input and output plus one layer's
    /// ([`crate::model::checkpoint`]).
    pub fn training(&self, micro_batch: u64, seq: u64, gradient_checkpointing: bool) -> Estimate {
        let mut e = Estimate::default();
        let p = self.parameters;
        e.add("weights (f32)", 4 * p);
        e.add("gradients", 4 * p);
        e.add("AdamW moments", 8 * p);
        let t = micro_batch * seq;
        // Kept per layer and token for the backward (the fused kernels save their inputs and
        // little else): ~10 hidden-sized rows, q/k/v twice, 3 MLP rows. Measured on SmolLM2
        // (sequence 256 and 512, micro batch 2): 52 kB per token and layer, this formula 49 kB.
        let per_layer = 4
            * t
            * (10 * self.hidden_size
                + 2 * (self.query_heads + self.cached_heads) * self.head_dim
                + 3 * self.intermediate_size);
        // One layer's attention maps at a time (scores and probabilities).
        let maps = 4 * 2 * micro_batch * self.query_heads * seq * seq;
        // Checkpointed: each layer's input and output, and one layer's intermediates.
        let kept = 2 * 4 * t * self.hidden_size * self.layers + per_layer + maps;
        let layers = if gradient_checkpointing {
            kept
        } else {
            per_layer * self.layers + maps
        };
        e.add("activations", layers);
        e.add("logits and their gradient", 4 * 3 * t * self.vocab_size);
        if !gradient_checkpointing && layers > 4 * p {
            e.hints.push(format!(
                "gradient_checkpointing: true keeps one layer's activations ({} instead of {})",
                human(kept),
                human(layers)
            ));
        }
        if micro_batch > 1 {
            e.hints.push(
                "a smaller micro_batch_size (with more gradient_accumulation_steps) needs less"
                    .into(),
            );
        }
        e
    }
}

/// The storage dtype matching a compute dtype of [`crate::model::Model::load`].
pub fn dtype_of(d: candle_core::DType) -> DType {
    match d {
        candle_core::DType::BF16 => DType::BF16,
        candle_core::DType::F16 => DType::F16,
        _ => DType::F32,
    }
}

/// Refuses `command` on the model in `dir` (CPU, computing in `dtype`) when one forward of
/// `batch × rows` positions, with logits for every row, and its KV cache do not fit.
pub fn check_inference(
    command: &str,
    dir: &Path,
    dtype: candle_core::DType,
    batch: usize,
    rows: usize,
) -> Result<()> {
    let shape = ModelShape::read(dir)?;
    let (b, r) = (batch as u64, rows as u64);
    shape.inference(dtype_of(dtype), b, r, 0, r).check(command)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_sizes() {
        assert_eq!(human(1_520_000_000), "1.52 GB");
        assert_eq!(human(830_000_000), "830 MB");
        assert_eq!(human(4_000), "4 kB");
    }
}
