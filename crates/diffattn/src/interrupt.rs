//! Interruption by a signal (SIGINT, SIGTERM): the binary's handler records it with
//! [`request`], and the long loops (each tensor written, each training step, each evaluation
//! batch, each compared prompt) return [`Error::Interrupted`] at their next [`check`]. The
//! error unwinds like any other, so staging directories are removed by their owners and a
//! replaced output is kept, and the command exits with 128 + the signal's number.

use std::sync::atomic::{AtomicI32, Ordering};

use crate::error::{Error, Result};

static SIGNAL: AtomicI32 = AtomicI32::new(0);

/// Records that signal `signal` asked the command to stop (async-signal-safe: one atomic
/// store).
pub fn request(signal: i32) {
    SIGNAL.store(signal, Ordering::SeqCst);
}

/// The signal that asked the command to stop, if any.
pub fn requested() -> Option<i32> {
    match SIGNAL.load(Ordering::SeqCst) {
        0 => None,
        s => Some(s),
    }
}

/// [`Error::Interrupted`] once a signal asked the command to stop.
pub fn check() -> Result<()> {
    match requested() {
        Some(signal) => Err(Error::Interrupted { signal }),
        None => Ok(()),
    }
}
