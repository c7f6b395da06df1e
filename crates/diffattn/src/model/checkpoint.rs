//! Gradient checkpointing (axolotl's `gradient_checkpointing: true`): each decoder layer runs as
//! one graph node whose forward keeps nothing but its input and output, and whose backward
//! recomputes the layer with gradient tracking and differentiates it.
//!
//! Memory: a training step then keeps, per layer, its input and output `[b, s, hidden]`
//! instead of every intermediate (norms, q/k/v, attention maps, MLP activations), plus one
//! layer's intermediates while that layer's backward runs. Time: one more forward per layer.
//!
//! Gradients: the recomputation's backward hands the layer's weight gradients to the trainer's
//! [`super::layout::WeightGradSink`] (the linear weights' own backward does so already; the
//! other parameters of the layer, norms, biases, lambda vectors, are added here), and returns
//! the gradient of the layer's input to the outer backward. A sink must be open (the trainer
//! opens one per step).

use std::sync::Arc;

use candle_core::{backprop::GradStore, CpuStorage, CustomOp1, Layout, Shape, Tensor, Var};

use super::cpu::f32_slice;
use super::Model;
use crate::error::Result;

/// The model twice: as trained (variables, for the recomputation) and detached (for the
/// forward, which then takes the fused inference kernels and builds no graph).
pub(crate) struct Checkpointed {
    live: Arc<Model>,
    frozen: Arc<Model>,
}

impl Checkpointed {
    pub(crate) fn new(model: &Model) -> Self {
        Self {
            live: Arc::new(model.clone()),
            frozen: Arc::new(model.detached()),
        }
    }

    /// Layer `l` on `x` as one checkpointed node (see the module's documentation).
    pub(crate) fn block(
        &self,
        l: usize,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: Option<&Tensor>,
    ) -> Result<Tensor> {
        let op = BlockOp {
            live: self.live.clone(),
            frozen: self.frozen.clone(),
            l,
            cos: cos.detach(),
            sin: sin.detach(),
            mask: mask.map(Tensor::detach),
        };
        Ok(x.contiguous()?.apply_op1(op)?)
    }
}

struct BlockOp {
    live: Arc<Model>,
    frozen: Arc<Model>,
    l: usize,
    cos: Tensor,
    sin: Tensor,
    mask: Option<Tensor>,
}

impl BlockOp {
    /// The layer on `x` with `model`'s weights.
    fn run(&self, model: &Model, x: &Tensor) -> candle_core::Result<Tensor> {
        let (cos, sin, mask) = (&self.cos, &self.sin, self.mask.as_ref());
        model
            .block(self.l, x, cos, sin, mask, None, false)
            .map(|(y, _)| y)
            .map_err(|e| candle_core::Error::Msg(e.to_string()))
    }
}

impl CustomOp1 for BlockOp {
    fn name(&self) -> &'static str {
        "checkpointed-decoder-layer"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = f32_slice(s, l, "checkpointed layer")?;
        let x = Tensor::from_slice(x, l.shape(), &self.frozen.device)?;
        let y = self.run(&self.frozen, &x)?;
        let y = y.contiguous()?;
        let out = y.flatten_all()?.to_vec1::<f32>()?;
        Ok((CpuStorage::F32(out), y.shape().clone()))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, g: &Tensor) -> candle_core::Result<Option<Tensor>> {
        if !super::layout::sink_open() {
            candle_core::bail!(
                "gradient checkpointing needs a weight gradient sink open during the backward"
            );
        }
        let x = Var::from_tensor(&arg.detach())?;
        let y = self.run(&self.live, x.as_tensor())?;
        let grads: GradStore = (y * g.detach())?.sum_all()?.backward()?;
        for w in self.live.block_tensors(self.l) {
            if !w.is_variable() {
                continue;
            }
            let Some(gw) = grads.get(w) else { continue };
            let gw = gw.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
            super::layout::into_sink(w.id(), gw.len(), |acc, fresh| {
                if fresh {
                    acc.copy_from_slice(&gw);
                } else {
                    acc.iter_mut().zip(&gw).for_each(|(a, b)| *a += b);
                }
            });
        }
        Ok(grads.get(x.as_tensor()).cloned())
    }
}
