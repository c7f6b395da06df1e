//! `plot`: a training run's metrics as a PNG, or several runs compared in one.

use std::path::PathBuf;

use anyhow::Result;

#[derive(clap::Args)]
pub struct PlotArgs {
    /// The run's output_dir (holding metrics.jsonl). Several: one PNG comparing their eval
    /// loss (from step 0 with eval_on_start) and train loss, one line per run.
    #[arg(required = true)]
    run_dirs: Vec<PathBuf>,
    /// The PNG to write (default: RUN_DIR/plot.png; required with several runs).
    #[arg(short, long)]
    output: Option<PathBuf>,
    /// The legend name of each run, in order (default: the directory names).
    #[arg(long)]
    label: Vec<String>,
}

pub fn run(a: &PlotArgs) -> Result<()> {
    if a.run_dirs.len() == 1 {
        if !a.label.is_empty() {
            anyhow::bail!("--label names the runs of a comparison: give several run directories");
        }
        let out = a
            .output
            .clone()
            .unwrap_or_else(|| a.run_dirs[0].join("plot.png"));
        diffattn::train::plot::plot(&a.run_dirs[0], &out)?;
        println!("wrote {}", out.display());
        return Ok(());
    }
    let Some(out) = &a.output else {
        anyhow::bail!("several run directories: give the PNG to write with -o");
    };
    if !a.label.is_empty() && a.label.len() != a.run_dirs.len() {
        anyhow::bail!(
            "{} --label for {} run directories: give one per run, in order",
            a.label.len(),
            a.run_dirs.len()
        );
    }
    let runs: Vec<(String, PathBuf)> = a
        .run_dirs
        .iter()
        .enumerate()
        .map(|(i, d)| {
            let label = a.label.get(i).cloned().unwrap_or_else(|| {
                d.file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_else(|| d.display().to_string())
            });
            (label, d.clone())
        })
        .collect();
    diffattn::train::plot::plot_runs(&runs, out)?;
    println!("wrote {}", out.display());
    Ok(())
}
