//! One module a subcommand: its arguments and its handler `run`.

pub mod bench;
pub mod compare;
pub mod convert;
pub mod evaluate;
pub mod export;
pub mod generate;
pub mod import_gguf;
pub mod plot;
pub mod train;

use indicatif::{ProgressBar, ProgressStyle};

/// A progress bar on stderr when it is a terminal, else a hidden one.
pub(crate) fn progress(len: u64, what: &str) -> ProgressBar {
    let pb = if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        ProgressBar::new(len)
    } else {
        ProgressBar::hidden()
    };
    pb.set_style(
        ProgressStyle::with_template("{msg} [{bar:40}] {pos}/{len} tensors ({elapsed})")
            .expect("valid template")
            .progress_chars("=> "),
    );
    pb.set_message(what.to_string());
    pb
}
