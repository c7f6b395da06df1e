//! `diff-transformer`: convert pretrained Llama-family checkpoints into differential-attention
//! models (Ye et al., arXiv:2410.05258), in the formats the Python ecosystem loads.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};

use diffattn::axolotl::AxolotlConfig;
use diffattn::convert::{self, ConvertOptions, Layout, Source};
use diffattn::dtype::DType;
use diffattn::output::parse_size;

#[derive(Parser)]
#[command(
    name = "diff-transformer",
    version,
    about = "Convert, run and fine-tune differential-attention models"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Import a llama.cpp GGUF file as a Hugging Face model directory (config.json,
    /// model.safetensors, tokenizer.json, tokenizer_config.json, generation_config.json).
    ImportGguf {
        /// The .gguf file.
        gguf: PathBuf,
        /// Output directory (must not exist or be empty, unless --overwrite).
        out_dir: PathBuf,
        /// Storage dtype of the written weights: f32, bf16 or f16.
        #[arg(long, default_value = "f32")]
        dtype: String,
        /// Replace a non-empty output directory.
        #[arg(long)]
        overwrite: bool,
    },
    /// Convert the `base_model` of an axolotl config to differential attention
    /// (format `llama-differential`), writing OUTPUT_DIR with an updated axolotl_config.yml.
    Convert(ConvertArgs),
}

#[derive(clap::Args)]
struct ConvertArgs {
    /// The axolotl YAML config (keys base_model, output_dir, bf16/fp16, seed, ...).
    config: PathBuf,
    /// Print the plan and per-layer parameter statistics of the written model.
    #[arg(long)]
    debug: bool,
    /// Negative q/k rows, lambda vectors and lambda_init all zero (the plugin's --zero-init;
    /// preserves outputs only with --no-sublayer-norm, and is a stationary point for training).
    #[arg(long)]
    zero_init: bool,
    /// Apply an RMS norm to each head's output (default on, as in the plugin).
    #[arg(long, overrides_with = "no_sublayer_norm")]
    sublayer_norm: bool,
    /// Do not apply the per-head RMS norm.
    #[arg(long, overrides_with = "sublayer_norm")]
    no_sublayer_norm: bool,
    /// Reuse the source heads: first half positive, second half negative (needs even H and Hkv).
    #[arg(long)]
    split_heads: bool,
    /// Negative q/k rows copy the positive ones.
    #[arg(long)]
    mirror_weights: bool,
    /// Seed of the random initialisation (default: the config's `seed`, else 42).
    #[arg(long)]
    seed: Option<u64>,
    /// Output directory (default: the config's `output_dir`).
    #[arg(long)]
    output_dir: Option<PathBuf>,
    /// Replace a non-empty output directory.
    #[arg(long)]
    overwrite: bool,
    /// Largest safetensors shard, e.g. 5GB, 500MB, 2GiB.
    #[arg(long, default_value = "5GB")]
    max_shard_size: String,
}

fn progress(len: u64, what: &str) -> ProgressBar {
    let pb = if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        ProgressBar::new(len)
    } else {
        ProgressBar::hidden()
    };
    pb.set_style(
        ProgressStyle::with_template("{msg} [{bar:40}] {pos}/{len} tensors ({elapsed})")
            .expect("valid template")
            .progress_chars("=> "),
    );
    pb.set_message(what.to_string());
    pb
}

fn import_gguf(gguf: &Path, out: &Path, dtype: &str, overwrite: bool) -> Result<()> {
    let dtype = DType::parse(dtype)
        .with_context(|| format!("--dtype {dtype:?}: expected f32, bf16 or f16"))?;
    let start = Instant::now();
    let pb = progress(0, "importing");
    let report = diffattn::gguf::import_gguf(gguf, out, dtype, overwrite, &|_| pb.inc(1))?;
    pb.finish_and_clear();
    let c = &report.config;
    println!(
        "imported {} tensors from {} into {} in {:.2} s",
        report.tensors,
        gguf.display(),
        report.output_dir.display(),
        start.elapsed().as_secs_f64()
    );
    println!(
        "LlamaForCausalLM: layers {}, hidden {}, heads {}, kv heads {}, head_dim {}, vocab {}, tied embeddings {}, dtype {}",
        c["num_hidden_layers"], c["hidden_size"], c["num_attention_heads"], c["num_key_value_heads"],
        c["head_dim"], c["vocab_size"], c["tie_word_embeddings"], dtype
    );
    Ok(())
}

fn run_convert(args: &ConvertArgs) -> Result<()> {
    let start = Instant::now();
    let cfg = AxolotlConfig::from_file(&args.config)?;
    let output_dir = match (&args.output_dir, &cfg.output_dir) {
        (Some(o), _) => o.clone(),
        (None, Some(o)) => o.clone(),
        (None, None) => {
            return Err(diffattn::Error::MissingKey {
                path: args.config.clone(),
                key: "output_dir".into(),
            }
            .into())
        }
    };
    let init = convert::init_from_flags(args.zero_init, args.mirror_weights)?;
    let max_shard_bytes = parse_size(&args.max_shard_size).with_context(|| {
        format!(
            "--max-shard-size {:?}: expected a size such as 5GB, 500MB or 2GiB",
            args.max_shard_size
        )
    })?;
    let options = ConvertOptions {
        layout: if args.split_heads {
            Layout::SplitHeads
        } else {
            Layout::DoubleHeads
        },
        init,
        sublayer_norm: !args.no_sublayer_norm,
        seed: args.seed.or(cfg.seed).unwrap_or(convert::DEFAULT_SEED),
        dtype: cfg.dtype,
        max_shard_bytes,
        overwrite: args.overwrite,
    };
    options.validate()?;
    let src = Source::from_axolotl(&cfg)?;
    let plan = convert::plan(&src, &options)?;
    println!("source: {}", src.model_dir.display());
    println!("{}", plan.summary());
    let pb = progress(plan.tensors().count() as u64, "converting");
    let report = convert::execute(&src, &plan, &output_dir, Some(&cfg), &|_| pb.inc(1))?;
    pb.finish_and_clear();
    println!(
        "wrote {} ({}) in {:.2} s",
        report.output_dir.display(),
        report.files.join(", "),
        start.elapsed().as_secs_f64()
    );
    if args.debug {
        println!("per-layer parameters of the converted model:");
        for line in convert::layer_statistics(&report.output_dir)? {
            println!("  {line}");
        }
        println!(
            "(the generation/logit comparison against the source arrives with the forward pass)"
        );
    }
    Ok(())
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match &cli.command {
        Command::ImportGguf {
            gguf,
            out_dir,
            dtype,
            overwrite,
        } => import_gguf(gguf, out_dir, dtype, *overwrite),
        Command::Convert(args) => run_convert(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
