//! The run's directories: where the weights come from (the checkpoint being resumed, else
//! `base_model`), and the checks on `output_dir` made before anything is written.

use std::path::{Path, PathBuf};

use serde_json::Value;

use super::{Resume, TrainConfig, TrainOptions, TrainerState, STATE_FILE};
use crate::error::{Error, IoContext, Result};

/// Where a run reads its weights and writes its files, checked.
pub(super) struct RunDir {
    /// `output_dir` (absolute).
    pub output_dir: PathBuf,
    /// The weights trained (absolute): the checkpoint being resumed, else `base_model`.
    pub model_dir: PathBuf,
    /// The state of the checkpoint being resumed.
    pub state: Option<TrainerState>,
    /// With `resume_from_checkpoint: true`: which checkpoint was picked and why.
    pub resume_note: Option<String>,
    /// `output_dir` is not empty and not the resumed run's: `--overwrite` replaces it.
    replace: bool,
    /// The lock on `output_dir` held for the whole run (see [`RunDir::create`]).
    lock: Option<crate::output::OutputLock>,
    /// Where `--overwrite` moved the previous `output_dir` until this run completes.
    replaced: Option<PathBuf>,
    /// `output_dir` was made by this run (it did not exist, or `--overwrite` moved the previous
    /// one aside): a run that stops before its first checkpoint removes it again.
    created: bool,
    /// The run completed ([`RunDir::finish_replacing`]).
    finished: bool,
}

impl Drop for RunDir {
    fn drop(&mut self) {
        // Stopped (a signal, an error) before any checkpoint: what it wrote (metrics, events)
        // resumes nothing and would only block the next run; it is removed, and a previous run
        // that --overwrite had moved aside is put back. The lock is still held here.
        if self.created && !self.finished && self.output_dir.is_dir() {
            let resumable = latest_checkpoint(&self.output_dir).is_some();
            let ours = crate::output::foreign_entries(&self.output_dir)
                .map(|f| f.is_empty())
                .unwrap_or(false);
            if !resumable && ours && std::fs::remove_dir_all(&self.output_dir).is_ok() {
                let restored = self
                    .replaced
                    .take()
                    .filter(|old| std::fs::rename(old, &self.output_dir).is_ok());
                tracing::warn!(
                    "this run stopped before its first checkpoint: {} was removed{}",
                    self.output_dir.display(),
                    if restored.is_some() {
                        " and the previous run put back in its place"
                    } else {
                        ""
                    }
                );
                return;
            }
        }
        if let Some(old) = &self.replaced {
            tracing::warn!(
                "this run did not complete: the previous contents of {} are kept in {}",
                self.output_dir.display(),
                old.display()
            );
        }
    }
}

impl RunDir {
    /// Resolves the model and checks `output_dir`: it must not overlap the model being
    /// trained (or the run's base model), nor be inside the checkpoint being resumed; a
    /// non-empty one that does not hold that checkpoint needs `--overwrite` and must not hold
    /// an input of the run. Nothing is written.
    pub fn check(cfg: &TrainConfig, opts: &TrainOptions) -> Result<Self> {
        let output_dir =
            crate::output::absolutize(opts.output_dir.as_ref().unwrap_or(&cfg.output_dir))?;
        // What an interrupted --overwrite left beside output_dir: restored, or named.
        if let Some(parent) = output_dir.parent() {
            let name = output_dir.file_name().unwrap_or_default();
            crate::output::sweep_dead_partials(parent, &name.to_string_lossy());
        }
        let (model_dir, state, resume_note) = model_source(cfg, &output_dir)?;
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
                    "overlaps the model being trained ({}); choose a new directory, e.g. {}-trained",
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
                match latest_checkpoint(&output_dir) {
                    Some(ck) => format!(
                        "is not empty: it holds a previous run with checkpoints (the last written: {}); set resume_from_checkpoint: true to continue it, choose another directory, or pass --overwrite",
                        ck.file_name().unwrap_or_default().to_string_lossy()
                    ),
                    None => "is not empty and holds no checkpoint-N to resume (a run stopped before its first save_steps, or another run's files); choose another directory, or pass --overwrite to replace it".into(),
                }
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
            // --overwrite replaces only a directory of this tool's own files.
            crate::output::check_replaceable(&output_dir)?;
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
        Ok(Self {
            output_dir,
            model_dir,
            state,
            resume_note,
            replace,
            lock: None,
            replaced: None,
            created: false,
            finished: false,
        })
    }

    /// Where the tokenizer comes from: `tokenizer_config` for a fresh run that sets it, else
    /// the model directory.
    pub fn tokenizer_dir(&self, cfg: &TrainConfig) -> Result<PathBuf> {
        Ok(match (&self.state, &cfg.axolotl.tokenizer_config) {
            (None, Some(t)) => {
                crate::hub::resolve_model(t, false, "tokenizer_config", &cfg.axolotl.path)?
            }
            _ => self.model_dir.clone(),
        })
    }

    /// Removes the previous `output_dir` that `--overwrite` moved aside: call once the run
    /// has completed.
    pub fn finish_replacing(&mut self) -> Result<()> {
        self.finished = true;
        if let Some(old) = self.replaced.take() {
            std::fs::remove_dir_all(&old).at(&old)?;
        }
        Ok(())
    }

    /// Creates `output_dir` (first moving aside the directory `--overwrite` replaces) and sweeps
    /// the staging directories of interrupted final saves. Call once everything is validated.
    ///
    /// `output_dir` stays locked ([`crate::output::OutputLock`]) until the run ends: a second
    /// writer into the same directory (another `train`, started at the same time or with
    /// `--overwrite`, or a `convert`), is refused before it writes or deletes anything.
    pub fn create(&mut self) -> Result<()> {
        let lock = crate::output::OutputLock::acquire(&self.output_dir)?;
        self.created = !self.output_dir.is_dir() || self.replace;
        if self.output_dir.is_dir() {
            if self.replace {
                // Kept until this run completes (then removed by `finish_replacing`); a run
                // killed before leaves it for the next run's sweep to restore or name.
                let old = crate::output::old_path(&self.output_dir);
                std::fs::rename(&self.output_dir, &old).at(&self.output_dir)?;
                self.replaced = Some(old);
            }
        }
        std::fs::create_dir_all(&self.output_dir).map_err(|source| Error::OutputNotWritable {
            path: self.output_dir.clone(),
            source,
        })?;
        self.lock = Some(lock);
        crate::output::sweep_dead_partials(&self.output_dir, "final");
        Ok(())
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
pub(super) fn old_checkpoints(dir: &Path, keep: usize) -> Vec<PathBuf> {
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
    latest_checkpoint_why(dir).map(|(p, _)| p)
}

/// The checkpoint `resume_from_checkpoint: true` continues: the `checkpoint-N` whose
/// trainer_state.json was written last, i.e. the newest checkpoint of the run that wrote into
/// `dir` last (a run resumed from an earlier checkpoint writes lower step numbers than the run
/// it branched from, so the highest N is not always it), and a note saying why when that is
/// not also the highest step.
fn latest_checkpoint_why(dir: &Path) -> Option<(PathBuf, Option<String>)> {
    let mut found: Vec<(std::time::SystemTime, usize, PathBuf)> = std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let n: usize = name.strip_prefix("checkpoint-")?.parse().ok()?;
            let written = std::fs::metadata(e.path().join(STATE_FILE))
                .ok()?
                .modified()
                .ok()?;
            Some((written, n, e.path()))
        })
        .collect();
    found.sort();
    let (_, n, path) = found.last()?.clone();
    let (_, top, top_path) = found.iter().max_by_key(|(_, n, _)| *n)?.clone();
    if top == n {
        return Some((path, None));
    }
    let run = |p: &Path| read_state(p).ok().and_then(|s| s.run_id);
    let other_run = match (run(&path), run(&top_path)) {
        (Some(a), Some(b)) => a != b,
        _ => true,
    };
    let why = format!(
        "resume_from_checkpoint: true continues checkpoint-{n}, the checkpoint written last; checkpoint-{top} has a higher step but was written before{}",
        if other_run { ", by another run (this one resumed from an earlier checkpoint)" } else { "" }
    );
    Some((path, Some(why)))
}

/// Resolves where the weights come from: the checkpoint being resumed, else `base_model`.
#[allow(clippy::type_complexity)]
fn model_source(
    cfg: &TrainConfig,
    output_dir: &Path,
) -> Result<(PathBuf, Option<TrainerState>, Option<String>)> {
    match &cfg.resume_from_checkpoint {
        Some(r) => {
            let mut note = None;
            let dir = match r {
                Resume::Path(p) => p.clone(),
                Resume::Latest => {
                    let (dir, why) =
                        latest_checkpoint_why(output_dir).ok_or_else(|| Error::InvalidValue {
                            path: cfg.axolotl.path.clone(),
                            key: "resume_from_checkpoint".into(),
                            value: "true".into(),
                            reason: format!(
                                "no checkpoint-N directory with {STATE_FILE} in {}",
                                output_dir.display()
                            ),
                        })?;
                    note = why;
                    dir
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
            Ok((dir, Some(state), note))
        }
        None => Ok((
            crate::hub::resolve_model(
                &cfg.axolotl.base_model,
                true,
                "base_model",
                &cfg.axolotl.path,
            )?,
            None,
            None,
        )),
    }
}
