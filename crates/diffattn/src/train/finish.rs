//! The end of [`super::train`]: the final evaluation, the final model and the results files.

use std::collections::BTreeMap;
use std::time::Instant;

use serde_json::json;

use super::step::Trainer;
use super::{evaluate_samples, optim, save_final, schedule, Event, TrainReport, MIX_KEY};
use crate::config::Format;
use crate::error::{Error, Result};

impl Trainer<'_> {
    /// Refuses non-finite weights, evaluates the final model (with the final mix) on the
    /// validation split, saves it into `output_dir` with `trainer_state.json`, writes
    /// `train_results.json`, `eval_results.json` and `all_results.json`, and warns when the
    /// run ended mid-warm-up. `t_start` is when the run began (for the closing message).
    pub fn finish(mut self, t_start: Instant) -> Result<TrainReport> {
        let cfg = self.cfg;
        let total = self.plan.total;
        let prepared = &self.data.prepared;
        let output_dir = self.run.output_dir.clone();
        let train_runtime = self.started.elapsed().as_secs_f64();
        let mut weights_sq = 0.0;
        for (_, v) in &self.tm.vars {
            weights_sq += optim::sum_sq(v.as_tensor())?;
        }
        if !weights_sq.is_finite() {
            return Err(Error::InvalidOptions(format!(
                "the last update made the weights non-finite (learning_rate {}, adam_epsilon {}, max_grad_norm {}); the final model is not saved, checkpoints written so far are kept",
                cfg.learning_rate, cfg.adamw.eps, cfg.max_grad_norm
            )));
        }
        let final_mix = schedule::mix(total, self.warmup);
        self.tm.model.mix = final_mix;
        let t = &self.totals;
        let mut metrics = BTreeMap::new();
        if total > 0 {
            // Over every step of the run, resumed or not.
            metrics.insert("train_loss".to_string(), t.loss_total / total as f64);
        }
        metrics.insert("train_runtime".into(), train_runtime);
        metrics.insert(
            "train_samples_per_second".into(),
            t.samples_run as f64 / train_runtime.max(1e-9),
        );
        metrics.insert(
            "train_steps_per_second".into(),
            t.steps_run as f64 / train_runtime.max(1e-9),
        );
        // Training throughput alone: the time of the steps, not of evaluations or saving.
        metrics.insert(
            "train_tokens_per_second".into(),
            t.tokens_run as f64 / t.step_seconds.max(1e-9),
        );
        metrics.insert("epoch".into(), t.epoch);
        let mut last_eval = None;
        if !prepared.val.is_empty() {
            let r = evaluate_samples(
                &self.tm.model,
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
            let mut rec = json!({"step": total, "epoch": t.epoch});
            for (k, v) in r.metrics() {
                rec[k.clone()] = json!(v);
                metrics.insert(k, v);
            }
            self.sinks.log(rec)?;
            last_eval = Some(r);
        }
        let st = self.state(total, final_mix);
        save_final(&output_dir, &self.tm, &st, self.is_diff, &self.data.side)?;
        let train_only: BTreeMap<_, _> = metrics
            .iter()
            .filter(|(k, _)| !k.starts_with("eval_") && *k != "perplexity")
            .collect();
        crate::config::write_json(&output_dir.join("train_results.json"), &json!(train_only))?;
        if let Some(r) = last_eval {
            crate::config::write_json(&output_dir.join("eval_results.json"), &json!(r.metrics()))?;
        }
        crate::config::write_json(&output_dir.join("all_results.json"), &json!(metrics))?;
        if let Some(w) = self.warmup {
            if final_mix < 1.0 {
                (self.on_event)(Event::Warning(format!(
                    "the run ended mid-warm-up: diff_attn_mix = {final_mix} ({total} of {w} warm-up steps); it is saved in config.json ({MIX_KEY}) and applied when this tool loads the model{}",
                    if self.tm.config.format == Format::DiffLlama {
                        "; transformers' DiffLlama ignores it and would run with 1"
                    } else if self.tm.config.format == Format::FamilyDifferential {
                        ""
                    } else {
                        "; the axolotl plugin does not read it and would run with 1"
                    }
                )));
            }
        }
        (self.on_event)(Event::Info(format!(
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
}
