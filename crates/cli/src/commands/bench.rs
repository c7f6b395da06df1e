//! `bench`: prefill and decode speed of a model.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Result;

use crate::args::{parse_dtype, DTypeArg};

#[derive(clap::Args)]
pub struct BenchArgs {
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
    #[arg(long, default_value = "f32", value_parser = parse_dtype)]
    dtype: DTypeArg,
}

pub fn run(a: &BenchArgs) -> Result<()> {
    use candle_core::{Device, Tensor};
    diffattn::memory::check_inference(
        "bench",
        &a.model,
        a.dtype.into(),
        1,
        a.prefill_tokens
            .max(a.prompt_tokens.saturating_add(a.decode_tokens)),
    )?;
    let model = diffattn::model::Model::load(&a.model, a.dtype.into(), &Device::Cpu)?;
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
