//! Differential attention (Ye et al., "Differential Transformer", arXiv:2410.05258) for
//! pretrained checkpoints of the Llama, Mistral, Qwen2, Qwen3 and Gemma 3 families: reading
//! Hugging Face checkpoints and GGUF files, converting attention to the differential form,
//! and writing checkpoints the Python ecosystem loads. The numeric contract is `docs/spec.md`
//! and `docs/formats.md` of the repository.

pub mod axolotl;
pub mod checkpoint;
pub mod compare;
pub mod config;
pub mod convert;
pub mod dtype;
pub mod error;
pub mod export;
pub mod families;
pub mod format;
pub mod generate;
pub mod gguf;
pub mod hub;
pub mod interrupt;
pub mod memory;
pub mod model;
pub mod output;
pub mod pipeline;
pub mod remote_code;
pub mod train;

pub use error::{Error, Result};
