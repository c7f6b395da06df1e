//! Numeric comparison of a converted model against its source (the plugin's `--debug`, done
//! with logits): per prompt, max and mean |Δ logit|, mean KL(source ‖ converted), top-1
//! agreement over positions, and greedy continuations of both with and without the KV cache.

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use serde::Serialize;

use crate::error::{Error, Result};
use crate::generate::{generate, Sampling, TextCodec};
use crate::model::Model;
use crate::output::StagedDir;

/// docs/spec.md §7: output-preserving conversion vs source, f32.
pub const PRESERVED_MAX_ABS: f32 = 1e-4;

/// One model's greedy continuation.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Continuation {
    pub ids: Vec<u32>,
    pub text: String,
    /// The same ids came out without the KV cache.
    pub uncached_ids_equal: bool,
    /// Seconds of the cached generation.
    pub seconds: f64,
}

/// Metrics of one prompt.
#[derive(Debug, Clone, Serialize)]
pub struct PromptComparison {
    pub prompt: String,
    pub input_ids: Vec<u32>,
    pub max_abs_logit_diff: f32,
    pub mean_abs_logit_diff: f32,
    pub mean_kl_source_converted: f64,
    pub top1_agreement: f64,
    pub source: Continuation,
    pub converted: Continuation,
    pub generations_match: bool,
    /// NaN or infinite logits of (source, converted) over the prompt's positions.
    pub non_finite_logits: (usize, usize),
    #[serde(skip)]
    pub source_logits: Vec<Vec<f32>>,
    #[serde(skip)]
    pub converted_logits: Vec<Vec<f32>>,
}

impl PromptComparison {
    /// docs/spec.md §7 preservation: max |Δ logit| ≤ 1e-4 and identical greedy generations (cached and
    /// uncached).
    pub fn preserved(&self) -> bool {
        Criterion::MaxAbs(PRESERVED_MAX_ABS).holds(self)
    }
}

/// What `compare --expect-preserved` requires of each prompt (docs/spec.md §7).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub enum Criterion {
    /// Finite logits within this max |Δ| and identical greedy generations (cached and
    /// uncached): f32 weights and compute (1e-4), or `--tolerance`.
    MaxAbs(f32),
    /// Half precision (weights stored or computed in bf16/f16, whose own rounding moves
    /// logits by 1e-2 and more): finite logits, the same top-1 token at every prompt position
    /// and identical greedy generations; max |Δ| is reported, not bounded.
    Greedy,
}

impl Criterion {
    /// The criterion for two model directories computed in `dtype`: `tolerance` when given,
    /// else [`Criterion::Greedy`] when either model stores a weight matrix in bf16/f16 or the
    /// compute dtype is one, else [`Criterion::MaxAbs`] of [`PRESERVED_MAX_ABS`].
    pub fn for_dirs(
        source: &Path,
        converted: &Path,
        dtype: DType,
        tolerance: Option<f32>,
    ) -> Result<Self> {
        if let Some(t) = tolerance {
            return Ok(Criterion::MaxAbs(t));
        }
        let half = |dir: &Path| -> Result<bool> {
            let ck = crate::checkpoint::Checkpoint::open(dir)?;
            let half = ck
                .names()
                .filter_map(|n| ck.info(n))
                .any(|i| i.shape.len() == 2 && i.dtype != crate::dtype::DType::F32);
            Ok(half)
        };
        Ok(
            if dtype != DType::F32 || half(source)? || half(converted)? {
                Criterion::Greedy
            } else {
                Criterion::MaxAbs(PRESERVED_MAX_ABS)
            },
        )
    }

    /// Whether `r` meets the criterion.
    pub fn holds(&self, r: &PromptComparison) -> bool {
        let common = r.non_finite_logits == (0, 0)
            && r.generations_match
            && r.source.uncached_ids_equal
            && r.converted.uncached_ids_equal;
        // NaN compares false: non-finite logits never pass.
        common
            && match self {
                Criterion::MaxAbs(t) => r.max_abs_logit_diff <= *t,
                Criterion::Greedy => r.top1_agreement == 1.0,
            }
    }

    /// The requirement in words.
    pub fn describe(&self) -> String {
        match self {
            Criterion::MaxAbs(t) => format!(
                "finite logits, max |delta logit| <= {t:e} and identical greedy generations"
            ),
            Criterion::Greedy => "half-precision weights or compute: finite logits, the same top-1 token at every prompt position and identical greedy generations (max |delta logit| reported; --tolerance bounds it)".into(),
        }
    }
}

fn log_softmax(row: &[f32]) -> Vec<f64> {
    let max = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
    let lse = row
        .iter()
        .map(|&x| (x as f64 - max).exp())
        .sum::<f64>()
        .ln()
        + max;
    row.iter().map(|&x| x as f64 - lse).collect()
}

/// Logit metrics between two `[seq, vocab]` matrices: (max |Δ|, mean |Δ|, mean KL(a ‖ b),
/// top-1 agreement).
pub fn logit_metrics(a: &[Vec<f32>], b: &[Vec<f32>]) -> (f32, f32, f64, f64) {
    let (mut max, mut sum, mut n, mut kl, mut agree) = (0f32, 0f64, 0usize, 0f64, 0usize);
    for (ra, rb) in a.iter().zip(b) {
        for (x, y) in ra.iter().zip(rb) {
            let d = (x - y).abs();
            // A NaN on either side makes the maximum NaN (f32::max would drop it, and a model
            // whose logits are all NaN would look preserved).
            max = if d.is_nan() || max.is_nan() {
                f32::NAN
            } else {
                max.max(d)
            };
            sum += d as f64;
            n += 1;
        }
        let (la, lb) = (log_softmax(ra), log_softmax(rb));
        kl += la
            .iter()
            .zip(&lb)
            .map(|(p, q)| p.exp() * (p - q))
            .sum::<f64>();
        let am = |r: &[f32]| {
            r.iter()
                .enumerate()
                .fold(0, |best, (i, &v)| if v > r[best] { i } else { best })
        };
        agree += usize::from(am(ra) == am(rb));
    }
    let rows = a.len().max(1) as f64;
    (
        max,
        (sum / n.max(1) as f64) as f32,
        kl / rows,
        agree as f64 / rows,
    )
}

fn continuation(
    model: &Model,
    codec: &TextCodec,
    ids: &[u32],
    max_new: usize,
) -> Result<Continuation> {
    let greedy = Sampling::default();
    let start = Instant::now();
    let cached = generate(
        model,
        ids,
        max_new,
        &greedy,
        &codec.eos_token_ids,
        true,
        &mut |_| {},
    )?;
    let seconds = start.elapsed().as_secs_f64();
    let uncached = generate(
        model,
        ids,
        max_new,
        &greedy,
        &codec.eos_token_ids,
        false,
        &mut |_| {},
    )?;
    Ok(Continuation {
        text: codec.decode(&cached.ids)?,
        uncached_ids_equal: uncached.ids == cached.ids,
        ids: cached.ids,
        seconds,
    })
}

/// One model's side of a comparison, per prompt: logits `[seq, vocab]` and, when they are all
/// finite, its greedy continuation.
struct Side {
    logits: Vec<Vec<f32>>,
    continuation: Option<Continuation>,
}

fn run_side(
    model: &Model,
    codec: &TextCodec,
    prompts: &[Vec<u32>],
    max_new_tokens: usize,
) -> Result<Vec<Side>> {
    prompts
        .iter()
        .map(|ids| {
            crate::interrupt::check()?;
            let t = Tensor::new(ids.as_slice(), &model.device)?.unsqueeze(0)?;
            let logits = model.forward(&t)?.squeeze(0)?.to_vec2::<f32>()?;
            // Non-finite logits leave nothing to generate from (generate refuses them).
            let continuation = if logits.iter().flatten().all(|x| x.is_finite()) {
                Some(continuation(model, codec, ids, max_new_tokens)?)
            } else {
                None
            };
            Ok(Side {
                logits,
                continuation,
            })
        })
        .collect()
}

fn tokenize(codec: &TextCodec, prompts: &[String]) -> Result<Vec<Vec<u32>>> {
    prompts
        .iter()
        .map(|prompt| {
            let ids = codec.encode(prompt)?;
            if ids.is_empty() {
                return Err(Error::InvalidOptions(format!(
                    "prompt {prompt:?} has no tokens"
                )));
            }
            Ok(ids)
        })
        .collect()
}

/// The metrics of each prompt from both sides' runs.
fn combine(
    prompts: &[String],
    ids: Vec<Vec<u32>>,
    source: Vec<Side>,
    converted: Vec<Side>,
) -> Vec<PromptComparison> {
    let mut out = Vec::new();
    for (((prompt, ids), s), c) in prompts.iter().zip(ids).zip(source).zip(converted) {
        let (ls, lc) = (s.logits, c.logits);
        let (max, mean, kl, top1) = logit_metrics(&ls, &lc);
        let non_finite = |l: &[Vec<f32>]| l.iter().flatten().filter(|x| !x.is_finite()).count();
        let non_finite_logits = (non_finite(&ls), non_finite(&lc));
        // No continuation is compared unless both sides' logits are finite; the preservation
        // check then fails on the counts.
        let (s, c, finite) = match (s.continuation, c.continuation) {
            (Some(s), Some(c)) if non_finite_logits == (0, 0) => (s, c, true),
            _ => (Continuation::default(), Continuation::default(), false),
        };
        out.push(PromptComparison {
            prompt: prompt.clone(),
            input_ids: ids,
            max_abs_logit_diff: max,
            mean_abs_logit_diff: mean,
            mean_kl_source_converted: kl,
            top1_agreement: top1,
            generations_match: finite && s.ids == c.ids,
            non_finite_logits,
            source: s,
            converted: c,
            source_logits: ls,
            converted_logits: lc,
        });
    }
    out
}

/// Compares `converted` with `source` on `prompts` (tokenized with the source's tokenizer).
pub fn compare(
    source: &Model,
    converted: &Model,
    codec: &TextCodec,
    prompts: &[String],
    max_new_tokens: usize,
) -> Result<Vec<PromptComparison>> {
    let ids = tokenize(codec, prompts)?;
    let s = run_side(source, codec, &ids, max_new_tokens)?;
    let c = run_side(converted, codec, &ids, max_new_tokens)?;
    Ok(combine(prompts, ids, s, c))
}

/// Loads the source, runs every prompt on it, drops it, then does the same with the
/// converted model (on CPU, computing in `dtype`): the two models are never loaded at once,
/// so a comparison needs the memory of one. Then as [`compare`].
pub fn compare_dirs(
    source_dir: &Path,
    converted_dir: &Path,
    prompts: &[String],
    max_new_tokens: usize,
    dtype: DType,
) -> Result<Vec<PromptComparison>> {
    let dev = Device::Cpu;
    // The source's tokenizer; a converted model carries a copy (useful when the source's
    // tokenizer lives in a separate `tokenizer_config` directory).
    let tok_dir = if source_dir.join("tokenizer.json").is_file() {
        source_dir
    } else {
        converted_dir
    };
    let codec = TextCodec::load(tok_dir)?;
    let ids = tokenize(&codec, prompts)?;
    // Checked from the configs, before either model runs.
    let vocab = |dir: &Path| -> Result<usize> {
        Ok(
            crate::config::ModelConfig::from_file(&dir.join("config.json"))?
                .typed
                .vocab_size,
        )
    };
    let (source_vocab, converted_vocab) = (vocab(source_dir)?, vocab(converted_dir)?);
    if source_vocab != converted_vocab {
        return Err(Error::InvalidOptions(format!(
            "vocabularies differ: {} has {}, {} has {}",
            source_dir.display(),
            source_vocab,
            converted_dir.display(),
            converted_vocab
        )));
    }
    // The larger of the two models' needs (they run one after the other) plus the logits
    // both sides keep.
    let longest = ids.iter().map(Vec::len).max().unwrap_or(0) + max_new_tokens;
    let positions: usize = ids.iter().map(Vec::len).sum();
    let estimates = [source_dir, converted_dir]
        .iter()
        .map(|dir| {
            let shape = crate::memory::ModelShape::read(dir)?;
            let (l, v) = (longest as u64, shape.vocab_size);
            let mut e = shape.inference(crate::memory::dtype_of(dtype), 1, l, 0, l);
            e.add(
                "logits kept for the comparison",
                2 * 4 * positions as u64 * v,
            );
            Ok(e)
        })
        .collect::<Result<Vec<_>>>()?;
    estimates
        .into_iter()
        .max_by_key(crate::memory::Estimate::total)
        .expect("two estimates")
        .check("compare")?;
    let s = {
        let source = Model::load(source_dir, dtype, &dev)?;
        run_side(&source, &codec, &ids, max_new_tokens)?
    };
    let converted = Model::load(converted_dir, dtype, &dev)?;
    let c = run_side(&converted, &codec, &ids, max_new_tokens)?;
    Ok(combine(prompts, ids, s, c))
}

/// Writes, per prompt i, `prompt{i}_input_ids.npy` (u32 `[seq]`),
/// `prompt{i}_source_logits.npy` and `prompt{i}_converted_logits.npy` (f32 `[seq, vocab]`),
/// and `manifest.json` listing them with the prompts, into `staged` (see
/// [`StagedDir::create`]: refused inside an input, or over a non-empty directory without
/// `--overwrite`), then moves it into place.
pub fn save_logits(staged: StagedDir, results: &[PromptComparison]) -> Result<PathBuf> {
    let dir = staged.path();
    let mut entries = Vec::new();
    for (i, r) in results.iter().enumerate() {
        let ids = format!("prompt{i}_input_ids.npy");
        let src = format!("prompt{i}_source_logits.npy");
        let conv = format!("prompt{i}_converted_logits.npy");
        let dev = Device::Cpu;
        Tensor::new(r.input_ids.as_slice(), &dev)?.write_npy(dir.join(&ids))?;
        let rows = |m: &[Vec<f32>]| -> Result<Tensor> {
            let v = m.len();
            Ok(Tensor::from_vec(
                m.concat(),
                (v, m.first().map(Vec::len).unwrap_or(0)),
                &dev,
            )?)
        };
        rows(&r.source_logits)?.write_npy(dir.join(&src))?;
        rows(&r.converted_logits)?.write_npy(dir.join(&conv))?;
        entries.push(serde_json::json!({
            "prompt": r.prompt, "input_ids": ids, "source_logits": src, "converted_logits": conv,
            "max_abs_logit_diff": r.max_abs_logit_diff,
        }));
    }
    crate::config::write_json(
        &dir.join("manifest.json"),
        &serde_json::json!({ "prompts": entries }),
    )?;
    staged.commit()
}
