//! Where logged records go: `metrics.jsonl`, the TensorBoard event file and the trainer
//! state's `log_history`.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde_json::Value;

use super::{tensorboard, TrainerState, METRICS_FILE};
use crate::error::{IoContext, Result};

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
pub(super) struct Sinks {
    tb: tensorboard::EventWriter,
    metrics_path: PathBuf,
    pub history: Vec<Value>,
}

impl Sinks {
    /// The sinks of a run in `output_dir` that starts after `start` steps: a resumed run
    /// (`state`) keeps the records up to `start` (in metrics.jsonl and `log_history`), a new
    /// one starts a new metrics.jsonl.
    pub fn open(output_dir: &Path, state: Option<&TrainerState>, start: usize) -> Result<Self> {
        let metrics_path = output_dir.join(METRICS_FILE);
        if state.is_some() {
            truncate_jsonl(&metrics_path, start)?;
        } else if metrics_path.exists() {
            std::fs::remove_file(&metrics_path).at(&metrics_path)?;
        }
        let tb = tensorboard::EventWriter::create(output_dir)?;
        let mut log_history: Vec<Value> = state.map(|s| s.log_history.clone()).unwrap_or_default();
        log_history.retain(|v| {
            v.get("step")
                .and_then(Value::as_u64)
                .map(|s| s as usize <= start)
                .unwrap_or(false)
        });
        Ok(Self {
            tb,
            metrics_path,
            history: log_history,
        })
    }

    /// Logs one record `{"step": N, name: value, ...}`. TensorBoard tags: `train/<name>`,
    /// `eval/<name>` for `eval_*`, `diff_attn/<name>` for the monitoring metrics.
    pub fn log(&mut self, record: Value) -> Result<()> {
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
