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
