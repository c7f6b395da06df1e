//! `diff-transformer`: convert pretrained Llama-family checkpoints into differential-attention
//! models (Ye et al., arXiv:2410.05258), in the formats the Python ecosystem loads.

use std::path::{Path, PathBuf};

use std::process::ExitCode;

/// mimalloc instead of the system allocator: see [`keep_freed_memory`].
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Training allocates and frees gigabytes per step (candle allocates every op's output and
/// every gradient). glibc returns large blocks to the kernel at once, so each step pays
/// ~500 k page faults; telling mimalloc never to purge freed memory makes the blocks reused
/// instead (4 SmolLM2 steps: 2.0 M -> 3.6 k page faults, about 20% faster). Peak memory is
/// unchanged, the process simply keeps it. Inference gains too (the 25 MB logits of a
/// 128-token prefill are re-faulted on every forward otherwise).
fn keep_freed_memory() {
    // `mi_option_purge_delay` in mimalloc v3's `mimalloc.h` enum `mi_option_e` (-1 = never purge).
    const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
    // SAFETY: sets a global allocator option; no pointer arguments.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
}

/// candle runs its element-wise ops on its own worker threads, which spin 25,000 rounds after
/// each op before parking, while the matrix products run on rayon's workers: on a machine
/// with as many cores as threads, the spinning worker takes a core from a matrix product.
/// A short spin (unless the user set `CANDLE_BARRIER_POOL_SPIN_LIMIT`) measured on SmolLM2,
/// 2 cores: prefill 128 tokens 260-316 -> 370-400 tok/s for the converted model.
fn shorten_candle_spin() {
    env_default("CANDLE_BARRIER_POOL_SPIN_LIMIT", || "100".into());
}

/// Sets environment variable `key` to `value()` unless the user set it. Only for the start of
/// `main`, before any other thread exists.
fn env_default(key: &str, value: impl FnOnce() -> String) {
    if std::env::var_os(key).is_none() {
        std::env::set_var(key, value());
    }
}
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
    about = "Convert Llama-family checkpoints to differential attention, run and compare them"
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
    /// (`llama-differential` or, with --format, `diffllama`), writing OUTPUT_DIR with an
    /// updated axolotl_config.yml.
    Convert(ConvertArgs),
    /// Generate text with a model directory (Llama, llama-differential, diffllama), streaming
    /// tokens.
    Generate(GenerateArgs),
    /// Compare a converted model with its source: logits (max/mean |delta|, KL, top-1) and
    /// greedy continuations with and without the KV cache.
    Compare(CompareArgs),
    /// Convert a differential checkpoint between llama-differential (axolotl plugin) and
    /// diffllama (transformers' DiffLlamaForCausalLM), exactly.
    Export {
        /// Target format: diffllama or llama-differential.
        #[arg(long)]
        to: String,
        /// The differential model directory to read.
        src: PathBuf,
        /// The directory to write (must not exist or be empty, unless --overwrite).
        dst: PathBuf,
        /// Replace a non-empty destination.
        #[arg(long)]
        overwrite: bool,
    },
    /// Measure prefill and decode speed of a model (synthetic token ids, greedy, KV cache).
    Bench(BenchArgs),
    /// Fine-tune the `base_model` of an axolotl config (Llama, llama-differential or
    /// diffllama) with the negative-branch warm-up and lambda monitoring; writes checkpoints,
    /// metrics.jsonl, a TensorBoard event file and the final model into output_dir.
    Train(TrainArgs),
    /// Eval loss and perplexity of a model on the validation split of an axolotl config.
    Evaluate(EvaluateArgs),
    /// Draw a training run's metrics (loss, learning rate, lambda_full, mix) as a PNG.
    Plot {
        /// The run's output_dir (holding metrics.jsonl).
        run_dir: PathBuf,
        /// The PNG to write (default: RUN_DIR/plot.png).
        #[arg(short, long)]
        output: Option<PathBuf>,
    },
}

#[derive(clap::Args)]
struct TrainArgs {
    /// The axolotl YAML (datasets, sequence_len, micro_batch_size, learning_rate, ...).
    config: PathBuf,
    /// Write here instead of the config's output_dir.
    #[arg(long)]
    output_dir: Option<PathBuf>,
    /// Replace a non-empty output directory (not needed to resume).
    #[arg(long)]
    overwrite: bool,
}

#[derive(clap::Args)]
struct EvaluateArgs {
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

#[derive(clap::Args)]
struct BenchArgs {
    /// Model directory.
    #[arg(long)]
    model: PathBuf,
    /// Tokens in the prefill forward.
    #[arg(long, default_value_t = 128)]
    prefill_tokens: usize,
    /// Prompt length before decoding.
    #[arg(long, default_value_t = 16)]
    prompt_tokens: usize,
    /// Greedy decode steps with the KV cache.
    #[arg(long, default_value_t = 64)]
    decode_tokens: usize,
    /// Repetitions (the best is reported).
    #[arg(long, default_value_t = 3)]
    repeat: usize,
    /// Compute dtype: f32, bf16 or f16.
    #[arg(long, default_value = "f32")]
    dtype: String,
}

#[derive(clap::Args)]
#[command(group(clap::ArgGroup::new("input").required(true).multiple(false)))]
struct GenerateArgs {
    /// Model directory (config.json, safetensors, tokenizer.json).
    #[arg(long)]
    model: PathBuf,
    /// Plain prompt (give this or --chat).
    #[arg(long, group = "input")]
    prompt: Option<String>,
    /// One user message, formatted with the model's chat_template.
    #[arg(long, group = "input")]
    chat: Option<String>,
    #[arg(long, default_value_t = 64)]
    max_new_tokens: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    temperature: f64,
    /// Sample only among the K most likely tokens (with --temperature > 0).
    #[arg(long)]
    top_k: Option<usize>,
    /// Nucleus sampling: the smallest set of tokens with probability >= P, in (0, 1].
    #[arg(long, allow_negative_numbers = true)]
    top_p: Option<f64>,
    /// Seed of the sampler.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Recompute the whole sequence at every step instead of using the KV cache.
    #[arg(long)]
    no_kv_cache: bool,
    /// Compute dtype: f32 (default on CPU), bf16 or f16.
    #[arg(long, default_value = "f32")]
    dtype: String,
}

#[derive(clap::Args)]
struct CompareArgs {
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
    /// Exit with status 1 unless max |delta logit| <= 1e-4 and greedy generations are identical.
    #[arg(long)]
    expect_preserved: bool,
    /// Write each prompt's ids and both models' float32 logits as .npy with a manifest.json.
    #[arg(long)]
    save_logits: Option<PathBuf>,
    /// Replace a non-empty --save-logits directory.
    #[arg(long)]
    overwrite: bool,
    /// Compute dtype: f32, bf16 or f16.
    #[arg(long, default_value = "f32")]
    dtype: String,
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
    /// Output-preserving start that still learns (double heads, needs --no-sublayer-norm):
    /// mirrored negative q/k, random lambda vectors, o_proj divided by (1 - lambda).
    #[arg(long)]
    preserving_mirror: bool,
    /// Seed of the random initialisation (default: the config's `seed`, else 42).
    #[arg(long)]
    seed: Option<u64>,
    /// Output directory (default: the config's `output_dir`).
    #[arg(long)]
    output_dir: Option<PathBuf>,
    /// Replace a non-empty output directory.
    #[arg(long)]
    overwrite: bool,
    /// Output format: llama-differential (the axolotl plugin's) or diffllama (transformers').
    #[arg(long, default_value = "llama-differential")]
    format: String,
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
        "{}: layers {}, hidden {}, heads {}, kv heads {}, head_dim {}, vocab {}, tied embeddings {}, dtype {}",
        c["architectures"][0].as_str().unwrap_or("?"), c["num_hidden_layers"], c["hidden_size"], c["num_attention_heads"], c["num_key_value_heads"],
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
    let init =
        convert::init_from_flags(args.zero_init, args.mirror_weights, args.preserving_mirror)?;
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
    if options.init == convert::Init::Zero {
        eprintln!(
            "warning: --zero-init starts training at a stationary point: with zero negative q/k \
             rows and zero lambda vectors every gradient into the negative branch is exactly 0, \
             so the model never becomes differential; --preserving-mirror --no-sublayer-norm \
             preserves outputs and learns"
        );
    }
    let format = diffattn::export::Format::parse(&args.format).with_context(|| {
        format!(
            "--format {:?}: expected llama-differential or diffllama",
            args.format
        )
    })?;
    if format == diffattn::export::Format::DiffLlama && !options.sublayer_norm {
        anyhow::bail!(
            "--format diffllama with --no-sublayer-norm: a model without a sub-layer norm cannot be expressed in the diffllama format (its RMS norm has no off switch)"
        );
    }
    let src = Source::from_axolotl(&cfg)?;
    let plan = convert::plan(&src, &options)?;
    println!("source: {}", src.model_dir.display());
    if format == diffattn::export::Format::DiffLlama {
        println!("format: diffllama (planned as llama-differential, then exported exactly; final sizes below)");
    } else {
        println!("format: llama-differential");
    }
    println!("{}", plan.summary());
    let pb = progress(plan.tensors().count() as u64, "converting");
    let report = if format == diffattn::export::Format::DiffLlama {
        // Format A into a hidden scratch directory beside the destination, then the exact
        // A -> B export into place.
        let dest = diffattn::output::absolutize(&output_dir)?;
        let scratch = dest.with_file_name(format!(
            ".{}.format-a-{}",
            dest.file_name().unwrap_or_default().to_string_lossy(),
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&scratch);
        let mut opts_a = plan.options.clone();
        opts_a.overwrite = true;
        let plan_a = convert::plan(&src, &opts_a)?;
        let res =
            convert::execute(&src, &plan_a, &scratch, Some(&cfg), &|_| pb.inc(1)).and_then(|_| {
                diffattn::export::export(
                    &scratch,
                    &output_dir,
                    diffattn::export::Format::DiffLlama,
                    args.overwrite,
                    &|_| {},
                )
            });
        let _ = std::fs::remove_dir_all(&scratch);
        let r = res?;
        for w in &r.warnings {
            eprintln!("warning: {w}");
        }
        print_written_sizes(&r.output_dir)?;
        convert::ConvertReport {
            output_dir: r.output_dir,
            files: r.files,
        }
    } else {
        convert::execute(&src, &plan, &output_dir, Some(&cfg), &|_| pb.inc(1))?
    };
    pb.finish_and_clear();
    println!(
        "wrote {} ({}) in {:.2} s",
        report.output_dir.display(),
        report.files.join(", "),
        start.elapsed().as_secs_f64()
    );
    if args.debug && format == diffattn::export::Format::DiffLlama {
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
    let expected = o.layout == Layout::DoubleHeads
        && matches!(
            o.init,
            convert::Init::Zero | convert::Init::PreservingMirror
        )
        && !o.sublayer_norm;
    if expected {
        println!(
            "  a match is expected ({} --no-sublayer-norm preserves outputs): {}",
            if o.init == convert::Init::Zero {
                "--zero-init"
            } else {
                "--preserving-mirror"
            },
            if r.preserved() {
                "it holds"
            } else {
                "IT DOES NOT HOLD"
            }
        );
    } else {
        let why = if o.layout == Layout::SplitHeads {
            "split heads turn half of the source heads into negative components"
        } else if o.sublayer_norm {
            "the sub-layer norm renormalises every head's output"
        } else {
            "the negative branch is non-zero (lambda != 0)"
        };
        if o.layout == Layout::SplitHeads {
            println!("  a match is not expected: {why} (no split-heads conversion preserves outputs; double heads with --zero-init or --preserving-mirror and --no-sublayer-norm do)");
        } else {
            println!("  a match is not expected: {why}; --zero-init or --preserving-mirror with --no-sublayer-norm preserve outputs");
        }
    }
    Ok(())
}

fn print_metrics(r: &diffattn::compare::PromptComparison) {
    println!(
        "  logits: max |delta| {:.3e}, mean |delta| {:.3e}, mean KL(source||converted) {:.3e}, top-1 agreement {:.1}%",
        r.max_abs_logit_diff,
        r.mean_abs_logit_diff,
        r.mean_kl_source_converted,
        100.0 * r.top1_agreement
    );
    println!(
        "  KV cache: source cached == uncached: {}, converted cached == uncached: {}",
        r.source.uncached_ids_equal, r.converted.uncached_ids_equal
    );
}

fn compute_dtype(s: &str) -> Result<candle_core::DType> {
    Ok(
        match DType::parse(s)
            .with_context(|| format!("--dtype {s:?}: expected f32, bf16 or f16"))?
        {
            DType::F32 => candle_core::DType::F32,
            DType::BF16 => candle_core::DType::BF16,
            DType::F16 => candle_core::DType::F16,
        },
    )
}

fn run_generate(a: &GenerateArgs) -> Result<()> {
    use std::io::Write;
    let dtype = compute_dtype(&a.dtype)?;
    let model = diffattn::model::Model::load(&a.model, dtype, &candle_core::Device::Cpu)?;
    let codec = diffattn::generate::TextCodec::load(&a.model)?;
    let ids = match (&a.prompt, &a.chat) {
        (_, Some(c)) => codec.encode_chat(c)?,
        (Some(p), None) => codec.encode(p)?,
        (None, None) => unreachable!("clap requires one"),
    };
    let sampling = diffattn::generate::Sampling {
        temperature: a.temperature,
        top_k: a.top_k,
        top_p: a.top_p,
        seed: a.seed,
    };
    if a.temperature == 0.0 && (a.top_k.is_some() || a.top_p.is_some()) {
        eprintln!("warning: --top-k/--top-p apply only when sampling: with --temperature 0 (the default) decoding is greedy");
    }
    let mut generated: Vec<u32> = Vec::new();
    let mut printed = 0usize;
    let mut stdout = std::io::stdout();
    let g = diffattn::generate::generate(
        &model,
        &ids,
        a.max_new_tokens,
        &sampling,
        &codec.eos_token_ids,
        !a.no_kv_cache,
        &mut |t| {
            generated.push(t);
            if let Ok(text) = codec.decode(&generated) {
                // Print only whole characters: wait while the tail is an incomplete UTF-8 piece.
                if !text.ends_with('\u{fffd}') && text.len() > printed {
                    let _ = write!(stdout, "{}", &text[printed..]);
                    let _ = stdout.flush();
                    printed = text.len();
                }
            }
        },
    )?;
    println!();
    let _ = stdout.flush();
    let n = g.ids.len();
    eprintln!(
        "{} prompt tokens, {} generated; prefill {:.1} tok/s, decode {:.1} tok/s{}",
        ids.len(),
        n,
        ids.len() as f64 / g.prefill_secs.max(1e-3),
        (n.saturating_sub(1)) as f64 / g.decode_secs.max(1e-9),
        if g.stopped_on_eos {
            " (stopped on eos)"
        } else {
            ""
        }
    );
    Ok(())
}

/// Heads, parameters and KV-cache bytes per token of a written checkpoint.
fn print_written_sizes(dir: &Path) -> Result<()> {
    let cfg = diffattn::config::ModelConfig::from_file(&dir.join("config.json"))?;
    let dims = cfg.dims()?;
    let ck = diffattn::checkpoint::Checkpoint::open(dir)?;
    let mut params = 0u64;
    let mut es = 4u64;
    for n in ck.names() {
        let info = ck.require(n)?;
        params += info.numel() as u64;
        es = info.dtype.size() as u64;
    }
    let kv =
        dims.num_hidden_layers as u64 * 2 * (dims.num_key_value_heads * dims.head_dim) as u64 * es;
    println!(
        "written as {}: heads {}, KV heads {}, head_dim {}, parameters {params}, KV-cache bytes per token {kv}",
        cfg.typed.model_type.as_deref().unwrap_or("?"),
        dims.num_attention_heads,
        dims.num_key_value_heads,
        dims.head_dim
    );
    Ok(())
}

fn run_export(to: &str, src: &Path, dst: &Path, overwrite: bool) -> Result<()> {
    let format = diffattn::export::Format::parse(to)
        .with_context(|| format!("--to {to:?}: expected diffllama or llama-differential"))?;
    let start = Instant::now();
    let r = diffattn::export::export(src, dst, format, overwrite, &|_| {})?;
    for w in &r.warnings {
        eprintln!("warning: {w}");
    }
    print_written_sizes(&r.output_dir)?;
    println!(
        "wrote {} ({}) in {:.2} s",
        r.output_dir.display(),
        r.files.join(", "),
        start.elapsed().as_secs_f64()
    );
    Ok(())
}

fn run_bench(a: &BenchArgs) -> Result<()> {
    use candle_core::{Device, Tensor};
    let model = diffattn::model::Model::load(&a.model, compute_dtype(&a.dtype)?, &Device::Cpu)?;
    let context = model.config.max_position_embeddings;
    if a.prefill_tokens == 0 || a.prompt_tokens == 0 || a.decode_tokens == 0 || a.repeat == 0 {
        anyhow::bail!(
            "--prefill-tokens, --prompt-tokens, --decode-tokens and --repeat must be at least 1"
        );
    }
    if a.prefill_tokens > context || a.prompt_tokens + a.decode_tokens + 1 > context {
        anyhow::bail!(
            "the benchmark needs {} positions, more than max_position_embeddings ({context})",
            a.prefill_tokens.max(a.prompt_tokens + a.decode_tokens + 1)
        );
    }
    let vocab = model.config.vocab_size as u32;
    // Deterministic, tokenizer-independent ids spread over the vocabulary.
    let ids = |n: usize| -> Vec<u32> { (0..n as u32).map(|i| (i * 7919 + 13) % vocab).collect() };
    let prefill = ids(a.prefill_tokens);
    let t = Tensor::new(prefill.as_slice(), &Device::Cpu)?.unsqueeze(0)?;
    let mut best_prefill = f64::MAX;
    let mut best_decode = f64::MAX;
    for _ in 0..a.repeat.max(1) {
        let start = Instant::now();
        let _ = model.forward(&t)?;
        best_prefill = best_prefill.min(start.elapsed().as_secs_f64());
        let g = diffattn::generate::generate(
            &model,
            &ids(a.prompt_tokens),
            a.decode_tokens + 1,
            &diffattn::generate::Sampling::default(),
            &[],
            true,
            &mut |_| {},
        )?;
        best_decode = best_decode.min(g.decode_secs);
    }
    println!(
        "{}: threads {}, prefill {} tokens: {:.1} tok/s; decode {} tokens after a {}-token prompt: {:.1} tok/s",
        a.model.display(),
        candle_core::utils::get_num_threads(),
        a.prefill_tokens,
        a.prefill_tokens as f64 / best_prefill,
        a.decode_tokens,
        a.prompt_tokens,
        a.decode_tokens as f64 / best_decode
    );
    Ok(())
}

fn run_compare(a: &CompareArgs) -> Result<ExitCode> {
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
    let results = diffattn::compare::compare_dirs(
        &a.source_dir,
        &a.converted_dir,
        &prompts,
        a.max_new_tokens,
        compute_dtype(&a.dtype)?,
    )?;
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
            .filter(|r| !r.preserved())
            .map(|r| r.prompt.as_str())
            .collect();
        if !bad.is_empty() {
            eprintln!(
                "error: outputs not preserved for {bad:?} (required: max |delta logit| <= 1e-4 and identical greedy generations)"
            );
            return Ok(ExitCode::from(1));
        }
        // stderr, so that --json output stays one JSON document.
        eprintln!(
            "outputs preserved for every prompt: max |delta logit| <= 1e-4 and identical greedy generations"
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn run_train(a: &TrainArgs) -> Result<()> {
    use diffattn::train::{self, Event};
    let cfg = train::TrainConfig::from_file(&a.config)?;
    let opts = train::TrainOptions {
        overwrite: a.overwrite,
        output_dir: a.output_dir.clone(),
    };
    let pb = std::cell::RefCell::new(None::<ProgressBar>);
    let last_lambda = std::cell::Cell::new(None::<(usize, f64)>);
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
            if let Some(l) = mean_lambda {
                last_lambda.set(Some((step, l)));
            }
            let lam = last_lambda
                .get()
                .map(|(at, l)| format!(" mean lambda {l:.4} (step {at})"))
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

fn run_evaluate(a: &EvaluateArgs) -> Result<()> {
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

/// candle's own ops ask for the thread count on every call, and without `RAYON_NUM_THREADS`
/// it is recomputed from `/proc/cpuinfo` each time (`candle_core::utils::get_num_threads`).
/// Setting the variable to that count once (unless the user set it) makes those calls cheap
/// and gives rayon's pool the same count. SmolLM2 decode, 2 cores: ~12 -> ~20 tok/s (see the
/// README).
fn fix_thread_count() {
    env_default("RAYON_NUM_THREADS", || {
        candle_core::utils::get_num_threads().to_string()
    });
}

fn main() -> ExitCode {
    fix_thread_count();
    shorten_candle_spin();
    keep_freed_memory();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        // Colour codes only for a terminal (not in logs or captured stderr); no timestamp or
        // module path, like the command's other messages.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .without_time()
        .with_target(false)
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
        Command::Generate(args) => run_generate(args),
        Command::Bench(args) => run_bench(args),
        Command::Export {
            to,
            src,
            dst,
            overwrite,
        } => run_export(to, src, dst, *overwrite),
        Command::Train(args) => run_train(args),
        Command::Evaluate(args) => run_evaluate(args),
        Command::Plot { run_dir, output } => {
            let out = output.clone().unwrap_or_else(|| run_dir.join("plot.png"));
            diffattn::train::plot::plot(run_dir, &out)
                .map(|_| println!("wrote {}", out.display()))
                .map_err(Into::into)
        }
        Command::Compare(args) => match run_compare(args) {
            Ok(code) => return code,
            Err(e) => Err(e),
        },
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
