//! Differentiable CPU kernels for the linear maps and the head layout changes of a transformer
//! block, each with its own backward.
//!
//! Why: composed in candle, `x Wᵀ` with many rows either runs the matrix library in its slow
//! orientation (few rows of output, one thread busy) or returns a transposed view that the next
//! op copies with candle's generic strided copy, and splitting `[b, s, n·d]` into heads then
//! applying RoPE is six ops each allocating a tensor. Here:
//! - [`linear`]: `y = x Wᵀ`, `x` `[n, in]`, `W` `[out, in]` -> `[n, out]`, computed as `W xᵀ`
//!   (`[out, n]`) written column-major straight into `y`, `W`'s rows cut into one block per
//!   thread ([`gemm_strided`] in [`Threads::Blocks`]); from 16 rows on the backward does the
//!   same for `dx = g W` (as `Wᵀ gᵀ`), and it computes `dW = gᵀ x` directly.
//! - [`rope_heads`]: `[b, s, n·d]` -> `[b, n, s, d]` with rotary embeddings applied
//!   (Hugging Face `rotate_half` convention: `x·cos + rotate_half(x)·sin`), one pass; backward
//!   rotates the gradient back (the transpose of the rotation) in one pass.
//! - [`split_heads`] / [`merge_heads`]: `[b, s, n·d]` <-> `[b, n, s, d]`, each the other's
//!   backward.
//!
//! Rounding: products and sums are formed in the same order as the composed candle ops (no
//! fused multiply-add), so forward values are bit-identical to the composed path; the matrix
//! products go through the same `gemm` crate candle itself uses. Tensors that are not f32 on the
//! CPU take the composed candle ops.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Shape, Tensor, D};
use rayon::prelude::*;

use super::cpu::{all_cpu_f32, f32_slice, with_f32};

/// An uninitialised f32 buffer that the caller overwrites completely.
#[allow(clippy::uninit_vec)]
pub(crate) fn buffer(len: usize) -> Vec<f32> {
    let mut v = Vec::with_capacity(len);
    // SAFETY: f32 has no invalid bit patterns and every caller writes all `len` elements
    // (gemm with `read_dst = false`, or a full permutation) before reading.
    unsafe { v.set_len(len) };
    v
}

/// Threads of the matrix products: candle's count (`RAYON_NUM_THREADS`, else the physical
/// cores), read once. candle recomputes it on every call, and without `RAYON_NUM_THREADS` that
/// parses `/proc/cpuinfo` (`num_cpus::get_physical`): ~200 times per decoded token.
pub(crate) fn n_threads() -> usize {
    static N: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *N.get_or_init(|| candle_core::utils::get_num_threads().max(1))
}

fn threads() -> gemm::Parallelism {
    match n_threads() {
        0 | 1 => gemm::Parallelism::None,
        n => gemm::Parallelism::Rayon(n),
    }
}

/// A matrix operand: base slice with row and column strides (in elements).
#[derive(Clone, Copy)]
pub(crate) struct Mat<'a> {
    pub data: &'a [f32],
    pub rs: isize,
    pub cs: isize,
}

impl Mat<'_> {
    /// The operand from row `r` on.
    fn rows_from(&self, r: usize) -> Self {
        Mat {
            data: &self.data[r * self.rs as usize..],
            ..*self
        }
    }
}

/// `dst` `[m, n]` (row-major, contiguous) `= a [m, k] · b [k, n]`, one product of the `gemm`
/// crate on all threads.
pub(crate) fn gemm_into(dst: &mut [f32], m: usize, n: usize, k: usize, a: Mat, b: Mat) {
    gemm_strided(dst, n, 1, m, n, k, a, b, false, Threads::Gemm(threads()))
}

/// Checks of a product `dst [m, n] (+)= a [m, k] · b [k, n]` with `dst[i, j]` at `i·rs + j·cs`:
/// distinct `(i, j)` address distinct elements, every address the strides reach lies inside
/// its slice (strides non-negative). Returns whether a product remains to be computed: none
/// when `dst` is empty, and an empty sum (`k = 0`) is written here (the `gemm` crate would
/// leave `dst` unwritten).
#[allow(clippy::too_many_arguments)]
fn checked_product(
    dst: &mut [f32],
    rs: usize,
    cs: usize,
    m: usize,
    n: usize,
    k: usize,
    a: &Mat,
    b: &Mat,
    accumulate: bool,
) -> bool {
    if m == 0 || n == 0 {
        return false;
    }
    // Saturating: a product whose addresses overflow fails the bounds check.
    let at = |i: usize, s: usize, j: usize, t: usize| {
        i.saturating_mul(s).saturating_add(j.saturating_mul(t))
    };
    assert!(m == 1 || n == 1 || rs >= n.saturating_mul(cs) || cs >= m.saturating_mul(rs));
    assert!((rs > 0 || m == 1) && (cs > 0 || n == 1) && at(m - 1, rs, n - 1, cs) < dst.len());
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                for j in 0..n {
                    dst[i * rs + j * cs] = 0.0;
                }
            }
        }
        return false;
    }
    // The last element each operand's strides reach.
    let last = |x: &Mat, r: usize, c: usize| at(r - 1, x.rs as usize, c - 1, x.cs as usize);
    assert!(a.rs >= 0 && a.cs >= 0 && b.rs >= 0 && b.cs >= 0);
    assert!(last(a, m, k) < a.data.len() && last(b, k, n) < b.data.len());
    true
}

/// The `gemm` crate's product into `dst` (see [`checked_product`] for the layout).
///
/// # Safety
/// The product must have passed [`checked_product`] for a `dst` slice starting at `dst`, and
/// no other thread may access the elements it writes while it runs.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm_unchecked(
    dst: *mut f32,
    rs: usize,
    cs: usize,
    m: usize,
    n: usize,
    k: usize,
    a: Mat,
    b: Mat,
    accumulate: bool,
    parallelism: gemm::Parallelism,
) {
    gemm::gemm(
        m,
        n,
        k,
        dst,
        cs as isize,
        rs as isize,
        accumulate,
        a.data.as_ptr(),
        a.cs,
        a.rs,
        b.data.as_ptr(),
        b.cs,
        b.rs,
        if accumulate { 1.0 } else { 0.0 },
        1.0,
        false,
        false,
        false,
        parallelism,
    )
}

/// How a product uses the threads.
#[derive(Clone, Copy)]
pub(crate) enum Threads {
    /// One product of the `gemm` crate, on these threads.
    Gemm(gemm::Parallelism),
    /// The rows cut into (at most) this many blocks (one per thread: [`n_threads`]; whole
    /// 16-row tiles, the AVX2 kernel's, and at least [`MIN_BLOCK_ROWS`] rows), each a
    /// single-threaded product on rayon's pool; bit-identical to one product.
    ///
    /// Why: a multi-threaded product of the `gemm` crate synchronises its threads after
    /// packing each operand block of every depth chunk, and a result computed transposed
    /// (`W xᵀ`, the orientation that keeps both threads busy) had to be copied back; blocks
    /// write the result in place (`rs = 1, cs = ld`) with one synchronisation. SmolLM2's
    /// 128-token prefill, 2 cores (AMD EPYC, AVX2), 8 alternations against the previous
    /// binary: median 254 -> 286 tok/s, faster in every pair.
    Blocks(usize),
}

/// `dst [m, n] (+)= a [m, k] · b [k, n]`, `dst[i, j]` at `i·rs + j·cs` (row-major `rs = n,
/// cs = 1`, or the transpose of a row-major buffer `rs = 1, cs = ld`): overwritten, or
/// accumulated into when `accumulate`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm_strided(
    dst: &mut [f32],
    rs: usize,
    cs: usize,
    m: usize,
    n: usize,
    k: usize,
    a: Mat,
    b: Mat,
    accumulate: bool,
    threads: Threads,
) {
    /// The destination's base address, shared by the blocks (each writes its own rows).
    struct Dst(*mut f32);
    // SAFETY: only used to write disjoint element sets from the threads below.
    unsafe impl Sync for Dst {}
    if !checked_product(dst, rs, cs, m, n, k, &a, &b, accumulate) {
        return;
    }
    let blocks = match threads {
        Threads::Gemm(parallelism) => {
            // SAFETY: checked above; `dst` is borrowed mutably.
            unsafe {
                gemm_unchecked(
                    dst.as_mut_ptr(),
                    rs,
                    cs,
                    m,
                    n,
                    k,
                    a,
                    b,
                    accumulate,
                    parallelism,
                )
            };
            return;
        }
        Threads::Blocks(blocks) => blocks,
    };
    // Blocks of whole 16-row tiles, each (the last one too) of at least MIN_BLOCK_ROWS rows
    // and more than 256 elements.
    let fewest = MIN_BLOCK_ROWS.max(256 / n + 1);
    let blocks = blocks.min(m / fewest).max(1);
    let tiles = m.div_ceil(16);
    let base = Dst(dst.as_mut_ptr());
    let base = &base;
    let block = |j: usize| {
        let i0 = 16 * (j * tiles / blocks);
        let len = (16 * ((j + 1) * tiles / blocks)).min(m) - i0;
        // SAFETY: rows i0..i0 + len of the checked product (distinct rows address distinct
        // elements, so the blocks write disjoint elements; `dst` is borrowed mutably).
        unsafe {
            gemm_unchecked(
                base.0.add(i0 * rs),
                rs,
                cs,
                len,
                n,
                k,
                a.rows_from(i0),
                b,
                accumulate,
                gemm::Parallelism::None,
            )
        }
    };
    if blocks == 1 {
        block(0);
    } else {
        (0..blocks).into_par_iter().for_each(block);
    }
}

/// The fewest rows of a block of [`Threads::Blocks`]. The `gemm` crate (`gemm-common` 0.19,
/// `gemm_basic_generic`) forms products of at most 256 elements with dot-product kernels,
/// sums products of at most 64 × 64 in depth chunks of 512, and larger ones in chunks of its
/// cache-derived size. A block in one of the first two cases while the whole product is
/// not would round differently, and the result would depend on the thread count. Blocks of
/// at least 80 rows (the 16-row tile after 64) and more than 256 elements sum as the whole
/// product does: the same bits whatever the number of threads.
const MIN_BLOCK_ROWS: usize = 80;

/// Where the weight gradients of [`linear`] go while a [`WeightGradSink`] is open on this
/// thread: one buffer per weight, accumulated by the matrix product itself (`dW += gᵀx`).
/// candle would otherwise allocate `dW`, allocate zeros of the weight's size and add the two
/// (three weight-sized passes per weight per micro-batch; for SmolLM2 ~100 M floats).
type SinkMap = std::collections::HashMap<candle_core::TensorId, Vec<f32>>;

thread_local! {
    static WEIGHT_GRADS: std::cell::RefCell<Option<SinkMap>> = const { std::cell::RefCell::new(None) };
}

/// Collects the gradients of the [`linear`] weights that are [`candle_core::Var`]s, summed
/// over every backward run on this thread while it is open (gradient accumulation for free).
/// [`WeightGradSink::finish`] adds them into a candle gradient store.
pub struct WeightGradSink(());

impl WeightGradSink {
    /// Opens the sink on this thread (a second open sink on the same thread is refused).
    pub fn open() -> candle_core::Result<Self> {
        WEIGHT_GRADS.with(|w| {
            let mut w = w.borrow_mut();
            if w.is_some() {
                candle_core::bail!("a weight gradient sink is already open on this thread");
            }
            *w = Some(SinkMap::new());
            Ok(Self(()))
        })
    }

    /// Closes the sink and adds each collected gradient into `grads` (inserted when absent)
    /// for the tensors in `weights`.
    pub fn finish(
        self,
        weights: &[&Tensor],
        grads: &mut candle_core::backprop::GradStore,
    ) -> candle_core::Result<()> {
        let mut map = WEIGHT_GRADS
            .with(|w| w.borrow_mut().take())
            .unwrap_or_default();
        for w in weights {
            if let Some(g) = map.remove(&w.id()) {
                let g = Tensor::from_vec(g, w.shape(), w.device())?;
                let total = match grads.remove(w) {
                    Some(other) => (other + g)?,
                    None => g,
                };
                grads.insert(w, total);
            }
        }
        if !map.is_empty() {
            candle_core::bail!(
                "{} weight gradients collected for unknown tensors",
                map.len()
            );
        }
        Ok(())
    }
}

/// Whether a sink is open on this thread.
pub(crate) fn sink_open() -> bool {
    WEIGHT_GRADS.with(|s| s.borrow().is_some())
}

/// Whether gradients of `w` go to the open sink of this thread (`w` a variable, a sink open).
pub(crate) fn sinks(w: &Tensor) -> bool {
    w.is_variable() && WEIGHT_GRADS.with(|s| s.borrow().is_some())
}

/// Runs `f` on the sink's gradient buffer of tensor `id` (`len` elements): `f(buffer, fresh)`
/// must overwrite every element when `fresh` (a new, uninitialised buffer) and accumulate
/// into it otherwise. Panics when no sink is open (check [`sinks`] first).
pub(crate) fn into_sink(id: candle_core::TensorId, len: usize, f: impl FnOnce(&mut [f32], bool)) {
    WEIGHT_GRADS.with(|s| {
        let mut s = s.borrow_mut();
        let map = s.as_mut().expect("weight gradient sink open");
        match map.entry(id) {
            std::collections::hash_map::Entry::Occupied(mut e) => f(e.get_mut(), false),
            std::collections::hash_map::Entry::Vacant(e) => f(e.insert(buffer(len)), true),
        }
    })
}

/// The gradient of weight `w` (`len` elements) formed by `f(buffer, fresh)` (see
/// [`into_sink`]): into this thread's open sink when `w` is a variable (None returned), else
/// into a new buffer (returned).
pub(crate) fn weight_gradient(
    w: &Tensor,
    len: usize,
    f: impl FnOnce(&mut [f32], bool),
) -> Option<Vec<f32>> {
    if sinks(w) {
        into_sink(w.id(), len, f);
        None
    } else {
        let mut dw = buffer(len);
        f(&mut dw, true);
        Some(dw)
    }
}

impl Drop for WeightGradSink {
    fn drop(&mut self) {
        WEIGHT_GRADS.with(|w| w.borrow_mut().take());
    }
}

/// Rows from which the backward's `dx` is formed transposed (see the module docs).
const TRANSPOSED_FROM_ROWS: usize = 16;

struct LinearOp;

impl LinearOp {
    /// `x [n, in] · Wᵀ` -> `[n, out]`, as `yᵀ = W xᵀ` written column-major into `y` in blocks
    /// of `W`'s rows, one per thread ([`Threads::Blocks`]). For a few rows (decoding) this
    /// also streams the weight on every thread: the gemm crate's one-row product is a
    /// single-threaded matrix-vector kernel, and one core cannot stream the weights at the
    /// memory's speed (SmolLM2's 113 MB output head: 14.8 ms per token, 7.7 GB/s).
    fn forward(x: &[f32], w: &[f32], n: usize, inp: usize, out: usize) -> Vec<f32> {
        let mut y = buffer(n * out);
        let ws = Mat {
            data: w,
            rs: inp as isize,
            cs: 1,
        };
        let xt = Mat {
            data: x,
            rs: 1,
            cs: inp as isize,
        };
        gemm_strided(
            &mut y,
            1,
            out,
            out,
            n,
            inp,
            ws,
            xt,
            false,
            Threads::Blocks(n_threads()),
        );
        y
    }
}

impl CustomOp2 for LinearOp {
    fn name(&self) -> &'static str {
        "linear"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = f32_slice(s1, l1, "linear")?;
        let w = f32_slice(s2, l2, "linear")?;
        let (n, inp) = rows(l1.shape())?;
        let (out, inp2) = l2.shape().dims2()?;
        if inp != inp2 {
            candle_core::bail!("linear: x [{n}, {inp}] and weight [{out}, {inp2}] do not match");
        }
        let mut dims = l1.shape().dims().to_vec();
        *dims.last_mut().expect("rank checked") = out;
        Ok((
            CpuStorage::F32(Self::forward(x, w, n, inp, out)),
            Shape::from(dims),
        ))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (n, inp) = rows(x.shape())?;
        let (out, _) = w.dims2()?;
        let g = g.contiguous()?;
        let (dx, dw) = with_f32(&[x, w, &g], "linear backward", |s| {
            let gt = Mat {
                data: s[2],
                rs: 1,
                cs: out as isize,
            };
            Ok(linear_grads(gt, s[0], s[1], w, n, inp, out))
        })?;
        let dev = x.device();
        Ok((
            Some(Tensor::from_vec(dx, x.shape(), dev)?),
            dw.map(|dw| Tensor::from_vec(dw, (out, inp), dev))
                .transpose()?,
        ))
    }
}

/// Gradients of `y = x Wᵀ` (`x` `[n, in]`, `W` `[out, in]`) from `gᵀ` `[out, n]` (any
/// strides): `dx = g W` `[n, in]` (formed as `(Wᵀ gᵀ)ᵀ` from 16 rows on, see the module docs)
/// and `dW = gᵀ x` `[out, in]`, which goes to the open [`WeightGradSink`] when `weight` is a
/// variable (None returned then). Shared by [`linear`] and the fused output head + loss.
pub(crate) fn linear_grads(
    gt: Mat,
    x: &[f32],
    w: &[f32],
    weight: &Tensor,
    n: usize,
    inp: usize,
    out: usize,
) -> (Vec<f32>, Option<Vec<f32>>) {
    let xs = Mat {
        data: x,
        rs: inp as isize,
        cs: 1,
    };
    let dw = weight_gradient(weight, out * inp, |acc, fresh| {
        gemm_strided(
            acc,
            inp,
            1,
            out,
            inp,
            n,
            gt,
            xs,
            !fresh,
            Threads::Blocks(n_threads()),
        )
    });
    let mut dx = buffer(n * inp);
    if n >= TRANSPOSED_FROM_ROWS {
        // dxᵀ = Wᵀ gᵀ, written column-major into dx.
        let wt = Mat {
            data: w,
            rs: 1,
            cs: inp as isize,
        };
        gemm_strided(
            &mut dx,
            1,
            inp,
            inp,
            n,
            out,
            wt,
            gt,
            false,
            Threads::Blocks(n_threads()),
        );
    } else {
        // g [n, out] is gᵀ read the other way round.
        let gs = Mat {
            data: gt.data,
            rs: gt.cs,
            cs: gt.rs,
        };
        let ws = Mat {
            data: w,
            rs: inp as isize,
            cs: 1,
        };
        gemm_into(&mut dx, n, inp, out, gs, ws);
    }
    (dx, dw)
}

/// Rows and width of `[.., in]` (rank >= 1).
fn rows(s: &Shape) -> candle_core::Result<(usize, usize)> {
    let inp = *s
        .dims()
        .last()
        .ok_or_else(|| candle_core::Error::Msg("linear: scalar input".into()))?;
    let dims = s.dims();
    Ok((dims[..dims.len() - 1].iter().product(), inp))
}

/// `y = x Wᵀ` for `x` `[.., in]` and `weight` `[out, in]`: `[.., out]`, differentiable in
/// both (one graph node, whatever the leading dimensions).
pub fn linear(x: &Tensor, weight: &Tensor) -> candle_core::Result<Tensor> {
    if all_cpu_f32(&[x, weight]) {
        x.contiguous()?.apply_op2(&weight.contiguous()?, LinearOp)
    } else {
        let (n, inp) = rows(x.shape())?;
        let mut dims = x.dims().to_vec();
        *dims.last_mut().expect("rank checked") = weight.dim(0)?;
        x.reshape((n, inp))?.matmul(&weight.t()?)?.reshape(dims)
    }
}

/// Row lookup `weight[ids]` (see [`embedding`]).
struct Embedding {
    ids: Vec<u32>,
    /// Output shape: the ids' shape then the row width.
    shape: Shape,
}

impl CustomOp1 for Embedding {
    fn name(&self) -> &'static str {
        "embedding"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let w = f32_slice(s, l, "embedding")?;
        let (v, dm) = l.shape().dims2()?;
        if let Some(&bad) = self.ids.iter().find(|&&i| i as usize >= v) {
            candle_core::bail!("embedding: token id {bad} >= vocabulary {v}");
        }
        let mut out = buffer(self.ids.len() * dm);
        for (row, &i) in out.chunks_mut(dm.max(1)).zip(&self.ids) {
            row.copy_from_slice(&w[i as usize * dm..(i as usize + 1) * dm]);
        }
        Ok((CpuStorage::F32(out), self.shape.clone()))
    }

    fn bwd(&self, w: &Tensor, _res: &Tensor, g: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let (v, dm) = w.dims2()?;
        let g = g.contiguous()?;
        let scatter = |dst: &mut [f32], gv: &[f32]| {
            for (row, &i) in gv.chunks(dm.max(1)).zip(&self.ids) {
                let at = i as usize * dm;
                dst[at..at + dm]
                    .iter_mut()
                    .zip(row)
                    .for_each(|(a, &x)| *a += x);
            }
        };
        if sinks(w) {
            with_f32(&[&g], "embedding backward", |sl| {
                into_sink(w.id(), v * dm, |acc, fresh| {
                    if fresh {
                        acc.fill(0.0);
                    }
                    scatter(acc, sl[0]);
                });
                Ok(())
            })?;
            return Ok(None);
        }
        let dw = with_f32(&[&g], "embedding backward", |sl| {
            let mut dw = vec![0f32; v * dm];
            scatter(&mut dw, sl[0]);
            Ok(dw)
        })?;
        Ok(Some(Tensor::from_vec(dw, (v, dm), w.device())?))
    }
}

/// `weight[ids]`: rows of `weight` `[vocab, hidden]` for `ids` (u32, any shape) ->
/// `[..ids, hidden]`, differentiable in `weight`. On the CPU in f32 the backward adds the
/// gradient's rows into the [`WeightGradSink`] when one is open (a tied output head shares
/// the buffer: no vocabulary-sized zeros, scatter and sum per micro-batch) or into a dense
/// gradient; elsewhere candle's `index_select`.
pub fn embedding(weight: &Tensor, ids: &Tensor) -> candle_core::Result<Tensor> {
    let mut dims = ids.dims().to_vec();
    dims.push(weight.dim(1)?);
    if all_cpu_f32(&[weight]) && ids.device().is_cpu() {
        let op = Embedding {
            ids: ids.flatten_all()?.to_vec1::<u32>()?,
            shape: Shape::from(dims),
        };
        weight.contiguous()?.apply_op1(op)
    } else {
        weight.index_select(&ids.flatten_all()?, 0)?.reshape(dims)
    }
}

/// Layout change between `[b, s, n·d]` (rows of tokens) and `[b, n, s, d]` (heads).
struct Heads {
    n: usize,
    /// true: `[b, s, n·d]` -> `[b, n, s, d]`; false: the inverse.
    split: bool,
}

fn permute_heads(src: &[f32], s: usize, n: usize, d: usize, split: bool) -> Vec<f32> {
    let mut out = buffer(src.len());
    // One task per (batch, head) block of the head-major side.
    let per = s * d;
    if split {
        out.par_chunks_mut(per.max(1))
            .enumerate()
            .for_each(|(bh, o)| {
                let (bi, h) = (bh / n, bh % n);
                for t in 0..s {
                    let from = ((bi * s + t) * n + h) * d;
                    o[t * d..(t + 1) * d].copy_from_slice(&src[from..from + d]);
                }
            });
    } else {
        out.par_chunks_mut((s * n * d).max(1))
            .enumerate()
            .for_each(|(bi, o)| {
                for h in 0..n {
                    for t in 0..s {
                        let from = ((bi * n + h) * s + t) * d;
                        o[(t * n + h) * d..(t * n + h + 1) * d]
                            .copy_from_slice(&src[from..from + d]);
                    }
                }
            });
    }
    out
}

impl CustomOp1 for Heads {
    fn name(&self) -> &'static str {
        if self.split {
            "split-heads"
        } else {
            "merge-heads"
        }
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = f32_slice(s, l, self.name())?;
        let (sq, n, d, shape) = if self.split {
            let (b, sq, nd) = l.shape().dims3()?;
            let d = nd / self.n;
            (sq, self.n, d, Shape::from((b, self.n, sq, d)))
        } else {
            let (b, n, sq, d) = l.shape().dims4()?;
            (sq, n, d, Shape::from((b, sq, n * d)))
        };
        Ok((
            CpuStorage::F32(permute_heads(x, sq, n, d, self.split)),
            shape,
        ))
    }

    fn bwd(&self, _a: &Tensor, _r: &Tensor, g: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(if self.split {
            merge_heads(g)?
        } else {
            split_heads(g, self.n)?
        }))
    }
}

/// `[b, s, n·d]` -> `[b, n, s, d]` (contiguous), differentiable.
pub fn split_heads(x: &Tensor, n: usize) -> candle_core::Result<Tensor> {
    let (b, s, nd) = x.dims3()?;
    if n == 0 || nd % n != 0 {
        candle_core::bail!("split_heads: {nd} features do not split into {n} heads");
    }
    if all_cpu_f32(&[x]) {
        x.contiguous()?.apply_op1(Heads { n, split: true })
    } else {
        x.reshape((b, s, n, nd / n))?.transpose(1, 2)?.contiguous()
    }
}

/// `[b, n, s, d]` -> `[b, s, n·d]` (contiguous), differentiable.
pub fn merge_heads(x: &Tensor) -> candle_core::Result<Tensor> {
    let (b, n, s, d) = x.dims4()?;
    if all_cpu_f32(&[x]) {
        x.contiguous()?.apply_op1(Heads { n, split: false })
    } else {
        x.transpose(1, 2)?.contiguous()?.reshape((b, s, n * d))
    }
}

/// Splits into heads and applies RoPE: `x` `[b, s, n·d]`, `cos`/`sin` `[b, s, d/2]`.
struct RopeHeads {
    n: usize,
}

impl RopeHeads {
    /// `x1·c + (-x2)·s`, `x2·c + x1·s` per half (HF `rotate_half`, same rounding as composed).
    fn rotate(
        src: &[f32],
        cos: &[f32],
        sin: &[f32],
        (_, s, n, d): (usize, usize, usize, usize),
    ) -> Vec<f32> {
        let half = d / 2;
        let mut out = buffer(src.len());
        out.par_chunks_mut((s * d).max(1))
            .enumerate()
            .for_each(|(bh, o)| {
                let (bi, h) = (bh / n, bh % n);
                for t in 0..s {
                    let from = ((bi * s + t) * n + h) * d;
                    let x = &src[from..from + d];
                    let tab = (bi * s + t) * half;
                    let (c, sn) = (&cos[tab..tab + half], &sin[tab..tab + half]);
                    let row = &mut o[t * d..(t + 1) * d];
                    for i in 0..half {
                        let (x1, x2) = (x[i], x[i + half]);
                        row[i] = x1 * c[i] + (-x2) * sn[i];
                        row[i + half] = x2 * c[i] + x1 * sn[i];
                    }
                }
            });
        out
    }

    /// The transpose of [`RopeHeads::rotate`]: `g` `[b, n, s, d]` -> `[b, s, n·d]`.
    fn rotate_back(
        g: &[f32],
        cos: &[f32],
        sin: &[f32],
        (_, s, n, d): (usize, usize, usize, usize),
    ) -> Vec<f32> {
        let half = d / 2;
        let mut out = buffer(g.len());
        out.par_chunks_mut((s * n * d).max(1))
            .enumerate()
            .for_each(|(bi, o)| {
                for t in 0..s {
                    let tab = (bi * s + t) * half;
                    let (c, sn) = (&cos[tab..tab + half], &sin[tab..tab + half]);
                    for h in 0..n {
                        let from = ((bi * n + h) * s + t) * d;
                        let gr = &g[from..from + d];
                        let row = &mut o[(t * n + h) * d..(t * n + h + 1) * d];
                        for i in 0..half {
                            let (g1, g2) = (gr[i], gr[i + half]);
                            row[i] = g1 * c[i] + g2 * sn[i];
                            row[i + half] = g2 * c[i] + -(g1 * sn[i]);
                        }
                    }
                }
            });
        out
    }

    fn dims(&self, x: &Shape) -> candle_core::Result<(usize, usize, usize, usize)> {
        let (b, s, nd) = x.dims3()?;
        Ok((b, s, self.n, nd / self.n))
    }
}

impl CustomOp3 for RopeHeads {
    fn name(&self) -> &'static str {
        "rope-heads"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (b, s, n, d) = self.dims(l1.shape())?;
        let x = f32_slice(s1, l1, "rope")?;
        let cos = f32_slice(s2, l2, "rope")?;
        let sin = f32_slice(s3, l3, "rope")?;
        if cos.len() != b * s * d / 2 || sin.len() != cos.len() {
            candle_core::bail!("rope: tables do not match [{b}, {s}, {}]", d / 2);
        }
        Ok((
            CpuStorage::F32(Self::rotate(x, cos, sin, (b, s, n, d))),
            Shape::from((b, n, s, d)),
        ))
    }

    fn bwd(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dims = self.dims(x.shape())?;
        let g = g.contiguous()?;
        let dx = with_f32(&[&g, cos, sin], "rope backward", |s| {
            Ok(Self::rotate_back(s[0], s[1], s[2], dims))
        })?;
        Ok((
            Some(Tensor::from_vec(dx, x.shape(), x.device())?),
            None,
            None,
        ))
    }
}

/// Splits `x` `[b, s, n·d]` into `n` heads and applies rotary embeddings:
/// `[b, n, s, d]`, `x·cos + rotate_half(x)·sin` with `cos`/`sin` `[b, s, d/2]` (the halves are
/// shared, as `torch.cat((freqs, freqs), -1)`). Differentiable in `x`.
pub fn rope_heads(x: &Tensor, cos: &Tensor, sin: &Tensor, n: usize) -> candle_core::Result<Tensor> {
    let (b, s, nd) = x.dims3()?;
    if n == 0 || nd % n != 0 || (nd / n) % 2 != 0 {
        candle_core::bail!("rope_heads: {nd} features do not split into {n} even heads");
    }
    let d = nd / n;
    if all_cpu_f32(&[x, cos, sin]) {
        x.contiguous()?
            .apply_op3(&cos.contiguous()?, &sin.contiguous()?, RopeHeads { n })
    } else {
        let heads = split_heads(x, n)?;
        let full = |t: &Tensor| -> candle_core::Result<Tensor> {
            Tensor::cat(&[t, t], D::Minus1)?.reshape((b, 1, s, d))
        };
        super::rope::apply(
            &heads,
            &full(cos)?.to_dtype(x.dtype())?,
            &full(sin)?.to_dtype(x.dtype())?,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::cpu::testing::max_diff;
    use candle_core::{Device, Var};

    /// Forward and both gradients against candle's matmul, for few rows (the backward's
    /// direct `dx`) and many.
    #[test]
    fn linear_matches_matmul_and_its_gradients() {
        let d = Device::Cpu;
        // Few rows and many, over a small weight (one block) and one large enough to be cut
        // into a block per thread (1299 rows: blocks of unequal length).
        for (n, out, inp) in [
            (3usize, 53usize, 37usize),
            (40, 53, 37),
            (40, 1299, 64),
            (1, 1299, 64),
            (5, 1299, 64),
        ] {
            let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (n, inp), &d).unwrap()).unwrap();
            let w = Var::from_tensor(&Tensor::randn(0f32, 1.0, (out, inp), &d).unwrap()).unwrap();
            let r = Tensor::randn(0f32, 1.0, (n, out), &d).unwrap();
            let a = linear(x.as_tensor(), w.as_tensor()).unwrap();
            let b = x.as_tensor().matmul(&w.as_tensor().t().unwrap()).unwrap();
            assert!(max_diff(&a, &b) < 1e-5, "n {n}: {}", max_diff(&a, &b));
            let ga = (&a * &r).unwrap().sum_all().unwrap().backward().unwrap();
            let gb = (&b * &r).unwrap().sum_all().unwrap().backward().unwrap();
            for v in [&x, &w] {
                let (p, q) = (
                    ga.get(v.as_tensor()).unwrap(),
                    gb.get(v.as_tensor()).unwrap(),
                );
                assert!(max_diff(p, q) < 1e-4, "n {n}: {}", max_diff(p, q));
                assert!(max_diff(p, &p.zeros_like().unwrap()) > 0.1);
            }
        }
    }

    /// Strided products (in blocks and as one product) against a plain triple loop, in the
    /// two layouts they are used with: row-major, and column-major with a leading dimension
    /// wider than the rows (the padding left untouched); blocks of unequal length, more blocks
    /// than 16-row tiles, an operand read transposed, accumulation and an empty sum.
    #[test]
    fn blocked_products_match_a_plain_product() {
        for (m, n, k, ld, blocks, accumulate) in [
            (53usize, 7usize, 9usize, 53usize, 2usize, false),
            (53, 7, 9, 60, 3, true),
            (16, 3, 5, 16, 4, false),
            (1299, 4, 6, 1300, 2, false),
            (40, 5, 0, 41, 2, false),
            (40, 5, 0, 41, 2, true),
            (8, 2, 3, 8, 1, true),
            // Depth above 512 (see MIN_BLOCK_ROWS): 3 blocks of 64 rows would round
            // differently, so 2 are taken; 12 blocks of 6-7 tiles, the last one partial.
            (192, 25, 576, 192, 3, false),
            (1299, 25, 576, 1300, 12, true),
            // Two columns: blocks of 100 rows would take the dot-product kernels.
            (300, 2, 576, 300, 3, false),
            // One to three columns (decoding one to three sequences): matrix-vector kernels.
            (576, 1, 576, 576, 2, false),
            (576, 3, 576, 576, 4, false),
        ] {
            let a: Vec<f32> = (0..m * k)
                .map(|i| ((i * 37) % 101) as f32 / 50.0 - 1.0)
                .collect();
            let b: Vec<f32> = (0..k * n)
                .map(|i| ((i * 53) % 97) as f32 / 48.0 - 1.0)
                .collect();
            // a [m, k] row-major; b [k, n] stored column-major (as `xᵀ` is).
            let am = Mat {
                data: &a,
                rs: k as isize,
                cs: 1,
            };
            let bm = Mat {
                data: &b,
                rs: 1,
                cs: k as isize,
            };
            let start = |i: usize, j: usize| ((i * 3 + j * 5) % 7) as f32 - 3.0;
            let want = |i: usize, j: usize| {
                let p: f32 = (0..k).map(|p| a[i * k + p] * b[p + j * k]).sum();
                p + if accumulate { start(i, j) } else { 0.0 }
            };
            let close = |got: f32, want: f32| (got - want).abs() <= 1e-4 * (1.0 + want.abs());
            // Column-major into a wider buffer (its padding must stay untouched), row-major.
            for (rs, cs, len) in [(1, ld, ld * n), (n, 1, m * n)] {
                let run = |threads| {
                    let mut dst = vec![f32::NAN; len];
                    for i in 0..m {
                        for j in 0..n {
                            dst[i * rs + j * cs] = start(i, j);
                        }
                    }
                    gemm_strided(&mut dst, rs, cs, m, n, k, am, bm, accumulate, threads);
                    dst
                };
                let single = run(Threads::Gemm(gemm::Parallelism::None));
                for threads in [
                    Threads::Blocks(blocks),
                    Threads::Gemm(gemm::Parallelism::Rayon(2)),
                ] {
                    let mut dst = run(threads);
                    let what = match threads {
                        Threads::Blocks(b) => format!("{b} blocks"),
                        Threads::Gemm(_) => "one product".into(),
                    };
                    // The same bits as a single-threaded product, whatever the threads.
                    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                    assert!(
                        bits(&dst) == bits(&single),
                        "{m}x{n}x{k}, {what}: other bits"
                    );
                    for i in 0..m {
                        for j in 0..n {
                            let got = std::mem::replace(&mut dst[i * rs + j * cs], f32::NAN);
                            assert!(
                                close(got, want(i, j)),
                                "{m}x{n}x{k} strides {rs},{cs}, {what}, at {i},{j}: {got} vs {}",
                                want(i, j)
                            );
                        }
                    }
                    assert!(dst.iter().all(|v| v.is_nan()), "padding written");
                }
            }
        }
    }

    /// Split/merge/rope against the composed reshape/transpose/rotate ops, values and gradients.
    #[test]
    fn heads_and_rope_match_the_composed_ops() {
        let d = Device::Cpu;
        let (b, s, n, hd) = (2usize, 5usize, 3usize, 8usize);
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, s, n * hd), &d).unwrap()).unwrap();
        let ang = Tensor::randn(0f32, 2.0, (b, s, hd / 2), &d).unwrap();
        let (cos, sin) = (ang.cos().unwrap(), ang.sin().unwrap());
        let r = Tensor::randn(0f32, 1.0, (b, n, s, hd), &d).unwrap();
        let composed_heads = x
            .as_tensor()
            .reshape((b, s, n, hd))
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .contiguous()
            .unwrap();
        let full = |t: &Tensor| {
            Tensor::cat(&[t, t], D::Minus1)
                .unwrap()
                .reshape((b, 1, s, hd))
                .unwrap()
        };
        let composed =
            super::super::rope::apply(&composed_heads, &full(&cos), &full(&sin)).unwrap();
        let fused = rope_heads(x.as_tensor(), &cos, &sin, n).unwrap();
        assert_eq!(
            max_diff(&fused, &composed),
            0.0,
            "rope forward is bit-identical"
        );
        let ga = (&fused * &r)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let gb = (&composed * &r)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let (p, q) = (
            ga.get(x.as_tensor()).unwrap(),
            gb.get(x.as_tensor()).unwrap(),
        );
        assert!(max_diff(p, q) < 1e-6, "{}", max_diff(p, q));

        let split = split_heads(x.as_tensor(), n).unwrap();
        assert_eq!(max_diff(&split, &composed_heads), 0.0);
        let merged = merge_heads(&split).unwrap();
        assert_eq!(max_diff(&merged, x.as_tensor()), 0.0);
        let ga = (&split * &r)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let expect = r.transpose(1, 2).unwrap().reshape((b, s, n * hd)).unwrap();
        assert_eq!(max_diff(ga.get(x.as_tensor()).unwrap(), &expect), 0.0);
        let y = Var::from_tensor(&r).unwrap();
        let ga = (merge_heads(y.as_tensor()).unwrap() * x.as_tensor())
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        assert_eq!(
            max_diff(ga.get(y.as_tensor()).unwrap(), &composed_heads),
            0.0
        );
    }

    /// With a sink open, the weight gradients of two backward passes are summed in place and
    /// equal the sum of the two gradients candle computes without a sink; other gradients
    /// (the inputs') still go to candle's store.
    #[test]
    fn weight_gradient_sink_accumulates_like_candle() {
        let d = Device::Cpu;
        let w = Var::from_tensor(&Tensor::randn(0f32, 1.0, (29, 37), &d).unwrap()).unwrap();
        let xs: Vec<Var> = (0..2)
            .map(|_| Var::from_tensor(&Tensor::randn(0f32, 1.0, (1, 20, 37), &d).unwrap()).unwrap())
            .collect();
        let r = Tensor::randn(0f32, 1.0, (1, 20, 29), &d).unwrap();
        let loss = |x: &Var| {
            (linear(x.as_tensor(), w.as_tensor()).unwrap() * &r)
                .unwrap()
                .sum_all()
                .unwrap()
        };
        let plain: Vec<_> = xs.iter().map(|x| loss(x).backward().unwrap()).collect();
        let expect =
            (plain[0].get(w.as_tensor()).unwrap() + plain[1].get(w.as_tensor()).unwrap()).unwrap();
        let sink = WeightGradSink::open().unwrap();
        assert!(WeightGradSink::open().is_err(), "one sink per thread");
        let mut g = loss(&xs[0]).backward().unwrap();
        assert!(
            g.get(w.as_tensor()).is_none(),
            "weight gradient went to the sink"
        );
        let dx = g.get(xs[0].as_tensor()).unwrap().clone();
        assert_eq!(max_diff(&dx, plain[0].get(xs[0].as_tensor()).unwrap()), 0.0);
        let _ = loss(&xs[1]).backward().unwrap();
        sink.finish(&[w.as_tensor()], &mut g).unwrap();
        let got = g.get(w.as_tensor()).unwrap();
        assert!(max_diff(got, &expect) < 1e-5, "{}", max_diff(got, &expect));
        // Closed: the next backward hands the weight gradient to candle again.
        assert!(loss(&xs[0])
            .backward()
            .unwrap()
            .get(w.as_tensor())
            .is_some());
    }

    /// A tied embedding: the lookup's and the output head's gradients of one weight, with
    /// repeated ids, against candle's `index_select` + `matmul`; with a sink open over two
    /// micro-batches (both ops add into one buffer) and without one.
    #[test]
    fn embedding_gradients_match_candle_with_and_without_the_sink() {
        let d = Device::Cpu;
        let w = Var::from_tensor(&Tensor::randn(0f32, 1.0, (11, 6), &d).unwrap()).unwrap();
        let ids = [
            Tensor::new(&[[3u32, 7, 3, 0, 10]], &d).unwrap(),
            Tensor::new(&[[1u32, 1, 1, 9, 3]], &d).unwrap(),
        ];
        let r = Tensor::randn(0f32, 1.0, (1, 5, 11), &d).unwrap();
        let ours = |ids: &Tensor| {
            let x = embedding(w.as_tensor(), ids).unwrap();
            assert_eq!(x.dims(), &[1, 5, 6]);
            (linear(&x, w.as_tensor()).unwrap() * &r)
                .unwrap()
                .sum_all()
                .unwrap()
        };
        let candle = |ids: &Tensor| {
            let x = w
                .as_tensor()
                .index_select(&ids.flatten_all().unwrap(), 0)
                .unwrap();
            let y = x
                .matmul(&w.as_tensor().t().unwrap())
                .unwrap()
                .unsqueeze(0)
                .unwrap();
            (y * &r).unwrap().sum_all().unwrap()
        };
        let want: Vec<Tensor> = ids
            .iter()
            .map(|i| {
                candle(i)
                    .backward()
                    .unwrap()
                    .get(w.as_tensor())
                    .unwrap()
                    .clone()
            })
            .collect();
        // Without a sink: a dense gradient per backward.
        let g0 = ours(&ids[0]).backward().unwrap();
        let got0 = g0.get(w.as_tensor()).unwrap();
        assert!(
            max_diff(got0, &want[0]) < 1e-5,
            "{}",
            max_diff(got0, &want[0])
        );
        // With a sink: nothing in candle's store, the sum of both after finish.
        let sink = WeightGradSink::open().unwrap();
        let mut g = ours(&ids[0]).backward().unwrap();
        assert!(g.get(w.as_tensor()).is_none());
        let _ = ours(&ids[1]).backward().unwrap();
        sink.finish(&[w.as_tensor()], &mut g).unwrap();
        let expect = (&want[0] + &want[1]).unwrap();
        let got = g.get(w.as_tensor()).unwrap();
        assert!(max_diff(got, &expect) < 1e-5, "{}", max_diff(got, &expect));
        // Out-of-vocabulary ids are refused by name.
        let bad = embedding(w.as_tensor(), &Tensor::new(&[[11u32]], &d).unwrap());
        assert!(bad.unwrap_err().to_string().contains("token id 11"));
    }

    /// Zero rows (an empty sequence) give empty results, not a panic or garbage.
    #[test]
    fn empty_inputs_give_empty_outputs() {
        let d = Device::Cpu;
        let x = Tensor::zeros((1, 0, 12), candle_core::DType::F32, &d).unwrap();
        let w = Tensor::ones((5, 12), candle_core::DType::F32, &d).unwrap();
        assert_eq!(linear(&x, &w).unwrap().dims(), &[1, 0, 5]);
        assert_eq!(split_heads(&x, 3).unwrap().dims(), &[1, 3, 0, 4]);
        let tab = Tensor::zeros((1, 0, 2), candle_core::DType::F32, &d).unwrap();
        assert_eq!(rope_heads(&x, &tab, &tab, 3).unwrap().dims(), &[1, 3, 0, 4]);
        let h = Tensor::zeros((1, 3, 0, 4), candle_core::DType::F32, &d).unwrap();
        assert_eq!(merge_heads(&h).unwrap().dims(), &[1, 0, 12]);
        // k = 0: the empty sum is zero.
        let x0 = Tensor::zeros((20, 0), candle_core::DType::F32, &d).unwrap();
        let w0 = Tensor::zeros((7, 0), candle_core::DType::F32, &d).unwrap();
        let y = linear(&x0, &w0).unwrap();
        assert_eq!(y.dims(), &[20, 7]);
        assert_eq!(
            y.abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap(),
            0.0
        );
    }
}
