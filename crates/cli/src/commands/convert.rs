//! `convert`: the `base_model` of an axolotl config to differential attention.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};

use diffattn::axolotl::AxolotlConfig;
use diffattn::convert::{self, ConvertOptions, Layout, Source};
use diffattn::export::Format;
use diffattn::output::parse_size;

use crate::args::FormatArg;
use crate::commands::{compare::print_metrics, export::print_warnings_and_sizes, progress};

#[derive(clap::Args)]
pub struct ConvertArgs {
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
    #[arg(long, conflicts_with = "no_sublayer_norm")]
    sublayer_norm: bool,
    /// Do not apply the per-head RMS norm.
    #[arg(long)]
    no_sublayer_norm: bool,
    /// Reuse the source heads: first half positive, second half negative (needs even H and Hkv).
    #[arg(long)]
    split_heads: bool,
    /// Negative q/k rows copy the positive ones.
    #[arg(long)]
    mirror_weights: bool,
    /// Output-preserving start that still learns (double heads, needs --no-sublayer-norm):
    /// mirrored negative q/k, random lambda vectors, o_proj divided by (1 - lambda).
    #[arg(long)]
    preserving_mirror: bool,
    /// Differential Transformer version: v1 (Ye et al. 2024: two softmax maps per head, one
    /// lambda per layer) or v2 (2026: doubles only the query heads, KV cache unchanged,
    /// lambda = sigmoid(lambda_proj(x)) per token and head, no sub-layer norm). With v2:
    /// default (new heads and lambda_proj random), --mirror-weights, or --preserving-mirror
    /// (outputs preserved exactly: mirrored heads, lambda_proj = 0, o_proj x 2).
    #[arg(long, value_enum, default_value = "v1", ignore_case = true)]
    variant: VariantArg,
    /// Seed of the random initialisation (default: the config's `seed`, else 42).
    #[arg(long)]
    seed: Option<u64>,
    /// Output directory (default: the config's `output_dir`).
    #[arg(long)]
    output_dir: Option<PathBuf>,
    /// Replace a non-empty output directory: only one holding nothing but files this tool
    /// writes (a checkpoint, a training run); any other file is named and nothing is deleted.
    /// The old output is kept until the new one is complete.
    #[arg(long)]
    overwrite: bool,
    /// Output format: llama-differential = the default, written as format A where a Llama config
    /// expresses the source and as the family format (`<model_type>-differential`: Qwen3, Gemma 3,
    /// windowed Mistral/Qwen2) otherwise; diffllama = transformers' format B.
    #[arg(
        long,
        default_value = "llama-differential",
        hide_possible_values = true
    )]
    format: FormatArg,
    /// Largest safetensors shard, e.g. 5GB, 500MB, 2GiB.
    #[arg(long, default_value = "5GB")]
    max_shard_size: String,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum VariantArg {
    V1,
    V2,
}

pub fn run(args: &ConvertArgs) -> Result<()> {
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
    let init =
        convert::init_from_flags(args.zero_init, args.mirror_weights, args.preserving_mirror)?;
    let max_shard_bytes = parse_size(&args.max_shard_size).with_context(|| {
        format!(
            "--max-shard-size {:?}: expected a size such as 5GB, 500MB or 2GiB",
            args.max_shard_size
        )
    })?;
    let v2 = args.variant == VariantArg::V2;
    if v2 && args.split_heads {
        anyhow::bail!(
            "--split-heads with --variant v2: V2 keeps every source head as a positive head and adds its negative partner (split heads are a V1 layout)"
        );
    }
    let options = ConvertOptions {
        layout: if v2 {
            Layout::V2
        } else if args.split_heads {
            Layout::SplitHeads
        } else {
            Layout::DoubleHeads
        },
        init,
        // V2 has no sub-layer norm: off unless asked for (and then refused by validate).
        sublayer_norm: if v2 {
            args.sublayer_norm
        } else {
            !args.no_sublayer_norm
        },
        seed: args.seed.or(cfg.seed).unwrap_or(convert::DEFAULT_SEED),
        dtype: cfg.dtype,
        max_shard_bytes,
        overwrite: args.overwrite,
    };
    options.validate()?;
    if options.init == convert::Init::Zero {
        eprintln!(
            "warning: --zero-init starts training at a stationary point: with zero negative q/k \
             rows and zero lambda vectors every gradient into the negative branch is exactly 0, \
             so the model never becomes differential; --preserving-mirror --no-sublayer-norm \
             preserves outputs and learns"
        );
    }
    let format = Format::from(args.format);
    if format == Format::DiffLlama && v2 {
        anyhow::bail!(
            "--format diffllama with --variant v2: the diffllama format cannot express V2 (its attention is V1: two softmax maps per head, one lambda per layer; V2 has a per-token gate and no sub-layer norm); without --format it is written as a differential checkpoint with diff_attn_variant: \"v2\""
        );
    }
    if format == Format::DiffLlama && !options.sublayer_norm {
        anyhow::bail!(
            "--format diffllama with --no-sublayer-norm: a model without a sub-layer norm cannot be expressed in the diffllama format (its RMS norm has no off switch)"
        );
    }
    let src = Source::from_axolotl(&cfg)?;
    let plan = convert::plan(&src, &options)?;
    diffattn::pipeline::check_format(&src, &plan, format)?;
    println!("source: {}", src.model_dir.display());
    if format == Format::DiffLlama {
        println!("output: diffllama (planned as llama-differential below, then exported exactly; final sizes below)");
    }
    println!("{}", plan.summary());
    if !plan.preserving_scales_far_from_one.is_empty() {
        let list: Vec<String> = plan
            .preserving_scales_far_from_one
            .iter()
            .map(|(l, s)| format!("layer {l}: {s:.1}x"))
            .collect();
        eprintln!(
            "warning: --preserving-mirror scales o_proj by 1/(1 - lambda), and this draw puts lambda above 0.75 or above 1 in {} of {} layers ({}): outputs are preserved, but training starts from amplified or sign-flipped o_proj weights; another --seed draws other lambda vectors",
            list.len(),
            plan.dims.num_hidden_layers,
            list.join(", ")
        );
    }
    let pb = progress(plan.tensors().count() as u64, "converting");
    let report =
        diffattn::pipeline::convert_to(&src, &plan, &output_dir, Some(&cfg), format, &|_| {
            pb.inc(1)
        })?;
    if format == Format::DiffLlama {
        print_warnings_and_sizes(&report)?;
    }
    pb.finish_and_clear();
    if format != Format::DiffLlama {
        for w in &report.warnings {
            eprintln!("warning: {w}");
        }
    }
    println!(
        "wrote {} ({}) in {:.2} s",
        report.output_dir.display(),
        report.files.join(", "),
        start.elapsed().as_secs_f64()
    );
    println!(
        "next: diff-transformer compare {src} {out}   (logits and generations against the source)\n      diff-transformer train {out}/axolotl_config.yml   (after adding datasets; it trains into {out}{suffix})\n      AutoModelForCausalLM.from_pretrained(\"{out}\", trust_remote_code=True)   (PyTorch: the checkpoint carries its modeling code)",
        suffix = diffattn::axolotl::TRAINED_SUFFIX,
        src = src.model_dir.display(),
        out = report.output_dir.display()
    );
    if args.debug && format == Format::DiffLlama {
        debug_compare(&src.model_dir, &report.output_dir, &plan)?;
    } else if args.debug {
        println!("per-layer parameters of the converted model:");
        for line in convert::layer_statistics(&report.output_dir)? {
            println!("  {line}");
        }
        debug_compare(&src.model_dir, &report.output_dir, &plan)?;
    }
    Ok(())
}
/// `convert --debug`: the source and the converted model on "The quick brown fox".
fn debug_compare(source: &Path, converted: &Path, plan: &convert::Plan) -> Result<()> {
    if !source.join("tokenizer.json").is_file() && !converted.join("tokenizer.json").is_file() {
        println!("debug: no tokenizer.json with the source model: generation comparison skipped");
        return Ok(());
    }
    let results = diffattn::compare::compare_dirs(
        source,
        converted,
        &["The quick brown fox".to_string()],
        20,
        candle_core::DType::F32,
    )?;
    let criterion =
        diffattn::compare::Criterion::for_dirs(source, converted, candle_core::DType::F32, None)?;
    let r = &results[0];
    println!("debug: prompt {:?}", r.prompt);
    println!(
        "  source    ({:.2} s): {:?}",
        r.source.seconds, r.source.text
    );
    println!(
        "  converted ({:.2} s): {:?}",
        r.converted.seconds, r.converted.text
    );
    println!("  generations match: {}", r.generations_match);
    print_metrics(r);
    let o = &plan.options;
    let expected = (o.layout == Layout::DoubleHeads
        && matches!(
            o.init,
            convert::Init::Zero | convert::Init::PreservingMirror
        )
        && !o.sublayer_norm)
        || (o.layout == Layout::V2 && o.init == convert::Init::PreservingMirror);
    if expected {
        println!(
            "  a match is expected ({} preserves outputs): {}",
            if o.layout == Layout::V2 {
                "--variant v2 --preserving-mirror"
            } else if o.init == convert::Init::Zero {
                "--zero-init --no-sublayer-norm"
            } else {
                "--preserving-mirror --no-sublayer-norm"
            },
            if criterion.holds(r) {
                format!("it holds ({})", criterion.describe())
            } else {
                format!("IT DOES NOT HOLD ({})", criterion.describe())
            }
        );
    } else {
        let why = if o.layout == Layout::V2 {
            "the new query heads and lambda_proj are not the mirrored, zero start"
        } else if o.layout == Layout::SplitHeads {
            "split heads turn half of the source heads into negative components"
        } else if o.sublayer_norm {
            "the sub-layer norm renormalises every head's output"
        } else {
            "the negative branch is non-zero (lambda != 0)"
        };
        if o.layout == Layout::V2 {
            println!("  a match is not expected: {why}; --variant v2 --preserving-mirror preserves outputs");
        } else if o.layout == Layout::SplitHeads {
            println!("  a match is not expected: {why} (no split-heads conversion preserves outputs; double heads with --zero-init or --preserving-mirror and --no-sublayer-norm do)");
        } else {
            println!("  a match is not expected: {why}; --zero-init or --preserving-mirror with --no-sublayer-norm preserve outputs");
        }
    }
    Ok(())
}
