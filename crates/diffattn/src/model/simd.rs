//! Vectorised element-wise math for the CPU kernels: an `exp` the compiler can vectorise, and
//! [`vectorized`], which runs a loop compiled for the best instruction set the CPU has (AVX-512,
//! AVX2+FMA, else the baseline) chosen at run time by `pulp` (the dispatcher of the `gemm`
//! crate candle uses).
//!
//! Why: the default x86-64 target has only SSE2, and `f32::exp` is a call into libm per element
//! (scalar, with an errno wrapper). Softmax, SwiGLU and the cross-entropy evaluate ~10⁸
//! exponentials per training step of SmolLM2; with [`exp`] inside [`vectorized`] loops they run
//! 8-16 lanes at a time.
//!
//! Rounding: no fused multiply-add is formed (Rust never contracts `a * b + c`), so a loop gives
//! the same bits in every instruction set; [`exp`] differs from libm's `expf` by at most 2 units
//! in the last place (see the test), which no tolerance of this crate can see.

/// `f()` compiled with the widest SIMD extension available at run time. Put the whole hot loop
/// inside `f` and mark the closure `#[inline(always)]` (otherwise it may stay a separate
/// function compiled for the baseline target, where `f32::floor` is even a libm call); the
/// helpers it calls must be `#[inline(always)]` too.
#[inline(always)]
pub(crate) fn vectorized<R>(f: impl FnOnce() -> R) -> R {
    pulp::Arch::new().dispatch(f)
}

/// `eˣ` in f32, branch-free (vectorisable): `x = n·ln 2 + r` with `|r| ≤ ln 2 / 2`, `eʳ` by the
/// degree-7 minimax polynomial of Cephes' `expf` (S. L. Moshier), `2ⁿ` built in the exponent
/// bits. Relative error ≤ 2 ulp against a correctly rounded `exp` for `x` in [−87.3, 88.7];
/// `x > 88.72` gives +∞, `x < −87.34` gives 0 (libm returns subnormals down to −103.9; their
/// absolute size is below 1.2e−38), NaN gives NaN.
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split so that n · LN2_HI is exact for |n| < 2⁹ (Cody-Waite reduction).
    const LN2_HI: f32 = 355.0 / 512.0;
    const LN2_LO: f32 = -2.121_944_4e-4;
    const HI: f32 = 88.722_84;
    const LO: f32 = -87.336_55;
    let n = (x * LOG2E + 0.5).floor().clamp(-126.0, 128.0);
    let r = (x - n * LN2_HI) - n * LN2_LO;
    let p = ((((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2)
        * r
        + 1.666_666_5e-1)
        * r
        + 5e-1)
        * (r * r)
        + r)
        + 1.0;
    // 2ⁿ for n up to 128 (x up to 88.72): 2^min(n, 127), times 2 once more when n = 128 (both
    // exact scalings).
    let top = n.min(127.0);
    let p = if n > top { p * 2.0 } else { p };
    let y = p * f32::from_bits(((top as i32 + 127) as u32) << 23);
    let y = if x > HI { f32::INFINITY } else { y };
    if x < LO {
        0.0
    } else {
        y
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Units in the last place between `a` and `b` (both finite, same sign).
    fn ulps(a: f32, b: f32) -> u32 {
        (a.to_bits() as i64 - b.to_bits() as i64).unsigned_abs() as u32
    }

    #[test]
    fn exp_is_within_two_ulp_of_a_correctly_rounded_exp() {
        let mut worst = (0, 0f32);
        let n = 2_000_000;
        for i in 0..=n {
            let x = -87.3f32 + (88.7 + 87.3) * i as f32 / n as f32;
            let want = (x as f64).exp() as f32; // f64 exp rounded once: correctly rounded f32
            let got = exp(x);
            let u = ulps(got, want);
            if u > worst.0 {
                worst = (u, x);
            }
        }
        assert!(worst.0 <= 2, "{} ulp at x = {}", worst.0, worst.1);
        // Exact where it must be.
        assert_eq!(exp(0.0), 1.0);
        assert_eq!(exp(-0.0), 1.0);
    }

    #[test]
    fn exp_edges() {
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(-1000.0), 0.0);
        assert_eq!(exp(-87.4), 0.0);
        assert_eq!(exp(f32::INFINITY), f32::INFINITY);
        assert_eq!(exp(89.0), f32::INFINITY);
        assert!(exp(f32::NAN).is_nan());
        assert!(exp(88.7).is_finite() && exp(88.7) > 3.0e38);
        assert!(exp(-87.3) > 0.0);
    }

    #[test]
    fn vectorized_loop_gives_the_scalar_bits() {
        let xs: Vec<f32> = (0..1000).map(|i| (i as f32 - 500.0) * 0.173).collect();
        let scalar: Vec<f32> = xs.iter().map(|&x| exp(x)).collect();
        let vector = vectorized(
            #[inline(always)]
            || xs.iter().map(|&x| exp(x)).collect::<Vec<_>>(),
        );
        assert_eq!(scalar, vector);
    }
}
