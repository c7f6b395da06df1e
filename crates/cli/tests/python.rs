//! The Python side, run by `cargo test`: the tests in python/tests (our PyTorch modeling of
//! every format against this binary's runtime, training through transformers and accelerate,
//! the axolotl plugin, the real SmolLM2) and the `pip install` check
//! (scripts/check-pip-install.sh), with the venv of scripts/python-env.sh (torch, transformers,
//! accelerate, pytest, maturin from PyPI; `.ci/run` creates it, cached outside the clone).
//!
//! The same Python tests run a second time with the oldest versions supported (transformers
//! 4.48.3, torch 2.6.0: `scripts/python-env.sh --oldest`), and `axolotl train` runs on the real
//! SmolLM2 with our plugin (scripts/axolotl-smollm2.sh, axolotl 0.19.0:
//! `scripts/python-env.sh --axolotl`).
//!
//! `DIFF_TRANSFORMER_PYTHON` (`DIFF_TRANSFORMER_PYTHON_OLDEST`) names another interpreter;
//! `DIFF_TRANSFORMER_SKIP_PYTHON=1` skips these tests (for machines without PyPI), saying so.

use std::path::{Path, PathBuf};
use std::process::Command;

/// stdout then stderr of a finished command.
fn both(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The interpreter, or None (with a line on stderr) when the Python tests are skipped.
fn python() -> Option<PathBuf> {
    env_python("DIFF_TRANSFORMER_PYTHON", "venv", "scripts/python-env.sh")
}

/// The interpreter with the oldest supported versions.
fn python_oldest() -> Option<PathBuf> {
    env_python(
        "DIFF_TRANSFORMER_PYTHON_OLDEST",
        "venv-transformers-4.48",
        "scripts/python-env.sh --oldest",
    )
}

/// The interpreter with axolotl.
fn python_axolotl() -> Option<PathBuf> {
    env_python(
        "DIFF_TRANSFORMER_PYTHON_AXOLOTL",
        "venv-axolotl",
        "scripts/python-env.sh --axolotl",
    )
}

fn env_python(var: &str, venv: &str, script: &str) -> Option<PathBuf> {
    if std::env::var("DIFF_TRANSFORMER_SKIP_PYTHON").as_deref() == Ok("1") {
        eprintln!("DIFF_TRANSFORMER_SKIP_PYTHON=1: the Python tests are skipped");
        return None;
    }
    if let Some(p) = std::env::var_os(var) {
        return Some(PathBuf::from(p));
    }
    let cache = std::env::var_os("DIFF_TRANSFORMER_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cache/diff-transformer")
        });
    let py = cache.join(venv).join("bin/python");
    assert!(
        cache.join(venv).join(".diff-transformer-env").is_file() && py.is_file(),
        "no Python test environment at {}: run {script} (it installs torch, transformers, \
         accelerate and pytest from PyPI into that cache), set {var}, or \
         DIFF_TRANSFORMER_SKIP_PYTHON=1 to skip",
        cache.join(venv).display()
    );
    Some(py)
}

#[test]
fn python_tests_pass() {
    let Some(py) = python() else { return };
    pytest(&py);
}

#[test]
fn python_tests_pass_on_transformers_4_48() {
    let Some(py) = python_oldest() else { return };
    pytest(&py);
}

fn pytest(py: &Path) {
    let out = Command::new(py)
        .args([
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "python/tests",
        ])
        .current_dir(root())
        .env(
            "DIFF_TRANSFORMER_BIN",
            env!("CARGO_BIN_EXE_diff-transformer"),
        )
        .output()
        .expect("run pytest");
    let text = both(&out);
    eprintln!("{}", text.lines().last().unwrap_or(""));
    assert!(out.status.success(), "python/tests failed:\n{text}");
    assert!(text.contains(" passed"), "{text}");
}

#[test]
fn pip_install_gives_the_binary_and_the_package() {
    let Some(py) = python() else { return };
    let out = Command::new(root().join("scripts/check-pip-install.sh"))
        .current_dir(root())
        .env("DIFF_TRANSFORMER_PYTHON", &py)
        .output()
        .expect("run scripts/check-pip-install.sh");
    let text = both(&out);
    assert!(out.status.success(), "pip install check failed:\n{text}");
}

/// `axolotl train` on a converted SmolLM2 with our plugin: the warm-up (mix 0, 0.5, 1) and the
/// monitoring metrics appear in axolotl's log, the saved model carries `diff_attn_mix`, and
/// this binary generates from it; then the preserving init, whose warm-up the plugin ignores.
#[test]
fn axolotl_trains_a_converted_smollm2_with_our_plugin() {
    if std::env::var("DIFF_TRANSFORMER_SKIP_REAL_MODEL").as_deref() == Ok("1") {
        eprintln!("DIFF_TRANSFORMER_SKIP_REAL_MODEL=1: skipped");
        return;
    }
    let Some(py) = python_axolotl() else { return };
    let work = tempfile::tempdir().unwrap();
    for (name, init) in [
        ("mirror", "--mirror-weights"),
        ("preserving", "--preserving-mirror --no-sublayer-norm"),
    ] {
        let dir = work.path().join(name);
        let out = Command::new(root().join("scripts/axolotl-smollm2.sh"))
            .arg(&dir)
            .current_dir(root())
            .env("AXOLOTL_PYTHON", &py)
            .env("INIT", init)
            .env(
                "DIFF_TRANSFORMER_BIN",
                env!("CARGO_BIN_EXE_diff-transformer"),
            )
            .output()
            .expect("run scripts/axolotl-smollm2.sh");
        let text = both(&out);
        assert!(out.status.success(), "axolotl run ({init}) failed:\n{text}");
        let config =
            std::fs::read_to_string(dir.join("SmolLM2-135M-Instruct-diff-trained/config.json"))
                .unwrap();
        let losses: Vec<f64> = text
            .lines()
            .find_map(|l| l.strip_prefix("== the losses logged: "))
            .unwrap_or_default()
            .split_whitespace()
            .map(|x| x.parse().unwrap())
            .collect();
        assert_eq!(losses.len(), 4, "{text}");
        if name == "mirror" {
            assert!(
                text.contains("== the warm-up factor logged: 0 0.5 1 1"),
                "{text}"
            );
            assert!(config.contains("\"diff_attn_mix\": 1.0"), "{config}");
        } else {
            // The source model's loss on these samples is about 2: the init preserved it.
            assert!(losses[0] < 3.0, "{losses:?}");
            assert!(text.contains("diff_attn_warmup_steps is ignored"), "{text}");
        }
    }
}
