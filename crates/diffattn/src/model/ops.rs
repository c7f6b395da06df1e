//! A softmax over the last dimension with its own backward, for the attention maps.
//!
//! candle's differentiable `ops::softmax` is composed of five ops (max, sub, exp, sum, div), each
//! allocating a `[batch, heads, seq, keys]` tensor, and its backward walks them all again; the
//! fused `softmax_last_dim` has no backward (gradients silently dropped). This op does the
//! forward in one pass per row and the backward `dx = y ⊙ (g − Σ g ⊙ y)` (the softmax Jacobian
//! applied to g) in one pass, from the saved output y.

use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::cpu::{all_cpu_f32, f32_slice, with_f32};
use super::simd;

struct Softmax;

const ROWS_PER_TASK: usize = 64;

/// Lanes of the vectorised reductions (one AVX-512 register of f32).
pub(crate) const LANES: usize = 16;

/// Softmax of one row in place: `exp(x − max) / Σ exp(x − max)`, vectorised: the maximum and
/// the sum are taken over 16 interleaved partial results (element `i` goes to lane `i mod 16`,
/// the lanes are then added in order), the exponential is [`simd::exp`]. Entries whose
/// exponential is exactly 0 (masked keys) can be left off the end of the row without changing
/// a bit of the others: a lane plus 0 is the lane.
pub(crate) fn softmax_row(row: &mut [f32]) {
    simd::vectorized(
        #[inline(always)]
        || softmax_row_in(row),
    )
}

#[inline(always)]
fn softmax_row_in(row: &mut [f32]) {
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let mut chunks = row.chunks_exact(LANES);
    for c in &mut chunks {
        for (m, &v) in lanes.iter_mut().zip(c) {
            *m = if v > *m { v } else { *m };
        }
    }
    for (m, &v) in lanes.iter_mut().zip(chunks.remainder()) {
        *m = if v > *m { v } else { *m };
    }
    let max = lanes.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sums = [0f32; LANES];
    let mut chunks = row.chunks_exact_mut(LANES);
    for c in &mut chunks {
        for (s, v) in sums.iter_mut().zip(c.iter_mut()) {
            *v = simd::exp(*v - max);
            *s += *v;
        }
    }
    for (s, v) in sums.iter_mut().zip(chunks.into_remainder()) {
        *v = simd::exp(*v - max);
        *s += *v;
    }
    let inv = 1.0 / sums.iter().sum::<f32>();
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
        let x = f32_slice(storage, layout, "softmax")?;
        let t = layout.shape().dims().last().copied().unwrap_or(1).max(1);
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut((t * ROWS_PER_TASK).max(1))
            .zip(x.par_chunks((t * ROWS_PER_TASK).max(1)))
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
        let out = with_f32(&[res, &g], "softmax backward", |s| {
            let (y, gv) = (s[0], s[1]);
            let mut out = vec![0f32; y.len()];
            out.par_chunks_mut((t * ROWS_PER_TASK).max(1))
                .zip(
                    y.par_chunks((t * ROWS_PER_TASK).max(1))
                        .zip(gv.par_chunks((t * ROWS_PER_TASK).max(1))),
                )
                .for_each(|(o, (yb, gb))| {
                    for ((orow, yrow), grow) in o.chunks_mut(t).zip(yb.chunks(t)).zip(gb.chunks(t))
                    {
                        let dot: f32 = yrow.iter().zip(grow).map(|(a, b)| a * b).sum();
                        for ((oj, &yj), &gj) in orow.iter_mut().zip(yrow).zip(grow) {
                            *oj = yj * (gj - dot);
                        }
                    }
                });
            Ok(out)
        })?;
        let shape = res.shape().clone();
        let device = res.device().clone();
        Ok(Some(Tensor::from_vec(out, shape, &device)?))
    }
}

/// Softmax over the last dimension (f32), differentiable. CPU: the fused op above; other
/// devices: candle's composed `ops::softmax`.
pub fn softmax_last_dim(x: &Tensor) -> candle_core::Result<Tensor> {
    if all_cpu_f32(&[x]) {
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

/// RMS normalisation over the last dimension with its own backward: `y = x·r·w`,
/// `r = 1/√(mean(x²) + eps)` (LlamaRMSNorm). Forward in the order of the composed candle ops
/// (`sqr`, candle's own row sum, `· (1/n)`, `+ eps`, `sqrt`, `recip`, two products), so its
/// values are bit-identical to them; backward
/// `dx = r·(g⊙w) − x·r³·Σ(g⊙w⊙x)/n`, `dw = Σ_rows g⊙x·r` (row blocks summed in a fixed order).
struct RmsNorm {
    eps: f64,
}

const NORM_ROWS: usize = 16;

impl RmsNorm {
    /// `1/√(mean(x²) + eps)` of one row, as the composed ops round it.
    fn inv_rms(&self, row: &[f32], sq: &mut Vec<f32>) -> f32 {
        sq.clear();
        sq.extend(row.iter().map(|v| v * v));
        let mut sum = 0f32;
        // SAFETY: `sq` holds `row.len()` elements.
        unsafe {
            <f32 as candle_core::cpu::kernels::VecOps>::vec_reduce_sum(
                sq.as_ptr(),
                &mut sum,
                sq.len(),
            )
        };
        let scale = (1f64 / row.len() as f64) as f32;
        let mean = sum * scale + 0.0;
        1.0 / (mean * 1.0 + self.eps as f32).sqrt()
    }

    fn forward(&self, x: &[f32], w: Option<&[f32]>, n: usize) -> Vec<f32> {
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut((n * NORM_ROWS).max(1))
            .zip(x.par_chunks((n * NORM_ROWS).max(1)))
            .for_each(|(o, xb)| {
                let mut sq = Vec::with_capacity(n);
                for (orow, xrow) in o.chunks_mut(n).zip(xb.chunks(n)) {
                    let r = self.inv_rms(xrow, &mut sq);
                    match w {
                        Some(w) => {
                            for ((y, &xv), &wv) in orow.iter_mut().zip(xrow).zip(w) {
                                *y = xv * r * wv;
                            }
                        }
                        None => {
                            for (y, &xv) in orow.iter_mut().zip(xrow) {
                                *y = xv * r;
                            }
                        }
                    }
                }
            });
        out
    }

    /// `(dx, dw)` for `x` rows of width `n`, gradient `g`.
    fn backward(
        &self,
        x: &[f32],
        w: Option<&[f32]>,
        g: &[f32],
        n: usize,
    ) -> (Vec<f32>, Option<Vec<f32>>) {
        let mut dx = vec![0f32; x.len()];
        let partial_dw: Vec<Vec<f32>> = dx
            .par_chunks_mut((n * NORM_ROWS).max(1))
            .zip(
                x.par_chunks((n * NORM_ROWS).max(1))
                    .zip(g.par_chunks((n * NORM_ROWS).max(1))),
            )
            .map(|(dxb, (xb, gb))| {
                let mut sq = Vec::with_capacity(n);
                let mut gw = vec![0f32; n];
                let mut dw = vec![0f32; if w.is_some() { n } else { 0 }];
                for ((dxr, xr), gr) in dxb.chunks_mut(n).zip(xb.chunks(n)).zip(gb.chunks(n)) {
                    let r = self.inv_rms(xr, &mut sq);
                    match w {
                        Some(w) => {
                            for j in 0..n {
                                gw[j] = gr[j] * w[j];
                                dw[j] += gr[j] * xr[j] * r;
                            }
                        }
                        None => gw.copy_from_slice(gr),
                    }
                    let dot: f32 = gw.iter().zip(xr).map(|(a, b)| a * b).sum();
                    let c = r * r * r * dot / n as f32;
                    for j in 0..n {
                        dxr[j] = r * gw[j] - xr[j] * c;
                    }
                }
                dw
            })
            .collect();
        let dw = w.map(|_| {
            let mut total = vec![0f32; n];
            for p in &partial_dw {
                total.iter_mut().zip(p).for_each(|(a, b)| *a += b);
            }
            total
        });
        (dx, dw)
    }
}

fn last_dim(l: &Layout) -> usize {
    l.shape().dims().last().copied().unwrap_or(1).max(1)
}

/// With a weight: `CustomOp2(x, w)`.
struct RmsNormW(RmsNorm);

impl CustomOp1 for RmsNorm {
    fn name(&self) -> &'static str {
        "rms-norm-with-backward"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = f32_slice(s, l, "rms_norm")?;
        Ok((
            CpuStorage::F32(self.forward(x, None, last_dim(l))),
            l.shape().clone(),
        ))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, g: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let g = g.contiguous()?;
        let n = x.dims().last().copied().unwrap_or(1).max(1);
        let (dx, _) = with_f32(&[x, &g], "rms_norm backward", |s| {
            Ok(self.backward(s[0], None, s[1], n))
        })?;
        Ok(Some(Tensor::from_vec(dx, x.shape(), x.device())?))
    }
}

impl candle_core::CustomOp2 for RmsNormW {
    fn name(&self) -> &'static str {
        "rms-norm-weighted-with-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = f32_slice(s1, l1, "rms_norm")?;
        let w = f32_slice(s2, l2, "rms_norm")?;
        let n = last_dim(l1);
        if w.len() != n {
            candle_core::bail!("rms_norm: weight of {} for rows of {n}", w.len());
        }
        Ok((
            CpuStorage::F32(self.0.forward(x, Some(w), n)),
            l1.shape().clone(),
        ))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let g = g.contiguous()?;
        let n = x.dims().last().copied().unwrap_or(1).max(1);
        let (dx, dw) = with_f32(&[x, w, &g], "rms_norm backward", |s| {
            Ok(self.0.backward(s[0], Some(s[1]), s[2], n))
        })?;
        Ok((
            Some(Tensor::from_vec(dx, x.shape(), x.device())?),
            dw.map(|dw| Tensor::from_vec(dw, w.shape(), w.device()))
                .transpose()?,
        ))
    }
}

/// RMS norm over the last dimension, `x · rsqrt(mean(x²) + eps) · w` (LlamaRMSNorm, f32),
/// differentiable in `x` and `w`. CPU f32: the fused op above (bit-identical forward);
/// otherwise the composed candle ops.
///
/// Half-precision `x` (f16, bf16) is normalised in f32 and cast back before the weight
/// multiplies it, as transformers' `LlamaRMSNorm` does: the residual stream of real models
/// holds values whose square overflows f16 (max 65504), which would zero the whole row.
pub fn rms_norm(x: &Tensor, weight: Option<&Tensor>, eps: f64) -> candle_core::Result<Tensor> {
    if matches!(
        x.dtype(),
        candle_core::DType::F16 | candle_core::DType::BF16
    ) {
        let y = rms_norm(&x.to_dtype(candle_core::DType::F32)?, None, eps)?.to_dtype(x.dtype())?;
        return match weight {
            Some(w) => y.broadcast_mul(w),
            None => Ok(y),
        };
    }
    if all_cpu_f32(&[x]) && weight.map(|w| all_cpu_f32(&[w])).unwrap_or(true) {
        let x = x.contiguous()?;
        return match weight {
            Some(w) => x.apply_op2(&w.contiguous()?, RmsNormW(RmsNorm { eps })),
            None => x.apply_op1(RmsNorm { eps }),
        };
    }
    rms_norm_composed(x, weight, eps)
}

/// The composed form of [`rms_norm`] (reference for its test and the non-CPU path).
pub fn rms_norm_composed(
    x: &Tensor,
    weight: Option<&Tensor>,
    eps: f64,
) -> candle_core::Result<Tensor> {
    let norm = x
        .sqr()?
        .mean_keepdim(candle_core::D::Minus1)?
        .affine(1.0, eps)?
        .sqrt()?
        .recip()?;
    let y = x.broadcast_mul(&norm)?;
    match weight {
        Some(w) => y.broadcast_mul(w),
        None => Ok(y),
    }
}

#[cfg(test)]
mod rms_tests {
    use super::*;
    use crate::model::cpu::testing::{assert_grads_close, max_diff};
    use candle_core::{Device, Var};

    /// Values whose square overflows f16 (real models' residual streams hold such outliers):
    /// the half-precision norm is computed in f32, as transformers does, instead of zeroing
    /// the row.
    #[test]
    fn half_precision_rms_norm_survives_large_values() {
        let d = Device::Cpu;
        let x = (Tensor::randn(0f32, 1.0, (3, 64), &d).unwrap() * 900.0).unwrap();
        let w = Tensor::randn(1f32, 0.2, 64, &d).unwrap();
        let want = rms_norm(&x, Some(&w), 1e-5).unwrap();
        for dt in [candle_core::DType::F16, candle_core::DType::BF16] {
            let got = rms_norm(
                &x.to_dtype(dt).unwrap(),
                Some(&w.to_dtype(dt).unwrap()),
                1e-5,
            )
            .unwrap();
            assert_eq!(got.dtype(), dt);
            let got = got.to_dtype(candle_core::DType::F32).unwrap();
            // Rows have RMS 1 before the weight: |y| is O(1). x, w and y are each rounded
            // once (bf16: relative 2^-9 each), so the error is bounded relative to max |y|
            // (an absolute 3e-2 failed on an unlucky draw: 0.032 with max |y| ~ 5).
            let err = max_diff(&got, &want);
            let scale = max_diff(&want, &want.zeros_like().unwrap());
            assert!(
                err < 2e-2 * scale,
                "{dt:?}: max |delta| {err}, max |y| {scale}"
            );
            let peak = max_diff(&got, &got.zeros_like().unwrap()); // max |y|
            assert!(peak > 1.0, "{dt:?}: the row was zeroed (max |y| {peak})");
        }
    }

    #[test]
    fn fused_rms_norm_is_bit_identical_and_its_gradients_match() {
        let d = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f32, 3.0, (2, 7, 37), &d).unwrap()).unwrap();
        let w = Var::from_tensor(&Tensor::randn(1f32, 0.5, 37, &d).unwrap()).unwrap();
        let r = Tensor::randn(0f32, 1.0, (2, 7, 37), &d).unwrap();
        for weighted in [true, false] {
            let wt = weighted.then(|| w.as_tensor());
            let a = rms_norm(x.as_tensor(), wt, 1e-5).unwrap();
            let b = rms_norm_composed(x.as_tensor(), wt, 1e-5).unwrap();
            assert_eq!(max_diff(&a, &b), 0.0, "forward bit-identical");
            let ga = (&a * &r).unwrap().sum_all().unwrap().backward().unwrap();
            let gb = (&b * &r).unwrap().sum_all().unwrap().backward().unwrap();
            let vars: &[&Var] = if weighted { &[&x, &w] } else { &[&x] };
            assert_grads_close(&ga, &gb, vars, 1e-5, 0.1);
        }
    }
}

/// `silu(a) ⊙ b` (the Llama MLP's gate), with its own backward:
/// `da = g⊙b⊙σ(a)(1 + a(1 − σ(a)))`, `db = g⊙silu(a)`. Forward as candle's `silu`
/// (`a / (1 + exp(−a))`) then the product, with [`simd::exp`] (≤ 2 ulp from libm's). One graph node instead of two
/// whose backward is ten full-size ops.
struct SwiGlu;

const SWIGLU_CHUNK: usize = 4096;

impl candle_core::CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "swiglu-with-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let a = f32_slice(s1, l1, "swiglu")?;
        let b = f32_slice(s2, l2, "swiglu")?;
        if l1.shape() != l2.shape() {
            candle_core::bail!("swiglu: shapes {:?} and {:?}", l1.shape(), l2.shape());
        }
        let mut out = vec![0f32; a.len()];
        out.par_chunks_mut(SWIGLU_CHUNK)
            .zip(a.par_chunks(SWIGLU_CHUNK).zip(b.par_chunks(SWIGLU_CHUNK)))
            .for_each(|(o, (ac, bc))| {
                simd::vectorized(
                    #[inline(always)]
                    || {
                        for ((y, &av), &bv) in o.iter_mut().zip(ac).zip(bc) {
                            *y = av / (1.0 + simd::exp(-av)) * bv;
                        }
                    },
                )
            });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let g = g.contiguous()?;
        let (da, db) = with_f32(&[a, b, &g], "swiglu backward", |s| {
            let (av, bv, gv) = (s[0], s[1], s[2]);
            let mut da = vec![0f32; av.len()];
            let mut db = vec![0f32; av.len()];
            da.par_chunks_mut(SWIGLU_CHUNK)
                .zip(db.par_chunks_mut(SWIGLU_CHUNK))
                .zip(
                    av.par_chunks(SWIGLU_CHUNK)
                        .zip(bv.par_chunks(SWIGLU_CHUNK).zip(gv.par_chunks(SWIGLU_CHUNK))),
                )
                .for_each(|((dac, dbc), (ac, (bc, gc)))| {
                    simd::vectorized(
                        #[inline(always)]
                        || {
                            for ((da, db), (&x, (&b, &g))) in dac
                                .iter_mut()
                                .zip(dbc.iter_mut())
                                .zip(ac.iter().zip(bc.iter().zip(gc)))
                            {
                                let sig = 1.0 / (1.0 + simd::exp(-x));
                                let silu = x * sig;
                                *da = g * b * sig * (1.0 + x * (1.0 - sig));
                                *db = g * silu;
                            }
                        },
                    )
                });
            Ok((da, db))
        })?;
        Ok((
            Some(Tensor::from_vec(da, a.shape(), a.device())?),
            Some(Tensor::from_vec(db, b.shape(), b.device())?),
        ))
    }
}

/// `silu(gate) ⊙ up`, differentiable in both (fused on the CPU in f32, composed otherwise).
pub fn swiglu(gate: &Tensor, up: &Tensor) -> candle_core::Result<Tensor> {
    if all_cpu_f32(&[gate, up]) {
        gate.contiguous()?.apply_op2(&up.contiguous()?, SwiGlu)
    } else {
        gate.silu()? * up
    }
}

#[cfg(test)]
mod swiglu_tests {
    use super::*;
    use crate::model::cpu::testing::assert_grads_close;
    use candle_core::{Device, Var};

    #[test]
    fn fused_swiglu_matches_candle_and_its_gradients_match() {
        let d = Device::Cpu;
        let a = Var::from_tensor(&Tensor::randn(0f32, 3.0, (3, 5000), &d).unwrap()).unwrap();
        let b = Var::from_tensor(&Tensor::randn(0f32, 1.0, (3, 5000), &d).unwrap()).unwrap();
        let r = Tensor::randn(0f32, 1.0, (3, 5000), &d).unwrap();
        let x = swiglu(a.as_tensor(), b.as_tensor()).unwrap();
        let y = (a.as_tensor().silu().unwrap() * b.as_tensor()).unwrap();
        // The same formula as candle's silu; only the exponential (simd::exp, <= 2 ulp) differs.
        let rel = ((&x - &y).unwrap().abs().unwrap() / (y.abs().unwrap() + 1e-30).unwrap())
            .unwrap()
            .max_keepdim(1)
            .unwrap()
            .max_keepdim(0)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()[0];
        assert!(rel <= 1e-6, "forward relative difference {rel}");
        let gx = (&x * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let gy = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
        assert_grads_close(&gx, &gy, &[&a, &b], 1e-5, 0.1);
    }
}
