//! AdamW (Loshchilov & Hutter, arXiv:1711.05101) with the update of PyTorch's
//! `torch.optim.AdamW` (decoupled decay `p *= 1 - lr·wd`, bias-corrected moments,
//! `eps` added to `sqrt(v_hat)`), global-norm gradient clipping (`clip_grad_norm_`), and a
//! state that can be saved and restored for `resume_from_checkpoint`.
//!
//! Why not `candle_nn::AdamW`: its update is the same, but its moments and step count are
//! private, so a run could not be resumed exactly; and it applies one weight decay to every
//! tensor, while transformers' Trainer exempts biases and norm weights (tensors of fewer than
//! 2 dimensions), which we reproduce.

use std::collections::HashMap;

use candle_core::{backprop::GradStore, DType, Device, Tensor, Var};
use rayon::prelude::*;

use crate::error::{Error, Result};

/// Hyper-parameters (`adam_beta1`, `adam_beta2`, `adam_epsilon`, `weight_decay`).
#[derive(Debug, Clone, Copy)]
pub struct AdamWParams {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWParams {
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

struct Slot {
    name: String,
    var: Var,
    decay: bool,
    m: Vec<f32>,
    v: Vec<f32>,
}

/// AdamW over named [`Var`]s (f32).
pub struct AdamW {
    slots: Vec<Slot>,
    /// Completed updates (PyTorch's per-parameter `step`, equal for all here).
    pub step: u64,
    pub params: AdamWParams,
}

/// Read-only f32 view of a contiguous CPU tensor, or a copy otherwise.
fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    let t = if t.is_contiguous() {
        t.clone()
    } else {
        t.contiguous()?
    };
    let (storage, layout) = t.storage_and_layout();
    if let candle_core::Storage::Cpu(candle_core::CpuStorage::F32(data)) = &*storage {
        let (start, end) = layout
            .contiguous_offsets()
            .expect("contiguous tensor has offsets");
        return Ok(f(&data[start..end]));
    }
    drop(storage);
    let v = t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
    Ok(f(&v))
}

/// Sum of squares of a tensor's elements (f64 accumulation).
pub fn sum_sq(t: &Tensor) -> Result<f64> {
    with_f32(t, |x| {
        // Partial sums in chunk order, added sequentially: the same bits on every run
        // (rayon's `sum` would reduce in a work-stealing-dependent order).
        x.par_chunks(1 << 16)
            .map(|c| c.iter().map(|&a| (a as f64) * (a as f64)).sum::<f64>())
            .collect::<Vec<f64>>()
            .into_iter()
            .sum()
    })
}

#[derive(Clone, Copy)]
struct Coeffs {
    b1: f32,
    b2: f32,
    eps: f32,
    gs: f32,
    decay: f32,
    step_size: f32,
    bc2_sqrt: f32,
}

impl Coeffs {
    /// `m = b1 m + (1-b1) g`, `v = b2 v + (1-b2) g²`,
    /// `θ = θ·decay − step_size · m / (sqrt(v)/sqrt(bc2) + eps)` (torch.optim.AdamW).
    fn apply(&self, th: &mut [f32], m: &mut [f32], v: &mut [f32], g: &[f32]) {
        const CHUNK: usize = 1 << 14;
        let c = *self;
        th.par_chunks_mut(CHUNK)
            .zip(m.par_chunks_mut(CHUNK))
            .zip(v.par_chunks_mut(CHUNK))
            .zip(g.par_chunks(CHUNK))
            .for_each(|(((th, m), v), g)| {
                for i in 0..th.len() {
                    let gi = g[i] * c.gs;
                    m[i] = c.b1 * m[i] + (1.0 - c.b1) * gi;
                    v[i] = c.b2 * v[i] + (1.0 - c.b2) * gi * gi;
                    let denom = v[i].sqrt() / c.bc2_sqrt + c.eps;
                    th[i] = th[i] * c.decay - c.step_size * m[i] / denom;
                }
            })
    }
}

/// The AdamW update applied to a parameter's own CPU storage.
struct InPlaceUpdate<'a> {
    grad: &'a [f32],
    m: std::cell::RefCell<&'a mut Vec<f32>>,
    v: std::cell::RefCell<&'a mut Vec<f32>>,
    c: Coeffs,
}

impl candle_core::InplaceOp1 for InPlaceUpdate<'_> {
    fn name(&self) -> &'static str {
        "adamw-update"
    }
    fn cpu_fwd(
        &self,
        storage: &mut candle_core::CpuStorage,
        layout: &candle_core::Layout,
    ) -> candle_core::Result<()> {
        let candle_core::CpuStorage::F32(data) = storage else {
            candle_core::bail!("adamw-update: f32 parameters only");
        };
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("adamw-update: contiguous parameters only");
        };
        let mut m = self.m.borrow_mut();
        let mut v = self.v.borrow_mut();
        self.c
            .apply(&mut data[start..end], &mut m[..], &mut v[..], self.grad);
        Ok(())
    }
}

impl AdamW {
    /// One slot per var; weight decay only on tensors of 2 or more dimensions.
    pub fn new(vars: &[(String, Var)], params: AdamWParams) -> Result<Self> {
        let mut slots = Vec::with_capacity(vars.len());
        for (name, var) in vars {
            if var.dtype() != DType::F32 {
                return Err(Error::InvalidOptions(format!(
                    "AdamW: parameter {name} is {:?}, expected f32",
                    var.dtype()
                )));
            }
            let n = var.elem_count();
            slots.push(Slot {
                name: name.clone(),
                var: var.clone(),
                decay: var.rank() >= 2,
                m: vec![0.0; n],
                v: vec![0.0; n],
            });
        }
        Ok(Self {
            slots,
            step: 0,
            params,
        })
    }

    /// Names of the tensors that get weight decay.
    pub fn decayed(&self) -> Vec<&str> {
        self.slots
            .iter()
            .filter(|s| s.decay)
            .map(|s| s.name.as_str())
            .collect()
    }

    /// Global L2 norm of the gradients present in `grads`.
    pub fn grad_norm(&self, grads: &GradStore) -> Result<f64> {
        let mut total = 0.0;
        for s in &self.slots {
            if let Some(g) = grads.get(s.var.as_tensor()) {
                total += sum_sq(g)?;
            }
        }
        Ok(total.sqrt())
    }

    /// One update with learning rate `lr`; gradients are multiplied by `grad_scale` first
    /// (the clipping coefficient). Parameters without a gradient are left untouched, their
    /// moments too (PyTorch skips parameters whose `.grad` is None).
    pub fn step(&mut self, grads: &GradStore, lr: f64, grad_scale: f64) -> Result<()> {
        self.step += 1;
        let p = self.params;
        let t = self.step as i32;
        let bc1 = 1.0 - p.beta1.powi(t);
        let bc2 = 1.0 - p.beta2.powi(t);
        let step_size = (lr / bc1) as f32;
        let bc2_sqrt = bc2.sqrt() as f32;
        let (b1, b2, eps) = (p.beta1 as f32, p.beta2 as f32, p.eps as f32);
        let gs = grad_scale as f32;
        for s in self.slots.iter_mut() {
            let Some(g) = grads.get(s.var.as_tensor()) else {
                continue;
            };
            let decay = if s.decay {
                (1.0 - lr * p.weight_decay) as f32
            } else {
                1.0
            };
            let coeffs = Coeffs {
                b1,
                b2,
                eps,
                gs,
                decay,
                step_size,
                bc2_sqrt,
            };
            let (m, v) = (&mut s.m, &mut s.v);
            let theta = s.var.as_tensor();
            if matches!(theta.device(), Device::Cpu) && theta.is_contiguous() {
                // In place: no copy of the parameter (hundreds of MB per step otherwise).
                with_f32(g, |g| {
                    theta.inplace_op1(&InPlaceUpdate {
                        grad: g,
                        m: std::cell::RefCell::new(m),
                        v: std::cell::RefCell::new(v),
                        c: coeffs,
                    })
                })??;
            } else {
                let shape = theta.shape().clone();
                let device = theta.device().clone();
                let mut next = with_f32(theta, |x| x.to_vec())?;
                with_f32(g, |g| coeffs.apply(&mut next, m, v, g))?;
                s.var.set(&Tensor::from_vec(next, shape, &device)?)?;
            }
        }
        Ok(())
    }

    /// The moments as named tensors (`{name}.exp_avg`, `{name}.exp_avg_sq`, PyTorch's state
    /// names) for saving.
    pub fn state_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = Vec::with_capacity(2 * self.slots.len());
        for s in &self.slots {
            let shape = s.var.shape().clone();
            out.push((
                format!("{}.exp_avg", s.name),
                Tensor::from_slice(&s.m, shape.clone(), &Device::Cpu)?,
            ));
            out.push((
                format!("{}.exp_avg_sq", s.name),
                Tensor::from_slice(&s.v, shape, &Device::Cpu)?,
            ));
        }
        Ok(out)
    }

    /// Restores moments saved by [`AdamW::state_tensors`] and the step count. Every slot must
    /// be present with its shape; `origin` names the file in errors.
    pub fn load_state(
        &mut self,
        state: &HashMap<String, Tensor>,
        step: u64,
        origin: &std::path::Path,
    ) -> Result<()> {
        for s in self.slots.iter_mut() {
            for (suffix, dst) in [("exp_avg", &mut s.m), ("exp_avg_sq", &mut s.v)] {
                let name = format!("{}.{suffix}", s.name);
                let t = state.get(&name).ok_or_else(|| Error::MissingTensor {
                    path: origin.to_path_buf(),
                    name: name.clone(),
                })?;
                if t.dims() != s.var.dims() {
                    return Err(Error::ShapeMismatch {
                        path: origin.to_path_buf(),
                        name,
                        expected: s.var.dims().to_vec(),
                        found: t.dims().to_vec(),
                    });
                }
                *dst = t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
            }
        }
        self.step = step;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two steps against values computed by hand from PyTorch's AdamW formulas.
    #[test]
    fn matches_torch_adamw_formula() {
        let w = Var::from_tensor(&Tensor::new(&[[1.0f32, -2.0]], &Device::Cpu).unwrap()).unwrap();
        let b = Var::from_tensor(&Tensor::new(&[0.5f32], &Device::Cpu).unwrap()).unwrap();
        let vars = vec![("w".to_string(), w.clone()), ("b".to_string(), b.clone())];
        let params = AdamWParams {
            weight_decay: 0.1,
            ..Default::default()
        };
        let mut opt = AdamW::new(&vars, params).unwrap();
        assert_eq!(opt.decayed(), vec!["w"]);
        // loss = sum(w * c) + 3 b  -> grads c, 3
        let c = Tensor::new(&[[0.3f32, -0.7]], &Device::Cpu).unwrap();
        for _ in 0..2 {
            let loss = ((w.as_tensor() * &c).unwrap().sum_all().unwrap()
                + (b.as_tensor() * 3.0).unwrap().sum_all().unwrap())
            .unwrap();
            let grads = loss.backward().unwrap();
            opt.step(&grads, 0.01, 1.0).unwrap();
        }
        // With a constant gradient g, m_hat = g and v_hat = g^2 at every step, so each step
        // moves by lr * sign(g) (up to eps) after the decay factor.
        let w_after = w.as_tensor().to_vec2::<f32>().unwrap()[0].clone();
        let mut expect = [1.0f64, -2.0];
        for _ in 0..2 {
            expect[0] = expect[0] * (1.0 - 0.01 * 0.1) - 0.01;
            expect[1] = expect[1] * (1.0 - 0.01 * 0.1) + 0.01;
        }
        assert!((w_after[0] as f64 - expect[0]).abs() < 1e-6, "{w_after:?}");
        assert!((w_after[1] as f64 - expect[1]).abs() < 1e-6, "{w_after:?}");
        let b_after = b.as_tensor().to_vec1::<f32>().unwrap()[0];
        assert!((b_after as f64 - (0.5 - 0.02)).abs() < 1e-6, "{b_after}");
        assert_eq!(opt.step, 2);
    }
}
