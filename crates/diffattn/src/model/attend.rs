//! Fused attention for inference (no gradient): scores, mask, softmax, the differential
//! combination `A1 − λ·A2` and the product with the values, per head and block of query rows,
//! without materialising `[b, heads, s, t]` tensors between candle ops.
//!
//! Used by [`super::Model`] only when no input tracks a gradient and no attention map is
//! requested (monitoring); training keeps the composed, differentiable ops. Every step is formed
//! in the same order as the composed path (`q·kᵀ`, then `·(1/√d)`, then `+ mask`, the softmax
//! of [`super::ops`], then `A1 − A2·λ`), so results agree to rounding of the matrix products.
//!
//! Head pairing (docs/spec.md §3 and docs/formats.md §1-2): standard attention reads key/value head `j / g` for query head
//! `j` (`g = H / Hkv`, GQA); double heads pairs query heads `j` and `H + j` with key heads
//! `j / g` and `Hkv + j / g` and values `j / g`; split heads pairs `j` and `H/2 + j` with key
//! heads `j / g` and `Hkv/2 + j / g` and concatenates the values of `j / g` and
//! `(j + H/2) / g` (`[v_j ; v_{j+H/2}]` after `repeat_kv`).

use candle_core::Tensor;
use rayon::prelude::*;

use super::cpu::{all_cpu_f32, f32_slice, with_f32};
use super::layout::{gemm_strided, Mat, Threads};

use super::AttentionKind;

/// Query rows per task.
const ROWS: usize = 32;

/// `dst` (`m` rows of width `n` at row stride `dst_rs`) `= a [m, k] · b [k, n]` (`+=` when
/// `accumulate`), `a` and `b` given with their (row stride, column stride); single-threaded
/// (the callers' tasks are parallel already).
#[allow(clippy::too_many_arguments)]
fn gemm_rows(
    accumulate: bool,
    dst: &mut [f32],
    dst_rs: usize,
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    (a_rs, a_cs): (usize, usize),
    b: &[f32],
    (b_rs, b_cs): (usize, usize),
) {
    let mat = |data, rs: usize, cs: usize| Mat {
        data,
        rs: rs as isize,
        cs: cs as isize,
    };
    gemm_strided(
        dst,
        dst_rs,
        1,
        m,
        n,
        k,
        mat(a, a_rs, a_cs),
        mat(b, b_rs, b_cs),
        accumulate,
        Threads::Gemm(gemm::Parallelism::None),
    )
}

/// Attention probabilities of `m` query rows (`q` `[m, d]`) over the first `t` keys (`k`
/// `[≥t, d]`): `softmax(q·kᵀ·scale + mask)` into the first `t` columns of `p` (rows `ld`
/// apart; `mask` rows `ld` apart too).
#[allow(clippy::too_many_arguments)]
fn probs(
    p: &mut [f32],
    ld: usize,
    q: &[f32],
    k: &[f32],
    mask: Option<&[f32]>,
    m: usize,
    t: usize,
    d: usize,
) {
    gemm_rows(false, p, ld, m, t, d, q, (d, 1), k, (1, d));
    let scale = 1.0 / (d as f64).sqrt();
    let scale = scale as f32;
    super::simd::vectorized(
        #[inline(always)]
        || {
            for i in 0..m {
                let row = &mut p[i * ld..i * ld + t];
                match mask {
                    Some(mk) => {
                        for (x, &mv) in row.iter_mut().zip(&mk[i * ld..i * ld + t]) {
                            *x = *x * scale + mv;
                        }
                    }
                    None => row.iter_mut().for_each(|x| *x *= scale),
                }
            }
        },
    );
    for i in 0..m {
        super::ops::softmax_row(&mut p[i * ld..i * ld + t]);
    }
}

/// Keys a query row needs: one past its last unmasked key (mask entry above `f32::MIN / 2`).
/// The keys after it are masked, so their probabilities are exactly 0 (`exp(MIN − max)`
/// underflows) and [`super::ops::softmax_row`] gives the same bits without them; a row with
/// every key masked needs all `t` (its softmax is uniform, not zero). Causal masks make this
/// `s`-row prefix triangular: blocks of early rows skip most keys.
fn keys_needed(mask_row: &[f32]) -> usize {
    match mask_row.iter().rposition(|&v| v > f32::MIN / 2.0) {
        Some(j) => j + 1,
        None => mask_row.len(),
    }
}

/// The first key a query row needs: its first unmasked key (0 for a row with every key
/// masked, whose softmax is uniform). Sliding windows mask the keys before it; their
/// probabilities are exactly 0 like those after the last needed key.
fn first_key_needed(mask_row: &[f32]) -> usize {
    mask_row
        .iter()
        .position(|&v| v > f32::MIN / 2.0)
        .unwrap_or(0)
}

/// First key needed by rows `r0..r0 + m` of an `[s, t]` mask (0 without a mask).
fn block_first_key(mask: Option<&[f32]>, t: usize, r0: usize, m: usize) -> usize {
    match mask {
        Some(mk) => (r0..r0 + m)
            .map(|r| first_key_needed(&mk[r * t..(r + 1) * t]))
            .min()
            .unwrap_or(0),
        None => 0,
    }
}

/// Keys needed by rows `r0..r0 + m` of an `[s, t]` mask (all `t` without a mask).
fn block_keys(mask: Option<&[f32]>, t: usize, r0: usize, m: usize) -> usize {
    match mask {
        Some(mk) => (r0..r0 + m)
            .map(|r| keys_needed(&mk[r * t..(r + 1) * t]))
            .max()
            .unwrap_or(t),
        None => t,
    }
}

/// Attention output `[b, heads_out, s, dv]` for `q` `[b, nq, s, d]`, `k` `[b, nk, t, d]`,
/// `v` `[b, Hkv, t, d]` (f32, CPU, contiguous), additive `mask` `[b, 1, s, t]`; `lambda` is
/// `mix · lambda_full` for the differential kinds.
pub fn attend(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    kind: AttentionKind,
    lambda: f32,
) -> candle_core::Result<Tensor> {
    let (b, nq, s, d) = q.dims4()?;
    let (_, nk, t, _) = k.dims4()?;
    let (_, hkv, _, _) = v.dims4()?;
    // (output heads, query heads per branch, key heads per branch, value width)
    let (heads, qb, kb, dv) = match kind {
        // V2: softmax attention over its 2H query heads; the caller combines the pairs.
        AttentionKind::Standard | AttentionKind::V2 => (nq, nq, nk, d),
        AttentionKind::DoubleHeads => (nq / 2, nq / 2, nk / 2, d),
        AttentionKind::SplitHeads => (nq / 2, nq / 2, nk / 2, 2 * d),
    };
    let g = qb / kb;
    let q = q.contiguous()?;
    let k = k.contiguous()?;
    let v = v.contiguous()?;
    let mask = match mask {
        Some(m) => Some(m.broadcast_as((b, 1, s, t))?.contiguous()?),
        None => None,
    };
    let mut inputs = vec![&q, &k, &v];
    inputs.extend(mask.as_ref());
    let out = with_f32(&inputs, "attend", |sl| {
        let (qd, kd, vd, md) = (sl[0], sl[1], sl[2], sl.get(3).copied());
        let mut out = vec![0f32; b * heads * s * dv];
        out.par_chunks_mut((s * dv).max(1))
            .enumerate()
            .flat_map(|(bj, o)| {
                o.par_chunks_mut((ROWS * dv).max(1))
                    .enumerate()
                    .map(move |(blk, ob)| (bj, blk, ob))
            })
            .for_each(|(bj, blk, ob)| {
                let (bi, j) = (bj / heads, bj % heads);
                let r0 = blk * ROWS;
                let m = ob.len() / dv;
                let qrow = |head: usize| {
                    let at = ((bi * nq + head) * s + r0) * d;
                    &qd[at..at + m * d]
                };
                let khead = |head: usize| {
                    let at = (bi * nk + head) * t * d;
                    &kd[at..at + t * d]
                };
                let vhead = |head: usize| {
                    let at = (bi * hkv + head) * t * d;
                    &vd[at..at + t * d]
                };
                let mrows = md.map(|mk| &mk[(bi * s + r0) * t..(bi * s + r0 + m) * t]);
                // Keys this block needs: from the first unmasked one (sliding windows) to one
                // past the last (the causal prefix); rows keep stride t.
                let tk = block_keys(mrows, t, 0, m);
                // Aligned down to the softmax's lane width, so that every key keeps its lane
                // and the softmax's sums keep their bits; the product with the values then
                // sums fewer zero terms (the same value to rounding, ~3e-7).
                let k0 = block_first_key(mrows, t, 0, m).min(tk.saturating_sub(1));
                let k0 = k0 - k0 % super::ops::LANES;
                let n = tk - k0;
                let mrows = mrows.map(|mk| &mk[k0..]);
                let khead = |head: usize| &khead(head)[k0 * d..];
                let vhead = |head: usize| &vhead(head)[k0 * d..];
                let mut p = vec![0f32; m * t];
                match kind {
                    AttentionKind::Standard | AttentionKind::V2 => {
                        probs(&mut p, t, qrow(j), khead(j / g), mrows, m, n, d);
                        gemm_rows(false, ob, dv, m, d, n, &p, (t, 1), vhead(j / g), (d, 1));
                    }
                    _ => {
                        let mut p2 = vec![0f32; m * t];
                        probs(&mut p, t, qrow(j), khead(j / g), mrows, m, n, d);
                        probs(&mut p2, t, qrow(qb + j), khead(kb + j / g), mrows, m, n, d);
                        for (a1, &a2) in p.iter_mut().zip(&p2) {
                            *a1 -= a2 * lambda;
                        }
                        if kind == AttentionKind::DoubleHeads {
                            gemm_rows(false, ob, dv, m, d, n, &p, (t, 1), vhead(j / g), (d, 1));
                        } else {
                            // repeat_kv: full head i reads kv head i / (H / Hkv) = i / g here too.
                            let (va, vb) = (vhead(j / g), vhead((j + heads) / g));
                            gemm_rows(false, ob, dv, m, d, n, &p, (t, 1), va, (d, 1));
                            gemm_rows(false, &mut ob[d..], dv, m, d, n, &p, (t, 1), vb, (d, 1));
                        }
                    }
                }
            });
        Ok(out)
    })?;
    Tensor::from_vec(out, (b, heads, s, dv), q.device())
}

/// Whether [`attend`] can serve these inputs: f32 on the CPU and no gradient tracked.
pub fn applies(ts: &[&Tensor]) -> bool {
    all_cpu_f32(ts) && ts.iter().all(|t| !t.track_op())
}

/// Softmax attention of `nq` query heads with its own backward (training): see [`sdpa`].
struct Sdpa {
    /// Value head of query head `i`: `(i % period) / group`.
    period: usize,
    group: usize,
    /// Additive mask `[b, 1, s, t]` (contiguous f32), no gradient.
    mask: Option<Tensor>,
    /// The forward's probabilities `[b, nq, s, t]`, kept for the backward.
    probs: std::sync::Mutex<Option<Vec<f32>>>,
}

struct Dims {
    b: usize,
    nq: usize,
    nk: usize,
    nv: usize,
    s: usize,
    t: usize,
    d: usize,
    dv: usize,
}

impl Sdpa {
    fn dims(
        q: &candle_core::Shape,
        k: &candle_core::Shape,
        v: &candle_core::Shape,
    ) -> candle_core::Result<Dims> {
        let (b, nq, s, d) = q.dims4()?;
        let (_, nk, t, _) = k.dims4()?;
        let (_, nv, _, dv) = v.dims4()?;
        Ok(Dims {
            b,
            nq,
            nk,
            nv,
            s,
            t,
            d,
            dv,
        })
    }

    fn v_head(&self, i: usize) -> usize {
        (i % self.period) / self.group
    }
}

impl candle_core::CustomOp3 for Sdpa {
    fn name(&self) -> &'static str {
        "sdpa-with-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &candle_core::CpuStorage,
        l1: &candle_core::Layout,
        s2: &candle_core::CpuStorage,
        l2: &candle_core::Layout,
        s3: &candle_core::CpuStorage,
        l3: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let Dims {
            b,
            nq,
            nk,
            nv,
            s,
            t,
            d,
            dv,
        } = Self::dims(l1.shape(), l2.shape(), l3.shape())?;
        let (q, k, v) = (
            f32_slice(s1, l1, "sdpa")?,
            f32_slice(s2, l2, "sdpa")?,
            f32_slice(s3, l3, "sdpa")?,
        );
        let run = |mask: Option<&[f32]>| {
            let gk = nq / nk;
            let mut probs_all = vec![0f32; b * nq * s * t];
            let mut out = vec![0f32; b * nq * s * dv];
            probs_all
                .par_chunks_mut((s * t).max(1))
                .zip(out.par_chunks_mut((s * dv).max(1)))
                .enumerate()
                .for_each(|(bi_i, (p, o))| {
                    let (bi, i) = (bi_i / nq, bi_i % nq);
                    let qh = &q[(bi * nq + i) * s * d..][..s * d];
                    let kh = &k[(bi * nk + i / gk) * t * d..][..t * d];
                    let vh = &v[(bi * nv + self.v_head(i)) * t * dv..][..t * dv];
                    let mrows = mask.map(|mk| &mk[bi * s * t..(bi + 1) * s * t]);
                    for r0 in (0..s).step_by(ROWS) {
                        let m = ROWS.min(s - r0);
                        let tk = block_keys(mrows, t, r0, m);
                        probs(
                            &mut p[r0 * t..],
                            t,
                            &qh[r0 * d..],
                            kh,
                            mrows.map(|mk| &mk[r0 * t..]),
                            m,
                            tk,
                            d,
                        );
                        let (pb, ob) = (&p[r0 * t..], &mut o[r0 * dv..]);
                        gemm_rows(false, ob, dv, m, dv, tk, pb, (t, 1), vh, (dv, 1));
                    }
                });
            (probs_all, out)
        };
        let (probs_all, out) = match &self.mask {
            Some(m) => with_f32(&[m], "sdpa mask", |sl| Ok(run(Some(sl[0]))))?,
            None => run(None),
        };
        *self.probs.lock().expect("sdpa probabilities") = Some(probs_all);
        Ok((
            candle_core::CpuStorage::F32(out),
            candle_core::Shape::from((b, nq, s, dv)),
        ))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let Dims {
            b,
            nq,
            nk,
            nv,
            s,
            t,
            d,
            dv,
        } = Self::dims(q.shape(), k.shape(), v.shape())?;
        let probs_all = self
            .probs
            .lock()
            .expect("sdpa probabilities")
            .take()
            .ok_or_else(|| candle_core::Error::Msg("sdpa: backward run twice".into()))?;
        let g = grad.contiguous()?;
        let mut inputs = vec![q, k, v, &g];
        inputs.extend(self.mask.as_ref());
        let (dq, dk, dvv) = with_f32(&inputs, "sdpa backward", |sl| {
            let (qd, kd, vd, gd) = (sl[0], sl[1], sl[2], sl[3]);
            let mask = sl.get(4).copied();
            let gk = nq / nk;
            let scale = (1.0 / (d as f64).sqrt()) as f32;
            let mut dq = vec![0f32; b * nq * s * d];
            // Per query head partial key and value gradients, summed per key/value head below.
            let mut dk_part = vec![0f32; b * nq * t * d];
            let mut dv_part = vec![0f32; b * nq * t * dv];
            dq.par_chunks_mut((s * d).max(1))
                .zip(dk_part.par_chunks_mut((t * d).max(1)))
                .zip(dv_part.par_chunks_mut((t * dv).max(1)))
                .enumerate()
                .for_each(|(bi_i, ((dqh, dkh), dvh))| {
                    let (bi, i) = (bi_i / nq, bi_i % nq);
                    let p = &probs_all[bi_i * s * t..][..s * t];
                    let qh = &qd[bi_i * s * d..][..s * d];
                    let kh = &kd[(bi * nk + i / gk) * t * d..][..t * d];
                    let vh = &vd[(bi * nv + self.v_head(i)) * t * dv..][..t * dv];
                    let gh = &gd[bi_i * s * dv..][..s * dv];
                    let mrows = mask.map(|mk| &mk[bi * s * t..(bi + 1) * s * t]);
                    // Per block of query rows, over the keys the forward used (the others have
                    // probability 0, so their dS is 0 too): dK_i and dV_i accumulate.
                    let mut ds = vec![0f32; ROWS * t];
                    for r0 in (0..s).step_by(ROWS) {
                        let m = ROWS.min(s - r0);
                        let tk = block_keys(mrows, t, r0, m);
                        let (pb, gb, qb) = (&p[r0 * t..], &gh[r0 * dv..], &qh[r0 * d..]);
                        // dV_i += P_bᵀ G_b.
                        gemm_rows(true, dvh, dv, tk, dv, m, pb, (1, t), gb, (dv, 1));
                        // dP = G_b Vᵀ, then the softmax backward and the score scale: dS.
                        gemm_rows(false, &mut ds, t, m, tk, dv, gb, (dv, 1), vh, (1, dv));
                        for i in 0..m {
                            let (dsr, pr) = (&mut ds[i * t..i * t + tk], &pb[i * t..i * t + tk]);
                            let dot: f32 = dsr.iter().zip(pr).map(|(a, b)| a * b).sum();
                            for (x, &y) in dsr.iter_mut().zip(pr) {
                                *x = y * (*x - dot) * scale;
                            }
                        }
                        // dQ_b = dS K, dK_i += dSᵀ Q_b.
                        gemm_rows(
                            false,
                            &mut dqh[r0 * d..],
                            d,
                            m,
                            d,
                            tk,
                            &ds,
                            (t, 1),
                            kh,
                            (d, 1),
                        );
                        gemm_rows(true, dkh, d, tk, d, m, &ds, (1, t), qb, (d, 1));
                    }
                });
            let reduce =
                |part: &[f32], heads: usize, width: usize, head_of: &dyn Fn(usize) -> usize| {
                    let mut total = vec![0f32; b * heads * t * width];
                    for bi in 0..b {
                        for i in 0..nq {
                            let src = &part[(bi * nq + i) * t * width..][..t * width];
                            let dst =
                                &mut total[(bi * heads + head_of(i)) * t * width..][..t * width];
                            dst.iter_mut().zip(src).for_each(|(a, &x)| *a += x);
                        }
                    }
                    total
                };
            let dk = reduce(&dk_part, nk, d, &|i| i / gk);
            let dvv = reduce(&dv_part, nv, dv, &|i| self.v_head(i));
            Ok((dq, dk, dvv))
        })?;
        let dev = q.device();
        Ok((
            Some(Tensor::from_vec(dq, q.shape(), dev)?),
            Some(Tensor::from_vec(dk, k.shape(), dev)?),
            Some(Tensor::from_vec(dvv, v.shape(), dev)?),
        ))
    }
}

/// Differentiable softmax attention on the CPU (f32): for query head `i` of `q`
/// `[b, nq, s, d]`, `softmax(q_i·k_{i/(nq/nk)}ᵀ/√d + mask)·v_{(i % period)/group}` with `k`
/// `[b, nk, t, d]`, `v` `[b, nv, t, dv]`, additive `mask` `[b, 1, s, t]`; returns
/// `[b, nq, s, dv]`. One graph node instead of the ~8 composed ops over `[b, nq, s, t]`
/// tensors (and their backward); the probabilities are kept from the forward for the backward
/// (`4·b·nq·s·t` bytes per layer until the backward runs). Same operation order as the
/// composed path up to the product with the values.
pub fn sdpa(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    period: usize,
    group: usize,
) -> candle_core::Result<Tensor> {
    let (b, _, s, _) = q.dims4()?;
    let t = k.dim(2)?;
    let mask = match mask {
        Some(m) => Some(m.broadcast_as((b, 1, s, t))?.contiguous()?),
        None => None,
    };
    q.contiguous()?.apply_op3(
        &k.contiguous()?,
        &v.contiguous()?,
        Sdpa {
            period,
            group,
            mask,
            probs: std::sync::Mutex::new(None),
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::cpu::testing::{assert_grads_close, max_diff};
    use candle_core::{Device, Var, D};

    /// Causal mask `[b, 1, s, s]` (0 or `f32::MIN`) with `pad[bi]` left-padding keys masked;
    /// batch row 1's first query row has every key masked (uniform softmax, nothing skipped).
    fn mask(b: usize, s: usize, pad: &[usize]) -> Tensor {
        let mut m = vec![0f32; b * s * s];
        for bi in 0..b {
            for i in 0..s {
                for j in 0..s {
                    if j > i || j < pad[bi] || (bi == 1 && i == 0) {
                        m[(bi * s + i) * s + j] = f32::MIN;
                    }
                }
            }
        }
        Tensor::from_vec(m, (b, 1, s, s), &Device::Cpu).unwrap()
    }

    /// The composed candle reference: softmax over all keys, GQA by repeating key/value heads.
    fn reference(q: &Tensor, k: &Tensor, v: &Tensor, m: &Tensor) -> Tensor {
        let (_, nq, _, d) = q.dims4().unwrap();
        let g = nq / k.dim(1).unwrap();
        let rep = |x: &Tensor| {
            let heads: Vec<Tensor> = (0..nq).map(|i| x.narrow(1, i / g, 1).unwrap()).collect();
            Tensor::cat(&heads, 1).unwrap()
        };
        let scores = (q.matmul(&rep(k).t().unwrap()).unwrap() * (1.0 / (d as f64).sqrt()))
            .unwrap()
            .broadcast_add(m)
            .unwrap();
        candle_nn::ops::softmax(&scores, D::Minus1)
            .unwrap()
            .matmul(&rep(v))
            .unwrap()
    }

    #[test]
    fn causal_blocks_skip_keys_without_changing_results_or_gradients() {
        let dev = Device::Cpu;
        // 70 rows: three blocks of 32, the last partial; GQA 4 query heads over 2 KV heads.
        let (b, nq, nk, s, d) = (2, 4, 2, 70, 16);
        let var = |shape: &[usize]| {
            Var::from_tensor(&Tensor::randn(0f32, 1.0, shape, &dev).unwrap()).unwrap()
        };
        let (q, k, v) = (
            var(&[b, nq, s, d]),
            var(&[b, nk, s, d]),
            var(&[b, nk, s, d]),
        );
        let m = mask(b, s, &[0, 5]);
        assert_eq!(
            block_keys(Some(&[0.0, 0.0, f32::MIN, f32::MIN]), 4, 0, 1),
            2
        );
        assert_eq!(block_keys(Some(&[f32::MIN; 4]), 4, 0, 1), 4);

        let want = reference(q.as_tensor(), k.as_tensor(), v.as_tensor(), &m);
        let fused = attend(
            &q.as_tensor().detach(),
            &k.as_tensor().detach(),
            &v.as_tensor().detach(),
            Some(&m),
            AttentionKind::Standard,
            0.0,
        )
        .unwrap();
        assert!(
            max_diff(&fused, &want) < 1e-5,
            "{}",
            max_diff(&fused, &want)
        );
        let got = sdpa(
            q.as_tensor(),
            k.as_tensor(),
            v.as_tensor(),
            Some(&m),
            nq,
            nq / nk,
        )
        .unwrap();
        assert!(max_diff(&got, &want) < 1e-5, "{}", max_diff(&got, &want));
        // The fused inference kernel and the differentiable one compute the same probabilities.
        assert_eq!(max_diff(&got, &fused), 0.0);

        let r = Tensor::randn(0f32, 1.0, want.shape(), &dev).unwrap();
        let g_got = (&got * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let g_want = (&want * &r).unwrap().sum_all().unwrap().backward().unwrap();
        assert_grads_close(&g_got, &g_want, &[&q, &k, &v], 1e-5, 0.1);
    }

    /// Sliding windows mask the oldest keys: the fused kernel skips them (from its first
    /// needed key, aligned to the softmax lanes) and agrees with the differentiable kernel,
    /// which does not, to rounding, for standard and differential attention.
    #[test]
    fn sliding_window_blocks_skip_old_keys_without_changing_results() {
        let dev = Device::Cpu;
        let (b, nq, nk, s, d, w) = (1, 4, 2, 100, 16, 24);
        let mut m = vec![0f32; s * s];
        for i in 0..s {
            for j in 0..s {
                if j > i || j + w <= i {
                    m[i * s + j] = f32::MIN;
                }
            }
        }
        let m = Tensor::from_vec(m, (b, 1, s, s), &dev).unwrap();
        assert_eq!(
            block_first_key(
                Some(&m.flatten_all().unwrap().to_vec1::<f32>().unwrap()),
                s,
                64,
                32
            ),
            64 - w + 1
        );
        let rnd = |shape: &[usize]| Tensor::randn(0f32, 1.0, shape, &dev).unwrap();
        let (q, k, v) = (
            rnd(&[b, nq, s, d]),
            rnd(&[b, nk, s, d]),
            rnd(&[b, nk, s, d]),
        );
        let want = reference(&q, &k, &v, &m);
        let fused = attend(&q, &k, &v, Some(&m), AttentionKind::Standard, 0.0).unwrap();
        let composed = sdpa(&q, &k, &v, Some(&m), nq, nq / nk).unwrap();
        assert!(
            max_diff(&fused, &want) < 1e-5,
            "{}",
            max_diff(&fused, &want)
        );
        assert!(
            max_diff(&composed, &fused) < 1e-6,
            "{}",
            max_diff(&composed, &fused)
        );
        // Double heads: both branches over the same window.
        let q2 = rnd(&[b, 2 * nq, s, d]);
        let k2 = rnd(&[b, 2 * nk, s, d]);
        let fused = attend(&q2, &k2, &v, Some(&m), AttentionKind::DoubleHeads, 0.3).unwrap();
        let both = sdpa(&q2, &k2, &v, Some(&m), nq, nq / nk).unwrap();
        let composed = (both.narrow(1, 0, nq).unwrap()
            - (both.narrow(1, nq, nq).unwrap() * 0.3).unwrap())
        .unwrap();
        assert!(
            max_diff(&composed, &fused) < 1e-6,
            "{}",
            max_diff(&composed, &fused)
        );
    }
}
