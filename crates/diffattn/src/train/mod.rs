//! Fine-tuning (`diff-transformer train`) and evaluation (`diff-transformer evaluate`) of
//! Llama, `llama-differential` (format A) and `diffllama` (format B) checkpoints from an
//! axolotl config, with the negative-branch warm-up, lambda monitoring (docs/spec.md §5-6) and
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
mod finish;
pub mod loss;
pub mod monitor;
pub mod optim;
pub mod plot;
mod run_dir;
pub mod schedule;
mod setup;
mod sinks;
mod step;
pub mod tensorboard;

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var};
use serde_json::{json, Value};

use crate::config::ModelConfig;
use crate::convert::SideFiles;
use crate::error::{Error, IoContext, Result};
use crate::generate::TextCodec;
use crate::model::{AttentionProbs, Model};
use crate::output::{write_safetensors, PlannedTensor, StagedDir, TensorProducer};
pub use config::{Resume, TrainConfig};
use data::{Batch, Sample, IGNORE};
pub use run_dir::latest_checkpoint;
use run_dir::RunDir;
use setup::StepPlan;
use step::Trainer;

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
        /// On monitoring steps, the metric summarising the negative branch and its value:
        /// `aggregate/lambda_full_mean` (V1: mean over layers of `mix · lambda_full`) or
        /// `aggregate/lambda_gate_mean` (V2: mean over monitored layers of `mix · gate`).
        mean_lambda: Option<(&'static str, f64)>,
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
    match (model.lm_head(), model.config.final_logit_softcapping) {
        (crate::model::Weight::Dense(w), None) => Ok(loss::head_nll_sum(&h, w, &targets)?),
        // The soft cap (Gemma's `final_logit_softcapping`), or a head read in place
        // (evaluation): logits through `Model::logits`, a bounded number of rows at a time.
        _ => {
            const ROWS: usize = 64;
            let mut total = Tensor::zeros((), candle_core::DType::F32, dev)?;
            for start in (0..n).step_by(ROWS) {
                let len = ROWS.min(n - start);
                let logits = model
                    .logits(&h.narrow(0, start, len)?.unsqueeze(0)?)?
                    .squeeze(0)?;
                total = (total + loss::nll_sum(&logits, &targets[start..start + len])?)?;
            }
            Ok(total)
        }
    }
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
        crate::interrupt::check()?;
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
    /// The attention is differential (format A or B): lambda warm-up and monitoring apply.
    pub fn is_differential(&self) -> bool {
        self.config.format.is_differential()
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
    crate::remote_code::attach(dir, &mut raw)?;
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
    /// The `train` invocation that wrote this checkpoint (one id per command run; a resumed
    /// run gets its own). Absent in checkpoints of older versions.
    #[serde(default)]
    pub run_id: Option<String>,
    /// The optimisation settings in force ([`hyperparameters`]), compared on resume.
    #[serde(default)]
    pub hyperparameters: serde_json::Map<String, Value>,
}

/// The id of this `train` invocation (time and PID), written into every checkpoint it saves.
pub fn run_id() -> &'static str {
    static ID: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    ID.get_or_init(|| {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        format!(
            "{}.{:09}-{}",
            t.as_secs(),
            t.subsec_nanos(),
            std::process::id()
        )
    })
}

/// The settings a resumed run reports when they changed: learning rate and schedule, weight
/// decay, clipping, sequence length and the warm-up of lambda.
pub fn hyperparameters(cfg: &TrainConfig) -> serde_json::Map<String, Value> {
    let mut m = serde_json::Map::new();
    m.insert("learning_rate".into(), serde_json::json!(cfg.learning_rate));
    m.insert(
        "lr_scheduler".into(),
        serde_json::json!(format!("{:?}", cfg.lr_scheduler).to_lowercase()),
    );
    m.insert("warmup_steps".into(), serde_json::json!(cfg.warmup_steps));
    m.insert("warmup_ratio".into(), serde_json::json!(cfg.warmup_ratio));
    m.insert(
        "weight_decay".into(),
        serde_json::json!(cfg.adamw.weight_decay),
    );
    m.insert("max_grad_norm".into(), serde_json::json!(cfg.max_grad_norm));
    m.insert("sequence_len".into(), serde_json::json!(cfg.sequence_len));
    m.insert(
        "diff_attn_warmup_steps".into(),
        serde_json::json!(cfg.diff_attn_warmup_steps),
    );
    m
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
            run_id: Some(run_id().to_string()),
            hyperparameters: hyperparameters(cfg),
        }
    }
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
    let vocab = model_cfg.typed.vocab_size;
    // `datasets` or `test_datasets` (`key`), tokenised: refused when nothing is usable or an
    // id (pad and eos included) is beyond the model's vocabulary.
    let load = |specs: &[data::DatasetSpec],
                key: &str|
     -> Result<(Vec<Sample>, data::DatasetStats)> {
        let (samples, stats) =
            data::tokenize(specs, &codec, eos, cfg.sequence_len, cfg.train_on_inputs)?;
        if samples.is_empty() {
            return Err(Error::Dataset {
                path: specs[0].path.clone(),
                msg: format!(
                    "{key}: no usable sample: {} records, {} longer than sequence_len {}, {} without a target",
                    stats.records, stats.dropped_too_long, cfg.sequence_len, stats.dropped_no_labels
                ),
            });
        }
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
                    "the tokenizer of {} produces id {max_id} in {key} (or pad_token_id / eos is that large): tokenizer and model do not match",
                    tokenizer_dir.display()
                ),
            });
        }
        Ok((samples, stats))
    };
    let (samples, stats) = load(&cfg.datasets, "datasets")?;
    let (train, val) = if cfg.test_datasets.is_empty() {
        let n_val = cfg
            .val_set_size
            .map(|v| v.count(samples.len()))
            .unwrap_or(0);
        data::split(samples, n_val, cfg.seed)
    } else {
        (samples, load(&cfg.test_datasets, "test_datasets")?.0)
    };
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

/// Runs training as configured. `on_event` receives progress, information and warnings.
pub fn train(
    cfg: &TrainConfig,
    opts: &TrainOptions,
    on_event: &dyn Fn(Event),
) -> Result<TrainReport> {
    let t_start = Instant::now();
    let device = default_device();
    let mut run = RunDir::check(cfg, opts)?;
    let tokenizer_dir = run.tokenizer_dir(cfg)?;
    let tm = setup::load_model(cfg, &run.model_dir, &device)?;
    let data = setup::build_data(cfg, &tokenizer_dir, &tm)?;
    let plan = StepPlan::new(cfg, data.n_train(), &run)?;
    // Everything is validated: only now is output_dir touched.
    run.create()?;
    setup::report_setup(cfg, &run, &tm, &data, &plan, &device, on_event)?;
    let (opt, start) = setup::resume_state(
        cfg,
        &run,
        &tm,
        data.n_train(),
        plan.total,
        &device,
        on_event,
    )?;
    let mut trainer = Trainer::new(cfg, &run, &data, &plan, on_event, tm, opt, start)?;
    trainer.eval_on_start()?;
    for g in start..plan.total {
        crate::interrupt::check()?;
        let mut out = trainer.forward_backward(g)?;
        trainer.check_finite(&out.info)?;
        let mean_lambda = trainer.monitor(&mut out)?;
        let done = trainer.optimizer_step(out)?;
        trainer.maybe_log(&done, mean_lambda)?;
        trainer.maybe_eval(done.step())?;
        trainer.maybe_checkpoint(done.step())?;
    }
    let report = trainer.finish(t_start)?;
    run.finish_replacing()?;
    Ok(report)
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
    if cfg.val_set_size.is_none() && cfg.test_datasets.is_empty() {
        return Err(Error::InvalidValue {
            path: cfg.axolotl.path.clone(),
            key: "val_set_size".into(),
            value: "0".into(),
            reason: "evaluate needs a validation set: set val_set_size (a fraction or a count) or test_datasets"
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
    if device.is_cpu() {
        let shape = crate::memory::ModelShape::read(&dir)?;
        check_sequence_fits(cfg, shape.max_position_embeddings)?;
        let (b, s) = (cfg.eval_batch_size as u64, cfg.sequence_len as u64);
        let mut e = shape.inference(crate::dtype::DType::F32, b, s, 0, 0);
        // The loss forms logits 64 rows at a time.
        e.add("logits", 2 * 4 * 64 * shape.vocab_size);
        e.check("evaluate")?;
    }
    let model = Model::load(&dir, DType::F32, &device)?;
    check_sequence_len(cfg, &model)?;
    let r = evaluate_samples(&model, &prepared.val, cfg.eval_batch_size, prepared.pad_id)?;
    Ok((dir, r))
}

/// Refuses a `sequence_len` longer than `model`'s `max_position_embeddings`.
fn check_sequence_len(cfg: &TrainConfig, model: &Model) -> Result<()> {
    check_sequence_fits(cfg, model.config.max_position_embeddings)
}

/// Refuses a `sequence_len` longer than `max_position_embeddings`.
pub(crate) fn check_sequence_fits(cfg: &TrainConfig, max_position_embeddings: usize) -> Result<()> {
    if cfg.sequence_len > max_position_embeddings {
        return Err(Error::InvalidValue {
            path: cfg.axolotl.path.clone(),
            key: "sequence_len".into(),
            value: cfg.sequence_len.to_string(),
            reason: format!(
                "longer than the model's max_position_embeddings ({max_position_embeddings})"
            ),
        });
    }
    Ok(())
}
