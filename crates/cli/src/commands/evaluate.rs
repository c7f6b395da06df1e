//! `evaluate`: eval loss and perplexity on a config's validation split.

use std::path::{Path, PathBuf};

use anyhow::Result;

#[derive(clap::Args)]
pub struct EvaluateArgs {
    /// The axolotl YAML (datasets, val_set_size, seed, sequence_len define the split).
    config: PathBuf,
    /// The model to evaluate (default: the config's base_model), e.g. a training output_dir
    /// or one of its checkpoint-N directories.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Also write the metrics as JSON to this file (a new file, or see --overwrite).
    #[arg(long)]
    json: Option<PathBuf>,
    /// Replace an existing --json file.
    #[arg(long)]
    overwrite: bool,
}

pub fn run(a: &EvaluateArgs) -> Result<()> {
    let cfg = diffattn::train::TrainConfig::from_file_for_evaluation(&a.config)?;
    // The inputs --json must not replace: the config, the datasets, the model evaluated.
    let mut inputs: Vec<&Path> = vec![&a.config];
    inputs.extend(cfg.datasets.iter().map(|d| d.path.as_path()));
    inputs.extend(a.model.as_deref());
    if let Some(p) = &a.json {
        diffattn::output::check_output_file(p, a.overwrite, &inputs)?;
    }
    let (dir, r) = diffattn::train::evaluate(&cfg, a.model.as_deref())?;
    println!("model: {}", dir.display());
    let metrics = r.metrics();
    for (k, v) in &metrics {
        println!("  {k}: {v:.6}");
    }
    if let Some(p) = &a.json {
        inputs.push(&dir);
        let mut text = serde_json::to_string_pretty(&serde_json::json!(metrics))?;
        text.push('\n');
        let written =
            diffattn::output::write_file_safely(p, text.as_bytes(), a.overwrite, &inputs)?;
        println!("wrote {}", written.display());
    }
    Ok(())
}
