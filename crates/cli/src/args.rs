//! Typed options shared by several commands: clap parses and checks them (an invalid value
//! is refused with the list of possible values) before any command runs.

use clap::ValueEnum;

/// A floating-point dtype: storage dtype of written weights, or compute dtype. `--dtype`
/// options parse it with [`parse_dtype`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DTypeArg {
    #[value(alias = "float32", alias = "fp32")]
    F32,
    #[value(alias = "bfloat16")]
    Bf16,
    #[value(alias = "float16", alias = "fp16", alias = "half")]
    F16,
}

/// `--dtype`'s parser: a [`DTypeArg`] name or one of its aliases (those
/// [`diffattn::dtype::DType::parse`] accepts), in any case. Possible values are not listed in
/// the help (its text names them); a wrong value is refused with them.
pub fn parse_dtype(s: &str) -> Result<DTypeArg, String> {
    DTypeArg::from_str(s, true).map_err(|_| "expected f32, bf16 or f16".to_string())
}

impl From<DTypeArg> for diffattn::dtype::DType {
    fn from(d: DTypeArg) -> Self {
        match d {
            DTypeArg::F32 => Self::F32,
            DTypeArg::Bf16 => Self::BF16,
            DTypeArg::F16 => Self::F16,
        }
    }
}

impl From<DTypeArg> for candle_core::DType {
    fn from(d: DTypeArg) -> Self {
        match d {
            DTypeArg::F32 => Self::F32,
            DTypeArg::Bf16 => Self::BF16,
            DTypeArg::F16 => Self::F16,
        }
    }
}

/// A differential checkpoint format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum FormatArg {
    // Format A, the axolotl plugin's `LlamaDifferentialForCausalLM`.
    LlamaDifferential,
    // Format B, transformers' `DiffLlamaForCausalLM`.
    #[value(name = "diffllama")]
    DiffLlama,
}

impl From<FormatArg> for diffattn::export::Format {
    fn from(f: FormatArg) -> Self {
        match f {
            FormatArg::LlamaDifferential => Self::LlamaDifferential,
            FormatArg::DiffLlama => Self::DiffLlama,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every name and alias clap accepts means what the library's parsers make of it.
    #[test]
    fn values_agree_with_the_library_parsers() {
        for s in [
            "f32", "float32", "fp32", "bf16", "bfloat16", "f16", "float16", "fp16", "half", "F32",
            "BF16",
        ] {
            let d = parse_dtype(s).unwrap();
            assert_eq!(
                Some(diffattn::dtype::DType::from(d)),
                diffattn::dtype::DType::parse(s),
                "{s}"
            );
        }
        assert_eq!(parse_dtype("f64").unwrap_err(), "expected f32, bf16 or f16");
        for s in ["llama-differential", "diffllama"] {
            let f = FormatArg::from_str(s, false).unwrap();
            assert_eq!(
                Some(diffattn::export::Format::from(f)),
                diffattn::export::Format::parse(s)
            );
        }
    }
}
