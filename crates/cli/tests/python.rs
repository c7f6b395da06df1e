//! The Python side, run by `cargo test`: the tests in python/tests (our PyTorch modeling of
//! every format against this binary's runtime, training through transformers and accelerate,
//! the axolotl plugin, the real SmolLM2) and the `pip install` check
//! (scripts/check-pip-install.sh), with the venv of scripts/python-env.sh (torch, transformers,
//! accelerate, pytest, maturin from PyPI; `.ci/run` creates it, cached outside the clone).
//!
//! `DIFF_TRANSFORMER_PYTHON` names another interpreter; `DIFF_TRANSFORMER_SKIP_PYTHON=1` skips
//! both tests (for machines without PyPI), saying so.

use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The interpreter, or None (with a line on stderr) when the Python tests are skipped.
fn python() -> Option<PathBuf> {
    if std::env::var("DIFF_TRANSFORMER_SKIP_PYTHON").as_deref() == Ok("1") {
        eprintln!("DIFF_TRANSFORMER_SKIP_PYTHON=1: the Python tests are skipped");
        return None;
    }
    if let Some(p) = std::env::var_os("DIFF_TRANSFORMER_PYTHON") {
        return Some(PathBuf::from(p));
    }
    let cache = std::env::var_os("DIFF_TRANSFORMER_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cache/diff-transformer")
        });
    let py = cache.join("venv/bin/python");
    assert!(
        cache.join("venv/.diff-transformer-env").is_file() && py.is_file(),
        "no Python test environment at {}: run scripts/python-env.sh (it installs torch, transformers, \
         accelerate and pytest from PyPI into that cache), set DIFF_TRANSFORMER_PYTHON, or \
         DIFF_TRANSFORMER_SKIP_PYTHON=1 to skip",
        cache.join("venv").display()
    );
    Some(py)
}

#[test]
fn python_tests_pass() {
    let Some(py) = python() else { return };
    let out = Command::new(&py)
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
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
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
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "pip install check failed:\n{text}");
}
