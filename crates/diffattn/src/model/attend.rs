//! Fused attention for inference (no gradient): scores, mask, softmax, the differential
//! combination `A1 − λ·A2` and the product with the values, per head and block of query rows,
//! without materialising `[b, heads, s, t]` tensors between candle ops.
//!
//! Used by [`super::Model`] only when no input tracks a gradient and no attention map is
//! requested (monitoring); training keeps the composed, differentiable ops. Every step is formed
//! in the same order as the composed path (`q·kᵀ`, then `·(1/√d)`, then `+ mask`, the softmax
//! of [`super::ops`], then `A1 − A2·λ`), so results agree to rounding of the matrix products.
//!
//! Head pairing (SPEC §3-5): standard attention reads key/value head `j / g` for query head
//! `j` (`g = H / Hkv`, GQA); double heads pairs query heads `j` and `H + j` with key heads
//! `j / g` and `Hkv + j / g` and values `j / g`; split heads pairs `j` and `H/2 + j` with key
//! heads `j / g` and `Hkv/2 + j / g` and concatenates the values of `j / g` and
//! `(j + H/2) / g` (`[v_j ; v_{j+H/2}]` after `repeat_kv`).

use candle_core::Tensor;
use rayon::prelude::*;

use super::AttentionKind;

/// Query rows per task.
const ROWS: usize = 32;

/// `dst` rows of width `n` at stride `dst_rs` `= a [m, k] (row-major, stride lda) · b`, `b`
/// given by (row stride, column stride); single-threaded (tasks are parallel already).
#[allow(clippy::too_many_arguments)]
fn gemm_rows(
    dst: &mut [f32],
    dst_rs: usize,
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    lda: usize,
    b: &[f32],
    (b_rs, b_cs): (usize, usize),
) {
    if m == 0 || n == 0 {
        return;
    }
    assert!(dst.len() >= (m - 1) * dst_rs + n);
    assert!(k == 0 || a.len() >= (m - 1) * lda + k);
    assert!(k == 0 || b.len() > (k - 1) * b_rs + (n - 1) * b_cs);
    // SAFETY: the asserts bound every address the strides reach.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_rs as isize,
            false,
            a.as_ptr(),
            1,
            lda as isize,
            b.as_ptr(),
            b_cs as isize,
            b_rs as isize,
            0.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        )
    }
}

/// Attention probabilities of `m` query rows (`q` `[m, d]`) over `t` keys (`k` `[t, d]`):
/// `softmax(q·kᵀ·scale + mask)` into `p` `[m, t]`.
fn probs(p: &mut [f32], q: &[f32], k: &[f32], mask: Option<&[f32]>, m: usize, t: usize, d: usize) {
    gemm_rows(p, t, m, t, d, q, d, k, (1, d));
    let scale = 1.0 / (d as f64).sqrt();
    let scale = scale as f32;
    for (i, row) in p.chunks_mut(t).enumerate() {
        match mask {
            Some(mk) => {
                for (x, &mv) in row.iter_mut().zip(&mk[i * t..(i + 1) * t]) {
                    *x = *x * scale + mv;
                }
            }
            None => row.iter_mut().for_each(|x| *x *= scale),
        }
        super::ops::softmax_row(row);
    }
}

fn slice<'a>(
    st: &'a candle_core::Storage,
    l: &candle_core::Layout,
) -> candle_core::Result<&'a [f32]> {
    match st {
        candle_core::Storage::Cpu(candle_core::CpuStorage::F32(data)) => {
            let (a, z) = l
                .contiguous_offsets()
                .ok_or_else(|| candle_core::Error::Msg("attend: not contiguous".into()))?;
            Ok(&data[a..z])
        }
        _ => candle_core::bail!("attend: f32 CPU tensors only"),
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
        AttentionKind::Standard => (nq, nq, nk, d),
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
    let (qs, ql) = q.storage_and_layout();
    let (ks, kl) = k.storage_and_layout();
    let (vs, vl) = v.storage_and_layout();
    let ms = mask.as_ref().map(|m| m.storage_and_layout());
    let (qd, kd, vd) = (slice(&qs, ql)?, slice(&ks, kl)?, slice(&vs, vl)?);
    let md = match &ms {
        Some((st, l)) => Some(slice(st, l)?),
        None => None,
    };
    let mut out = vec![0f32; b * heads * s * dv];
    out.par_chunks_mut(s * dv)
        .enumerate()
        .flat_map(|(bj, o)| {
            o.par_chunks_mut(ROWS * dv)
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
            let mut p = vec![0f32; m * t];
            match kind {
                AttentionKind::Standard => {
                    probs(&mut p, qrow(j), khead(j / g), mrows, m, t, d);
                    gemm_rows(ob, dv, m, d, t, &p, t, vhead(j / g), (d, 1));
                }
                _ => {
                    let mut p2 = vec![0f32; m * t];
                    probs(&mut p, qrow(j), khead(j / g), mrows, m, t, d);
                    probs(&mut p2, qrow(qb + j), khead(kb + j / g), mrows, m, t, d);
                    for (a1, &a2) in p.iter_mut().zip(&p2) {
                        *a1 -= a2 * lambda;
                    }
                    if kind == AttentionKind::DoubleHeads {
                        gemm_rows(ob, dv, m, d, t, &p, t, vhead(j / g), (d, 1));
                    } else {
                        // repeat_kv: full head i reads kv head i / (H / Hkv) = i / g here too.
                        let (va, vb) = (vhead(j / g), vhead((j + heads) / g));
                        gemm_rows(ob, dv, m, d, t, &p, t, va, (d, 1));
                        gemm_rows(&mut ob[d..], dv, m, d, t, &p, t, vb, (d, 1));
                    }
                }
            }
        });
    let shape = (b, heads, s, dv);
    drop((qs, ks, vs, ms));
    Tensor::from_vec(out, shape, q.device())
}

/// Whether [`attend`] can serve these inputs: f32 on the CPU and no gradient tracked.
pub fn applies(ts: &[&Tensor]) -> bool {
    ts.iter()
        .all(|t| t.device().is_cpu() && t.dtype() == candle_core::DType::F32 && !t.track_op())
}
