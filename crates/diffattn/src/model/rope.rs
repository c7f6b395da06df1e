//! Rotary position embeddings as in Hugging Face Llama (`rotate_half` convention), with
//! `rope_scaling` types `linear` and `llama3` (transformers' `modeling_rope_utils.py`:
//! `_compute_linear_scaling_rope_parameters`, `_compute_llama3_parameters`).

use candle_core::{DType, Device, Result, Tensor, D};
use serde_json::Value;

/// RoPE tables `cos`, `sin`: `[max_positions, head_dim / 2]` (f32).
#[derive(Debug, Clone)]
pub struct Rope {
    cos: Tensor,
    sin: Tensor,
    pub head_dim: usize,
}

/// Inverse frequencies for `head_dim`, `theta` and an optional scaling object
/// (`rope_type`/`type` = `default`, `linear`, `llama3`). Other types are refused by name.
pub fn inv_freq(
    head_dim: usize,
    theta: f64,
    scaling: Option<&Value>,
) -> std::result::Result<Vec<f32>, String> {
    // As transformers: base ** (arange(0, dim, 2) / dim), in float32.
    let base: Vec<f32> = (0..head_dim / 2)
        .map(|i| 1.0 / (theta as f32).powf((2 * i) as f32 / head_dim as f32))
        .collect();
    let Some(s) = scaling else { return Ok(base) };
    let kind = s
        .get("rope_type")
        .or_else(|| s.get("type"))
        .and_then(Value::as_str)
        .unwrap_or("default");
    let num = |k: &str| -> std::result::Result<f32, String> {
        s.get(k)
            .and_then(Value::as_f64)
            .filter(|v| v.is_finite() && *v > 0.0)
            .map(|v| v as f32)
            .ok_or_else(|| format!("rope scaling {kind:?} needs a positive numeric `{k}`"))
    };
    match kind {
        "default" => Ok(base),
        "linear" => {
            let f = num("factor")?;
            Ok(base.iter().map(|x| x / f).collect())
        }
        "llama3" => {
            let factor = num("factor")?;
            let low = num("low_freq_factor")?;
            let high = num("high_freq_factor")?;
            let old = num("original_max_position_embeddings")?;
            let low_wavelen = old / low;
            let high_wavelen = old / high;
            Ok(base
                .iter()
                .map(|&f| {
                    let wavelen = 2.0 * std::f32::consts::PI / f;
                    let scaled = if wavelen > low_wavelen { f / factor } else { f };
                    let medium = !(wavelen < high_wavelen) && !(wavelen > low_wavelen);
                    if medium {
                        let smooth = (old / wavelen - low) / (high - low);
                        (1.0 - smooth) * scaled / factor + smooth * scaled
                    } else {
                        scaled
                    }
                })
                .collect())
        }
        other => Err(format!(
            "unsupported rope scaling type {other:?}; supported: default, linear, llama3"
        )),
    }
}

impl Rope {
    /// Tables for positions `0..max_positions`.
    pub fn new(
        inv_freq: &[f32],
        head_dim: usize,
        max_positions: usize,
        device: &Device,
    ) -> Result<Self> {
        let n = inv_freq.len();
        let inv = Tensor::from_slice(inv_freq, (1, n), device)?;
        let pos = Tensor::arange(0u32, max_positions as u32, device)?
            .to_dtype(DType::F32)?
            .reshape((max_positions, 1))?;
        let freqs = pos.broadcast_mul(&inv)?;
        Ok(Self {
            cos: freqs.cos()?,
            sin: freqs.sin()?,
            head_dim,
        })
    }

    /// Number of positions covered.
    pub fn max_positions(&self) -> usize {
        self.cos.dim(0).unwrap_or(0)
    }

    /// `cos`, `sin` for `positions` `[b, s]` (u32), shaped `[b, s, head_dim / 2]` (f32; the
    /// two halves of a head share them, as `torch.cat((freqs, freqs), -1)`).
    pub fn tables(&self, positions: &Tensor) -> Result<(Tensor, Tensor)> {
        let (b, s) = positions.dims2()?;
        let flat = positions.flatten_all()?;
        let get = |t: &Tensor| -> Result<Tensor> {
            t.index_select(&flat, 0)?.reshape((b, s, self.head_dim / 2))
        };
        Ok((get(&self.cos)?, get(&self.sin)?))
    }
}

/// `x * cos + rotate_half(x) * sin` for `x` `[b, heads, s, head_dim]`, `cos`/`sin`
/// `[b, 1, s, head_dim]` (differentiable; the composed form of [`super::layout::rope_heads`]).
pub fn apply(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let d = x.dim(D::Minus1)?;
    let x1 = x.narrow(D::Minus1, 0, d / 2)?;
    let x2 = x.narrow(D::Minus1, d / 2, d / 2)?;
    let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    x.broadcast_mul(cos)? + rotated.broadcast_mul(sin)?
}
