//! Training data: local `.json` / `.jsonl` datasets of axolotl's `alpaca` and `completion`
//! types, tokenised into `(input_ids, labels)` samples, split into train / validation sets
//! and cut into micro-batches.
//!
//! Conventions (axolotl's, where it has one):
//! - `alpaca`: the standard Alpaca prompt (Taori et al., 2023, `prompt.txt` of
//!   tatsu-lab/stanford_alpaca) followed by `output` and the EOS token. Labels are -100 over the
//!   prompt unless `train_on_inputs: true`. Samples longer than `sequence_len` are dropped (as
//!   axolotl's `drop_long_seq`) and counted.
//! - `completion`: the text of `field` (default `text`) plus EOS, cut into consecutive windows of
//!   `sequence_len` tokens (axolotl's completion strategy splits long texts the same way);
//!   every token is a label.
//! - Samples without any label are dropped.

use std::path::{Path, PathBuf};

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_xoshiro::Xoshiro256PlusPlus;
use serde_json::Value;

use crate::error::{Error, IoContext, Result};
use crate::generate::TextCodec;

/// Label value excluded from the loss (PyTorch's `ignore_index`).
pub const IGNORE: i64 = -100;

/// `datasets[i].type`.
#[derive(Debug, Clone, PartialEq)]
pub enum DatasetType {
    /// instruction / input / output records.
    Alpaca,
    /// plain text in `field` (default `text`).
    Completion { field: String },
}

/// One entry of `datasets`.
#[derive(Debug, Clone)]
pub struct DatasetSpec {
    /// A `.json` / `.jsonl` file or a directory of them (read in name order).
    pub path: PathBuf,
    pub kind: DatasetType,
}

/// A tokenised sample: `labels[i]` is the target of position i's *input* token (HF's
/// convention: the loss shifts, `labels[i+1]` is predicted from positions `..=i`).
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub input_ids: Vec<u32>,
    pub labels: Vec<i64>,
}

impl Sample {
    /// Number of positions that contribute to the loss (shifted labels != -100).
    pub fn n_targets(&self) -> usize {
        self.labels.iter().skip(1).filter(|&&l| l != IGNORE).count()
    }
}

/// Text before the response of an Alpaca record with a non-empty `input`.
const ALPACA_WITH_INPUT: &str = "Below is an instruction that describes a task, paired with an input that provides further context. Write a response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n";
/// Same, without `input`.
const ALPACA_NO_INPUT: &str = "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n";

/// The Alpaca prompt for `instruction` and `input` (empty input: the shorter template).
pub fn alpaca_prompt(instruction: &str, input: &str) -> String {
    if input.trim().is_empty() {
        ALPACA_NO_INPUT.replace("{instruction}", instruction)
    } else {
        ALPACA_WITH_INPUT
            .replace("{instruction}", instruction)
            .replace("{input}", input)
    }
}

/// The JSON records of `path` (a file or a directory of `.json`/`.jsonl` files), each with
/// its file and line (1-based; 0 for records of a JSON array).
pub fn read_records(path: &Path) -> Result<Vec<(PathBuf, usize, Value)>> {
    let files: Vec<PathBuf> = if path.is_dir() {
        let mut f: Vec<PathBuf> = std::fs::read_dir(path)
            .at(path)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.is_file()
                    && matches!(
                        p.extension().and_then(|e| e.to_str()),
                        Some("json") | Some("jsonl")
                    )
            })
            .collect();
        f.sort();
        if f.is_empty() {
            return Err(Error::Dataset {
                path: path.to_path_buf(),
                msg: "the directory holds no .json or .jsonl file".into(),
            });
        }
        f
    } else if path.is_file() {
        vec![path.to_path_buf()]
    } else {
        return Err(Error::Dataset {
            path: path.to_path_buf(),
            msg: "no such local file or directory (datasets from the Hugging Face hub are not \
                  supported: download it and point `path` to the .json/.jsonl file)"
                .into(),
        });
    };
    let mut out = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file).at(&file)?;
        let trimmed = text.trim_start();
        if trimmed.starts_with('[') {
            let v: Value = serde_json::from_str(&text).map_err(|source| Error::Json {
                path: file.clone(),
                source,
            })?;
            for r in v.as_array().into_iter().flatten() {
                out.push((file.clone(), 0, r.clone()));
            }
        } else {
            for (i, line) in text.lines().enumerate() {
                if line.trim().is_empty() {
                    continue;
                }
                let v: Value = serde_json::from_str(line).map_err(|e| Error::Dataset {
                    path: file.clone(),
                    msg: format!("line {}: not valid JSON: {e}", i + 1),
                })?;
                out.push((file.clone(), i + 1, v));
            }
        }
    }
    Ok(out)
}

/// What tokenisation kept and dropped.
#[derive(Debug, Clone, Default)]
pub struct DatasetStats {
    pub records: usize,
    pub samples: usize,
    /// Alpaca samples longer than `sequence_len`.
    pub dropped_too_long: usize,
    /// Samples without a single label.
    pub dropped_no_labels: usize,
}

fn field<'a>(
    rec: &'a Value,
    file: &Path,
    line: usize,
    key: &str,
    required: bool,
) -> Result<&'a str> {
    match rec.get(key) {
        Some(Value::String(s)) => Ok(s),
        None | Some(Value::Null) if !required => Ok(""),
        other => Err(Error::Dataset {
            path: file.to_path_buf(),
            msg: format!(
                "{}field `{key}`: expected a string, found {}",
                if line > 0 {
                    format!("line {line}: ")
                } else {
                    String::new()
                },
                other
                    .map(|v| v.to_string())
                    .unwrap_or_else(|| "nothing".into())
            ),
        }),
    }
}

/// Tokenises every dataset. `eos` is appended to each response / text.
pub fn tokenize(
    specs: &[DatasetSpec],
    codec: &TextCodec,
    eos: u32,
    sequence_len: usize,
    train_on_inputs: bool,
) -> Result<(Vec<Sample>, DatasetStats)> {
    let mut samples = Vec::new();
    let mut stats = DatasetStats::default();
    let enc = |s: &str, special: bool| -> Result<Vec<u32>> {
        Ok(codec
            .tokenizer
            .encode(s, special)
            .map_err(|e| Error::Tokenizer(e.to_string()))?
            .get_ids()
            .to_vec())
    };
    for spec in specs {
        for (file, line, rec) in read_records(&spec.path)? {
            stats.records += 1;
            let mut push = |ids: Vec<u32>, labels: Vec<i64>| {
                let s = Sample {
                    input_ids: ids,
                    labels,
                };
                if s.n_targets() == 0 {
                    stats.dropped_no_labels += 1;
                } else {
                    samples.push(s);
                }
            };
            match &spec.kind {
                DatasetType::Alpaca => {
                    let instruction = field(&rec, &file, line, "instruction", true)?;
                    let input = field(&rec, &file, line, "input", false)?;
                    let output = field(&rec, &file, line, "output", true)?;
                    let prompt = alpaca_prompt(instruction, input);
                    let prompt_ids = enc(&prompt, true)?;
                    let mut ids = enc(&format!("{prompt}{output}"), true)?;
                    ids.push(eos);
                    if ids.len() > sequence_len {
                        stats.dropped_too_long += 1;
                        continue;
                    }
                    let n_prompt = prompt_ids.len().min(ids.len());
                    let labels = ids
                        .iter()
                        .enumerate()
                        .map(|(i, &t)| {
                            if i < n_prompt && !train_on_inputs {
                                IGNORE
                            } else {
                                t as i64
                            }
                        })
                        .collect();
                    push(ids, labels);
                }
                DatasetType::Completion { field: f } => {
                    let text = field(&rec, &file, line, f, true)?;
                    let mut ids = enc(text, true)?;
                    ids.push(eos);
                    for chunk in ids.chunks(sequence_len) {
                        push(chunk.to_vec(), chunk.iter().map(|&t| t as i64).collect());
                    }
                }
            }
        }
    }
    stats.samples = samples.len();
    Ok((samples, stats))
}

/// `val_set_size`: a fraction of the samples (0 < x < 1) or a count.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ValSetSize {
    Fraction(f64),
    Count(usize),
}

impl ValSetSize {
    /// Number of validation samples out of `n` (a fraction rounds up, as `datasets`'
    /// `train_test_split`).
    pub fn count(self, n: usize) -> usize {
        match self {
            ValSetSize::Fraction(f) => ((f * n as f64).ceil() as usize).min(n),
            ValSetSize::Count(c) => c.min(n),
        }
    }
}

/// Shuffles the sample indices with `seed` and returns (train, validation) with `n_val`
/// validation samples.
pub fn split(samples: Vec<Sample>, n_val: usize, seed: u64) -> (Vec<Sample>, Vec<Sample>) {
    let mut idx: Vec<usize> = (0..samples.len()).collect();
    idx.shuffle(&mut Xoshiro256PlusPlus::seed_from_u64(seed));
    let mut slots: Vec<Option<Sample>> = samples.into_iter().map(Some).collect();
    let mut val = Vec::with_capacity(n_val);
    let mut train = Vec::with_capacity(slots.len() - n_val.min(slots.len()));
    for (k, i) in idx.into_iter().enumerate() {
        let s = slots[i].take().expect("each index once");
        if k < n_val {
            val.push(s);
        } else {
            train.push(s);
        }
    }
    (train, val)
}

/// The order of the training samples in `epoch`: a permutation seeded by `(seed, epoch)`, so
/// that any step's micro-batches can be recomputed (resume needs no data state).
pub fn epoch_order(n: usize, seed: u64, epoch: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..n).collect();
    let mix = seed ^ (epoch as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    idx.shuffle(&mut Xoshiro256PlusPlus::seed_from_u64(mix));
    idx
}

/// A padded micro-batch: `input_ids` `[b, s]`, `labels` `[b, s]` already shifted (`labels[i]`
/// is the target of position i, -100 where none), right padding with `pad_id`.
#[derive(Debug, Clone)]
pub struct Batch {
    pub input_ids: Vec<u32>,
    pub labels: Vec<i64>,
    pub batch: usize,
    pub seq: usize,
    /// Positions with a target.
    pub n_targets: usize,
    /// Input tokens, padding excluded.
    pub n_tokens: usize,
}

/// Pads `samples` to their longest length and shifts the labels.
pub fn collate(samples: &[&Sample], pad_id: u32) -> Batch {
    let seq = samples.iter().map(|s| s.input_ids.len()).max().unwrap_or(0);
    let mut input_ids = Vec::with_capacity(samples.len() * seq);
    let mut labels = Vec::with_capacity(samples.len() * seq);
    for s in samples {
        let n = s.input_ids.len();
        input_ids.extend_from_slice(&s.input_ids);
        input_ids.extend(std::iter::repeat_n(pad_id, seq - n));
        labels.extend_from_slice(&s.labels[1..]);
        labels.extend(std::iter::repeat_n(IGNORE, seq - n + 1));
    }
    let n_targets = labels.iter().filter(|&&l| l != IGNORE).count();
    Batch {
        input_ids,
        labels,
        batch: samples.len(),
        seq,
        n_targets,
        n_tokens: samples.iter().map(|s| s.input_ids.len()).sum(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_is_seeded_and_disjoint() {
        let samples: Vec<Sample> = (0..10)
            .map(|i| Sample {
                input_ids: vec![i, i + 1],
                labels: vec![i as i64, i as i64 + 1],
            })
            .collect();
        let (t1, v1) = split(samples.clone(), 3, 7);
        let (t2, v2) = split(samples.clone(), 3, 7);
        let (_, v3) = split(samples, 3, 8);
        assert_eq!((t1.len(), v1.len()), (7, 3));
        assert_eq!(v1, v2);
        assert_eq!(t1, t2);
        assert_ne!(v1, v3);
        let mut all: Vec<u32> = t1.iter().chain(&v1).map(|s| s.input_ids[0]).collect();
        all.sort();
        assert_eq!(all, (0..10).collect::<Vec<_>>());
        assert_eq!(ValSetSize::Fraction(0.25).count(10), 3);
        assert_eq!(ValSetSize::Count(4).count(10), 4);
    }

    #[test]
    fn collate_shifts_and_pads() {
        let a = Sample {
            input_ids: vec![5, 6, 7],
            labels: vec![IGNORE, 6, 7],
        };
        let b = Sample {
            input_ids: vec![8, 9],
            labels: vec![8, 9],
        };
        let batch = collate(&[&a, &b], 0);
        assert_eq!(batch.input_ids, vec![5, 6, 7, 8, 9, 0]);
        assert_eq!(batch.labels, vec![6, 7, IGNORE, 9, IGNORE, IGNORE]);
        assert_eq!(batch.n_targets, 3);
        assert_eq!(a.n_targets() + b.n_targets(), 3);
    }
}
