//! `import-gguf`: a llama.cpp GGUF file as a Hugging Face model directory.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Result;

use crate::args::{parse_dtype, DTypeArg};
use crate::commands::progress;

#[derive(clap::Args)]
pub struct ImportGgufArgs {
    /// The .gguf file.
    gguf: PathBuf,
    /// Output directory (must not exist or be empty, unless --overwrite).
    out_dir: PathBuf,
    /// Storage dtype of the written weights: f32, bf16 or f16.
    #[arg(long, default_value = "f32", value_parser = parse_dtype)]
    dtype: DTypeArg,
    /// Replace a non-empty output directory: only one holding nothing but files this tool
    /// writes (a checkpoint, a training run); any other file is named and nothing is deleted.
    /// The old output is kept until the new one is complete.
    #[arg(long)]
    overwrite: bool,
}

pub fn run(a: &ImportGgufArgs) -> Result<()> {
    let dtype = a.dtype.into();
    let start = Instant::now();
    let pb = progress(0, "importing");
    let report =
        diffattn::gguf::import_gguf(&a.gguf, &a.out_dir, dtype, a.overwrite, &|_| pb.inc(1))?;
    pb.finish_and_clear();
    let c = &report.config;
    println!(
        "imported {} tensors from {} into {} in {:.2} s",
        report.tensors,
        a.gguf.display(),
        report.output_dir.display(),
        start.elapsed().as_secs_f64()
    );
    println!(
        "{}: layers {}, hidden {}, heads {}, kv heads {}, head_dim {}, vocab {}, tied embeddings {}, dtype {}",
        c["architectures"][0].as_str().unwrap_or("?"),
        c["num_hidden_layers"], c["hidden_size"], c["num_attention_heads"], c["num_key_value_heads"],
        c["head_dim"], c["vocab_size"], c["tie_word_embeddings"], dtype
    );
    Ok(())
}
