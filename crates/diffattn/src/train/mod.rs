//! Fine-tuning (`diff-transformer train`) and evaluation (`diff-transformer evaluate`) of
//! Llama, `llama-differential` (format A) and `diffllama` (format B) checkpoints from an
//! axolotl config, with the negative-branch warm-up, lambda monitoring (SPEC §7) and
//! checkpoints that can be resumed.
//!
//! One optimizer step `g` (0-based; `g` steps completed before it):
//! 1. `mix = min(1, g / diff_attn_warmup_steps)` is set on the model (1 without warm-up);
//! 2. `lr = learning_rate · schedule(g)` (transformers' `get_scheduler` formulas);
//! 3. `gradient_accumulation_steps` micro-batches are run; the loss is the token-weighted mean
//!    cross-entropy over all their targets (as transformers >= 4.46 with `num_items_in_batch`),
//!    gradients are summed;
//! 4. gradients are clipped to `max_grad_norm` (global L2 norm) and AdamW updates the weights
//!    (weight decay only on tensors of 2+ dimensions).
//!
//! The data order of every step is a pure function of `(seed, epoch)`, so a resumed run sees
//! exactly the batches the uninterrupted run would have seen.
//!
//! Files in `output_dir`: `checkpoint-N/` (model in the format loaded, `config.json` with the
//! `diff_attn_mix` in force, tokenizer files, `optimizer.safetensors`, `trainer_state.json`);
//! at the end the final model, `trainer_state.json`, `train_results.json`,
//! `eval_results.json`, `all_results.json`; during the run `metrics.jsonl` and a TensorBoard
//! `events.out.tfevents.*` file.

pub mod config;
pub mod data;
pub mod loss;
pub mod monitor;
pub mod optim;
pub mod plot;
pub mod schedule;
pub mod tensorboard;

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{backprop::GradStore, DType, Device, Tensor, Var};
use serde_json::{json, Value};

use crate::config::{Format, ModelConfig};
use crate::convert::SideFiles;
use crate::error::{Error, IoContext, Result};
use crate::generate::TextCodec;
use crate::model::{AttentionProbs, Model};
use crate::output::{write_safetensors, PlannedTensor, StagedDir, TensorProducer};
pub use config::{Resume, TrainConfig};
use data::{Batch, Sample, IGNORE};

/// Upper bound on a run's optimizer steps (a guard against `num_epochs: 1e30`).
pub const MAX_STEPS: usize = 100_000_000;

pub use crate::config::MIX_KEY;
/// Training metrics, one JSON object per line.
pub const METRICS_FILE: &str = "metrics.jsonl";
const STATE_FILE: &str = "trainer_state.json";
const OPTIMIZER_FILE: &str = "optimizer.safetensors";

/// The device computations run on: CUDA device 0 when built with the `cuda` feature and a GPU
/// is present, else the CPU.
pub fn default_device() -> Device {
    #[cfg(feature = "cuda")]
    {
        if let Ok(d) = Device::new_cuda(0) {
            return d;
        }
    }
    Device::Cpu
}

/// What the trainer reports while it runs.
#[derive(Debug, Clone)]
pub enum Event {
    /// A line of information for the user.
    Info(String),
    /// Something the user should look at (training continues).
    Warning(String),
    /// Optimizer step `step` of `total` finished (1-based).
    Step {
        step: usize,
        total: usize,
        loss: f64,
        learning_rate: f64,
        /// Mean over layers of `mix · lambda_full`, on monitoring steps.
        mean_lambda: Option<f64>,
        /// A logging step (`logging_steps`).
        logged: bool,
    },
}

/// Options of the command line that are not YAML keys.
#[derive(Debug, Clone, Default)]
pub struct TrainOptions {
    /// Replace a non-empty `output_dir` that is not being resumed.
    pub overwrite: bool,
    /// Override `output_dir`.
    pub output_dir: Option<PathBuf>,
}

/// The metrics transformers' Trainer reports at the end of `train` (+ `evaluate`), all
/// written by `train` into `all_results.json`.
pub const TRAINER_METRICS: [&str; 8] = [
    "train_loss",
    "train_runtime",
    "train_samples_per_second",
    "train_steps_per_second",
    "eval_loss",
    "eval_runtime",
    "eval_samples_per_second",
    "eval_steps_per_second",
];

/// Final figures of a run (the keys transformers' Trainer reports).
#[derive(Debug, Clone)]
pub struct TrainReport {
    pub output_dir: PathBuf,
    pub metrics: BTreeMap<String, f64>,
    pub global_step: usize,
    pub total_steps: usize,
    pub mix: f64,
}

/// Token-weighted cross-entropy pieces of one micro-batch: the summed negative log-likelihood
/// (a 0-dim tensor, differentiable) and the number of targets.
pub fn nll_sum(
    model: &Model,
    batch: &Batch,
    probs: Option<(&[usize], &mut AttentionProbs)>,
) -> Result<Tensor> {
    let dev = &model.device;
    let ids = Tensor::from_slice(&batch.input_ids, (batch.batch, batch.seq), dev)?;
    let pos = model.positions(batch.batch, batch.seq, 0)?;
    let mask = model.mask(batch.batch, batch.seq, 0, None)?;
    let hidden = model.forward_hidden(&ids, &pos, Some(&mask), None, probs)?;
    let rows: Vec<u32> = (0..batch.labels.len() as u32)
        .filter(|&i| batch.labels[i as usize] != IGNORE)
        .collect();
    let targets: Vec<u32> = rows
        .iter()
        .map(|&i| batch.labels[i as usize] as u32)
        .collect();
    let n = rows.len();
    let dm = model.config.hidden_size;
    let h = hidden
        .reshape((batch.batch * batch.seq, dm))?
        .index_select(&Tensor::from_vec(rows, n, dev)?, 0)?;
    Ok(loss::head_nll_sum(&h, model.lm_head(), &targets)?)
}

/// Mean loss and timing of `samples` in batches of `batch_size`.
#[derive(Debug, Clone, Copy)]
pub struct EvalResult {
    pub loss: f64,
    pub runtime: f64,
    pub samples: usize,
    pub batches: usize,
}

impl EvalResult {
    /// `eval_*` metrics as transformers' Trainer names them, plus `perplexity`.
    pub fn metrics(&self) -> BTreeMap<String, f64> {
        BTreeMap::from([
            ("eval_loss".into(), self.loss),
            ("eval_runtime".into(), self.runtime),
            (
                "eval_samples_per_second".into(),
                self.samples as f64 / self.runtime.max(1e-9),
            ),
            (
                "eval_steps_per_second".into(),
                self.batches as f64 / self.runtime.max(1e-9),
            ),
            ("perplexity".into(), self.loss.exp()),
        ])
    }
}

/// Token-weighted mean cross-entropy of `samples` (no gradient kept).
pub fn evaluate_samples(
    model: &Model,
    samples: &[Sample],
    batch_size: usize,
    pad_id: u32,
) -> Result<EvalResult> {
    let t0 = Instant::now();
    let model = &model.detached();
    let (mut total, mut n, mut batches) = (0.0f64, 0usize, 0usize);
    for chunk in samples.chunks(batch_size.max(1)) {
        let refs: Vec<&Sample> = chunk.iter().collect();
        let b = data::collate(&refs, pad_id);
        total += nll_sum(model, &b, None)?.detach().to_scalar::<f32>()? as f64;
        n += b.n_targets;
        batches += 1;
    }
    Ok(EvalResult {
        loss: total / n.max(1) as f64,
        runtime: t0.elapsed().as_secs_f64(),
        samples: samples.len(),
        batches,
    })
}

/// A model loaded for training: parameters as [`Var`]s, the constant tensors (stored
/// `lambda_init`), the loaded config and checkpoint dtype.
pub struct TrainableModel {
    pub model: Model,
    pub vars: Vec<(String, Var)>,
    pub constants: Vec<(String, Tensor)>,
    pub config: ModelConfig,
    pub dtype: crate::dtype::DType,
}

impl TrainableModel {
    /// Loads `dir` in f32 on `device`; the stored `diff_attn_mix` is applied.
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        let config = ModelConfig::from_file(&dir.join("config.json"))?;
        let ck = crate::checkpoint::Checkpoint::open(dir)?;
        let dtype = ck
            .names()
            .next()
            .and_then(|n| ck.info(n))
            .map(|i| i.dtype)
            .unwrap_or(crate::dtype::DType::F32);
        let weights = crate::model::load_weights(dir, DType::F32, device)?;
        let (w2, vars, constants) = crate::model::trainable_weights(weights)?;
        // from_weights applies the stored diff_attn_mix.
        let model = Model::from_weights(&config, &w2, dir, device)?;
        Ok(Self {
            model,
            vars,
            constants,
            config,
            dtype,
        })
    }
}

struct MapProducer<'a> {
    tensors: &'a HashMap<String, Tensor>,
}

impl TensorProducer for MapProducer<'_> {
    fn produce(&self, t: &PlannedTensor) -> Result<Cow<'_, [u8]>> {
        let x = self.tensors[&t.name]
            .to_device(&Device::Cpu)?
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        Ok(Cow::Owned(crate::dtype::from_f32(&x, t.dtype)))
    }
}

/// Writes the model's tensors (in `dtype`), its config.json with `diff_attn_mix`, and the
/// tokenizer / generation files `side` into `dir`.
fn write_model(
    dir: &Path,
    tm: &TrainableModel,
    mix: f64,
    with_mix: bool,
    side: &SideFiles,
) -> Result<()> {
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    for (n, v) in &tm.vars {
        tensors.insert(n.clone(), v.as_tensor().clone());
    }
    for (n, t) in &tm.constants {
        tensors.insert(n.clone(), t.clone());
    }
    let planned: Vec<PlannedTensor> = tensors
        .iter()
        .map(|(n, t)| PlannedTensor {
            name: n.clone(),
            dtype: tm.dtype,
            shape: t.dims().to_vec(),
        })
        .collect();
    write_safetensors(dir, planned, u64::MAX, &MapProducer { tensors: &tensors })?;
    let mut raw = tm.config.raw.clone();
    if with_mix {
        raw.insert(MIX_KEY.into(), json!(mix));
    } else {
        raw.remove(MIX_KEY);
    }
    crate::config::write_json(&dir.join("config.json"), &Value::Object(raw))?;
    side.write(dir)?;
    Ok(())
}

/// Saved training progress (`trainer_state.json`).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct TrainerState {
    pub global_step: usize,
    pub max_steps: usize,
    pub epoch: f64,
    pub diff_attn_mix: f64,
    pub seed: u64,
    pub micro_batch_size: usize,
    pub gradient_accumulation_steps: usize,
    pub sequence_len: usize,
    pub train_samples: usize,
    /// Sum of the losses of every step so far (train_loss = total_loss / global_step).
    #[serde(default)]
    pub total_loss: f64,
    pub log_history: Vec<Value>,
}

impl TrainerState {
    #[allow(clippy::too_many_arguments)]
    fn new(
        cfg: &TrainConfig,
        global_step: usize,
        max_steps: usize,
        epoch: f64,
        diff_attn_mix: f64,
        train_samples: usize,
        total_loss: f64,
        log_history: &[Value],
    ) -> Self {
        Self {
            global_step,
            max_steps,
            epoch,
            diff_attn_mix,
            seed: cfg.seed,
            micro_batch_size: cfg.micro_batch_size,
            gradient_accumulation_steps: cfg.gradient_accumulation_steps,
            sequence_len: cfg.sequence_len,
            train_samples,
            total_loss,
            log_history: log_history.to_vec(),
        }
    }
}

fn read_state(dir: &Path) -> Result<TrainerState> {
    let p = dir.join(STATE_FILE);
    let text = std::fs::read_to_string(&p).at(&p)?;
    let value: Value = serde_json::from_str(&text).map_err(|source| Error::Json {
        path: p.clone(),
        source,
    })?;
    crate::config::typed_from_json(value, &p)
}

/// `checkpoint-N` directories of `dir` beyond the newest `keep` (oldest first).
fn old_checkpoints(dir: &Path, keep: usize) -> Vec<PathBuf> {
    let mut all: Vec<(usize, PathBuf)> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let n: usize = e
                .file_name()
                .to_string_lossy()
                .strip_prefix("checkpoint-")?
                .parse()
                .ok()?;
            Some((n, e.path()))
        })
        .collect();
    all.sort();
    let n = all.len().saturating_sub(keep);
    all.into_iter().take(n).map(|(_, p)| p).collect()
}

/// The `checkpoint-N` directory with the largest N in `dir`.
pub fn latest_checkpoint(dir: &Path) -> Option<PathBuf> {
    std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let n: usize = name.strip_prefix("checkpoint-")?.parse().ok()?;
            e.path().join(STATE_FILE).is_file().then_some((n, e.path()))
        })
        .max_by_key(|(n, _)| *n)
        .map(|(_, p)| p)
}

/// Tokenised train and validation sets of a config, with the tokenizer's pad id.
pub struct PreparedData {
    pub train: Vec<Sample>,
    pub val: Vec<Sample>,
    pub pad_id: u32,
    pub stats: data::DatasetStats,
}

/// Tokenises the datasets with the tokenizer of `tokenizer_dir` and splits them (seeded).
pub fn prepare_data(
    cfg: &TrainConfig,
    tokenizer_dir: &Path,
    model_cfg: &ModelConfig,
) -> Result<PreparedData> {
    let codec = TextCodec::load(tokenizer_dir)?;
    for (name, tok) in &cfg.special_tokens {
        if codec.tokenizer.token_to_id(tok).is_none() {
            return Err(Error::InvalidValue {
                path: cfg.axolotl.path.clone(),
                key: format!("special_tokens.{name}"),
                value: format!("{tok:?}"),
                reason: "not in the tokenizer's vocabulary; adding tokens (embedding resize) is not supported".into(),
            });
        }
    }
    let eos = cfg
        .special_tokens
        .iter()
        .find(|(n, _)| n == "eos_token")
        .and_then(|(_, t)| codec.tokenizer.token_to_id(t))
        .or_else(|| codec.eos_token_ids.first().copied())
        .ok_or_else(|| Error::MissingKey {
            path: tokenizer_dir.join("config.json"),
            key: "eos_token_id".into(),
        })?;
    let pad_id = crate::config::token_ids(model_cfg.raw.get("pad_token_id"))
        .first()
        .copied()
        .unwrap_or(eos);
    let (samples, stats) = data::tokenize(
        &cfg.datasets,
        &codec,
        eos,
        cfg.sequence_len,
        cfg.train_on_inputs,
    )?;
    if samples.is_empty() {
        return Err(Error::Dataset {
            path: cfg.datasets[0].path.clone(),
            msg: format!(
                "no usable sample: {} records, {} longer than sequence_len {}, {} without a target",
                stats.records, stats.dropped_too_long, cfg.sequence_len, stats.dropped_no_labels
            ),
        });
    }
    let vocab = model_cfg.typed.vocab_size;
    let max_id = samples
        .iter()
        .flat_map(|s| s.input_ids.iter())
        .copied()
        .max()
        .unwrap_or(0)
        .max(pad_id);
    if max_id as usize >= vocab {
        return Err(Error::InvalidValue {
            path: model_cfg.path.clone(),
            key: "vocab_size".into(),
            value: vocab.to_string(),
            reason: format!(
                "the tokenizer of {} produces id {max_id} (or pad_token_id / eos is that large): tokenizer and model do not match",
                tokenizer_dir.display()
            ),
        });
    }
    let n_val = cfg
        .val_set_size
        .map(|v| v.count(samples.len()))
        .unwrap_or(0);
    let (train, val) = data::split(samples, n_val, cfg.seed);
    Ok(PreparedData {
        train,
        val,
        pad_id,
        stats,
    })
}

/// Micro-batches per epoch, optimizer steps per epoch and total steps.
pub fn step_counts(cfg: &TrainConfig, n_train: usize) -> (usize, usize, usize) {
    let batches = n_train.div_ceil(cfg.micro_batch_size);
    let per_epoch = batches.div_ceil(cfg.gradient_accumulation_steps).max(1);
    let total = cfg
        .max_steps
        .unwrap_or_else(|| (per_epoch as f64 * cfg.num_epochs).ceil() as usize)
        .max(1);
    (batches, per_epoch, total)
}

/// The micro-batches of optimizer step `g` (indices into the train set), and the epoch
/// (fractional) reached after it.
fn step_batches(cfg: &TrainConfig, n_train: usize, g: usize) -> (Vec<Vec<usize>>, f64) {
    let (batches, per_epoch, _) = step_counts(cfg, n_train);
    let epoch = g / per_epoch;
    let j = g % per_epoch;
    let order = data::epoch_order(n_train, cfg.seed, epoch);
    let a = cfg.gradient_accumulation_steps;
    let mb = cfg.micro_batch_size;
    let out = (j * a..((j + 1) * a).min(batches))
        .map(|b| order[b * mb..((b + 1) * mb).min(n_train)].to_vec())
        .collect();
    (out, epoch as f64 + (j + 1) as f64 / per_epoch as f64)
}

/// True when every lambda vector of every layer is exactly zero: then each vector's gradient
/// (proportional to its partner) is zero too and the negative branch never learns.
pub fn is_stationary_start(model: &Model) -> Result<bool> {
    let lambdas = model.lambdas();
    if lambdas.iter().all(|l| l.is_none()) {
        return Ok(false);
    }
    for lam in lambdas.into_iter().flatten() {
        for v in [&lam.q1, &lam.k1, &lam.q2, &lam.k2] {
            if v.abs()?
                .max_all()?
                .to_dtype(DType::F32)?
                .to_scalar::<f32>()?
                != 0.0
            {
                return Ok(false);
            }
        }
    }
    Ok(true)
}

/// Resolves where the weights come from: the checkpoint being resumed, else `base_model`.
fn model_source(cfg: &TrainConfig, output_dir: &Path) -> Result<(PathBuf, Option<TrainerState>)> {
    match &cfg.resume_from_checkpoint {
        Some(r) => {
            let dir = match r {
                Resume::Path(p) => p.clone(),
                Resume::Latest => {
                    latest_checkpoint(output_dir).ok_or_else(|| Error::InvalidValue {
                        path: cfg.axolotl.path.clone(),
                        key: "resume_from_checkpoint".into(),
                        value: "true".into(),
                        reason: format!(
                            "no checkpoint-N directory with {STATE_FILE} in {}",
                            output_dir.display()
                        ),
                    })?
                }
            };
            if !dir.join(STATE_FILE).is_file() {
                return Err(Error::InvalidValue {
                    path: cfg.axolotl.path.clone(),
                    key: "resume_from_checkpoint".into(),
                    value: dir.display().to_string(),
                    reason: format!("not a training checkpoint (no {STATE_FILE})"),
                });
            }
            let state = read_state(&dir)?;
            Ok((dir, Some(state)))
        }
        None => Ok((
            crate::hub::resolve_model(
                &cfg.axolotl.base_model,
                true,
                "base_model",
                &cfg.axolotl.path,
            )?,
            None,
        )),
    }
}

fn append_jsonl(path: &Path, v: &Value) -> Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .at(path)?;
    // One write per record, so that an interrupted run leaves whole lines.
    f.write_all(format!("{v}\n").as_bytes()).at(path)
}

/// Keeps only the records of `metrics.jsonl` up to `step` (a resumed run rewrites the rest).
fn truncate_jsonl(path: &Path, step: usize) -> Result<()> {
    if !path.is_file() {
        return Ok(());
    }
    let text = std::fs::read_to_string(path).at(path)?;
    let kept: String = text
        .lines()
        .filter(|l| {
            serde_json::from_str::<Value>(l)
                .ok()
                .and_then(|v| v.get("step").and_then(Value::as_u64))
                .map(|s| s as usize <= step)
                .unwrap_or(false)
        })
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(path, kept).at(path)
}

/// Where logged records go: metrics.jsonl, the TensorBoard file and the trainer state's
/// `log_history`.
struct Sinks {
    tb: tensorboard::EventWriter,
    metrics_path: PathBuf,
    history: Vec<Value>,
}

impl Sinks {
    /// Logs one record `{"step": N, name: value, ...}`. TensorBoard tags: `train/<name>`,
    /// `eval/<name>` for `eval_*`, `diff_attn/<name>` for the monitoring metrics.
    fn log(&mut self, record: Value) -> Result<()> {
        let step = record["step"].as_u64().unwrap_or(0);
        let scalars: Vec<(String, f64)> = record
            .as_object()
            .map(|o| {
                o.iter()
                    .filter(|(k, _)| *k != "step")
                    .filter_map(|(k, v)| {
                        let tag = if k.starts_with("layer_") || k.starts_with("aggregate/") {
                            format!("diff_attn/{k}")
                        } else if let Some(e) = k.strip_prefix("eval_") {
                            format!("eval/{e}")
                        } else if k == "perplexity" {
                            "eval/perplexity".to_string()
                        } else {
                            format!("train/{k}")
                        };
                        Some((tag, v.as_f64()?))
                    })
                    .collect()
            })
            .unwrap_or_default();
        self.tb
            .scalars(step, scalars.iter().map(|(k, v)| (k.as_str(), *v)))?;
        self.tb.flush()?;
        append_jsonl(&self.metrics_path, &record)?;
        self.history.push(record);
        Ok(())
    }
}

/// Runs training as configured. `on_event` receives progress, information and warnings.
pub fn train(
    cfg: &TrainConfig,
    opts: &TrainOptions,
    on_event: &dyn Fn(Event),
) -> Result<TrainReport> {
    let t_start = Instant::now();
    let output_dir =
        crate::output::absolutize(opts.output_dir.as_ref().unwrap_or(&cfg.output_dir))?;
    let device = default_device();
    let (model_dir, state) = model_source(cfg, &output_dir)?;
    let model_dir = crate::output::absolutize(&model_dir)?;
    // The model being trained (or the run's base model) must not be overwritten, nor the
    // checkpoint being resumed (output_dir may contain it, as transformers' layout has it).
    let base = crate::hub::resolve_model(
        &cfg.axolotl.base_model,
        true,
        "base_model",
        &cfg.axolotl.path,
    )
    .ok()
    .map(|p| crate::output::absolutize(&p))
    .transpose()?;
    let refuse_output = |reason: String| Error::InvalidValue {
        path: cfg.axolotl.path.clone(),
        key: "output_dir".into(),
        value: output_dir.display().to_string(),
        reason,
    };
    let overlap = |input: &Path| {
        output_dir == input || output_dir.starts_with(input) || input.starts_with(&output_dir)
    };
    for input in base.iter().chain(state.is_none().then_some(&model_dir)) {
        if overlap(input) {
            return Err(refuse_output(format!(
                "overlaps the model being trained ({}); choose a new directory, e.g. {}-finetuned",
                input.display(),
                input.display()
            )));
        }
    }
    if state.is_some() && (output_dir == model_dir || output_dir.starts_with(&model_dir)) {
        return Err(refuse_output(format!(
            "is (inside) the checkpoint being resumed ({}); use the run's directory",
            model_dir.display()
        )));
    }
    let non_empty = output_dir.is_dir()
        && std::fs::read_dir(&output_dir)
            .at(&output_dir)?
            .next()
            .is_some();
    // Resuming continues the run that owns the checkpoint: output_dir must be that run's
    // directory (or empty / new).
    let resuming_here = state.is_some() && model_dir.starts_with(&output_dir);
    let replace = non_empty && !resuming_here;
    if replace && !opts.overwrite {
        return Err(refuse_output(if state.is_some() {
            format!("is not empty and does not hold the checkpoint being resumed ({}); use the checkpoint's run directory or a new one", model_dir.display())
        } else {
            "is not empty (a previous run?); set resume_from_checkpoint to continue it, choose another directory, or pass --overwrite".into()
        }));
    }
    if replace {
        // --overwrite deletes output_dir: never with an input inside it.
        let mut inputs: Vec<PathBuf> = vec![cfg.axolotl.path.clone(), model_dir.clone()];
        inputs.extend(cfg.datasets.iter().map(|d| d.path.clone()));
        if let Some(t) = &cfg.axolotl.tokenizer_config {
            inputs.push(PathBuf::from(t));
        }
        for dir in base.iter().chain([&model_dir]) {
            inputs.extend(crate::output::resolved_files(dir));
        }
        for input in inputs {
            let abs = crate::output::absolutize(&input)?;
            if abs.starts_with(&output_dir) {
                return Err(refuse_output(format!(
                    "holds an input of this run ({}); --overwrite would delete it",
                    abs.display()
                )));
            }
        }
    }
    if output_dir.exists() && !output_dir.is_dir() {
        return Err(Error::OutputNotWritable {
            path: output_dir.clone(),
            source: std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "a file with this name exists",
            ),
        });
    }

    let tokenizer_dir = match (&state, &cfg.axolotl.tokenizer_config) {
        (None, Some(t)) => {
            crate::hub::resolve_model(t, false, "tokenizer_config", &cfg.axolotl.path)?
        }
        _ => model_dir.clone(),
    };
    let mut tm = TrainableModel::load(&model_dir, &device)?;
    let is_diff = tm.config.format.is_differential();
    if cfg.sequence_len > tm.model.config.max_position_embeddings {
        return Err(Error::InvalidValue {
            path: cfg.axolotl.path.clone(),
            key: "sequence_len".into(),
            value: cfg.sequence_len.to_string(),
            reason: format!(
                "longer than the model's max_position_embeddings ({})",
                tm.model.config.max_position_embeddings
            ),
        });
    }
    let prepared = prepare_data(cfg, &tokenizer_dir, &tm.config)?;
    // Read once: a resumed checkpoint they come from may be rotated away
    // (`save_total_limit`) before the final save.
    let side = SideFiles::read(&tokenizer_dir, &[&tokenizer_dir])?;
    let n_train = prepared.train.len();
    if n_train == 0 {
        return Err(Error::InvalidValue {
            path: cfg.axolotl.path.clone(),
            key: "val_set_size".into(),
            value: match cfg.val_set_size {
                Some(data::ValSetSize::Fraction(f)) => f.to_string(),
                Some(data::ValSetSize::Count(c)) => c.to_string(),
                None => "0".into(),
            },
            reason: format!(
                "leaves no training sample out of {}",
                prepared.stats.samples
            ),
        });
    }
    let (_, per_epoch, total) = step_counts(cfg, n_train);
    if total > MAX_STEPS {
        return Err(Error::InvalidValue {
            path: cfg.axolotl.path.clone(),
            key: if cfg.max_steps.is_some() {
                "max_steps"
            } else {
                "num_epochs"
            }
            .into(),
            value: cfg
                .max_steps
                .map(|m| m.to_string())
                .unwrap_or_else(|| cfg.num_epochs.to_string()),
            reason: format!("gives {total} optimizer steps; at most {MAX_STEPS} are accepted"),
        });
    }
    if let Some(st) = &state {
        if st.global_step > total {
            return Err(Error::InvalidValue {
                path: model_dir.join(STATE_FILE),
                key: "global_step".into(),
                value: st.global_step.to_string(),
                reason: format!("is beyond this run's {total} steps"),
            });
        }
    }
    // Everything is validated: only now is output_dir touched.
    if replace {
        std::fs::remove_dir_all(&output_dir).at(&output_dir)?;
    }
    std::fs::create_dir_all(&output_dir).map_err(|source| Error::OutputNotWritable {
        path: output_dir.clone(),
        source,
    })?;
    crate::output::sweep_dead_partials(&output_dir, "final");
    let lr_warmup = cfg.lr_warmup(total);
    let log_every = cfg.logging_interval(total);
    on_event(Event::Info(format!(
        "model: {} ({} {:?}, {} layers), device {:?}",
        model_dir.display(),
        tm.config.family.name,
        tm.config.format,
        tm.model.config.num_hidden_layers,
        device
    )));
    on_event(Event::Info(format!(
        "data: {} records -> {} samples ({} train, {} validation); dropped {} longer than sequence_len {}, {} without targets",
        prepared.stats.records,
        prepared.stats.samples,
        n_train,
        prepared.val.len(),
        prepared.stats.dropped_too_long,
        cfg.sequence_len,
        prepared.stats.dropped_no_labels
    )));
    on_event(Event::Info(format!(
        "steps: {total} (batch {} = micro {} x accumulation {}, {per_epoch} steps per epoch), lr {} {:?} with {lr_warmup} warm-up steps",
        cfg.micro_batch_size * cfg.gradient_accumulation_steps,
        cfg.micro_batch_size,
        cfg.gradient_accumulation_steps,
        cfg.learning_rate,
        cfg.lr_scheduler
    )));
    if cfg.axolotl.dtype != crate::axolotl::DtypeChoice::Keep {
        on_event(Event::Info(format!(
            "bf16/fp16 mixed precision is not used: training computes in f32 and checkpoints keep the loaded dtype ({})",
            tm.dtype.torch_name()
        )));
    }
    if is_diff && is_stationary_start(&tm.model)? {
        on_event(Event::Warning(
            "this model starts at a stationary point (every lambda vector is zero, as after --zero-init): \
             the gradient of each lambda vector is proportional to its partner, so the negative branch \
             never learns; convert with --preserving-mirror for an output-preserving start that learns"
                .into(),
        ));
    }
    let preserving = tm
        .config
        .raw
        .get("preserving_mirror")
        .and_then(Value::as_bool)
        == Some(true);
    if preserving && cfg.diff_attn_warmup_steps.is_some() && is_diff {
        on_event(Event::Warning(
            "this model was converted with --preserving-mirror: its o_proj carries 1/(1 - lambda), so it computes the source model only at mix = 1; diff_attn_warmup_steps starts at mix = 0 and the first steps see a rescaled attention output (a much higher loss); remove diff_attn_warmup_steps for this start"
                .into(),
        ));
    }
    if cfg.eval_steps.is_some() && prepared.val.is_empty() {
        on_event(Event::Warning(
            "eval_steps is set but there is no validation split (val_set_size): no evaluation"
                .into(),
        ));
    }
    if !is_diff && cfg.diff_attn_warmup_steps.is_some() {
        on_event(Event::Warning(
            "diff_attn_warmup_steps is set but the model has standard attention: ignored".into(),
        ));
    }

    let mut opt = optim::AdamW::new(&tm.vars, cfg.adamw)?;
    let start = match &state {
        Some(s) => {
            let p = model_dir.join(OPTIMIZER_FILE);
            let st =
                candle_core::safetensors::load(&p, &device).map_err(|e| Error::Safetensors {
                    path: p.clone(),
                    msg: e.to_string(),
                })?;
            opt.load_state(&st, s.global_step as u64, &p)?;
            if s.max_steps != total
                || s.micro_batch_size != cfg.micro_batch_size
                || s.gradient_accumulation_steps != cfg.gradient_accumulation_steps
                || s.seed != cfg.seed
                || s.train_samples != n_train
            {
                on_event(Event::Warning(format!(
                    "the checkpoint was written by a run with other settings (steps {}, micro batch {}, accumulation {}, seed {}, {} train samples): the schedule and data order now follow this config",
                    s.max_steps, s.micro_batch_size, s.gradient_accumulation_steps, s.seed, s.train_samples
                )));
            }
            on_event(Event::Info(format!(
                "resuming from {} at step {}",
                model_dir.display(),
                s.global_step
            )));
            s.global_step
        }
        None => 0,
    };
    let metrics_path = output_dir.join(METRICS_FILE);
    if state.is_some() {
        truncate_jsonl(&metrics_path, start)?;
    } else if metrics_path.exists() {
        std::fs::remove_file(&metrics_path).at(&metrics_path)?;
    }
    let tb = tensorboard::EventWriter::create(&output_dir)?;
    let monitored = schedule::monitored_layers(
        tm.model.config.num_hidden_layers,
        cfg.diff_attn_num_monitor_layers,
    );
    let warmup = if is_diff {
        cfg.diff_attn_warmup_steps
    } else {
        None
    };
    let mut log_history: Vec<Value> = state
        .as_ref()
        .map(|s| s.log_history.clone())
        .unwrap_or_default();
    log_history.retain(|v| {
        v.get("step")
            .and_then(Value::as_u64)
            .map(|s| s as usize <= start)
            .unwrap_or(false)
    });

    let mut sinks = Sinks {
        tb,
        metrics_path: metrics_path.clone(),
        history: log_history,
    };

    let run_t0 = Instant::now();
    let (mut loss_since_log, mut steps_since_log) = (0.0, 0usize);
    let (mut steps_run, mut samples_run) = (0usize, 0usize);
    let mut loss_total = state.as_ref().map(|s| s.total_loss).unwrap_or(0.0);
    let mut out_of_range: std::collections::HashSet<usize> = Default::default();
    let mut epoch = start as f64 / per_epoch as f64;
    let mut last_eval: Option<EvalResult> = None;
    for g in start..total {
        let mix = schedule::mix(g, warmup);
        tm.model.mix = mix;
        let lr = cfg.learning_rate * cfg.lr_scheduler.factor(g, total, lr_warmup);
        let (micro, ep) = step_batches(cfg, n_train, g);
        epoch = ep;
        let t_step = Instant::now();
        let batches: Vec<Batch> = micro
            .iter()
            .map(|idx| {
                let refs: Vec<&Sample> = idx.iter().map(|&i| &prepared.train[i]).collect();
                data::collate(&refs, prepared.pad_id)
            })
            .collect();
        let n_targets: usize = batches.iter().map(|b| b.n_targets).sum();
        let monitor_now = is_diff && g % cfg.diff_attn_log_every == 0;
        let mut probs = AttentionProbs::default();
        let mut grads: Option<GradStore> = None;
        let mut step_loss = 0.0;
        // Linear weights' gradients are accumulated in place over the micro-batches.
        let sink = crate::model::layout::WeightGradSink::open()?;
        for (i, b) in batches.iter().enumerate() {
            let capture = (monitor_now && i == 0).then_some((monitored.as_slice(), &mut probs));
            let t0 = Instant::now();
            let loss = (nll_sum(&tm.model, b, capture)? / n_targets.max(1) as f64)?;
            step_loss += loss.to_scalar::<f32>()? as f64;
            let t1 = Instant::now();
            let gs = loss.backward()?;
            tracing::debug!(
                step = g,
                seq = b.seq,
                forward_s = (t1 - t0).as_secs_f64(),
                backward_s = t1.elapsed().as_secs_f64(),
                "micro-batch"
            );
            match grads.as_mut() {
                None => grads = Some(gs),
                Some(acc) => acc.extend(gs)?,
            }
            samples_run += b.batch;
        }
        let mut grads = grads.expect("a step has at least one micro-batch");
        let var_tensors: Vec<&Tensor> = tm.vars.iter().map(|(_, v)| v.as_tensor()).collect();
        sink.finish(&var_tensors, &mut grads)?;
        let grad_norm = opt.grad_norm(&grads)?;
        if !step_loss.is_finite() || !grad_norm.is_finite() {
            let why = if g == start {
                format!(
                    "before any update: the model in {} already computes non-finite values",
                    model_dir.display()
                )
            } else {
                format!(
                    "the weights diverged (learning_rate {}, adam_epsilon {}, max_grad_norm {}); checkpoints written so far are kept",
                    cfg.learning_rate, cfg.adamw.eps, cfg.max_grad_norm
                )
            };
            return Err(Error::InvalidOptions(format!(
                "step {}: loss {step_loss} / gradient norm {grad_norm} is not finite: {why}",
                g + 1
            )));
        }
        let mut mean_lambda = None;
        if monitor_now {
            let lambdas = tm.model.lambdas();
            let mut m = monitor::metrics(&lambdas, &monitored, &probs, mix, warmup.is_some())?;
            mean_lambda = m.get("aggregate/lambda_full_mean").copied();
            for (l, v) in monitor::lambda_out_of_range(&lambdas)? {
                if out_of_range.insert(l) {
                    on_event(Event::Warning(format!(
                        "step {}: layer {l} lambda_full = {v:.4} is outside [0, 1.5] (not clamped)",
                        g + 1
                    )));
                }
            }
            out_of_range.retain(|l| {
                lambdas[*l]
                    .and_then(|lam| lam.full().ok()?.to_scalar::<f32>().ok())
                    .map(|v| !(0.0..=1.5).contains(&v))
                    .unwrap_or(false)
            });
            // Labelled with the step this forward belongs to (1-based, as the train loss).
            let mut rec = serde_json::Map::new();
            rec.insert("step".into(), json!(g + 1));
            for (k, v) in std::mem::take(&mut m) {
                rec.insert(k, json!(v));
            }
            sinks.log(Value::Object(rec))?;
        }
        drop(probs);
        let clip = if cfg.max_grad_norm > 0.0 && grad_norm > cfg.max_grad_norm {
            cfg.max_grad_norm / (grad_norm + 1e-6)
        } else {
            1.0
        };
        let t0 = Instant::now();
        opt.step(&grads, lr, clip)?;
        tracing::debug!(
            step = g,
            optimizer_s = t0.elapsed().as_secs_f64(),
            "optimizer step"
        );
        drop(grads);
        let step = g + 1;
        loss_since_log += step_loss;
        steps_since_log += 1;
        loss_total += step_loss;
        steps_run += 1;
        let logged = step % log_every == 0 || step == total;
        on_event(Event::Step {
            step,
            total,
            loss: step_loss,
            learning_rate: lr,
            mean_lambda,
            logged,
        });
        if logged {
            let mut rec = json!({
                "step": step,
                "epoch": epoch,
                "loss": loss_since_log / steps_since_log as f64,
                "learning_rate": lr,
                "grad_norm": grad_norm,
                "step_time": t_step.elapsed().as_secs_f64(),
            });
            if is_diff {
                rec["diff_attn_mix"] = json!(mix);
            }
            sinks.log(rec)?;
            loss_since_log = 0.0;
            steps_since_log = 0;
        }
        let next_mix = schedule::mix(step, warmup);
        if let Some(e) = cfg.eval_steps {
            if step % e == 0 && step != total && !prepared.val.is_empty() {
                tm.model.mix = next_mix;
                let r = evaluate_samples(
                    &tm.model,
                    &prepared.val,
                    cfg.eval_batch_size,
                    prepared.pad_id,
                )?;
                let mut rec = json!({"step": step, "epoch": epoch});
                for (k, v) in r.metrics() {
                    rec[k] = json!(v);
                }
                on_event(Event::Info(format!("step {step}: eval_loss {:.4}", r.loss)));
                sinks.log(rec)?;
            }
        }
        if let Some(s) = cfg.save_steps {
            if step % s == 0 {
                let dir = output_dir.join(format!("checkpoint-{step}"));
                let st = TrainerState::new(
                    cfg,
                    step,
                    total,
                    epoch,
                    next_mix,
                    n_train,
                    loss_total,
                    &sinks.history,
                );
                save_checkpoint(&dir, &tm, &opt, &st, is_diff, &side)?;
                on_event(Event::Info(format!("saved {}", dir.display())));
                if let Some(limit) = cfg.save_total_limit {
                    for old in old_checkpoints(&output_dir, limit) {
                        std::fs::remove_dir_all(&old).at(&old)?;
                        on_event(Event::Info(format!(
                            "removed {} (save_total_limit {limit})",
                            old.display()
                        )));
                    }
                }
            }
        }
    }
    let train_runtime = run_t0.elapsed().as_secs_f64();
    let mut weights_sq = 0.0;
    for (_, v) in &tm.vars {
        weights_sq += optim::sum_sq(v.as_tensor())?;
    }
    if !weights_sq.is_finite() {
        return Err(Error::InvalidOptions(format!(
            "the last update made the weights non-finite (learning_rate {}, adam_epsilon {}, max_grad_norm {}); the final model is not saved, checkpoints written so far are kept",
            cfg.learning_rate, cfg.adamw.eps, cfg.max_grad_norm
        )));
    }
    let final_mix = schedule::mix(total, warmup);
    tm.model.mix = final_mix;
    let mut metrics = BTreeMap::new();
    if total > 0 {
        // Over every step of the run, resumed or not.
        metrics.insert("train_loss".to_string(), loss_total / total as f64);
    }
    metrics.insert("train_runtime".into(), train_runtime);
    metrics.insert(
        "train_samples_per_second".into(),
        samples_run as f64 / train_runtime.max(1e-9),
    );
    metrics.insert(
        "train_steps_per_second".into(),
        steps_run as f64 / train_runtime.max(1e-9),
    );
    metrics.insert("epoch".into(), epoch);
    if !prepared.val.is_empty() {
        let r = evaluate_samples(
            &tm.model,
            &prepared.val,
            cfg.eval_batch_size,
            prepared.pad_id,
        )?;
        if !r.loss.is_finite() {
            return Err(Error::InvalidOptions(format!(
                "the final model's eval loss is {}: the weights diverged (learning_rate {}, adam_epsilon {}, max_grad_norm {}); the final model is not saved, checkpoints written so far are kept",
                r.loss, cfg.learning_rate, cfg.adamw.eps, cfg.max_grad_norm
            )));
        }
        let mut rec = json!({"step": total, "epoch": epoch});
        for (k, v) in r.metrics() {
            rec[k.clone()] = json!(v);
            metrics.insert(k, v);
        }
        sinks.log(rec)?;
        last_eval = Some(r);
    }
    let st = TrainerState::new(
        cfg,
        total,
        total,
        epoch,
        final_mix,
        n_train,
        loss_total,
        &sinks.history,
    );
    save_final(&output_dir, &tm, &st, is_diff, &side)?;
    let train_only: BTreeMap<_, _> = metrics
        .iter()
        .filter(|(k, _)| !k.starts_with("eval_") && *k != "perplexity")
        .collect();
    crate::config::write_json(&output_dir.join("train_results.json"), &json!(train_only))?;
    if let Some(r) = last_eval {
        crate::config::write_json(&output_dir.join("eval_results.json"), &json!(r.metrics()))?;
    }
    crate::config::write_json(&output_dir.join("all_results.json"), &json!(metrics))?;
    if let Some(w) = warmup {
        if final_mix < 1.0 {
            on_event(Event::Warning(format!(
                "the run ended mid-warm-up: diff_attn_mix = {final_mix} ({total} of {w} warm-up steps); it is saved in config.json ({MIX_KEY}) and applied when this tool loads the model{}",
                if tm.config.format == Format::DiffLlama {
                    "; transformers' DiffLlama ignores it and would run with 1"
                } else if tm.config.format == Format::FamilyDifferential {
                    ""
                } else {
                    "; the axolotl plugin does not read it and would run with 1"
                }
            )));
        }
    }
    on_event(Event::Info(format!(
        "done in {:.1} s: {}",
        t_start.elapsed().as_secs_f64(),
        output_dir.display()
    )));
    Ok(TrainReport {
        output_dir,
        metrics,
        global_step: total,
        total_steps: total,
        mix: final_mix,
    })
}

fn save_checkpoint(
    dir: &Path,
    tm: &TrainableModel,
    opt: &optim::AdamW,
    st: &TrainerState,
    is_diff: bool,
    side: &SideFiles,
) -> Result<()> {
    let staged = StagedDir::create(dir, true, &[])?;
    write_model(staged.path(), tm, st.diff_attn_mix, is_diff, side)?;
    let opt_tensors: HashMap<String, Tensor> = opt.state_tensors()?.into_iter().collect();
    let p = staged.path().join(OPTIMIZER_FILE);
    candle_core::safetensors::save(&opt_tensors, &p).map_err(|e| Error::Safetensors {
        path: p.clone(),
        msg: e.to_string(),
    })?;
    crate::config::write_json(
        &staged.path().join(STATE_FILE),
        &serde_json::to_value(st).expect("serialisable"),
    )?;
    staged.commit()?;
    Ok(())
}

/// Writes the final model into `output_dir` itself: staged in a hidden sibling directory,
/// then moved file by file with config.json last, so an interrupted save never leaves a
/// directory that looks like a complete model.
fn save_final(
    output_dir: &Path,
    tm: &TrainableModel,
    st: &TrainerState,
    is_diff: bool,
    side: &SideFiles,
) -> Result<()> {
    let stage = crate::output::partial_path(&output_dir.join("final"), "");
    if stage.exists() {
        std::fs::remove_dir_all(&stage).at(&stage)?;
    }
    std::fs::create_dir(&stage).at(&stage)?;
    let written = write_model(&stage, tm, st.diff_attn_mix, is_diff, side).and_then(|_| {
        crate::config::write_json(
            &stage.join(STATE_FILE),
            &serde_json::to_value(st).expect("serialisable"),
        )
    });
    if let Err(e) = written {
        let _ = std::fs::remove_dir_all(&stage);
        return Err(e);
    }
    let old = output_dir.join("config.json");
    if old.exists() {
        std::fs::remove_file(&old).at(&old)?;
    }
    for e in std::fs::read_dir(output_dir).at(output_dir)?.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with("model") && name.contains(".safetensors") {
            std::fs::remove_file(e.path()).at(e.path())?;
        }
    }
    let mut names: Vec<_> = std::fs::read_dir(&stage)
        .at(&stage)?
        .flatten()
        .map(|e| e.file_name())
        .collect();
    names.sort_by_key(|n| n == "config.json");
    for n in names {
        std::fs::rename(stage.join(&n), output_dir.join(&n)).at(output_dir.join(&n))?;
    }
    std::fs::remove_dir(&stage).at(&stage)?;
    Ok(())
}

/// `evaluate`: eval loss and perplexity of `model_dir` (default: `base_model`) on the
/// config's validation split. Writes `eval_results.json` into `output_dir` when given.
pub fn evaluate(cfg: &TrainConfig, model_dir: Option<&Path>) -> Result<(PathBuf, EvalResult)> {
    let dir = match model_dir {
        Some(d) => d.to_path_buf(),
        None => crate::hub::resolve_model(
            &cfg.axolotl.base_model,
            true,
            "base_model",
            &cfg.axolotl.path,
        )?,
    };
    if cfg.val_set_size.is_none() {
        return Err(Error::InvalidValue {
            path: cfg.axolotl.path.clone(),
            key: "val_set_size".into(),
            value: "0".into(),
            reason: "evaluate needs a validation split: set val_set_size (a fraction or a count)"
                .into(),
        });
    }
    let device = default_device();
    let mc = ModelConfig::from_file(&dir.join("config.json"))?;
    let tokenizer_dir = match (&cfg.axolotl.tokenizer_config, model_dir) {
        (Some(t), None) => {
            crate::hub::resolve_model(t, false, "tokenizer_config", &cfg.axolotl.path)?
        }
        _ => dir.clone(),
    };
    let prepared = prepare_data(cfg, &tokenizer_dir, &mc)?;
    let model = Model::load(&dir, DType::F32, &device)?;
    if cfg.sequence_len > model.config.max_position_embeddings {
        return Err(Error::InvalidValue {
            path: cfg.axolotl.path.clone(),
            key: "sequence_len".into(),
            value: cfg.sequence_len.to_string(),
            reason: format!(
                "longer than the model's max_position_embeddings ({})",
                model.config.max_position_embeddings
            ),
        });
    }
    let r = evaluate_samples(&model, &prepared.val, cfg.eval_batch_size, prepared.pad_id)?;
    Ok((dir, r))
}
