//! `diff-transformer plot`: a PNG of a run's `metrics.jsonl` with four panels: train and eval
//! loss, learning rate, `lambda_full` of the monitored layers, and the warm-up factor `mix`,
//! all over optimizer steps. Rendered with plotters' bitmap backend and a bundled DejaVu Sans
//! (assets/, Bitstream Vera licence), so no system font library is needed.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Once;

use plotters::prelude::*;
use serde_json::Value;

use crate::error::{Error, IoContext, Result};

static FONT: &[u8] = include_bytes!("../../assets/DejaVuSans.ttf");
static REGISTER: Once = Once::new();

/// Named series of (step, value) points.
pub type Series = BTreeMap<String, Vec<(f64, f64)>>;

/// Reads `metrics.jsonl` into the series plotted: `loss`, `eval_loss`, `learning_rate`,
/// `layer_N/lambda_full` (V1) or `layer_N/lambda_gate_mean` (V2), `diff_attn_mix`.
pub fn read_series(path: &Path) -> Result<Series> {
    let text = std::fs::read_to_string(path).at(path)?;
    let mut out: Series = BTreeMap::new();
    let lines: Vec<&str> = text.lines().collect();
    for (i, line) in lines.iter().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let v: Value = match serde_json::from_str(line) {
            Ok(v) => v,
            // A run killed while appending leaves a torn last line: skip it.
            Err(_) if i + 1 == lines.len() && !text.ends_with('\n') => continue,
            Err(e) => {
                return Err(Error::Dataset {
                    path: path.to_path_buf(),
                    msg: format!("line {}: not valid JSON: {e}", i + 1),
                })
            }
        };
        let Some(step) = v.get("step").and_then(Value::as_f64) else {
            continue;
        };
        for (k, x) in v.as_object().into_iter().flatten() {
            let keep = matches!(
                k.as_str(),
                "loss" | "eval_loss" | "learning_rate" | "diff_attn_mix"
            ) || (k.starts_with("layer_")
                && (k.ends_with("/lambda_full") || k.ends_with("/lambda_gate_mean")));
            if let (true, Some(x)) = (keep, x.as_f64()) {
                out.entry(k.clone()).or_default().push((step, x));
            }
        }
    }
    Ok(out)
}

fn panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    title: &str,
    series: &[(&str, &Vec<(f64, f64)>)],
) -> std::result::Result<(), String> {
    let pts: Vec<&(f64, f64)> = series.iter().flat_map(|(_, s)| s.iter()).collect();
    let (mut x0, mut x1, mut y0, mut y1) = (0f64, 1f64, 0f64, 1f64);
    if !pts.is_empty() {
        x0 = pts.iter().map(|p| p.0).fold(f64::INFINITY, f64::min);
        x1 = pts.iter().map(|p| p.0).fold(f64::NEG_INFINITY, f64::max);
        y0 = pts.iter().map(|p| p.1).fold(f64::INFINITY, f64::min);
        y1 = pts.iter().map(|p| p.1).fold(f64::NEG_INFINITY, f64::max);
        if x1 <= x0 {
            x1 = x0 + 1.0;
        }
        let xpad = (x1 - x0) * 0.03;
        x0 -= xpad;
        x1 += xpad;
        let pad = ((y1 - y0) * 0.08).max(1e-9 + y1.abs() * 0.02);
        y0 -= pad;
        y1 += pad;
    }
    // Values near f64's limits (a diverged run's loss, a hand-edited file) make the span
    // infinite, where plotters' tick search never ends: such a panel says so instead.
    let plottable = [x0, x1, y0, y1, x1 - x0, y1 - y0]
        .iter()
        .all(|v| v.is_finite());
    let message = if pts.is_empty() {
        Some("no data in this run")
    } else if !plottable {
        Some("values too large to plot (the span overflows f64)")
    } else {
        None
    };
    if !plottable {
        (x0, x1, y0, y1) = (0.0, 1.0, 0.0, 1.0);
    }
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 18))
        .margin(8)
        .x_label_area_size(30)
        .y_label_area_size(60)
        .build_cartesian_2d(x0..x1, y0..y1)
        .map_err(|e| e.to_string())?;
    // Scientific notation for small values, with enough digits to tell ticks of a narrow
    // range apart (a constant learning rate of 1e-5 spans 9.8e-6..1.02e-5).
    let small = y1.abs().max(y0.abs()) < 1e-2;
    let fmt = move |y: &f64| {
        if small {
            format!("{y:.2e}")
        } else {
            format!("{y:.3}")
        }
    };
    let x_digits = if x1 - x0 < 5.0 { 1 } else { 0 };
    chart
        .configure_mesh()
        .x_desc("step")
        .x_label_formatter(&|x: &f64| format!("{x:.x_digits$}"))
        .y_label_formatter(&fmt)
        .label_style(("sans-serif", 12))
        .draw()
        .map_err(|e| e.to_string())?;
    if let Some(message) = message {
        area.draw(&Text::new(
            message,
            (120, 100),
            ("sans-serif", 14).into_font(),
        ))
        .map_err(|e| e.to_string())?;
        return Ok(());
    }
    for (i, (name, s)) in series.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        chart
            .draw_series(LineSeries::new(s.iter().copied(), color.stroke_width(2)))
            .map_err(|e| e.to_string())?
            .label(name.to_string())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 16, y)], color.stroke_width(2))
            });
        if s.len() == 1 {
            chart
                .draw_series(std::iter::once(Circle::new(s[0], 5, color.filled())))
                .map_err(|e| e.to_string())?;
        }
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .label_font(("sans-serif", 12))
        .draw()
        .map_err(|e| e.to_string())?;
    Ok(())
}

/// The metrics file of a run directory, which must exist.
fn metrics_of(run_dir: &Path) -> Result<std::path::PathBuf> {
    let metrics = run_dir.join(super::METRICS_FILE);
    if !metrics.is_file() {
        return Err(Error::Io {
            path: metrics,
            source: std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "not found (plot reads the metrics.jsonl that `train` writes into output_dir)",
            ),
        });
    }
    Ok(metrics)
}

/// Renders `run_dir/metrics.jsonl` as a 1200×800 PNG at `out`.
pub fn plot(run_dir: &Path, out: &Path) -> Result<()> {
    let series = read_series(&metrics_of(run_dir)?)?;
    draw_png(out, (1200, 800), |root, fail| {
        let areas = root.split_evenly((2, 2));
        let get = |k: &str| series.get(k);
        let mut loss = Vec::new();
        if let Some(s) = get("loss") {
            loss.push(("train loss", s));
        }
        if let Some(s) = get("eval_loss") {
            loss.push(("eval loss", s));
        }
        panel(&areas[0], "loss", &loss).map_err(&fail)?;
        let lr: Vec<_> = get("learning_rate")
            .map(|s| ("learning rate", s))
            .into_iter()
            .collect();
        panel(&areas[1], "learning rate", &lr).map_err(&fail)?;
        let v2 = !series.keys().any(|k| k.ends_with("/lambda_full"))
            && series.keys().any(|k| k.ends_with("/lambda_gate_mean"));
        let (suffix, title) = if v2 {
            (
                "/lambda_gate_mean",
                "V2 gate sigmoid(lambda_proj(x)), mean (monitored layers, without mix)",
            )
        } else {
            (
                "/lambda_full",
                "lambda_full (monitored layers, without mix)",
            )
        };
        let lambdas: Vec<(&str, &Vec<(f64, f64)>)> = series
            .iter()
            .filter(|(k, _)| k.ends_with(suffix))
            .map(|(k, s)| (k.as_str(), s))
            .collect();
        panel(&areas[2], title, &lambdas).map_err(&fail)?;
        let mix: Vec<_> = get("diff_attn_mix")
            .map(|s| ("mix", s))
            .into_iter()
            .collect();
        panel(&areas[3], "negative-branch warm-up mix", &mix).map_err(&fail)?;
        Ok(())
    })
}

/// One PNG comparing runs (`(label, run_dir)`): the eval loss of each (with `eval_on_start`,
/// from step 0) and its train loss, one line per run.
pub fn plot_runs(runs: &[(String, std::path::PathBuf)], out: &Path) -> Result<()> {
    let mut all = Vec::new();
    for (label, dir) in runs {
        all.push((label.as_str(), read_series(&metrics_of(dir)?)?));
    }
    draw_png(out, (1400, 600), |root, fail| {
        let areas = root.split_evenly((1, 2));
        for (area, key, title) in [
            (&areas[0], "eval_loss", "held-out eval loss"),
            (&areas[1], "loss", "train loss"),
        ] {
            let lines: Vec<(&str, &Vec<(f64, f64)>)> = all
                .iter()
                .filter_map(|(l, s)| s.get(key).map(|v| (*l, v)))
                .collect();
            panel(area, title, &lines).map_err(&fail)?;
        }
        Ok(())
    })
}

type Root<'a> = DrawingArea<BitMapBackend<'a>, plotters::coord::Shift>;

/// Draws a `size` PNG at `out` through a staged file renamed into place; refuses an `out`
/// that is not a `.png`, or that exists and is not a PNG.
fn draw_png(
    out: &Path,
    size: (u32, u32),
    draw: impl FnOnce(&Root, &dyn Fn(String) -> Error) -> Result<()>,
) -> Result<()> {
    if out
        .extension()
        .and_then(|e| e.to_str())
        .map(|e| e.eq_ignore_ascii_case("png"))
        != Some(true)
    {
        return Err(Error::InvalidOptions(format!(
            "-o {}: the output must be a .png file",
            out.display()
        )));
    }
    if out.exists() {
        let head = std::fs::read(out).at(out)?;
        if !head.starts_with(b"\x89PNG") {
            return Err(Error::InvalidOptions(format!(
                "-o {}: exists and is not a PNG; refusing to overwrite it",
                out.display()
            )));
        }
    }
    REGISTER.call_once(|| {
        plotters::style::register_font("sans-serif", FontStyle::Normal, FONT)
            .unwrap_or_else(|_| panic!("the bundled font is valid"));
    });
    let fail = |e: String| Error::Io {
        path: out.to_path_buf(),
        source: std::io::Error::other(e),
    };
    // `.png` kept last: the bitmap backend picks the format from the extension.
    let tmp = crate::output::partial_path(out, ".png");
    if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
        if !parent.is_dir() {
            return Err(Error::OutputNotWritable {
                path: out.to_path_buf(),
                source: std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "its directory does not exist",
                ),
            });
        }
    }
    let drawn = (|| -> Result<()> {
        let root = BitMapBackend::new(&tmp, size).into_drawing_area();
        root.fill(&WHITE).map_err(|e| fail(e.to_string()))?;
        draw(&root, &fail)?;
        root.present().map_err(|e| fail(e.to_string()))?;
        Ok(())
    })();
    if let Err(e) = drawn {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::rename(&tmp, out).at(out)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Values whose span overflows f64 used to send plotters' tick search into an endless
    /// loop: the panel now says so and the plot is written (run on a thread with a deadline,
    /// so a regression fails instead of hanging).
    #[test]
    fn values_spanning_beyond_f64_are_plotted_with_a_note() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join(crate::train::METRICS_FILE),
            "{\"step\":1,\"loss\":1e308,\"learning_rate\":1e308}\n{\"step\":2,\"loss\":-1e308,\"learning_rate\":0}\n{\"step\":1e308,\"diff_attn_mix\":1}\n{\"step\":-1e308,\"diff_attn_mix\":0}\n",
        )
        .unwrap();
        let out = dir.path().join("plot.png");
        let (run_dir, png) = (dir.path().to_path_buf(), out.clone());
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || tx.send(plot(&run_dir, &png).map_err(|e| e.to_string())));
        let r = rx
            .recv_timeout(std::time::Duration::from_secs(120))
            .expect("plot finished within 120 s");
        r.unwrap();
        assert!(std::fs::read(&out).unwrap().starts_with(b"\x89PNG"));
    }
}
