//! Lambda and attention monitoring (docs/spec.md §5-6): per monitored layer the norms of the four lambda
//! vectors, `lambda1`, `lambda2`, `lambda_init`, `lambda_full` (without mix) and mean / std of
//! both attention maps; over all layers the mean and sample std (n − 1) of the norms,
//! `lambda1`, `lambda2` and `lambda_full` (with mix); `aggregate/diff_attn_mix` with warm-up.
//! V2 layers have no lambda vectors: per monitored layer the norm of `lambda_proj` and the mean
//! / std of the gate `sigmoid(lambda_proj(x))` over every token and head of the step's first
//! micro-batch (`lambda_gate_*`, without mix), the two attention maps of the pairs (heads 2i,
//! 2i+1); over all layers the mean and std of the `lambda_proj` norms and the mean over the
//! monitored layers of mix times the gate mean (`aggregate/lambda_gate_mean`).
//!
//! Attention statistics are always taken over the attention *probabilities* (after softmax
//! and masking, every element of `[batch, heads, seq, keys]`, masked zeros included, as
//! `tensor.mean()` / `tensor.std()` in PyTorch), never over scores: the plugin's statistics
//! meant different things on different attention paths.

use std::collections::BTreeMap;

use candle_core::{DType, Tensor};

use crate::error::Result;
use crate::model::{AttentionProbs, Lambda};

/// Mean and sample standard deviation (n − 1; 0 for n < 2) of `xs`.
pub fn mean_std(xs: &[f64]) -> (f64, f64) {
    let n = xs.len();
    if n == 0 {
        return (f64::NAN, f64::NAN);
    }
    let mean = xs.iter().sum::<f64>() / n as f64;
    if n < 2 {
        return (mean, 0.0);
    }
    let var = xs.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / (n - 1) as f64;
    (mean, var.sqrt())
}

fn scalar(t: &Tensor) -> Result<f64> {
    Ok(t.to_dtype(DType::F64)?.to_scalar::<f64>()?)
}

fn norm(t: &Tensor) -> Result<f64> {
    Ok(scalar(&t.to_dtype(DType::F64)?.sqr()?.sum_all()?)?.sqrt())
}

/// The lambda quantities of one layer.
#[derive(Debug, Clone, Copy)]
pub struct LambdaValues {
    pub q1_norm: f64,
    pub k1_norm: f64,
    pub q2_norm: f64,
    pub k2_norm: f64,
    pub lambda1: f64,
    pub lambda2: f64,
    pub lambda_init: f64,
    /// `lambda1 − lambda2 + lambda_init` (without mix).
    pub lambda_full: f64,
}

impl LambdaValues {
    /// Reads the values of `lam` (detached).
    pub fn of(lam: &Lambda) -> Result<Self> {
        let (l1, l2) = lam.parts()?;
        let (lambda1, lambda2) = (scalar(&l1.detach())?, scalar(&l2.detach())?);
        let lambda_init = scalar(&lam.init)?;
        Ok(Self {
            q1_norm: norm(&lam.q1.detach())?,
            k1_norm: norm(&lam.k1.detach())?,
            q2_norm: norm(&lam.q2.detach())?,
            k2_norm: norm(&lam.k2.detach())?,
            lambda1,
            lambda2,
            lambda_init,
            lambda_full: lambda1 - lambda2 + lambda_init,
        })
    }
}

/// Mean and sample std of every element of a probability tensor.
fn prob_stats(p: &Tensor) -> Result<(f64, f64)> {
    let v = p
        .detach()
        .flatten_all()?
        .to_dtype(DType::F32)?
        .to_vec1::<f32>()?;
    let n = v.len();
    let mean = v.iter().map(|&x| x as f64).sum::<f64>() / n.max(1) as f64;
    let var = if n > 1 {
        v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / (n - 1) as f64
    } else {
        0.0
    };
    Ok((mean, var.sqrt()))
}

/// `{prefix}attn1_mean|_std` (and `attn2_*` when captured) of layer `l`'s probabilities.
fn attention_stats(
    out: &mut BTreeMap<String, f64>,
    prefix: &str,
    probs: &AttentionProbs,
    l: usize,
) -> Result<()> {
    let Some((a1, a2)) = probs.layers.get(&l) else {
        return Ok(());
    };
    for (k, a) in std::iter::once(("attn1", a1)).chain(a2.iter().map(|a| ("attn2", a))) {
        let (m, s) = prob_stats(a)?;
        out.insert(format!("{prefix}{k}_mean"), m);
        out.insert(format!("{prefix}{k}_std"), s);
    }
    Ok(())
}

/// The metrics of docs/spec.md §5-6 for one logging step. `lambdas` holds every layer's parameters,
/// `monitored` the detailed layers, `probs` their attention probabilities (captured in the
/// step's first micro-batch), `warmup` whether `diff_attn_warmup_steps` is set.
pub fn metrics(
    lambdas: &[Option<&Lambda>],
    lambda_projs: &[Option<&Tensor>],
    monitored: &[usize],
    probs: &AttentionProbs,
    mix: f64,
    warmup: bool,
) -> Result<BTreeMap<String, f64>> {
    let mut out = v2_metrics(lambda_projs, monitored, probs, mix, warmup)?;
    let values: Vec<Option<LambdaValues>> = lambdas
        .iter()
        .map(|l| l.map(LambdaValues::of).transpose())
        .collect::<Result<_>>()?;
    for &l in monitored {
        let Some(v) = values.get(l).copied().flatten() else {
            continue;
        };
        let p = format!("layer_{l}/");
        for (k, x) in [
            ("lambda_q1_norm", v.q1_norm),
            ("lambda_k1_norm", v.k1_norm),
            ("lambda_q2_norm", v.q2_norm),
            ("lambda_k2_norm", v.k2_norm),
            ("lambda1", v.lambda1),
            ("lambda2", v.lambda2),
            ("lambda_init", v.lambda_init),
            ("lambda_full", v.lambda_full),
        ] {
            out.insert(format!("{p}{k}"), x);
        }
        attention_stats(&mut out, &p, probs, l)?;
    }
    let all: Vec<LambdaValues> = values.iter().flatten().copied().collect();
    if !all.is_empty() {
        type Pick = fn(&LambdaValues, f64) -> f64;
        let series: [(&str, Pick); 7] = [
            ("lambda_q1_norm", |v, _| v.q1_norm),
            ("lambda_k1_norm", |v, _| v.k1_norm),
            ("lambda_q2_norm", |v, _| v.q2_norm),
            ("lambda_k2_norm", |v, _| v.k2_norm),
            ("lambda1", |v, _| v.lambda1),
            ("lambda2", |v, _| v.lambda2),
            ("lambda_full", |v, mix| v.lambda_full * mix),
        ];
        for (name, pick) in series {
            let xs: Vec<f64> = all.iter().map(|v| pick(v, mix)).collect();
            let (m, s) = mean_std(&xs);
            out.insert(format!("aggregate/{name}_mean"), m);
            out.insert(format!("aggregate/{name}_std"), s);
        }
        if warmup {
            out.insert("aggregate/diff_attn_mix".into(), mix);
        }
    }
    Ok(out)
}

/// The V2 part of [`metrics`] (empty for a model without V2 layers).
fn v2_metrics(
    lambda_projs: &[Option<&Tensor>],
    monitored: &[usize],
    probs: &AttentionProbs,
    mix: f64,
    warmup: bool,
) -> Result<BTreeMap<String, f64>> {
    let mut out = BTreeMap::new();
    let norms: Vec<Option<f64>> = lambda_projs
        .iter()
        .map(|w| w.map(|w| norm(&w.detach())).transpose())
        .collect::<Result<_>>()?;
    if norms.iter().all(Option::is_none) {
        return Ok(out);
    }
    let mut gate_means = Vec::new();
    for &l in monitored {
        let Some(n) = norms.get(l).copied().flatten() else {
            continue;
        };
        let p = format!("layer_{l}/");
        out.insert(format!("{p}lambda_proj_norm"), n);
        if let Some(g) = probs.gates.get(&l) {
            let (m, s) = prob_stats(g)?;
            out.insert(format!("{p}lambda_gate_mean"), m);
            out.insert(format!("{p}lambda_gate_std"), s);
            gate_means.push(m * mix);
        }
        attention_stats(&mut out, &p, probs, l)?;
    }
    let all: Vec<f64> = norms.iter().flatten().copied().collect();
    let (m, s) = mean_std(&all);
    out.insert("aggregate/lambda_proj_norm_mean".into(), m);
    out.insert("aggregate/lambda_proj_norm_std".into(), s);
    if !gate_means.is_empty() {
        out.insert(
            "aggregate/lambda_gate_mean".into(),
            gate_means.iter().sum::<f64>() / gate_means.len() as f64,
        );
    }
    if warmup {
        out.insert("aggregate/diff_attn_mix".into(), mix);
    }
    Ok(out)
}

/// Layers whose `lambda_full` (without mix) is outside [0, 1.5], with the value.
pub fn lambda_out_of_range(lambdas: &[Option<&Lambda>]) -> Result<Vec<(usize, f64)>> {
    let mut out = Vec::new();
    for (l, lam) in lambdas.iter().enumerate() {
        if let Some(lam) = lam {
            let v = scalar(&lam.full()?.detach())?;
            if !(0.0..=1.5).contains(&v) {
                out.push((l, v));
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sample_std() {
        let (m, s) = mean_std(&[1.0, 2.0, 3.0, 4.0]);
        assert_eq!(m, 2.5);
        // sqrt(5/3): torch.tensor([1.,2.,3.,4.]).std() = 1.2910
        assert!((s - (5.0f64 / 3.0).sqrt()).abs() < 1e-12);
        assert_eq!(mean_std(&[7.0]), (7.0, 0.0));
    }
}
