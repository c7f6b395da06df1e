//! Weight matrices kept in their stored dtype (f32, bf16 or f16), read in place from the
//! checkpoint's memory map, and the inference kernels that use them: `y = x Wᵀ` and the
//! embedding lookup, both accumulating in f32.
//!
//! Why: a model held as candle f32 tensors costs 4 bytes per parameter of anonymous memory
//! (an 8B model: 32 GB) and reads 4 bytes per parameter per decoded token. Mapped, the weights
//! are file pages the kernel can reclaim and re-read, the anonymous memory of a forward is its
//! activations, KV cache and per-thread panels, and a bf16 checkpoint decodes reading 2 bytes
//! per parameter.
//!
//! Kernels:
//! - a few rows (`m ≤ SMALL_M`, decoding): each row of `W` is read once, converted to f32 in a
//!   per-thread buffer and dotted with every input row in 16 interleaved f32 lanes (element
//!   `i` to lane `i mod 16`, the lanes added in order, no fused multiply-add: the same bits on
//!   every instruction set and thread count); the threads split `W`'s rows;
//! - more rows (prefill, logits of a prompt): `W` is cut into panels of [`PANEL_BYTES`] of f32
//!   rows, each converted and multiplied by the `gemm` crate single-threaded, the threads
//!   splitting the panels (panel bounds do not depend on the thread count, so neither do the
//!   bits).
//!
//! Values: bf16 and f16 are widened exactly (`half`), so a mapped bf16 weight computes what the
//! same weight converted to an f32 tensor computes, up to summation order.

use std::sync::Arc;

use memmap2::Mmap;
use rayon::prelude::*;

use super::layout::{buffer, gemm_strided, n_threads, Mat, Threads};
use super::simd;
use crate::dtype::DType;

/// Rows of input up to which the dot-product kernel runs (reading each weight row once).
pub const SMALL_M: usize = 8;

/// Weight elements below which a few-rows product runs on the calling thread (waking the
/// pool costs more than the product).
const SMALL_PRODUCT: usize = 1 << 16;

/// Size of one converted panel of weight rows (f32) in the many-rows kernel.
const PANEL_BYTES: usize = 4096 << 10;

/// Where the elements live.
#[derive(Clone)]
enum Backing {
    /// A read-only map of the checkpoint file (shared by every matrix of the shard).
    Mapped(Arc<Mmap>),
    /// An owned, 4-byte-aligned copy (a dtype other than the stored one, or stored data not
    /// aligned to its element size).
    Owned(Arc<Vec<u32>>),
}

/// A `[rows, cols]` row-major matrix of f32, bf16 or f16 elements.
#[derive(Clone)]
pub struct StoredMatrix {
    backing: Backing,
    /// Byte offset of element 0 in the backing.
    start: usize,
    pub rows: usize,
    pub cols: usize,
    pub dtype: DType,
}

impl std::fmt::Debug for StoredMatrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "StoredMatrix[{}, {}] {:?} ({})",
            self.rows,
            self.cols,
            self.dtype,
            if self.is_mapped() { "mapped" } else { "owned" }
        )
    }
}

/// bf16 bits widened to f32 (exact).
#[inline(always)]
fn bf16_to_f32(b: u16) -> f32 {
    f32::from_bits((b as u32) << 16)
}

impl StoredMatrix {
    /// The matrix whose elements are bytes `start..` of `map` (`rows · cols` elements of
    /// `dtype`, little-endian). Copied into owned memory when the data is not aligned to the
    /// element size (safetensors does not promise alignment).
    pub fn mapped(map: Arc<Mmap>, start: usize, rows: usize, cols: usize, dtype: DType) -> Self {
        let len = rows * cols * dtype.size();
        let aligned = (map.as_ptr() as usize + start) % dtype.size() == 0;
        if aligned {
            return Self {
                backing: Backing::Mapped(map),
                start,
                rows,
                cols,
                dtype,
            };
        }
        Self::owned_bytes(&map[start..start + len], rows, cols, dtype)
    }

    fn owned_bytes(bytes: &[u8], rows: usize, cols: usize, dtype: DType) -> Self {
        let mut words = vec![0u32; bytes.len().div_ceil(4)];
        bytemuck::cast_slice_mut::<u32, u8>(&mut words)[..bytes.len()].copy_from_slice(bytes);
        Self {
            backing: Backing::Owned(Arc::new(words)),
            start: 0,
            rows,
            cols,
            dtype,
        }
    }

    /// An owned matrix of `values` (`[rows, cols]`) rounded to `dtype` (round to nearest even).
    pub fn from_f32(values: &[f32], rows: usize, cols: usize, dtype: DType) -> Self {
        debug_assert_eq!(values.len(), rows * cols);
        Self::owned_bytes(&crate::dtype::from_f32(values, dtype), rows, cols, dtype)
    }

    /// Whether the elements are read from the file's map (not copied).
    pub fn is_mapped(&self) -> bool {
        matches!(self.backing, Backing::Mapped(_))
    }

    /// Bytes of the elements.
    pub fn nbytes(&self) -> usize {
        self.rows * self.cols * self.dtype.size()
    }

    fn bytes(&self) -> &[u8] {
        let all: &[u8] = match &self.backing {
            Backing::Mapped(m) => m,
            Backing::Owned(v) => bytemuck::cast_slice(v),
        };
        &all[self.start..self.start + self.nbytes()]
    }

    fn f32s(&self) -> &[f32] {
        bytemuck::cast_slice(self.bytes())
    }

    fn u16s(&self) -> &[u16] {
        bytemuck::cast_slice(self.bytes())
    }

    /// Rows `r0..r0 + out.len() / cols` widened to f32 into `out`.
    pub fn rows_f32(&self, r0: usize, out: &mut [f32]) {
        let (a, b) = (r0 * self.cols, r0 * self.cols + out.len());
        match self.dtype {
            DType::F32 => out.copy_from_slice(&self.f32s()[a..b]),
            DType::BF16 => {
                let src = &self.u16s()[a..b];
                simd::vectorized(
                    #[inline(always)]
                    || {
                        for (o, &s) in out.iter_mut().zip(src) {
                            *o = bf16_to_f32(s);
                        }
                    },
                )
            }
            DType::F16 => {
                use half::slice::HalfFloatSliceExt;
                let src: &[half::f16] = bytemuck::cast_slice(&self.u16s()[a..b]);
                src.convert_to_f32_slice(out);
            }
        }
    }

    /// The whole matrix widened to f32.
    pub fn to_f32(&self) -> Vec<f32> {
        let mut out = buffer(self.rows * self.cols);
        self.rows_f32(0, &mut out);
        out
    }

    /// `y = x Wᵀ`: `x` `[m, cols]` (row-major) -> `[m, rows]`, accumulated in f32.
    pub fn matmul_t(&self, x: &[f32], m: usize) -> Vec<f32> {
        let (n, k) = (self.rows, self.cols);
        assert_eq!(x.len(), m * k, "matmul_t: input is not [m, {k}]");
        if m == 0 || n == 0 {
            return Vec::new();
        }
        if k == 0 {
            return vec![0.0; m * n];
        }
        if m <= SMALL_M {
            return self.few_rows(x, m);
        }
        // y = x Wᵀ written as its transpose W xᵀ (`[n, m]` at `rs = 1, cs = n`): the
        // orientation in which the threads split W's rows and each writes its own elements.
        let mut y = buffer(m * n);
        let xt = Mat {
            data: x,
            rs: 1,
            cs: k as isize,
        };
        if self.dtype == DType::F32 {
            let w = Mat {
                data: self.f32s(),
                rs: k as isize,
                cs: 1,
            };
            gemm_strided(
                &mut y,
                1,
                n,
                n,
                m,
                k,
                w,
                xt,
                false,
                Threads::Blocks(n_threads()),
            );
            return y;
        }
        /// The destination's base address, shared by the panels (each writes its own rows).
        struct Dst(*mut f32);
        // SAFETY: only used to write disjoint element sets from the threads below.
        unsafe impl Sync for Dst {}
        unsafe impl Send for Dst {}
        let panel = (PANEL_BYTES / 4 / k).clamp(16, 4096);
        // The full product's bounds, checked once (each panel is a row range of it).
        assert!(y.len() == m * n && x.len() == m * k);
        let base = Dst(y.as_mut_ptr());
        let base = &base;
        (0..n.div_ceil(panel))
            .into_par_iter()
            .for_each_init(Vec::new, |buf: &mut Vec<f32>, p| {
                let r0 = p * panel;
                let rows = panel.min(n - r0);
                buf.resize(rows * k, 0.0);
                self.rows_f32(r0, buf);
                let w = Mat {
                    data: buf,
                    rs: k as isize,
                    cs: 1,
                };
                // SAFETY: rows r0..r0 + rows of the [n, m] product at rs = 1, cs = n lie in
                // `y` (n·m elements) and no other panel writes them.
                unsafe {
                    super::layout::gemm_unchecked(
                        base.0.add(r0),
                        1,
                        n,
                        rows,
                        m,
                        k,
                        w,
                        xt,
                        false,
                        gemm::Parallelism::None,
                    )
                }
            });
        y
    }

    /// [`StoredMatrix::matmul_t`] for `m ≤ SMALL_M` rows.
    fn few_rows(&self, x: &[f32], m: usize) -> Vec<f32> {
        let (n, k) = (self.rows, self.cols);
        // yᵀ `[n, m]`: each task writes whole rows of it (its weight rows).
        let mut yt = buffer(n * m);
        // One block of rows per thread (fewer wake-ups than finer tasks: decoding runs
        // ~200 of these products per token), one block for small products.
        let tasks = if n * k < SMALL_PRODUCT {
            1
        } else {
            n_threads()
        };
        let per = n.div_ceil(tasks).max(1);
        let block = |(c, out): (usize, &mut [f32]), row: &mut Vec<f32>| {
            row.resize(k, 0.0);
            for (r, o) in out.chunks_mut(m).enumerate() {
                let a = (c * per + r) * k;
                match self.dtype {
                    DType::F32 => {
                        let w = &self.f32s()[a..a + k];
                        for (i, oi) in o.iter_mut().enumerate() {
                            *oi = dot(&x[i * k..(i + 1) * k], w);
                        }
                    }
                    DType::BF16 => {
                        let w = &self.u16s()[a..a + k];
                        for (i, oi) in o.iter_mut().enumerate() {
                            *oi = dot(&x[i * k..(i + 1) * k], w);
                        }
                    }
                    DType::F16 => {
                        self.rows_f32(c * per + r, row);
                        for (i, oi) in o.iter_mut().enumerate() {
                            *oi = dot(&x[i * k..(i + 1) * k], row);
                        }
                    }
                }
            }
        };
        if tasks == 1 {
            block((0, &mut yt), &mut Vec::new());
        } else {
            yt.par_chunks_mut(per * m)
                .enumerate()
                .for_each_init(Vec::new, |row, item| block(item, row));
        }
        if m == 1 {
            return yt;
        }
        let mut y = buffer(m * n);
        for (j, col) in yt.chunks(m).enumerate() {
            for (i, &v) in col.iter().enumerate() {
                y[i * n + j] = v;
            }
        }
        y
    }

    /// Rows `ids` of the matrix widened to f32: `[ids.len(), cols]`. Errors name the first id
    /// beyond the rows.
    pub fn gather(&self, ids: &[u32]) -> Result<Vec<f32>, u32> {
        if let Some(&bad) = ids.iter().find(|&&i| i as usize >= self.rows) {
            return Err(bad);
        }
        let mut out = buffer(ids.len() * self.cols);
        for (o, &i) in out.chunks_mut(self.cols.max(1)).zip(ids) {
            self.rows_f32(i as usize, o);
        }
        Ok(out)
    }
}

/// Elements of [`dot`]'s weight operand.
trait Elem: Copy {
    fn widen(self) -> f32;
}

impl Elem for f32 {
    #[inline(always)]
    fn widen(self) -> f32 {
        self
    }
}

/// bf16 bits.
impl Elem for u16 {
    #[inline(always)]
    fn widen(self) -> f32 {
        bf16_to_f32(self)
    }
}

/// Lanes of [`dot`]: four AVX-512 registers, eight AVX2 registers, so that consecutive
/// additions do not wait on each other.
const DOT_LANES: usize = 64;

/// `Σ a_i b_i` (`b` widened to f32) in 64 interleaved lanes: element `i` goes to lane
/// `i mod 64`, each lane sums its products in order (product rounded, then added: no fused
/// multiply-add), then lane `l` and lane `l + w/2` are added for widths 64, 32, ..., 2. The
/// AVX-512, AVX2 and portable versions perform exactly these operations, so the result has the
/// same bits on every CPU.
fn dot<T: x86::Load>(a: &[f32], b: &[T]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    let main = a.len() / DOT_LANES * DOT_LANES;
    let mut acc = [0f32; DOT_LANES];
    x86::lanes(&a[..main], &b[..main], &mut acc);
    for (l, (x, y)) in a[main..].iter().zip(&b[main..]).enumerate() {
        acc[l] += x * y.widen();
    }
    let mut w = DOT_LANES;
    while w > 1 {
        w /= 2;
        for l in 0..w {
            acc[l] += acc[l + w];
        }
    }
    acc[0]
}

/// The lane sums of [`dot`] over a length that is a multiple of [`DOT_LANES`].
mod x86 {
    use super::{Elem, DOT_LANES};

    fn portable<T: Elem>(a: &[f32], b: &[T], acc: &mut [f32; DOT_LANES]) {
        for (x, y) in a.chunks_exact(DOT_LANES).zip(b.chunks_exact(DOT_LANES)) {
            for l in 0..DOT_LANES {
                acc[l] += x[l] * y[l].widen();
            }
        }
    }

    /// Loads of 16 (AVX-512) or 8 (AVX2) weight elements as f32.
    pub(super) trait Load: Elem {
        /// # Safety
        /// AVX-512F available; `p` valid for 16 elements.
        #[cfg(target_arch = "x86_64")]
        unsafe fn load16(p: *const Self) -> std::arch::x86_64::__m512;
        /// # Safety
        /// AVX2 available; `p` valid for 8 elements.
        #[cfg(target_arch = "x86_64")]
        unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256;
    }

    #[cfg(not(target_arch = "x86_64"))]
    impl<T: Elem> Load for T {}

    #[cfg(target_arch = "x86_64")]
    impl Load for f32 {
        #[inline(always)]
        unsafe fn load16(p: *const f32) -> std::arch::x86_64::__m512 {
            std::arch::x86_64::_mm512_loadu_ps(p)
        }
        #[inline(always)]
        unsafe fn load8(p: *const f32) -> std::arch::x86_64::__m256 {
            std::arch::x86_64::_mm256_loadu_ps(p)
        }
    }

    #[cfg(target_arch = "x86_64")]
    impl Load for u16 {
        #[inline(always)]
        unsafe fn load16(p: *const u16) -> std::arch::x86_64::__m512 {
            use std::arch::x86_64::*;
            let h = _mm256_loadu_si256(p as *const __m256i);
            _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)))
        }
        #[inline(always)]
        unsafe fn load8(p: *const u16) -> std::arch::x86_64::__m256 {
            use std::arch::x86_64::*;
            let h = _mm_loadu_si128(p as *const __m128i);
            _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h)))
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn avx512<T: Load>(a: &[f32], b: &[T], acc: &mut [f32; DOT_LANES]) {
        use std::arch::x86_64::*;
        let mut r = [_mm512_setzero_ps(); 4];
        for i in (0..a.len()).step_by(DOT_LANES) {
            for (j, rj) in r.iter_mut().enumerate() {
                let x = _mm512_loadu_ps(a.as_ptr().add(i + 16 * j));
                let y = T::load16(b.as_ptr().add(i + 16 * j));
                *rj = _mm512_add_ps(*rj, _mm512_mul_ps(x, y));
            }
        }
        for (j, rj) in r.iter().enumerate() {
            _mm512_storeu_ps(acc.as_mut_ptr().add(16 * j), *rj);
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn avx2<T: Load>(a: &[f32], b: &[T], acc: &mut [f32; DOT_LANES]) {
        use std::arch::x86_64::*;
        let mut r = [_mm256_setzero_ps(); 8];
        for i in (0..a.len()).step_by(DOT_LANES) {
            for (j, rj) in r.iter_mut().enumerate() {
                let x = _mm256_loadu_ps(a.as_ptr().add(i + 8 * j));
                let y = T::load8(b.as_ptr().add(i + 8 * j));
                *rj = _mm256_add_ps(*rj, _mm256_mul_ps(x, y));
            }
        }
        for (j, rj) in r.iter().enumerate() {
            _mm256_storeu_ps(acc.as_mut_ptr().add(8 * j), *rj);
        }
    }

    /// `acc[l] = Σ_c a[64c + l] · b[64c + l]` (`acc` starts at 0), `a.len()` a multiple of 64.
    #[cfg(target_arch = "x86_64")]
    pub(super) fn lanes<T: Load>(a: &[f32], b: &[T], acc: &mut [f32; DOT_LANES]) {
        assert!(a.len() == b.len() && a.len() % DOT_LANES == 0);
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the feature is present; every load is inside the asserted lengths.
            unsafe { avx512(a, b, acc) }
        } else if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: as above.
            unsafe { avx2(a, b, acc) }
        } else {
            portable(a, b, acc)
        }
    }

    #[cfg(not(target_arch = "x86_64"))]
    pub(super) fn lanes<T: Load>(a: &[f32], b: &[T], acc: &mut [f32; DOT_LANES]) {
        portable(a, b, acc)
    }

    #[cfg(all(test, target_arch = "x86_64"))]
    #[test]
    fn every_instruction_set_gives_the_portable_bits() {
        let a: Vec<f32> = (0..640)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0)
            .collect();
        let b: Vec<u16> = (0..640)
            .map(|i| half::bf16::from_f32(((i * 53 % 97) as f32 - 48.0) / 3.0).to_bits())
            .collect();
        let mut want = [0f32; DOT_LANES];
        portable(&a, &b, &mut want);
        if std::arch::is_x86_feature_detected!("avx2") {
            let mut got = [0f32; DOT_LANES];
            unsafe { avx2(&a, &b, &mut got) };
            assert_eq!(got, want);
        }
        if std::arch::is_x86_feature_detected!("avx512f") {
            let mut got = [0f32; DOT_LANES];
            unsafe { avx512(&a, &b, &mut got) };
            assert_eq!(got, want);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference(x: &[f32], w: &[f32], m: usize, n: usize, k: usize) -> Vec<f64> {
        let mut y = vec![0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                y[i * n + j] = (0..k)
                    .map(|t| x[i * k + t] as f64 * w[j * k + t] as f64)
                    .sum();
            }
        }
        y
    }

    fn values(len: usize, seed: u32) -> Vec<f32> {
        (0..len)
            .map(|i| {
                let h = (i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed) >> 8;
                (h % 2001) as f32 / 1000.0 - 1.0
            })
            .collect()
    }

    #[test]
    fn products_match_f64_in_every_dtype_and_both_kernels() {
        let (n, k) = (300, 77);
        let w = values(n * k, 1);
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            let s = StoredMatrix::from_f32(&w, n, k, dtype);
            // The reference uses the rounded weights: the kernels widen exactly.
            let wr = s.to_f32();
            for (i, (&a, &b)) in wr.iter().zip(&w).enumerate() {
                assert!((a - b).abs() <= 4e-3, "{dtype:?} element {i}: {a} vs {b}");
            }
            for m in [1, 3, SMALL_M, SMALL_M + 1, 40] {
                let x = values(m * k, 7 + m as u32);
                let want = reference(&x, &wr, m, n, k);
                let got = s.matmul_t(&x, m);
                assert_eq!(got.len(), m * n);
                for (g, w) in got.iter().zip(&want) {
                    assert!((*g as f64 - w).abs() < 1e-4, "{dtype:?} m={m}: {g} vs {w}");
                }
            }
        }
    }

    #[test]
    fn unaligned_map_data_is_copied_and_reads_the_same() {
        let w: Vec<f32> = values(6 * 5, 3);
        let mut bytes = vec![0u8; 3];
        bytes.extend(crate::dtype::from_f32(&w, DType::F32));
        let mut file = tempfile::tempfile().unwrap();
        std::io::Write::write_all(&mut file, &bytes).unwrap();
        let map = Arc::new(unsafe { Mmap::map(&file) }.unwrap());
        let s = StoredMatrix::mapped(map.clone(), 3, 6, 5, DType::F32);
        assert!(!s.is_mapped());
        assert_eq!(s.to_f32(), w);
        assert_eq!(s.gather(&[5, 0]).unwrap()[..5], w[25..30]);
        assert_eq!(s.gather(&[6]), Err(6));
        let bf = StoredMatrix::mapped(map, 4, 2, 2, DType::BF16);
        assert!(bf.is_mapped());
    }
}
