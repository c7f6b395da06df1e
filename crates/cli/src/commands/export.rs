//! `export`: a differential checkpoint converted exactly between the two formats.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Result;

use crate::args::FormatArg;

#[derive(clap::Args)]
pub struct ExportArgs {
    /// Target format: diffllama or llama-differential.
    #[arg(long, hide_possible_values = true)]
    to: FormatArg,
    /// The differential model directory to read.
    src: PathBuf,
    /// The directory to write (must not exist or be empty, unless --overwrite).
    dst: PathBuf,
    /// Replace a non-empty destination: only one holding nothing but files this tool writes;
    /// any other file is named and nothing is deleted.
    #[arg(long)]
    overwrite: bool,
}

pub fn run(a: &ExportArgs) -> Result<()> {
    let start = Instant::now();
    let r = diffattn::export::export(&a.src, &a.dst, a.to.into(), a.overwrite, &|_| {})?;
    print_warnings_and_sizes(&r)?;
    println!(
        "wrote {} ({}) in {:.2} s",
        r.output_dir.display(),
        r.files.join(", "),
        start.elapsed().as_secs_f64()
    );
    Ok(())
}

/// The export's warnings (stderr), then the written checkpoint's sizes.
pub(crate) fn print_warnings_and_sizes(r: &diffattn::export::ExportReport) -> Result<()> {
    for w in &r.warnings {
        eprintln!("warning: {w}");
    }
    print_written_sizes(&r.output_dir)
}

/// Heads, parameters and KV-cache bytes per token of a written checkpoint.
fn print_written_sizes(dir: &Path) -> Result<()> {
    let s = diffattn::pipeline::CheckpointSizes::of(dir)?;
    println!(
        "written as {}: heads {}, KV heads {}, head_dim {}, parameters {}, KV-cache bytes per token {}",
        s.model_type.as_deref().unwrap_or("?"),
        s.num_attention_heads,
        s.num_key_value_heads,
        s.head_dim,
        s.parameters,
        s.kv_cache_bytes_per_token
    );
    Ok(())
}
