//! `bench`: prefill and decode speed of a model.

use std::path::PathBuf;
use std::time::Instant;

use diffattn::dtype::DType;

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
    /// Also measure this machine's memory read bandwidth (the decode kernel reading a 512 MB
    /// matrix) and print decode's weight traffic as a fraction of it.
    #[arg(long)]
    bandwidth: bool,
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
    if a.bandwidth {
        let per_token = weight_bytes_per_token(&a.model, a.dtype.into())?;
        let read = read_bandwidth();
        let decode = per_token as f64 * a.decode_tokens as f64 / best_decode;
        println!(
            "decode reads {:.0} MB of weights per token: {:.1} GB/s, {:.0}% of this machine's read bandwidth ({:.1} GB/s: our product kernel reading a 512 MB matrix on {} threads)",
            per_token as f64 / 1e6,
            decode / 1e9,
            100.0 * decode / read,
            read / 1e9,
            rayon::current_num_threads()
        );
    }
    Ok(())
}

/// Bytes of weight matrices one decoded token reads: every matrix in the dtype it is used in
/// (see `Model::load`), except the embedding when an output head of its own exists (a decoded
/// token reads one row of it).
fn weight_bytes_per_token(dir: &std::path::Path, dtype: candle_core::DType) -> Result<u64> {
    let ck = diffattn::checkpoint::Checkpoint::open(dir)?;
    let dtype = diffattn::memory::dtype_of(dtype);
    let untied = ck.info("lm_head.weight").is_some();
    Ok(ck
        .names()
        .filter(|n| !(untied && *n == "model.embed_tokens.weight"))
        .filter_map(|n| ck.info(n))
        .filter(|i| i.shape.len() == 2)
        .map(|i| {
            let size = if dtype == diffattn::dtype::DType::F32 {
                i.dtype.size()
            } else {
                dtype.size()
            };
            (i.numel() * size) as u64
        })
        .sum())
}

/// Bytes per second at which the decode kernel reads a 512 MB f32 matrix held in memory
/// (`[16384, 8192]` times one row), best of 5: the ceiling decoding can reach on this machine.
fn read_bandwidth() -> f64 {
    let (rows, cols) = (16384, 8192);
    let w: Vec<f32> = (0..rows * cols).map(|i| (i % 7) as f32 * 0.1).collect();
    let m = diffattn::model::stored::StoredMatrix::from_f32(&w, rows, cols, DType::F32);
    drop(w);
    let x = vec![0.5f32; cols];
    let mut best = f64::MAX;
    for _ in 0..5 {
        let start = Instant::now();
        std::hint::black_box(m.matmul_t(&x, 1));
        best = best.min(start.elapsed().as_secs_f64());
    }
    m.nbytes() as f64 / best
}
