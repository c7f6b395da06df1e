//! Where a prefill forward's time goes: each kernel of one decoder layer of SmolLM2-135M
//! (hidden 576, 9 heads of 64, 3 KV heads, intermediate 1536, vocab 49152) timed alone on
//! random f32 inputs of `SEQ` tokens (default 128), best of `REPS` (default 20), then scaled to
//! the 30 layers of the model plus the output head. A profile, not a test: figures only.
//!
//! `cargo run --release -p diffattn --example forward_breakdown` (RAYON_NUM_THREADS=2).
use std::time::Instant;

use candle_core::{Device, Tensor};
use diffattn::model::{attend, layout, ops, AttentionKind};

/// Best wall time (s) of `reps` calls of `f`.
fn best<T>(reps: usize, mut f: impl FnMut() -> candle_core::Result<T>) -> candle_core::Result<f64> {
    let mut b = f64::MAX;
    for _ in 0..reps {
        let t = Instant::now();
        std::hint::black_box(f()?);
        b = b.min(t.elapsed().as_secs_f64());
    }
    Ok(b)
}

fn main() -> candle_core::Result<()> {
    let env = |k: &str, d: usize| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    let (s, reps) = (env("SEQ", 128), env("REPS", 20));
    let (dm, h, kv, d, inter, vocab, layers) = (576, 9, 3, 64, 1536, 49152, 30.0);
    let dev = Device::Cpu;
    let r = |shape: &[usize]| Tensor::randn(0f32, 0.05, shape, &dev);
    let x = r(&[1, s, dm])?;
    let xi = r(&[1, s, inter])?;
    let w = |o: usize, i: usize| r(&[o, i]);
    let (wq, wq2, wk, wk2, wv, wo) = (
        w(h * d, dm)?,
        w(2 * h * d, dm)?,
        w(kv * d, dm)?,
        w(2 * kv * d, dm)?,
        w(kv * d, dm)?,
        w(dm, h * d)?,
    );
    let (wg, wd, head) = (w(inter, dm)?, w(dm, inter)?, w(vocab, dm)?);
    let norm = Tensor::ones(dm, candle_core::DType::F32, &dev)?;
    let inv: Vec<f32> = (0..d / 2)
        .map(|i| 100000f32.powf(-(2.0 * i as f32) / d as f32))
        .collect();
    let rope =
        diffattn::model::rope::Rope::new(&inv, d, 2048, &dev).map_err(candle_core::Error::wrap)?;
    let pos = Tensor::arange(0u32, s as u32, &dev)?.unsqueeze(0)?;
    let (cos, sin) = rope.tables(&pos).map_err(candle_core::Error::wrap)?;
    let mask = {
        let m: Vec<f32> = (0..s * s)
            .map(|i| {
                if i % s > i / s {
                    f32::NEG_INFINITY
                } else {
                    0.0
                }
            })
            .collect();
        Tensor::from_vec(m, (1, 1, s, s), &dev)?
    };
    let q = layout::rope_heads(&layout::linear(&x, &wq)?, &cos, &sin, h)?;
    let q2 = layout::rope_heads(&layout::linear(&x, &wq2)?, &cos, &sin, 2 * h)?;
    let k = layout::rope_heads(&layout::linear(&x, &wk)?, &cos, &sin, kv)?;
    let k2 = layout::rope_heads(&layout::linear(&x, &wk2)?, &cos, &sin, 2 * kv)?;
    let v = layout::split_heads(&layout::linear(&x, &wv)?, kv)?;
    let gate = layout::linear(&x, &wg)?;
    let att = attend::attend(&q, &k, &v, Some(&mask), AttentionKind::Standard, 0.0)?;

    let rows: Vec<(&str, f64, f64)> = vec![
        (
            "q_proj 576->576",
            best(reps, || layout::linear(&x, &wq))?,
            layers,
        ),
        (
            "k_proj+v_proj 576->192 (x2)",
            2.0 * best(reps, || layout::linear(&x, &wk))?,
            layers,
        ),
        (
            "o_proj 576->576",
            best(reps, || layout::linear(&x, &wo))?,
            layers,
        ),
        (
            "gate_proj+up_proj 576->1536 (x2)",
            2.0 * best(reps, || layout::linear(&x, &wg))?,
            layers,
        ),
        (
            "down_proj 1536->576",
            best(reps, || layout::linear(&xi, &wd))?,
            layers,
        ),
        (
            "rms_norm (x2)",
            2.0 * best(reps, || ops::rms_norm(&x, Some(&norm), 1e-5))?,
            layers,
        ),
        ("residual add (x2)", 2.0 * best(reps, || &x + &x)?, layers),
        ("swiglu", best(reps, || ops::swiglu(&gate, &gate))?, layers),
        (
            "rope_heads q+k, split v",
            best(reps, || -> candle_core::Result<()> {
                layout::rope_heads(&gate.narrow(2, 0, h * d)?, &cos, &sin, h)?;
                layout::rope_heads(&gate.narrow(2, 0, kv * d)?, &cos, &sin, kv)?;
                layout::split_heads(&gate.narrow(2, 0, kv * d)?, kv)?;
                Ok(())
            })?,
            layers,
        ),
        (
            "attend standard",
            best(reps, || {
                attend::attend(&q, &k, &v, Some(&mask), AttentionKind::Standard, 0.0)
            })?,
            layers,
        ),
        (
            "merge_heads",
            best(reps, || layout::merge_heads(&att))?,
            layers,
        ),
        (
            "output head 576->49152",
            best(reps, || x.squeeze(0)?.matmul(&head.t()?))?,
            1.0,
        ),
        (
            "[diff] q_proj+k_proj extra (double heads)",
            best(reps, || layout::linear(&x, &wq2))? + best(reps, || layout::linear(&x, &wk2))?
                - best(reps, || layout::linear(&x, &wq))?
                - best(reps, || layout::linear(&x, &wk))?,
            layers,
        ),
        (
            "[diff] attend double heads",
            best(reps, || {
                attend::attend(&q2, &k2, &v, Some(&mask), AttentionKind::DoubleHeads, 0.5)
            })?,
            layers,
        ),
        (
            "[diff] sub-layer rms_norm",
            best(reps, || ops::rms_norm(&att, None, 1e-5))?,
            layers,
        ),
    ];
    let flops = |o: usize, i: usize| 2.0 * (s * o * i) as f64;
    println!(
        "SmolLM2-135M prefill of {s} tokens, {} threads",
        candle_core::utils::get_num_threads()
    );
    let mut total = 0.0;
    for (name, t, n) in &rows {
        let ms = t * n * 1e3;
        if !name.starts_with("[diff]") {
            total += ms;
        }
        println!("{name:44} {:8.3} ms each  {ms:8.2} ms per forward", t * 1e3);
    }
    println!(
        "{:44} {:>23.2} ms (standard Llama; [diff] rows are extra)",
        "sum", total
    );
    let lin =
        flops(h * d, dm) + 2.0 * flops(kv * d, dm) + flops(dm, h * d) + 3.0 * flops(inter, dm);
    println!(
        "linear layers: {:.1} GFLOP/forward; output head {:.1} GFLOP",
        lin * layers / 1e9,
        flops(vocab, dm) / 1e9
    );
    Ok(())
}
