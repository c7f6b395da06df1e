//! A TensorBoard event-file writer for scalars: TFRecord framing (length, masked CRC-32C of
//! the length, data, masked CRC-32C of the data) around `tensorflow.Event` protobuf messages
//! (`event.proto`: `wall_time` = 1 (double), `step` = 2 (int64), `file_version` = 3 (string),
//! `summary` = 5; `Summary.value` = 1; `Summary.Value.tag` = 1, `simple_value` = 2 (float)).
//! TensorBoard reads the file and `wandb sync --sync-tensorboard` uploads it.
//!
//! Hand-written (about 60 lines) instead of `tensorboard-rs`, whose protobuf 2.x dependency
//! carries RUSTSEC-2024-0437.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::error::{IoContext, Result};

const CRC32C: crc::Crc<u32> = crc::Crc::<u32>::new(&crc::CRC_32_ISCSI);

/// TFRecord's masked CRC-32C.
pub fn masked_crc32c(data: &[u8]) -> u32 {
    let c = CRC32C.checksum(data);
    (c.rotate_right(15)).wrapping_add(0xa282_ead8)
}

fn varint(mut v: u64, out: &mut Vec<u8>) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn key(field: u64, wire: u64, out: &mut Vec<u8>) {
    varint((field << 3) | wire, out);
}

fn bytes_field(field: u64, data: &[u8], out: &mut Vec<u8>) {
    key(field, 2, out);
    varint(data.len() as u64, out);
    out.extend_from_slice(data);
}

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// Appends scalar events to `events.out.tfevents.<secs>.<host>` in a directory.
pub struct EventWriter {
    path: PathBuf,
    out: BufWriter<File>,
}

impl EventWriter {
    /// Creates a new event file in `dir` and writes the `brain.Event:2` header event.
    pub fn create(dir: &Path) -> Result<Self> {
        let host = std::fs::read_to_string("/etc/hostname")
            .ok()
            .map(|h| h.trim().to_string())
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "localhost".into());
        let path = dir.join(format!(
            "events.out.tfevents.{}.{host}.{}.0",
            now() as u64,
            std::process::id()
        ));
        let out = BufWriter::new(File::create(&path).at(&path)?);
        let mut w = Self { path, out };
        let mut ev = Vec::new();
        key(1, 1, &mut ev);
        ev.extend_from_slice(&now().to_le_bytes());
        bytes_field(3, b"brain.Event:2", &mut ev);
        w.record(&ev)?;
        w.flush()?;
        Ok(w)
    }

    /// The file written.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn record(&mut self, data: &[u8]) -> Result<()> {
        let len = (data.len() as u64).to_le_bytes();
        let p = self.path.clone();
        self.out.write_all(&len).at(&p)?;
        self.out
            .write_all(&masked_crc32c(&len).to_le_bytes())
            .at(&p)?;
        self.out.write_all(data).at(&p)?;
        self.out
            .write_all(&masked_crc32c(data).to_le_bytes())
            .at(&p)?;
        Ok(())
    }

    /// One event at `step` holding every `(tag, value)` of `scalars`.
    pub fn scalars<'a>(
        &mut self,
        step: u64,
        scalars: impl IntoIterator<Item = (&'a str, f64)>,
    ) -> Result<()> {
        let mut summary = Vec::new();
        for (tag, v) in scalars {
            let mut value = Vec::new();
            bytes_field(1, tag.as_bytes(), &mut value);
            key(2, 5, &mut value);
            value.extend_from_slice(&(v as f32).to_le_bytes());
            bytes_field(1, &value, &mut summary);
        }
        let mut ev = Vec::new();
        key(1, 1, &mut ev);
        ev.extend_from_slice(&now().to_le_bytes());
        key(2, 0, &mut ev);
        varint(step, &mut ev);
        bytes_field(5, &summary, &mut ev);
        self.record(&ev)
    }

    /// Flushes buffered events to the file.
    pub fn flush(&mut self) -> Result<()> {
        let p = self.path.clone();
        self.out.flush().at(&p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_known_value() {
        // CRC-32C("123456789") = 0xE3069283 (the standard check value).
        assert_eq!(CRC32C.checksum(b"123456789"), 0xE306_9283);
    }
}
