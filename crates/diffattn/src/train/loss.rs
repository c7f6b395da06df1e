//! Fused cross-entropy: negative log-likelihood of target ids under `log_softmax` of
//! class-major logits `[vocab, n]`, as one candle custom op with its own backward.
//!
//! The composed form ([`nll_sum`]: `log_softmax`, `gather`, their backward: `scatter-add` into
//! zeros and several full passes) allocates and walks the logits about ten times; for SmolLM2
//! (vocab 49 152) at 256 tokens that is 0.4–0.8 s of a training step. Here the forward is two
//! row-major passes (per-column max, log-sum-exp) and the backward one pass writing
//! `(softmax(x) − onehot(target)) · grad` (the textbook gradient of the cross-entropy). The
//! test below checks loss and gradient against the composed form.

use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};

use crate::model::cpu::{all_cpu_f32, f32_slice, with_f32};
use crate::model::simd::{exp, vectorized};
use rayon::prelude::*;

/// Summed negative log-likelihood (0-dim) of `targets` under `logits` `[n, vocab]`, composed
/// from candle ops (`log_softmax`, `gather`): the reference of the fused op, and its fallback
/// off the CPU.
pub fn nll_sum(logits: &Tensor, targets: &[u32]) -> candle_core::Result<Tensor> {
    let n = targets.len();
    let t = Tensor::from_vec(targets.to_vec(), (n, 1), logits.device())?;
    let lp = candle_nn::ops::log_softmax(logits, candle_core::D::Minus1)?;
    lp.gather(&t, 1)?.sum_all()?.neg()
}

/// `nll[i] = logsumexp(column i) − logits[targets[i], i]` for class-major logits `[vocab, n]` (column i holds position i's logits): the
/// layout of `W · hᵀ`, whose weight gradient `grad · h` comes out contiguous `[vocab, hidden]`
/// (with `h · Wᵀ` candle would accumulate a transposed 28 M-element gradient, strided).
pub struct CrossEntropyT {
    pub targets: Vec<u32>,
}

const ROWS_PER_TASK: usize = 512;

/// Per-column log-sum-exp of a row-major `[v, n]` matrix: parallel over row blocks, each
/// keeping per-column running (max, sum) merged at the end.
fn column_lse(x: &[f32], v: usize, n: usize) -> Vec<f32> {
    let partial: Vec<(Vec<f32>, Vec<f64>)> = x
        .par_chunks((ROWS_PER_TASK * n).max(1))
        .map(|block| {
            vectorized(
                #[inline(always)]
                || {
                    let mut max = vec![f32::NEG_INFINITY; n];
                    for row in block.chunks(n) {
                        // A comparison the compiler vectorises (f32::max is not); NaN never wins either way.
                        for (m, &a) in max.iter_mut().zip(row) {
                            if a > *m {
                                *m = a;
                            }
                        }
                    }
                    let mut sum = vec![0f32; n];
                    for row in block.chunks(n) {
                        for ((s, &m), &a) in sum.iter_mut().zip(&max).zip(row) {
                            *s += exp(a - m);
                        }
                    }
                    (max, sum.into_iter().map(|s| s as f64).collect())
                },
            )
        })
        .collect();
    let _ = v;
    (0..n)
        .map(|j| {
            let m = partial
                .iter()
                .map(|p| p.0[j])
                .fold(f32::NEG_INFINITY, f32::max);
            let s: f64 = partial
                .iter()
                .map(|p| p.1[j] * ((p.0[j] - m) as f64).exp())
                .sum();
            m + s.ln() as f32
        })
        .collect()
}

impl CustomOp1 for CrossEntropyT {
    fn name(&self) -> &'static str {
        "cross-entropy-class-major"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = f32_slice(storage, layout, "cross-entropy")?;
        let (v, n) = layout.shape().dims2()?;
        if n != self.targets.len() {
            candle_core::bail!("cross-entropy: {n} columns, {} targets", self.targets.len());
        }
        let lse = column_lse(x, v, n);
        let out = (0..n)
            .map(|j| lse[j] - x[self.targets[j] as usize * n + j])
            .collect();
        Ok((CpuStorage::F32(out), Shape::from(n)))
    }

    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let (v, n) = arg.dims2()?;
        let arg = arg.contiguous()?;
        let g = grad_res
            .to_dtype(candle_core::DType::F32)?
            .to_vec1::<f32>()?;
        let out = with_f32(&[&arg], "cross-entropy backward", |sl| {
            let x = sl[0];
            let lse = column_lse(x, v, n);
            let mut out = vec![0f32; v * n];
            out.par_chunks_mut((ROWS_PER_TASK * n).max(1))
                .zip(x.par_chunks((ROWS_PER_TASK * n).max(1)))
                .for_each(|(o, xb)| {
                    vectorized(
                        #[inline(always)]
                        || {
                            for (orow, xrow) in o.chunks_mut(n).zip(xb.chunks(n)) {
                                for ((o, &x), (&l, &gj)) in
                                    orow.iter_mut().zip(xrow).zip(lse.iter().zip(&g))
                                {
                                    *o = exp(x - l) * gj;
                                }
                            }
                        },
                    )
                });
            for (j, &t) in self.targets.iter().enumerate() {
                out[t as usize * n + j] -= g[j];
            }
            Ok(out)
        })?;
        Ok(Some(Tensor::from_vec(out, (v, n), arg.device())?))
    }
}

/// Summed negative log-likelihood (0-dim) of `targets` under class-major logits `[vocab, n]`.
pub fn nll_sum_class_major(logits_t: &Tensor, targets: &[u32]) -> candle_core::Result<Tensor> {
    if logits_t.device().is_cpu() {
        logits_t
            .contiguous()?
            .apply_op1(CrossEntropyT {
                targets: targets.to_vec(),
            })?
            .sum_all()
    } else {
        nll_sum(&logits_t.t()?, targets)
    }
}

/// The output head and the cross-entropy as one op: `nll[j]` of `targets[j]` under the
/// logits `W·h_jᵀ` (`h` `[n, hidden]`, `W` `[vocab, hidden]`), differentiable in `h` and `W`.
/// The class-major logits `[vocab, n]` are formed once and kept for the backward, which turns
/// them in place into `(softmax − onehot)·g` and forms `dW = G·h` and `dh = (Wᵀ·G)ᵀ`: no
/// logits-sized gradient goes through candle's graph (for SmolLM2 at 256 tokens, two 50 MB
/// passes and a transposed accumulation fewer). Values as [`CrossEntropyT`] over
/// `W·hᵀ` (same products, same log-sum-exp).
pub struct HeadCrossEntropy {
    targets: Vec<u32>,
    /// Logits `[vocab, n]` and per-column log-sum-exp from the forward.
    saved: std::sync::Mutex<Option<(Vec<f32>, Vec<f32>)>>,
}

impl candle_core::CustomOp2 for HeadCrossEntropy {
    fn name(&self) -> &'static str {
        "head-cross-entropy"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        use crate::model::layout::{buffer, gemm_strided, n_threads, Mat, Threads};
        let h = f32_slice(s1, l1, "head cross-entropy")?;
        let w = f32_slice(s2, l2, "head cross-entropy")?;
        let (n, dm) = l1.shape().dims2()?;
        let (v, dm2) = l2.shape().dims2()?;
        if dm != dm2 || n != self.targets.len() {
            candle_core::bail!(
                "head cross-entropy: h [{n}, {dm}], weight [{v}, {dm2}], {} targets",
                self.targets.len()
            );
        }
        if let Some(&t) = self.targets.iter().find(|&&t| t as usize >= v) {
            candle_core::bail!("head cross-entropy: target {t} >= vocabulary {v}");
        }
        let mut z = buffer(v * n);
        let wm = Mat {
            data: w,
            rs: dm as isize,
            cs: 1,
        };
        let ht = Mat {
            data: h,
            rs: 1,
            cs: dm as isize,
        };
        gemm_strided(
            &mut z,
            n,
            1,
            v,
            n,
            dm,
            wm,
            ht,
            false,
            Threads::Blocks(n_threads()),
        );
        let lse = column_lse(&z, v, n);
        let out = (0..n)
            .map(|j| lse[j] - z[self.targets[j] as usize * n + j])
            .collect();
        *self.saved.lock().expect("head cross-entropy state") = Some((z, lse));
        Ok((CpuStorage::F32(out), Shape::from(n)))
    }

    fn bwd(
        &self,
        h: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        use crate::model::layout::{linear_grads, Mat};
        let (n, dm) = h.dims2()?;
        let (v, _) = w.dims2()?;
        let g = grad.to_dtype(candle_core::DType::F32)?.to_vec1::<f32>()?;
        let (mut z, lse) = self
            .saved
            .lock()
            .expect("head cross-entropy state")
            .take()
            .ok_or_else(|| candle_core::Error::Msg("head cross-entropy: backward twice".into()))?;
        z.par_chunks_mut((ROWS_PER_TASK * n).max(1))
            .for_each(|block| {
                vectorized(
                    #[inline(always)]
                    || {
                        for row in block.chunks_mut(n) {
                            for (x, (&l, &gj)) in row.iter_mut().zip(lse.iter().zip(&g)) {
                                *x = exp(*x - l) * gj;
                            }
                        }
                    },
                )
            });
        for (j, &t) in self.targets.iter().enumerate() {
            z[t as usize * n + j] -= g[j];
        }
        // The head is a linear map: z now holds gᵀ [v, n] for the logits gradient g [n, v] (the tied
        // embedding's rows go to the same sink buffer as dW).
        let (dh, dw) = with_f32(&[h, w], "head cross-entropy backward", |sl| {
            let gt = Mat {
                data: &z,
                rs: n as isize,
                cs: 1,
            };
            Ok(linear_grads(gt, sl[0], sl[1], w, n, dm, v))
        })?;
        Ok((
            Some(Tensor::from_vec(dh, (n, dm), h.device())?),
            dw.map(|dw| Tensor::from_vec(dw, (v, dm), w.device()))
                .transpose()?,
        ))
    }
}

/// Summed negative log-likelihood (0-dim) of `targets` under the logits `weight · hᵀ`
/// (`h` `[n, hidden]`, `weight` `[vocab, hidden]`): [`HeadCrossEntropy`] on the CPU in f32,
/// the composed head and [`nll_sum_class_major`] otherwise.
pub fn head_nll_sum(h: &Tensor, weight: &Tensor, targets: &[u32]) -> candle_core::Result<Tensor> {
    if all_cpu_f32(&[h, weight]) {
        h.contiguous()?
            .apply_op2(
                &weight.contiguous()?,
                HeadCrossEntropy {
                    targets: targets.to_vec(),
                    saved: std::sync::Mutex::new(None),
                },
            )?
            .sum_all()
    } else {
        let logits_t = weight.matmul(&h.t()?)?.to_dtype(candle_core::DType::F32)?;
        nll_sum_class_major(&logits_t, targets)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn fused_equals_composed_loss_and_gradient() {
        let d = Device::Cpu;
        let x = Var::from_tensor(&(Tensor::randn(0f32, 3.0, (5, 1100), &d).unwrap())).unwrap();
        let targets = [0u32, 1099, 3, 3, 700];
        let composed = nll_sum(x.as_tensor(), &targets).unwrap();
        let b = composed.to_scalar::<f32>().unwrap();
        let gb = composed
            .backward()
            .unwrap()
            .get(x.as_tensor())
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        let xt = Var::from_tensor(&x.as_tensor().t().unwrap().contiguous().unwrap()).unwrap();
        let cm = nll_sum_class_major(xt.as_tensor(), &targets).unwrap();
        let a = cm.to_scalar::<f32>().unwrap();
        assert!((a - b).abs() < 1e-5 * b.abs(), "{a} vs {b}");
        let gt = cm
            .backward()
            .unwrap()
            .get(xt.as_tensor())
            .unwrap()
            .t()
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        // Gradients are softmax − onehot, in [−1, 1]: exp(x − lse) with |x − lse| up to ~30
        // here carries ~30 · 2⁻²⁴ ≈ 2e-6 of rounding from the f32 difference alone (both sides),
        // plus our exp's 2 ulp: 5e-6 absolute.
        for (ra, rb) in gt.iter().zip(&gb) {
            for (p, q) in ra.iter().zip(rb) {
                assert!((p - q).abs() < 5e-6, "{p} vs {q}");
            }
        }
    }

    /// The fused head + cross-entropy against the head as a matmul and the composed loss:
    /// loss, and gradients of both the hidden rows and the weight.
    #[test]
    fn fused_head_equals_matmul_and_composed_loss() {
        // 6 rows: the direct products; 40: the transposed ones (see `layout::linear_grads`).
        for n in [6usize, 40] {
            fused_head_case(n);
        }
    }

    fn fused_head_case(n: usize) {
        use crate::model::cpu::testing::assert_grads_close;
        let d = Device::Cpu;
        let h = Var::from_tensor(&Tensor::randn(0f32, 1.0, (n, 40), &d).unwrap()).unwrap();
        let w = Var::from_tensor(&Tensor::randn(0f32, 1.0, (1100, 40), &d).unwrap()).unwrap();
        let mut targets: Vec<u32> = (0..n as u32).map(|i| (i * 37) % 1100).collect();
        targets[..4].copy_from_slice(&[0, 1099, 3, 3]);
        let fused = head_nll_sum(h.as_tensor(), w.as_tensor(), &targets).unwrap();
        let logits = h.as_tensor().matmul(&w.as_tensor().t().unwrap()).unwrap();
        let composed = nll_sum(&logits, &targets).unwrap();
        let (a, b) = (
            fused.to_scalar::<f32>().unwrap(),
            composed.to_scalar::<f32>().unwrap(),
        );
        assert!((a - b).abs() < 1e-5 * b.abs(), "{a} vs {b}");
        let (ga, gb) = (fused.backward().unwrap(), composed.backward().unwrap());
        assert_grads_close(&ga, &gb, &[&h, &w], 1e-5, 0.01);
        // With a weight-gradient sink open, dW goes there (twice: accumulated) and dh to candle.
        let sink = crate::model::layout::WeightGradSink::open().unwrap();
        let again = || head_nll_sum(h.as_tensor(), w.as_tensor(), &targets).unwrap();
        let mut gs = again().backward().unwrap();
        assert!(gs.get(w.as_tensor()).is_none());
        let _ = again().backward().unwrap();
        sink.finish(&[w.as_tensor()], &mut gs).unwrap();
        let twice = (&composed * 2.0).unwrap().backward().unwrap();
        assert_grads_close(&gs, &twice, &[&w], 1e-5, 0.01);
        assert_grads_close(&gs, &gb, &[&h], 1e-5, 0.01);
    }
}
