//! Floating-point storage types of checkpoints and conversions between their raw bytes.
//!
//! Conversions to bf16/f16 round to nearest even (`half`), which is what PyTorch's
//! `tensor.to(torch.bfloat16)` does, so values written here equal what transformers writes.

use std::borrow::Cow;

use half::{bf16, f16};
use safetensors::Dtype as StDtype;

/// Storage dtype of a tensor we read or write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    F16,
    BF16,
}

impl DType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
        }
    }

    /// The safetensors dtype.
    pub fn to_safetensors(self) -> StDtype {
        match self {
            DType::F32 => StDtype::F32,
            DType::F16 => StDtype::F16,
            DType::BF16 => StDtype::BF16,
        }
    }

    /// From a safetensors dtype; `None` for anything that is not F32/F16/BF16.
    pub fn from_safetensors(d: StDtype) -> Option<Self> {
        match d {
            StDtype::F32 => Some(DType::F32),
            StDtype::F16 => Some(DType::F16),
            StDtype::BF16 => Some(DType::BF16),
            _ => None,
        }
    }

    /// The `torch_dtype` string of config.json (`float32`, `float16`, `bfloat16`).
    pub fn torch_name(self) -> &'static str {
        match self {
            DType::F32 => "float32",
            DType::F16 => "float16",
            DType::BF16 => "bfloat16",
        }
    }

    /// Parses `f32|float32`, `f16|float16|fp16`, `bf16|bfloat16`.
    pub fn parse(s: &str) -> Option<Self> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "float32" | "fp32" => Some(DType::F32),
            "f16" | "float16" | "fp16" | "half" => Some(DType::F16),
            "bf16" | "bfloat16" => Some(DType::BF16),
            _ => None,
        }
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
        })
    }
}

/// Decodes little-endian raw bytes of `dtype` into f32 values.
pub fn to_f32(bytes: &[u8], dtype: DType) -> Vec<f32> {
    match dtype {
        DType::F32 => bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        DType::F16 => bytes
            .chunks_exact(2)
            .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        DType::BF16 => bytes
            .chunks_exact(2)
            .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
    }
}

/// Encodes f32 values as little-endian bytes of `dtype` (round to nearest even).
pub fn from_f32(values: &[f32], dtype: DType) -> Vec<u8> {
    let mut out = Vec::with_capacity(values.len() * dtype.size());
    extend_from_f32(&mut out, values, dtype);
    out
}

/// Appends f32 values to `out` as little-endian bytes of `dtype`.
pub fn extend_from_f32(out: &mut Vec<u8>, values: &[f32], dtype: DType) {
    match dtype {
        #[cfg(target_endian = "little")]
        DType::F32 => out.extend_from_slice(bytemuck::cast_slice(values)),
        #[cfg(not(target_endian = "little"))]
        DType::F32 => values
            .iter()
            .for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
        DType::F16 => values
            .iter()
            .for_each(|v| out.extend_from_slice(&f16::from_f32(*v).to_le_bytes())),
        DType::BF16 => values
            .iter()
            .for_each(|v| out.extend_from_slice(&bf16::from_f32(*v).to_le_bytes())),
    }
}

/// Re-encodes raw bytes from one dtype to another; borrows when the dtypes agree.
pub fn convert(bytes: &[u8], from: DType, to: DType) -> Cow<'_, [u8]> {
    if from == to {
        return Cow::Borrowed(bytes);
    }
    match (from, to) {
        // Direct paths avoid a temporary f32 vector for the common down-casts.
        (DType::F32, _) => {
            let mut out = Vec::with_capacity(bytes.len() / 4 * to.size());
            for c in bytes.chunks_exact(4) {
                let v = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                match to {
                    DType::BF16 => out.extend_from_slice(&bf16::from_f32(v).to_le_bytes()),
                    DType::F16 => out.extend_from_slice(&f16::from_f32(v).to_le_bytes()),
                    DType::F32 => unreachable!(),
                }
            }
            Cow::Owned(out)
        }
        _ => Cow::Owned(from_f32(&to_f32(bytes, from), to)),
    }
}

/// Values of little-endian `bytes` of `dtype` that are NaN or infinite, and the largest |x|
/// of the finite ones. Works on the bits (the exponent all ones is NaN or infinite; for the
/// others, |x| orders as its bits without the sign), branch-free so that it vectorises.
pub fn scan(bytes: &[u8], dtype: DType) -> (usize, f32) {
    match dtype {
        DType::F32 => {
            let (mut bad, mut max) = (0usize, 0u32);
            for c in bytes.chunks_exact(4) {
                let b = u32::from_le_bytes([c[0], c[1], c[2], c[3]]) & 0x7fff_ffff;
                let non_finite = b >= 0x7f80_0000;
                bad += usize::from(non_finite);
                max = max.max(if non_finite { 0 } else { b });
            }
            (bad, f32::from_bits(max))
        }
        DType::F16 | DType::BF16 => {
            let exp: u16 = if dtype == DType::F16 { 0x7c00 } else { 0x7f80 };
            let (mut bad, mut max) = (0usize, 0u16);
            for c in bytes.chunks_exact(2) {
                let b = u16::from_le_bytes([c[0], c[1]]) & 0x7fff;
                let non_finite = b >= exp;
                bad += usize::from(non_finite);
                max = max.max(if non_finite { 0 } else { b });
            }
            let max = if dtype == DType::F16 {
                f16::from_bits(max).to_f32()
            } else {
                bf16::from_bits(max).to_f32()
            };
            (bad, max)
        }
    }
}

#[cfg(test)]
mod scan_tests {
    use super::*;

    #[test]
    fn counts_non_finite_and_finds_the_largest_finite_magnitude() {
        let v = [
            1.0f32,
            -3.0,
            f32::NAN,
            f32::INFINITY,
            0.5,
            f32::NEG_INFINITY,
            -0.0,
        ];
        for dt in [DType::F32, DType::F16, DType::BF16] {
            assert_eq!(scan(&from_f32(&v, dt), dt), (3, 3.0), "{dt:?}");
        }
        // f16 overflow: 1e5 becomes +inf there, and is finite in bf16.
        assert_eq!(scan(&from_f32(&[1e5], DType::F16), DType::F16).0, 1);
        assert_eq!(scan(&from_f32(&[1e5], DType::BF16), DType::BF16).0, 0);
        assert_eq!(scan(&[], DType::F32), (0, 0.0));
    }
}
