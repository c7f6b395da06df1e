//! `train`: fine-tuning from an axolotl config.

use std::path::PathBuf;

use anyhow::Result;
use indicatif::{ProgressBar, ProgressStyle};

use crate::commands::progress;

#[derive(clap::Args)]
pub struct TrainArgs {
    /// The axolotl YAML (datasets, sequence_len, micro_batch_size, learning_rate, ...).
    config: PathBuf,
    /// Write here instead of the config's output_dir.
    #[arg(long)]
    output_dir: Option<PathBuf>,
    /// Replace a non-empty output directory (not needed to resume): only one holding nothing
    /// but files this tool writes (a model, metrics, checkpoint-N directories); any other file
    /// is named and nothing is deleted. The previous run is kept until this one completes.
    #[arg(long)]
    overwrite: bool,
}

pub fn run(a: &TrainArgs) -> Result<()> {
    use diffattn::train::{self, Event};
    let cfg = train::TrainConfig::from_file(&a.config)?;
    let opts = train::TrainOptions {
        overwrite: a.overwrite,
        output_dir: a.output_dir.clone(),
    };
    let pb = std::cell::RefCell::new(None::<ProgressBar>);
    let last_lambda = std::cell::Cell::new(None::<(usize, &str, f64)>);
    let on_event = |e: Event| match e {
        Event::Info(m) => match pb.borrow().as_ref() {
            Some(p) => p.println(m),
            None => println!("{m}"),
        },
        Event::Warning(m) => match pb.borrow().as_ref() {
            Some(p) => p.suspend(|| eprintln!("warning: {m}")),
            None => eprintln!("warning: {m}"),
        },
        Event::Step {
            step,
            total,
            loss,
            learning_rate,
            mean_lambda,
            logged,
        } => {
            let mut slot = pb.borrow_mut();
            let p = slot.get_or_insert_with(|| {
                let p = progress(total as u64, "");
                p.set_style(
                    ProgressStyle::with_template(
                        "[{bar:30}] step {pos}/{len} {msg} ({elapsed} < {eta})",
                    )
                    .expect("valid template")
                    .progress_chars("=> "),
                );
                p.set_position((step - 1) as u64);
                p
            });
            if let Some((key, l)) = mean_lambda {
                last_lambda.set(Some((step, key, l)));
            }
            let lam = last_lambda
                .get()
                .map(|(at, key, l)| {
                    if key.ends_with("lambda_gate_mean") {
                        format!(" lambda gate {l:.4} ({key}: sigmoid(lambda_proj(x)) over tokens and heads, mean over the monitored layers, times the warm-up mix; measured at step {at}, every diff_attn_log_every steps)")
                    } else {
                        format!(" lambda_full {l:.4} ({key}: mean over all layers, times the warm-up mix; measured at step {at}, every diff_attn_log_every steps)")
                    }
                })
                .unwrap_or_default();
            let msg = format!("loss {loss:.4} lr {learning_rate:.3e}{lam}");
            if p.is_hidden() && logged {
                println!("step {step}/{total} {msg}");
            }
            p.set_message(msg);
            p.set_position(step as u64);
        }
    };
    let report = train::train(&cfg, &opts, &on_event)?;
    if let Some(p) = pb.borrow().as_ref() {
        p.finish_and_clear();
    }
    println!(
        "metrics ({}):",
        report.output_dir.join("all_results.json").display()
    );
    for (k, v) in &report.metrics {
        println!("  {k}: {v:.6}");
    }
    println!(
        "evaluate again with: diff-transformer evaluate {} --model {}",
        a.config.display(),
        report.output_dir.display()
    );
    Ok(())
}
