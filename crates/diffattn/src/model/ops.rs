//! A softmax over the last dimension with its own backward, for the attention maps.
//!
//! candle's differentiable `ops::softmax` is composed of five ops (max, sub, exp, sum, div), each
//! allocating a `[batch, heads, seq, keys]` tensor, and its backward walks them all again; the
//! fused `softmax_last_dim` has no backward (gradients silently dropped). This op does the
//! forward in one pass per row and the backward `dx = y ⊙ (g − Σ g ⊙ y)` (the softmax Jacobian
//! applied to g) in one pass, from the saved output y.

use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};
use rayon::prelude::*;

struct Softmax;

const ROWS_PER_TASK: usize = 64;

fn contiguous_f32<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> candle_core::Result<&'a [f32]> {
    let CpuStorage::F32(d) = s else {
        candle_core::bail!("{what}: f32 only");
    };
    let Some((a, b)) = l.contiguous_offsets() else {
        candle_core::bail!("{what}: contiguous input only");
    };
    Ok(&d[a..b])
}

/// Softmax of one row in place: `exp(x − max) / Σ exp(x − max)`.
pub(crate) fn softmax_row(row: &mut [f32]) {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0f32;
    for v in row.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    let inv = 1.0 / sum;
    row.iter_mut().for_each(|v| *v *= inv);
}

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "softmax-last-dim-with-backward"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(storage, layout, "softmax")?;
        let t = layout.shape().dims().last().copied().unwrap_or(1).max(1);
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(t * ROWS_PER_TASK)
            .zip(x.par_chunks(t * ROWS_PER_TASK))
            .for_each(|(o, xb)| {
                for (orow, xrow) in o.chunks_mut(t).zip(xb.chunks(t)) {
                    orow.copy_from_slice(xrow);
                    softmax_row(orow);
                }
            });
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }

    fn bwd(
        &self,
        _arg: &Tensor,
        res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let t = res.dims().last().copied().unwrap_or(1).max(1);
        let g = grad_res.contiguous()?;
        let (ys, yl) = res.storage_and_layout();
        let (gs, gl) = g.storage_and_layout();
        let (candle_core::Storage::Cpu(ys), candle_core::Storage::Cpu(gs)) = (&*ys, &*gs) else {
            candle_core::bail!("softmax backward: CPU tensors only");
        };
        let y = contiguous_f32(ys, yl, "softmax backward")?;
        let gv = contiguous_f32(gs, gl, "softmax backward")?;
        let mut out = vec![0f32; y.len()];
        out.par_chunks_mut(t * ROWS_PER_TASK)
            .zip(
                y.par_chunks(t * ROWS_PER_TASK)
                    .zip(gv.par_chunks(t * ROWS_PER_TASK)),
            )
            .for_each(|(o, (yb, gb))| {
                for ((orow, yrow), grow) in o.chunks_mut(t).zip(yb.chunks(t)).zip(gb.chunks(t)) {
                    let dot: f32 = yrow.iter().zip(grow).map(|(a, b)| a * b).sum();
                    for ((oj, &yj), &gj) in orow.iter_mut().zip(yrow).zip(grow) {
                        *oj = yj * (gj - dot);
                    }
                }
            });
        let shape = res.shape().clone();
        let device = res.device().clone();
        Ok(Some(Tensor::from_vec(out, shape, &device)?))
    }
}

/// Softmax over the last dimension (f32), differentiable. CPU: the fused op above; other
/// devices: candle's composed `ops::softmax`.
pub fn softmax_last_dim(x: &Tensor) -> candle_core::Result<Tensor> {
    if x.device().is_cpu() && x.dtype() == candle_core::DType::F32 {
        x.contiguous()?.apply_op1(Softmax)
    } else {
        candle_nn::ops::softmax(x, candle_core::D::Minus1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var, D};

    #[test]
    fn equals_composed_softmax_and_its_gradient() {
        let d = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f32, 2.0, (2, 3, 70), &d).unwrap()).unwrap();
        let w = Tensor::randn(0f32, 1.0, (2, 3, 70), &d).unwrap();
        let a = softmax_last_dim(x.as_tensor()).unwrap();
        let b = candle_nn::ops::softmax(x.as_tensor(), D::Minus1).unwrap();
        let diff = (&a - &b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(diff < 1e-6, "{diff}");
        let ga = (&a * &w).unwrap().sum_all().unwrap().backward().unwrap();
        let gb = (&b * &w).unwrap().sum_all().unwrap().backward().unwrap();
        let (ga, gb) = (
            ga.get(x.as_tensor()).unwrap(),
            gb.get(x.as_tensor()).unwrap(),
        );
        let diff = (ga - gb)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(diff < 1e-6, "{diff}");
    }
}
