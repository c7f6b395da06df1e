//! `diff-transformer`: convert pretrained Llama, Mistral, Qwen2, Qwen3 and Gemma 3 checkpoints into differential-attention
//! models (Ye et al., arXiv:2410.05258), in the formats the Python ecosystem loads.

mod args;
mod commands;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

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

#[derive(Parser)]
#[command(
    name = "diff-transformer",
    version,
    about = "Convert Llama, Mistral, Qwen2, Qwen3 and Gemma 3 checkpoints to differential attention, run, compare and fine-tune them"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Import a llama.cpp GGUF file as a Hugging Face model directory (config.json,
    /// model.safetensors, tokenizer.json, tokenizer_config.json, generation_config.json).
    ImportGguf(commands::import_gguf::ImportGgufArgs),
    /// Convert the `base_model` of an axolotl config to differential attention
    /// (`llama-differential` where a Llama config expresses the source, else the family's
    /// `<model_type>-differential`; with --format, `diffllama`), writing OUTPUT_DIR with an
    /// updated axolotl_config.yml.
    Convert(commands::convert::ConvertArgs),
    /// Generate text with a model directory (any supported family, source or converted),
    /// streaming tokens.
    Generate(commands::generate::GenerateArgs),
    /// Compare a converted model with its source: logits (max/mean |delta|, KL, top-1) and
    /// greedy continuations with and without the KV cache.
    Compare(commands::compare::CompareArgs),
    /// Convert a differential checkpoint between llama-differential (axolotl plugin) and
    /// diffllama (transformers' DiffLlamaForCausalLM), exactly.
    Export(commands::export::ExportArgs),
    /// Measure prefill and decode speed of a model (synthetic token ids, greedy, KV cache).
    Bench(commands::bench::BenchArgs),
    /// Fine-tune the `base_model` of an axolotl config (any supported family, source or
    /// converted) with the negative-branch warm-up and lambda monitoring; writes checkpoints,
    /// metrics.jsonl, a TensorBoard event file and the final model into output_dir.
    Train(commands::train::TrainArgs),
    /// Eval loss and perplexity of a model on the validation split of an axolotl config.
    Evaluate(commands::evaluate::EvaluateArgs),
    /// Draw a training run's metrics (loss, learning rate, lambda_full, mix) as a PNG.
    Plot(commands::plot::PlotArgs),
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

/// A closed stdout (`compare --json | head`) ends the process quietly, as for any Unix tool:
/// Rust ignores SIGPIPE by default, so every `println!` after the reader left would panic.
fn default_sigpipe() {
    #[cfg(unix)]
    // SAFETY: restoring the default disposition of one signal at start-up, before any thread.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

/// A panic is a bug of this tool: one line saying so (where, and what), the backtrace only
/// under RUST_BACKTRACE, instead of the default hook's message.
fn bug_report_on_panic() {
    std::panic::set_hook(Box::new(|info| {
        let what = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "panic".into());
        let at = info
            .location()
            .map(|l| format!(" at {}:{}", l.file(), l.line()))
            .unwrap_or_default();
        eprintln!(
            "internal error (a bug in diff-transformer, please report it): {what}{at}; set RUST_BACKTRACE=1 for a backtrace"
        );
        if std::env::var_os("RUST_BACKTRACE").is_some_and(|v| v != "0") {
            eprintln!("{}", std::backtrace::Backtrace::force_capture());
        }
    }));
}

/// SIGINT and SIGTERM ask the command to stop at its next check (`diffattn::interrupt`),
/// which then removes its partial outputs and exits with 128 + the signal; a second signal
/// ends the process at once (the handler restores the default action).
fn stop_on_signals() {
    extern "C" fn handler(signal: libc::c_int) {
        diffattn::interrupt::request(signal);
        // SAFETY: signal() is async-signal-safe; restores the default disposition.
        unsafe { libc::signal(signal, libc::SIG_DFL) };
    }
    for signal in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: installs a handler that only stores an atomic and calls signal().
        unsafe { libc::signal(signal, handler as *const () as libc::sighandler_t) };
    }
}

fn main() -> ExitCode {
    default_sigpipe();
    stop_on_signals();
    bug_report_on_panic();
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
    on_the_pool(|| dispatch(&cli))
}

/// Runs `f` on a worker of rayon's global pool: the parallel loops it starts (several hundred
/// matrix products per decoded token) then fork and join inside the pool, where a call from
/// the main thread would hand each one to the pool and sleep on a futex until it is done (two
/// context switches per product). The worker's stack is as large as a main thread's.
fn on_the_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    // The pool's size is rayon's default: `RAYON_NUM_THREADS`, set by `fix_thread_count`.
    match rayon::ThreadPoolBuilder::new()
        .stack_size(64 << 20)
        .build_global()
    {
        // Called from outside the pool, `scope` runs its body on a worker.
        Ok(()) => rayon::scope(|_| f()),
        Err(_) => f(),
    }
}

fn dispatch(cli: &Cli) -> ExitCode {
    let result = match &cli.command {
        Command::ImportGguf(args) => commands::import_gguf::run(args),
        Command::Convert(args) => commands::convert::run(args),
        Command::Generate(args) => commands::generate::run(args),
        Command::Bench(args) => commands::bench::run(args),
        Command::Export(args) => commands::export::run(args),
        Command::Train(args) => commands::train::run(args),
        Command::Evaluate(args) => commands::evaluate::run(args),
        Command::Plot(args) => commands::plot::run(args),
        Command::Compare(args) => match commands::compare::run(args) {
            Ok(code) => return code,
            Err(e) => Err(e),
        },
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            match e.downcast_ref::<diffattn::error::Error>() {
                Some(diffattn::error::Error::Interrupted { signal }) => {
                    ExitCode::from((128 + signal).clamp(0, 255) as u8)
                }
                _ => ExitCode::FAILURE,
            }
        }
    }
}
