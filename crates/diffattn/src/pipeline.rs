//! The steps of `convert` after planning: conversion straight into the planned format (format
//! A or the family's own, what [`crate::convert`] writes) or into format B, `diffllama` (format
//! A exported exactly by [`crate::export`]; refused for sources only a family format
//! expresses), and the figures of the checkpoint written.

use std::path::Path;

use crate::axolotl::AxolotlConfig;
use crate::checkpoint::Checkpoint;
use crate::config::ModelConfig;
use crate::convert::{self, Plan, Source};
use crate::error::{Error, Result};
use crate::export::{self, ExportReport, Format};
use crate::format::Target;

/// Refuses `--format diffllama` for a source that only its family's format expresses (a
/// Llama config, which diffllama is, would be read with another block), naming why.
pub fn check_format(src: &Source, plan: &Plan, format: Format) -> Result<()> {
    if format == Format::DiffLlama && plan.options.layout == crate::convert::Layout::V2 {
        return Err(Error::InvalidOptions(
            "--format diffllama cannot express --variant v2: diffllama's attention is V1 split heads (two softmax maps per head, one lambda per layer); without --format it is written as a differential checkpoint with diff_attn_variant: \"v2\"".into(),
        ));
    }
    if format == Format::DiffLlama && plan.target == Target::Family {
        let (model_type, _) = plan.format_names();
        return Err(Error::InvalidOptions(format!(
            "--format diffllama cannot express {} ({}): diffllama is a Llama config, and a Llama config cannot express {}; without --format it is written as {model_type}",
            src.model_dir.display(),
            plan.family.class,
            plan.not_llama.as_deref().unwrap_or("this family's block"),
        )));
    }
    Ok(())
}

/// Runs the planned conversion of `src` into `output_dir` in `format`. Format A is written
/// directly; `diffllama` is written as format A into a hidden scratch directory beside the
/// destination (removed afterwards, whatever happens), then exported exactly into place.
/// `on_tensor` is called after each format-A tensor is written; the report's `warnings` are
/// the conversion's (format A) or the export's (diffllama).
pub fn convert_to(
    src: &Source,
    plan: &Plan,
    output_dir: &Path,
    axolotl: Option<&AxolotlConfig>,
    format: Format,
    on_tensor: &dyn Fn(&str),
) -> Result<ExportReport> {
    check_format(src, plan, format)?;
    if format == Format::LlamaDifferential {
        let r = convert::execute(src, plan, output_dir, axolotl, on_tensor)?;
        return Ok(ExportReport {
            output_dir: r.output_dir,
            files: r.files,
            warnings: r.warnings,
        });
    }
    let dest = crate::output::absolutize(output_dir)?;
    let scratch = dest.with_file_name(format!(
        ".{}.format-a-{}",
        dest.file_name().unwrap_or_default().to_string_lossy(),
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&scratch);
    let mut opts_a = plan.options.clone();
    opts_a.overwrite = true;
    let plan_a = convert::plan(src, &opts_a)?;
    let res = convert::execute(src, &plan_a, &scratch, axolotl, on_tensor).and_then(|_| {
        export::export(
            &scratch,
            output_dir,
            Format::DiffLlama,
            plan.options.overwrite,
            &|_| {},
        )
    });
    let _ = std::fs::remove_dir_all(&scratch);
    res
}

/// Heads, parameters and KV-cache bytes per token of a written checkpoint.
#[derive(Debug, Clone)]
pub struct CheckpointSizes {
    /// config.json's `model_type`, when present.
    pub model_type: Option<String>,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub parameters: u64,
    /// Keys and values of every layer for one token, in the checkpoint's dtype.
    pub kv_cache_bytes_per_token: u64,
}

impl CheckpointSizes {
    /// Reads config.json and the safetensors headers of `dir`.
    pub fn of(dir: &Path) -> Result<Self> {
        let cfg = ModelConfig::from_file(&dir.join("config.json"))?;
        let dims = cfg.dims()?;
        let ck = Checkpoint::open(dir)?;
        let mut params = 0u64;
        let mut es = 4u64;
        for n in ck.names() {
            let info = ck.require(n)?;
            params += info.numel() as u64;
            es = info.dtype.size() as u64;
        }
        let kv = dims.num_hidden_layers as u64
            * 2
            * (dims.num_key_value_heads * dims.head_dim) as u64
            * es;
        Ok(Self {
            model_type: cfg.typed.model_type.clone(),
            num_attention_heads: dims.num_attention_heads,
            num_key_value_heads: dims.num_key_value_heads,
            head_dim: dims.head_dim,
            parameters: params,
            kv_cache_bytes_per_token: kv,
        })
    }
}
