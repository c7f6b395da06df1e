//! One optimizer step of [`super::train`], in named parts: the forward and backward passes
//! over the step's micro-batches, the lambda monitoring, the AdamW update, and the logging,
//! evaluation and checkpoint that follow on their steps.

// `n.is_multiple_of(k)` is Rust 1.87; the workspace's rust-version is 1.85.
#![allow(clippy::manual_is_multiple_of)]

use std::collections::HashSet;
use std::time::Instant;

use candle_core::{backprop::GradStore, Tensor};
use serde_json::{json, Value};

use super::run_dir::{old_checkpoints, RunDir};
use super::setup::{RunData, StepPlan};
use super::sinks::Sinks;
use super::{
    data, evaluate_samples, monitor, nll_sum, optim, save_checkpoint, schedule, step_batches,
    Event, TrainConfig, TrainableModel, TrainerState,
};
use crate::error::{Error, IoContext, Result};
use crate::model::AttentionProbs;

/// A run between its set-up and its end: the model, the optimizer, the sinks, and the
/// running totals.
pub(super) struct Trainer<'a> {
    pub cfg: &'a TrainConfig,
    pub run: &'a RunDir,
    pub data: &'a RunData,
    pub plan: &'a StepPlan,
    pub on_event: &'a dyn Fn(Event),
    pub tm: TrainableModel,
    pub opt: optim::AdamW,
    pub sinks: Sinks,
    /// Steps done before this process started (0, or the resumed checkpoint's).
    pub start: usize,
    pub is_diff: bool,
    /// The warm-up of the negative branch (differential models only).
    pub warmup: Option<usize>,
    /// Layers whose attention is monitored.
    pub monitored: Vec<usize>,
    pub totals: Totals,
    /// When the first step of this process started.
    pub started: Instant,
    /// Layers whose `lambda_full` was last seen outside [0, 1.5] (warned once until back).
    out_of_range: HashSet<usize>,
}

/// Running sums of a run.
#[derive(Debug, Default)]
pub(super) struct Totals {
    /// Losses and steps since the last logged record.
    pub loss_since_log: f64,
    pub steps_since_log: usize,
    /// Steps and samples run by this process.
    pub steps_run: usize,
    pub samples_run: usize,
    /// Input tokens (padding excluded) run through training steps by this process, and the
    /// seconds those steps took (forward, backward, update; evaluation and saving excluded).
    pub tokens_run: usize,
    pub step_seconds: f64,
    /// Sum of the losses of every step of the run, resumed or not.
    pub loss_total: f64,
    /// The (fractional) epoch reached.
    pub epoch: f64,
}

/// The forward and backward passes of one step, before the update.
pub(super) struct StepOutput {
    pub info: StepInfo,
    grads: GradStore,
    /// Attention probabilities of the monitored layers, on monitoring steps.
    probs: Option<AttentionProbs>,
}

/// The figures of one step.
#[derive(Debug, Clone, Copy)]
pub(super) struct StepInfo {
    /// Optimizer step `g` (0-based).
    pub g: usize,
    pub mix: f64,
    pub learning_rate: f64,
    pub started: Instant,
    pub loss: f64,
    pub grad_norm: f64,
}

impl StepInfo {
    /// The number of steps done after this one (1-based step number).
    pub fn step(&self) -> usize {
        self.g + 1
    }
}

impl<'a> Trainer<'a> {
    /// A trainer starting after `start` steps.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        cfg: &'a TrainConfig,
        run: &'a RunDir,
        data: &'a RunData,
        plan: &'a StepPlan,
        on_event: &'a dyn Fn(Event),
        tm: TrainableModel,
        opt: optim::AdamW,
        start: usize,
    ) -> Result<Self> {
        let is_diff = tm.is_differential();
        let sinks = Sinks::open(&run.output_dir, run.state.as_ref(), start)?;
        let monitored = super::schedule::monitored_layers(
            tm.model.config.num_hidden_layers,
            cfg.diff_attn_num_monitor_layers,
        );
        let warmup = if is_diff && !super::setup::is_preserving(&tm) {
            cfg.diff_attn_warmup_steps
        } else {
            None
        };
        let totals = Totals {
            loss_total: run.state.as_ref().map(|s| s.total_loss).unwrap_or(0.0),
            epoch: start as f64 / plan.per_epoch as f64,
            ..Totals::default()
        };
        Ok(Self {
            cfg,
            run,
            data,
            plan,
            on_event,
            tm,
            opt,
            sinks,
            start,
            is_diff,
            warmup,
            monitored,
            totals,
            started: Instant::now(),
            out_of_range: HashSet::new(),
        })
    }

    /// Step `g`'s mix and learning rate set, its micro-batches run forward and backward with
    /// their gradients summed (the loss is their token-weighted mean), and the gradient norm;
    /// the attention probabilities are captured on monitoring steps.
    pub fn forward_backward(&mut self, g: usize) -> Result<StepOutput> {
        let cfg = self.cfg;
        let prepared = &self.data.prepared;
        let mix = schedule::mix(g, self.warmup);
        self.tm.model.mix = mix;
        let lr = cfg.learning_rate
            * cfg
                .lr_scheduler
                .factor(g, self.plan.total, self.plan.lr_warmup);
        let (micro, ep) = step_batches(cfg, self.data.n_train(), g);
        self.totals.epoch = ep;
        let t_step = Instant::now();
        let batches: Vec<data::Batch> = micro
            .iter()
            .map(|idx| {
                let refs: Vec<&data::Sample> = idx.iter().map(|&i| &prepared.train[i]).collect();
                data::collate(&refs, prepared.pad_id)
            })
            .collect();
        let n_targets: usize = batches.iter().map(|b| b.n_targets).sum();
        let monitor_now = self.is_diff && g % cfg.diff_attn_log_every == 0;
        let mut probs = AttentionProbs::default();
        let mut grads: Option<GradStore> = None;
        let mut step_loss = 0.0;
        // Linear weights' gradients are accumulated in place over the micro-batches.
        let sink = crate::model::layout::WeightGradSink::open()?;
        for (i, b) in batches.iter().enumerate() {
            let capture =
                (monitor_now && i == 0).then_some((self.monitored.as_slice(), &mut probs));
            let t0 = Instant::now();
            let loss = (nll_sum(&self.tm.model, b, capture)? / n_targets.max(1) as f64)?;
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
            self.totals.samples_run += b.batch;
            self.totals.tokens_run += b.n_tokens;
        }
        let mut grads = grads.expect("a step has at least one micro-batch");
        let var_tensors: Vec<&Tensor> = self.tm.vars.iter().map(|(_, v)| v.as_tensor()).collect();
        sink.finish(&var_tensors, &mut grads)?;
        let grad_norm = self.opt.grad_norm(&grads)?;
        Ok(StepOutput {
            info: StepInfo {
                g,
                mix,
                learning_rate: lr,
                started: t_step,
                loss: step_loss,
                grad_norm,
            },
            grads,
            probs: monitor_now.then_some(probs),
        })
    }

    /// Refuses a non-finite loss or gradient norm (before any update: the model loaded is
    /// broken; later: the weights diverged).
    pub fn check_finite(&self, s: &StepInfo) -> Result<()> {
        if s.loss.is_finite() && s.grad_norm.is_finite() {
            return Ok(());
        }
        let cfg = self.cfg;
        let why = if s.g == self.start {
            format!(
                "before any update: the model in {} already computes non-finite values",
                self.run.model_dir.display()
            )
        } else {
            format!(
                "the weights diverged (learning_rate {}, adam_epsilon {}, max_grad_norm {}); checkpoints written so far are kept",
                cfg.learning_rate, cfg.adamw.eps, cfg.max_grad_norm
            )
        };
        Err(Error::InvalidOptions(format!(
            "step {}: loss {} / gradient norm {} is not finite: {why}",
            s.g + 1,
            s.loss,
            s.grad_norm
        )))
    }

    /// On monitoring steps: logs the lambda and attention metrics (docs/spec.md §5-6) under the step
    /// the forward belongs to, warns about each layer whose `lambda_full` leaves [0, 1.5], and
    /// returns the summary metric of the negative branch (see `Event::Step`).
    pub fn monitor(&mut self, s: &mut StepOutput) -> Result<Option<(&'static str, f64)>> {
        let Some(probs) = s.probs.take() else {
            return Ok(None);
        };
        let g = s.info.g;
        let lambdas = self.tm.model.lambdas();
        let mut m = monitor::metrics(
            &lambdas,
            &self.tm.model.lambda_projs(),
            &self.monitored,
            &probs,
            s.info.mix,
            self.warmup.is_some(),
        )?;
        let mean_lambda = ["aggregate/lambda_full_mean", "aggregate/lambda_gate_mean"]
            .into_iter()
            .find_map(|k| m.get(k).map(|v| (k, *v)));
        for (l, v) in monitor::lambda_out_of_range(&lambdas)? {
            if self.out_of_range.insert(l) {
                (self.on_event)(Event::Warning(format!(
                    "step {}: layer {l} lambda_full = {v:.4} is outside [0, 1.5] (not clamped)",
                    g + 1
                )));
            }
        }
        self.out_of_range.retain(|l| {
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
        self.sinks.log(Value::Object(rec))?;
        Ok(mean_lambda)
    }

    /// Clips the gradients to `max_grad_norm`, applies the AdamW update (the gradients are
    /// freed) and adds the step's loss to the totals.
    pub fn optimizer_step(&mut self, out: StepOutput) -> Result<StepInfo> {
        let s = out.info;
        let max = self.cfg.max_grad_norm;
        let clip = if max > 0.0 && s.grad_norm > max {
            max / (s.grad_norm + 1e-6)
        } else {
            1.0
        };
        let t0 = Instant::now();
        self.opt.step(&out.grads, s.learning_rate, clip)?;
        tracing::debug!(
            step = s.g,
            optimizer_s = t0.elapsed().as_secs_f64(),
            "optimizer step"
        );
        drop(out);
        let t = &mut self.totals;
        t.loss_since_log += s.loss;
        t.steps_since_log += 1;
        t.loss_total += s.loss;
        t.steps_run += 1;
        t.step_seconds += s.started.elapsed().as_secs_f64();
        Ok(s)
    }

    /// Reports the step, and on logging steps (`logging_steps`, and the last) logs the mean
    /// loss since the last record.
    pub fn maybe_log(
        &mut self,
        s: &StepInfo,
        mean_lambda: Option<(&'static str, f64)>,
    ) -> Result<()> {
        let step = s.step();
        let total = self.plan.total;
        let logged = step % self.plan.log_every == 0 || step == total;
        (self.on_event)(Event::Step {
            step,
            total,
            loss: s.loss,
            learning_rate: s.learning_rate,
            mean_lambda,
            logged,
        });
        if logged {
            let t = &mut self.totals;
            let mut rec = json!({
                "step": step,
                "epoch": t.epoch,
                "loss": t.loss_since_log / t.steps_since_log as f64,
                "learning_rate": s.learning_rate,
                "grad_norm": s.grad_norm,
                "step_time": s.started.elapsed().as_secs_f64(),
            });
            if self.is_diff {
                rec["diff_attn_mix"] = json!(s.mix);
            }
            self.sinks.log(rec)?;
            t.loss_since_log = 0.0;
            t.steps_since_log = 0;
        }
        Ok(())
    }

    /// On `eval_steps` (not the last step, which the final evaluation covers): the eval loss
    /// of the model with the next step's mix.
    pub fn maybe_eval(&mut self, step: usize) -> Result<()> {
        let prepared = &self.data.prepared;
        let Some(e) = self.cfg.eval_steps else {
            return Ok(());
        };
        if step % e != 0 || step == self.plan.total || prepared.val.is_empty() {
            return Ok(());
        }
        self.eval_at(step)
    }

    /// `eval_on_start`: the evaluation of the starting model, logged at step 0.
    pub fn eval_on_start(&mut self) -> Result<()> {
        if !self.cfg.eval_on_start || self.start != 0 || self.data.prepared.val.is_empty() {
            return Ok(());
        }
        self.eval_at(0)
    }

    /// Evaluates the validation set at `step` (with that step's mix) and logs it.
    fn eval_at(&mut self, step: usize) -> Result<()> {
        let prepared = &self.data.prepared;
        self.tm.model.mix = schedule::mix(step, self.warmup);
        let r = evaluate_samples(
            &self.tm.model,
            &prepared.val,
            self.cfg.eval_batch_size,
            prepared.pad_id,
        )?;
        let mut rec = json!({"step": step, "epoch": self.totals.epoch});
        for (k, v) in r.metrics() {
            rec[k] = json!(v);
        }
        (self.on_event)(Event::Info(format!("step {step}: eval_loss {:.4}", r.loss)));
        self.sinks.log(rec)?;
        Ok(())
    }

    /// On `save_steps`: writes `checkpoint-<step>` (with the next step's mix) and removes the
    /// oldest beyond `save_total_limit`.
    pub fn maybe_checkpoint(&mut self, step: usize) -> Result<()> {
        let Some(s) = self.cfg.save_steps else {
            return Ok(());
        };
        if step % s != 0 {
            return Ok(());
        }
        let output_dir = &self.run.output_dir;
        let dir = output_dir.join(format!("checkpoint-{step}"));
        let st = self.state(step, schedule::mix(step, self.warmup));
        save_checkpoint(
            &dir,
            &self.tm,
            &self.opt,
            &st,
            self.is_diff,
            &self.data.side,
        )?;
        (self.on_event)(Event::Info(format!("saved {}", dir.display())));
        if let Some(limit) = self.cfg.save_total_limit {
            for old in old_checkpoints(output_dir, limit) {
                std::fs::remove_dir_all(&old).at(&old)?;
                (self.on_event)(Event::Info(format!(
                    "removed {} (save_total_limit {limit})",
                    old.display()
                )));
            }
        }
        Ok(())
    }

    /// The trainer state after `step` steps, with `mix` in force for the next.
    pub fn state(&self, step: usize, mix: f64) -> TrainerState {
        TrainerState::new(
            self.cfg,
            step,
            self.plan.total,
            self.totals.epoch,
            mix,
            self.data.n_train(),
            self.totals.loss_total,
            &self.sinks.history,
        )
    }
}
