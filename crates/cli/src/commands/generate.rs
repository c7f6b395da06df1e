//! `generate`: text from a model directory, streamed.

use std::path::PathBuf;

use anyhow::Result;

use crate::args::{parse_dtype, DTypeArg};

#[derive(clap::Args)]
#[command(group(clap::ArgGroup::new("input").required(true).multiple(false)))]
pub struct GenerateArgs {
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
    #[arg(long, default_value = "f32", value_parser = parse_dtype)]
    dtype: DTypeArg,
}

pub fn run(a: &GenerateArgs) -> Result<()> {
    use std::io::Write;
    let dtype = a.dtype.into();
    let codec = diffattn::generate::TextCodec::load(&a.model)?;
    let ids = match (&a.prompt, &a.chat) {
        (_, Some(c)) => codec.encode_chat(c)?,
        (Some(p), None) => codec.encode(p)?,
        (None, None) => unreachable!("clap requires one"),
    };
    diffattn::memory::check_inference(
        "generate",
        &a.model,
        dtype,
        1,
        ids.len() + a.max_new_tokens,
    )?;
    let model = diffattn::model::Model::load(&a.model, dtype, &candle_core::Device::Cpu)?;
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
