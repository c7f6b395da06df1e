//! Access to the f32 data of CPU tensors, shared by the kernels with their own backward
//! ([`super::layout`], [`super::ops`], [`super::attend`], the trainer's loss).

use candle_core::{CpuStorage, Layout, Storage, Tensor};

/// The contiguous f32 data of a storage/layout pair; `what` names the op in errors.
pub(crate) fn f32_slice<'a>(
    s: &'a CpuStorage,
    l: &Layout,
    what: &str,
) -> candle_core::Result<&'a [f32]> {
    let CpuStorage::F32(d) = s else {
        candle_core::bail!("{what}: f32 only");
    };
    let Some((a, b)) = l.contiguous_offsets() else {
        candle_core::bail!("{what}: contiguous input only");
    };
    Ok(&d[a..b])
}

/// Runs `f` on the contiguous f32 data of each tensor (CPU), in the order given.
pub(crate) fn with_f32<R>(
    ts: &[&Tensor],
    what: &str,
    f: impl FnOnce(&[&[f32]]) -> candle_core::Result<R>,
) -> candle_core::Result<R> {
    let guards: Vec<_> = ts.iter().map(|t| t.storage_and_layout()).collect();
    let mut slices = Vec::with_capacity(ts.len());
    for (s, l) in &guards {
        let Storage::Cpu(s) = &**s else {
            candle_core::bail!("{what}: CPU tensors only");
        };
        slices.push(f32_slice(s, l, what)?);
    }
    f(&slices)
}

/// Whether every tensor is f32 on the CPU: the condition under which the kernels with their
/// own backward run (otherwise the callers fall back to composed candle ops).
pub(crate) fn all_cpu_f32(ts: &[&Tensor]) -> bool {
    ts.iter()
        .all(|t| t.device().is_cpu() && t.dtype() == candle_core::DType::F32)
}

/// Helpers of the kernels' unit tests.
#[cfg(test)]
pub(crate) mod testing {
    use candle_core::{backprop::GradStore, Tensor, Var};

    /// `max |a − b|` over all elements.
    pub fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    /// The gradients of `vars` in `got` and `expected` agree within `rel` of the largest
    /// expected magnitude, which must exceed `min_scale` (so that a vanished gradient fails).
    pub fn assert_grads_close(
        got: &GradStore,
        expected: &GradStore,
        vars: &[&Var],
        rel: f32,
        min_scale: f32,
    ) {
        for v in vars {
            let (p, q) = (
                got.get(v.as_tensor()).expect("gradient"),
                expected.get(v.as_tensor()).expect("reference gradient"),
            );
            let scale = max_diff(q, &q.zeros_like().unwrap());
            let diff = max_diff(p, q);
            assert!(
                scale > min_scale && diff <= rel * scale,
                "gradient differs by {diff} (scale {scale})"
            );
        }
    }
}
