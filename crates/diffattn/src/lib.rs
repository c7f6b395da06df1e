//! Differential attention (Ye et al., "Differential Transformer", arXiv:2410.05258) for
//! pretrained Llama-family checkpoints: reading Hugging Face checkpoints and GGUF files,
//! converting attention to the differential form, and writing checkpoints the Python
//! ecosystem loads. The numeric contract is `shared/SPEC.md`.

pub mod axolotl;
pub mod checkpoint;
pub mod compare;
pub mod config;
pub mod convert;
pub mod dtype;
pub mod error;
pub mod export;
pub mod generate;
pub mod gguf;
pub mod hub;
pub mod model;
pub mod output;
pub mod pipeline;
pub mod train;

pub use error::{Error, Result};
