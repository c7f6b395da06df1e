//! The steps of [`super::train`] before the first optimizer step: the model, the data and
//! step counts (all validated before `output_dir` is touched), the set-up report, and the
//! optimizer with the resumed state.

use std::path::Path;

use candle_core::Device;
use serde_json::Value;

use super::run_dir::RunDir;
use super::{
    check_sequence_len, data, is_stationary_start, optim, prepare_data, step_counts, Event,
    PreparedData, TrainConfig, TrainableModel, MAX_STEPS, OPTIMIZER_FILE, STATE_FILE,
};
use crate::convert::SideFiles;
use crate::error::{Error, Result};

/// Loads the weights trained (f32 on `device`) and checks that `sequence_len` fits them.
pub(super) fn load_model(
    cfg: &TrainConfig,
    model_dir: &Path,
    device: &Device,
) -> Result<TrainableModel> {
    let shape = crate::memory::ModelShape::read(model_dir)?;
    super::check_sequence_fits(cfg, shape.max_position_embeddings)?;
    shape
        .training(
            cfg.micro_batch_size as u64,
            cfg.sequence_len as u64,
            cfg.gradient_checkpointing,
        )
        .check("train")?;
    let mut tm = TrainableModel::load(model_dir, device)?;
    tm.model.gradient_checkpointing = cfg.gradient_checkpointing;
    check_sequence_len(cfg, &tm.model)?;
    Ok(tm)
}

/// The run's data: tokenised splits and the tokenizer / generation files written with
/// every saved model.
pub(super) struct RunData {
    pub prepared: PreparedData,
    pub side: SideFiles,
}

impl RunData {
    /// Training samples.
    pub fn n_train(&self) -> usize {
        self.prepared.train.len()
    }
}

/// Tokenises and splits the datasets; refuses a split that leaves no training sample.
pub(super) fn build_data(
    cfg: &TrainConfig,
    tokenizer_dir: &Path,
    tm: &TrainableModel,
) -> Result<RunData> {
    let prepared = prepare_data(cfg, tokenizer_dir, &tm.config)?;
    // Read once: a resumed checkpoint they come from may be rotated away
    // (`save_total_limit`) before the final save.
    let side = SideFiles::read(tokenizer_dir, &[tokenizer_dir])?;
    if prepared.train.is_empty() {
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
    Ok(RunData { prepared, side })
}

/// How many optimizer steps the run has, and its warm-up and logging intervals.
pub(super) struct StepPlan {
    pub per_epoch: usize,
    pub total: usize,
    pub lr_warmup: usize,
    pub log_every: usize,
}

impl StepPlan {
    /// The steps of `n_train` samples; refuses more than [`MAX_STEPS`], or a resumed
    /// checkpoint (`run.state`) beyond the last step.
    pub fn new(cfg: &TrainConfig, n_train: usize, run: &RunDir) -> Result<Self> {
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
        if let Some(st) = &run.state {
            if st.global_step > total {
                return Err(Error::InvalidValue {
                    path: run.model_dir.join(STATE_FILE),
                    key: "global_step".into(),
                    value: st.global_step.to_string(),
                    reason: format!("is beyond this run's {total} steps"),
                });
            }
        }
        Ok(Self {
            per_epoch,
            total,
            lr_warmup: cfg.lr_warmup(total),
            log_every: cfg.logging_interval(total),
        })
    }
}

/// Reports the model, data and steps of the run, and warns about settings that do not do
/// what they seem to.
pub(super) fn report_setup(
    cfg: &TrainConfig,
    run: &RunDir,
    tm: &TrainableModel,
    data: &RunData,
    plan: &StepPlan,
    device: &Device,
    on_event: &dyn Fn(Event),
) -> Result<()> {
    let is_diff = tm.is_differential();
    let prepared = &data.prepared;
    let per_epoch = plan.per_epoch;
    let total = plan.total;
    let lr_warmup = plan.lr_warmup;
    on_event(Event::Info(format!(
        "model: {} ({}, {} layers), device {:?}",
        run.model_dir.display(),
        tm.config.format.name(tm.config.family),
        tm.model.config.num_hidden_layers,
        device
    )));
    on_event(Event::Info(format!(
        "data: {} records -> {} samples ({} train, {} validation); dropped {} longer than sequence_len {}, {} without targets",
        prepared.stats.records,
        prepared.stats.samples,
        data.n_train(),
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
    if lr_warmup >= total && total > 0 {
        on_event(Event::Warning(format!(
            "warmup_steps {lr_warmup} >= the run's {total} steps: the learning rate never reaches learning_rate ({}); the whole run is warm-up (step 1 at lr 0)",
            cfg.learning_rate
        )));
    }
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
    if is_preserving(tm) && cfg.diff_attn_warmup_steps.is_some() && is_diff {
        let fold = if tm.model.config.attention == crate::model::AttentionKind::V2 {
            "--variant v2 --preserving-mirror, whose o_proj is doubled (lambda = 1/2)"
        } else {
            "--preserving-mirror, whose o_proj carries 1/(1 - lambda)"
        };
        on_event(Event::Warning(format!(
            "diff_attn_warmup_steps is ignored (mix = 1 throughout): this model was converted with {fold}, so it computes the source model only at mix = 1; a warm-up from mix = 0 would start from a rescaled attention output (a much higher loss)"
        )));
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
    Ok(())
}

/// Whether `tm` was converted with an output-preserving init that folds a scale into `o_proj`
/// (`preserving_mirror: true` in config.json): the warm-up of lambda does not apply to it
/// (docs/spec.md §6), so `diff_attn_warmup_steps` is ignored with a warning.
pub(super) fn is_preserving(tm: &TrainableModel) -> bool {
    tm.config
        .raw
        .get("preserving_mirror")
        .and_then(Value::as_bool)
        == Some(true)
}

/// The optimizer of `tm`, and the steps already done: with a resumed checkpoint its AdamW
/// moments and step count are loaded (warning when it was written with other settings).
pub(super) fn resume_state(
    cfg: &TrainConfig,
    run: &RunDir,
    tm: &TrainableModel,
    n_train: usize,
    total: usize,
    device: &Device,
    on_event: &dyn Fn(Event),
) -> Result<(optim::AdamW, usize)> {
    let mut opt = optim::AdamW::new(&tm.vars, cfg.adamw)?;
    let start = match &run.state {
        Some(s) => {
            let p = run.model_dir.join(OPTIMIZER_FILE);
            crate::checkpoint::check_safetensors_file(&p)?;
            let st =
                candle_core::safetensors::load(&p, device).map_err(|e| Error::Safetensors {
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
            let now = super::hyperparameters(cfg);
            let changed: Vec<String> = now
                .iter()
                .filter_map(|(k, v)| {
                    let old = s.hyperparameters.get(k)?;
                    (old != v).then(|| format!("{k} {old} -> {v}"))
                })
                .collect();
            if !changed.is_empty() {
                on_event(Event::Warning(format!(
                    "resuming with changed settings: {} (the checkpoint was written with the first values)",
                    changed.join(", ")
                )));
            }
            if let Some(why) = &run.resume_note {
                on_event(Event::Info(why.clone()));
            }
            on_event(Event::Info(format!(
                "resuming from {} at step {}",
                run.model_dir.display(),
                s.global_step
            )));
            s.global_step
        }
        None => 0,
    };
    Ok((opt, start))
}
