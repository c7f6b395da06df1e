//! `plot`: a training run's metrics as a PNG.

use std::path::PathBuf;

use anyhow::Result;

#[derive(clap::Args)]
pub struct PlotArgs {
    /// The run's output_dir (holding metrics.jsonl).
    run_dir: PathBuf,
    /// The PNG to write (default: RUN_DIR/plot.png).
    #[arg(short, long)]
    output: Option<PathBuf>,
}

pub fn run(a: &PlotArgs) -> Result<()> {
    let out = a
        .output
        .clone()
        .unwrap_or_else(|| a.run_dir.join("plot.png"));
    diffattn::train::plot::plot(&a.run_dir, &out)?;
    println!("wrote {}", out.display());
    Ok(())
}
