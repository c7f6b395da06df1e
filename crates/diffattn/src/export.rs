//! Exact conversion between the two differential formats (docs/formats.md §2):
//! format A (`llama-differential`, the axolotl plugin) and format B (`diffllama`,
//! transformers' native `DiffLlamaForCausalLM`).
//!
//! A -> B folds the affine sub-layer norm weight and the `(1 - lambda_init)` factor that A
//! lacks into `o_proj` columns (`o'[:, 2d·j + c] = o[:, 2d·j + c] · w[c] / (1 - lambda_init)`),
//! and absorbs a stored `lambda_init` that differs from the formula into `lambda_q2`/`lambda_k2`
//! (`<lq2', lk2'> = ln(exp(<lq2, lk2>) + lambda_init_B - lambda_init_A)`). Double heads become
//! `2H` heads and `2Hkv` KV heads with `v_proj` rows duplicated (each 2d value head is `[a; a]`,
//! so the RMS norm over 2d equals the RMS norm over d) and each `o_proj` block split into two
//! halves carrying `W_o,j · diag(w) / (2 (1 - lambda_init))`. A model without a sub-layer norm is
//! refused: format B's norm has no off switch.
//!
//! B -> A is split heads with `subln.weight = 1 - lambda_init(l)` and `lambda_init` stored.

use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use crate::config::{self, lambda_init, write_json};
use crate::convert::{copy_side_files, Producer, Recipe, Source};
use crate::error::{Error, Result};
use crate::output::{write_safetensors, PlannedTensor, StagedDir};

/// The two differential checkpoint formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// `llama-differential` (format A, docs/formats.md §1).
    LlamaDifferential,
    /// `diffllama` (format B, docs/formats.md §2).
    DiffLlama,
}

impl Format {
    /// Parses `llama-differential` or `diffllama`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "llama-differential" => Some(Self::LlamaDifferential),
            "diffllama" => Some(Self::DiffLlama),
            _ => None,
        }
    }
}

/// What an export wrote.
#[derive(Debug)]
pub struct ExportReport {
    pub output_dir: PathBuf,
    pub files: Vec<String>,
    /// Non-fatal remarks (e.g. a target current transformers would reject).
    pub warnings: Vec<String>,
}

fn refuse(src: &Source, msg: String) -> Error {
    Error::InvalidOptions(format!("{}: {msg}", src.model_dir.display()))
}

/// Lambda vectors `(q1, k1, q2, k2)` with `lambda_init_from` replaced by `lambda_init_to`:
/// `exp(<q2', k2'>) = exp(<q2, k2>) + to - from`, or, when that is not positive,
/// `exp(<q1', k1'>) = exp(<q1, k1>) - (to - from)`. Exact in real arithmetic.
pub fn absorb_lambda_init(
    v: [Vec<f32>; 4],
    from: f64,
    to: f64,
) -> std::result::Result<[Vec<f32>; 4], String> {
    let [q1, k1, q2, k2] = v;
    let delta = to - from;
    // A stored lambda_init is the formula rounded to f32: equal at storage precision means
    // nothing to absorb (and the vectors stay bit-identical).
    if from as f32 == to as f32 {
        return Ok([q1, k1, q2, k2]);
    }
    let dot = |a: &[f32], b: &[f32]| {
        a.iter()
            .zip(b)
            .map(|(x, y)| *x as f64 * *y as f64)
            .sum::<f64>()
    };
    // Returns (a', b') with <a', b'> = target, changing b along a (or setting both when a = 0).
    let retarget = |a: Vec<f32>, b: Vec<f32>, target: f64| -> (Vec<f32>, Vec<f32>) {
        let n2 = dot(&a, &a);
        if n2 > 1e-12 {
            let c = (target - dot(&a, &b)) / n2;
            let b2 = b
                .iter()
                .zip(&a)
                .map(|(x, y)| (*x as f64 + c * *y as f64) as f32)
                .collect();
            (a, b2)
        } else {
            let d = a.len() as f64;
            let s = (target.abs() / d).sqrt();
            let a2 = vec![s as f32; a.len()];
            let b2 = vec![(s * target.signum()) as f32; a.len()];
            (a2, b2)
        }
    };
    let e2 = dot(&q2, &k2).exp() + delta;
    if e2 > 0.0 {
        let (q2, k2) = retarget(q2, k2, e2.ln());
        return Ok([q1, k1, q2, k2]);
    }
    let e1 = dot(&q1, &k1).exp() - delta;
    if e1 > 0.0 {
        let (q1, k1) = retarget(q1, k1, e1.ln());
        return Ok([q1, k1, q2, k2]);
    }
    Err(format!(
        "lambda_init {from} cannot be absorbed into the lambda vectors for {to}"
    ))
}

/// Converts the differential checkpoint `src_dir` to `to` in `dst_dir` (staged, atomic).
pub fn export(
    src_dir: &Path,
    dst_dir: &Path,
    to: Format,
    overwrite: bool,
    on_tensor: &dyn Fn(&str),
) -> Result<ExportReport> {
    let src = Source::from_dir(src_dir)?;
    let cfg = &src.config;
    let from = match cfg.format {
        config::Format::LlamaDifferential => Format::LlamaDifferential,
        config::Format::DiffLlama => Format::DiffLlama,
        config::Format::FamilyDifferential => {
            return Err(refuse(
                &src,
                format!(
                    "a {} checkpoint ({}) cannot be exported: format A and diffllama are Llama configs, which cannot express a {} block ({})",
                    cfg.family.differential_model_type(),
                    cfg.family.differential_class(),
                    cfg.family.class,
                    crate::format::why_not_llama(cfg).unwrap_or_else(|| "its own block".into()),
                ),
            ))
        }
        config::Format::Source => {
            return Err(refuse(
                &src,
                "not a differential model (architectures must be LlamaDifferentialForCausalLM or DiffLlamaForCausalLM); convert it first".into(),
            ))
        }
    };
    if from == to {
        return Err(refuse(&src, format!("already in the {to:?} format")));
    }
    if cfg.diff_attn_variant()? == config::Variant::V2 {
        return Err(refuse(
            &src,
            "a Differential Transformer V2 checkpoint (diff_attn_variant \"v2\") cannot be exported: diffllama's attention is V1 (two softmax maps per head, one lambda per layer), which cannot express V2's per-token gate".into(),
        ));
    }
    let dims = cfg.dims()?;
    let (h, hkv, d, dm) = (
        dims.num_attention_heads,
        dims.num_key_value_heads,
        dims.head_dim,
        dims.hidden_size,
    );
    let ck = &src.checkpoint;
    let out_dtype = ck.require("model.embed_tokens.weight")?.dtype;
    let flag = |k: &str, default: bool| cfg.flag(k, default);
    let split = from == Format::DiffLlama || flag("split_heads", false)?;
    let mut warnings = Vec::new();
    let mut tensors: Vec<(PlannedTensor, Recipe)> = Vec::new();
    let mut push = |name: String, shape: Vec<usize>, r: Recipe| {
        tensors.push((
            PlannedTensor {
                name,
                dtype: out_dtype,
                shape,
            },
            r,
        ));
    };
    let mut config = cfg.raw.clone();
    // Tensors the mapping rewrites; every other tensor is copied as it is.
    let rewritten = |n: &str| -> bool {
        let Some(rest) = n.split(".self_attn.").nth(1) else {
            return false;
        };
        rest.starts_with("lambda_")
            || rest.starts_with("subln.")
            || (to == Format::DiffLlama
                && (rest == "o_proj.weight" || (!split && rest.starts_with("v_proj."))))
    };
    for name in ck.names().filter(|n| !rewritten(n)) {
        let info = ck.require(name)?;
        push(
            name.to_string(),
            info.shape.clone(),
            Recipe::Copy(name.to_string()),
        );
    }
    for l in 0..dims.num_hidden_layers {
        let a = format!("model.layers.{l}.self_attn.");
        let names = ["lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2"];
        let lam: Vec<Vec<f32>> = names
            .iter()
            .map(|n| ck.to_f32(&format!("{a}{n}")))
            .collect::<Result<_>>()?;
        let mut lam: [Vec<f32>; 4] = lam.try_into().expect("four vectors");
        let formula = lambda_init(l);
        match to {
            Format::DiffLlama => {
                if !flag("sublayer_norm", true)? {
                    return Err(refuse(&src, "a model without a sub-layer norm cannot be expressed in the diffllama format: its RMS norm has no off switch".into()));
                }
                let stored = ck.to_f32(&format!("{a}lambda_init"))?[0] as f64;
                let w = ck.to_f32(&format!("{a}subln.weight"))?;
                lam = absorb_lambda_init(lam, stored, formula)
                    .map_err(|e| refuse(&src, format!("layer {l}: {e}")))?;
                let scale = 1.0 / (1.0 - formula);
                let o = format!("{a}o_proj.weight");
                if split {
                    // Column c of head j (width 2d) scaled by w[c] / (1 - lambda_init).
                    let map = (0..h * d)
                        .map(|c| (c, (w[c % (2 * d)] as f64 * scale) as f32))
                        .collect();
                    push(
                        o.clone(),
                        vec![dm, h * d],
                        Recipe::MapColumns { src: o, map },
                    );
                } else {
                    for sfx in ["weight", "bias"] {
                        let n = format!("{a}v_proj.{sfx}");
                        if let Some(info) = ck.info(&n) {
                            let mut shape = info.shape.clone();
                            shape[0] *= 2;
                            push(n.clone(), shape, Recipe::RepeatRows(n));
                        }
                    }
                    // New head j (width 2d) = [old block j · w / 2s ; old block j · w / 2s].
                    let map = (0..2 * h * d)
                        .map(|c| {
                            let (j, r) = (c / (2 * d), c % d);
                            (j * d + r, (w[r] as f64 * scale / 2.0) as f32)
                        })
                        .collect();
                    push(
                        o.clone(),
                        vec![dm, 2 * h * d],
                        Recipe::MapColumns { src: o, map },
                    );
                }
            }
            Format::LlamaDifferential => {
                push(
                    format!("{a}lambda_init"),
                    vec![],
                    Recipe::Values(vec![formula as f32]),
                );
                push(
                    format!("{a}subln.weight"),
                    vec![2 * d],
                    Recipe::Values(vec![(1.0 - formula) as f32; 2 * d]),
                );
            }
        }
        for (n, v) in names.iter().zip(lam) {
            push(format!("{a}{n}"), vec![d], Recipe::Values(v));
        }
    }
    tensors.sort_by(|x, y| x.0.name.cmp(&y.0.name));
    match to {
        Format::DiffLlama => {
            for k in [
                "split_heads",
                "sublayer_norm",
                "zero_init",
                "mirror_weights",
            ] {
                config.shift_remove(k);
            }
            config.insert("architectures".into(), json!(["DiffLlamaForCausalLM"]));
            config.insert("model_type".into(), json!("diffllama"));
            config.insert("head_dim".into(), json!(d));
            config.insert("lambda_std_dev".into(), json!(0.1));
            if !split {
                config.insert("num_attention_heads".into(), json!(2 * h));
                config.insert("num_key_value_heads".into(), json!(2 * hkv));
            }
            let kv = if split { hkv } else { 2 * hkv };
            if kv % 2 != 0 {
                warnings.push(format!(
                    "num_key_value_heads = {kv} is odd: current transformers rejects DiffLlama models whose key/value heads cannot be split in halves"
                ));
            }
        }
        Format::LlamaDifferential => {
            config.insert(
                "architectures".into(),
                json!(["LlamaDifferentialForCausalLM"]),
            );
            config.insert("model_type".into(), json!("llama-differential"));
            config.insert("head_dim".into(), json!(d));
            config.insert("split_heads".into(), json!(true));
            config.insert("sublayer_norm".into(), json!(true));
            config.insert("zero_init".into(), json!(false));
            config.insert("mirror_weights".into(), json!(false));
        }
    }
    let staged = StagedDir::create(dst_dir, overwrite, &[src_dir])?;
    let producer = Producer {
        ck,
        tensors: &tensors,
        out_dtype,
        seed: 0,
        on_tensor,
    };
    let mut files = write_safetensors(
        staged.path(),
        tensors.iter().map(|(t, _)| t.clone()).collect(),
        u64::MAX,
        &producer,
    )?;
    files.extend(crate::remote_code::attach(staged.path(), &mut config)?);
    write_json(&staged.path().join("config.json"), &Value::Object(config))?;
    files.push("config.json".into());
    files.extend(copy_side_files(&src, staged.path())?);
    let src_yml = src_dir.join("axolotl_config.yml");
    if src_yml.is_file() {
        let text = std::fs::read_to_string(&src_yml).map_err(|e| Error::Io {
            path: src_yml.clone(),
            source: e,
        })?;
        let edited = crate::axolotl::converted_config_text(
            &text,
            &staged.dest().to_string_lossy(),
            to == Format::LlamaDifferential,
        )?;
        let edited = if to == Format::DiffLlama {
            crate::axolotl::without_plugin(&edited)?
        } else {
            edited
        };
        std::fs::write(staged.path().join("axolotl_config.yml"), edited).map_err(|e| {
            Error::Io {
                path: staged.path().join("axolotl_config.yml"),
                source: e,
            }
        })?;
        files.push("axolotl_config.yml".into());
    }
    let output_dir = staged.commit()?;
    Ok(ExportReport {
        output_dir,
        files,
        warnings,
    })
}
