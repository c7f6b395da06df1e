//! `compare`: a converted model against its source.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;

use crate::args::{parse_dtype, DTypeArg};

#[derive(clap::Args)]
pub struct CompareArgs {
    source_dir: PathBuf,
    converted_dir: PathBuf,
    /// Prompt (repeatable). Default: "The quick brown fox".
    #[arg(long)]
    prompt: Vec<String>,
    /// File with one prompt per line.
    #[arg(long)]
    prompts_file: Option<PathBuf>,
    #[arg(long, default_value_t = 20)]
    max_new_tokens: usize,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
    /// Exit with status 1 unless the outputs are preserved: f32 weights and compute, max
    /// |delta logit| <= 1e-4 (or --tolerance) and identical greedy generations; bf16/f16 weights
    /// or compute, the same top-1 token at every prompt position and identical greedy
    /// generations (max |delta| reported; --tolerance bounds it too).
    #[arg(long)]
    expect_preserved: bool,
    /// The max |delta logit| --expect-preserved allows, in any dtype (default: 1e-4 in f32,
    /// no bound in half precision).
    #[arg(long)]
    tolerance: Option<f32>,
    /// Write each prompt's ids and both models' float32 logits as .npy with a manifest.json.
    #[arg(long)]
    save_logits: Option<PathBuf>,
    /// Replace a non-empty --save-logits directory (only one holding nothing but files this
    /// tool writes; other files are named and kept).
    #[arg(long)]
    overwrite: bool,
    /// Compute dtype: f32, bf16 or f16.
    #[arg(long, default_value = "f32", value_parser = parse_dtype)]
    dtype: DTypeArg,
}

pub fn run(a: &CompareArgs) -> Result<ExitCode> {
    let mut prompts = a.prompt.clone();
    if let Some(f) = &a.prompts_file {
        let text = std::fs::read_to_string(f)
            .map_err(|e| anyhow::anyhow!("--prompts-file {}: {e}", f.display()))?;
        prompts.extend(
            text.lines()
                .filter(|l| !l.trim().is_empty())
                .map(String::from),
        );
    }
    if prompts.is_empty() {
        if a.prompts_file.is_some() {
            anyhow::bail!("--prompts-file has no non-empty line");
        }
        prompts.push("The quick brown fox".into());
    }
    // Checked before the models run: refused inside an input or over a non-empty directory.
    let staged = a
        .save_logits
        .as_ref()
        .map(|d| {
            diffattn::output::StagedDir::create(d, a.overwrite, &[&a.source_dir, &a.converted_dir])
        })
        .transpose()?;
    if a.tolerance.is_some_and(|t| !(t >= 0.0 && t.is_finite())) {
        anyhow::bail!("--tolerance must be a finite number >= 0");
    }
    let criterion = diffattn::compare::Criterion::for_dirs(
        &a.source_dir,
        &a.converted_dir,
        a.dtype.into(),
        a.tolerance,
    )?;
    // The two models run one after the other (one in memory at a time): say so before the
    // silence of the forward passes and generations (on a terminal; an error stays one line).
    use std::io::IsTerminal;
    let tty = std::io::stderr().is_terminal();
    let say = |m: String| {
        if tty {
            eprintln!("{m}");
        }
    };
    say(format!(
        "comparing on {} prompt{} ({} generated tokens each): running {} then {} ...",
        prompts.len(),
        if prompts.len() == 1 { "" } else { "s" },
        a.max_new_tokens,
        a.source_dir.display(),
        a.converted_dir.display()
    ));
    let t0 = std::time::Instant::now();
    let results = diffattn::compare::compare_dirs(
        &a.source_dir,
        &a.converted_dir,
        &prompts,
        a.max_new_tokens,
        a.dtype.into(),
    )?;
    say(format!("compared in {:.1} s", t0.elapsed().as_secs_f64()));
    if let Some(staged) = staged {
        diffattn::compare::save_logits(staged, &results)?;
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&results)?);
    } else {
        for r in &results {
            println!("prompt {:?} ({} tokens)", r.prompt, r.input_ids.len());
            print_metrics(r);
            println!("  source:    {:?}", r.source.text);
            println!("  converted: {:?}", r.converted.text);
            println!("  generations match: {}", r.generations_match);
        }
    }
    if a.expect_preserved {
        let bad: Vec<&str> = results
            .iter()
            .filter(|r| !criterion.holds(r))
            .map(|r| r.prompt.as_str())
            .collect();
        if !bad.is_empty() {
            eprintln!(
                "error: outputs not preserved for {bad:?} (required: {})",
                criterion.describe()
            );
            return Ok(ExitCode::from(1));
        }
        // stderr, so that --json output stays one JSON document.
        let worst = results
            .iter()
            .map(|r| r.max_abs_logit_diff)
            .fold(0f32, f32::max);
        eprintln!(
            "outputs preserved for every prompt ({}); max |delta logit| {worst:.3e}",
            criterion.describe()
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub(crate) fn print_metrics(r: &diffattn::compare::PromptComparison) {
    println!(
        "  logits: max |delta| {:.3e}, mean |delta| {:.3e}, mean KL(source||converted) {:.3e}, top-1 agreement {:.1}%",
        r.max_abs_logit_diff,
        r.mean_abs_logit_diff,
        r.mean_kl_source_converted,
        100.0 * r.top1_agreement
    );
    let (ns, nc) = r.non_finite_logits;
    if ns + nc > 0 {
        println!(
            "  NOT FINITE: {ns} source and {nc} converted logits are NaN or infinite (no generation compared)"
        );
    }
    println!(
        "  KV cache: source cached == uncached: {}, converted cached == uncached: {}",
        r.source.uncached_ids_equal, r.converted.uncached_ids_equal
    );
}
