//! Safe output: a staging directory beside the destination, renamed into place only when
//! everything is written, and a streaming (optionally sharded) safetensors writer.
//!
//! An interrupted run leaves at most a hidden `.NAME.partial-PID` sibling, which no loader
//! mistakes for a checkpoint; the destination is either absent, untouched, or complete.

use std::borrow::Cow;
use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::path::{Component, Path, PathBuf};

use safetensors::View;
use serde_json::{json, Map, Value};

use crate::checkpoint::{INDEX_FILE, SINGLE_FILE};
use crate::dtype::DType;
use crate::error::{Error, IoContext, Result};

/// Makes `p` absolute and resolves symlinks of its longest existing ancestor.
pub fn absolutize(p: &Path) -> Result<PathBuf> {
    let abs = if p.is_absolute() {
        p.to_path_buf()
    } else {
        std::env::current_dir().at(".")?.join(p)
    };
    let mut existing = abs.as_path();
    let mut rest = Vec::new();
    loop {
        if let Ok(c) = existing.canonicalize() {
            let mut out = c;
            for part in rest.iter().rev() {
                out.push(part);
            }
            return Ok(normalize(&out));
        }
        match (existing.parent(), existing.file_name()) {
            (Some(parent), Some(name)) => {
                rest.push(name.to_os_string());
                existing = parent;
            }
            _ => return Ok(normalize(&abs)),
        }
    }
}

/// The hidden staging sibling `.NAME.partial-PID{suffix}` of `dest`, renamed into place once
/// complete ([`sweep_dead_partials`] removes those of killed runs).
pub(crate) fn partial_path(dest: &Path, suffix: &str) -> PathBuf {
    let name = dest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "output".into());
    dest.with_file_name(format!(".{name}.partial-{}{suffix}", std::process::id()))
}

/// Writes one output file the way [`StagedDir`] writes a directory: refused when `path` is (or
/// is inside) one of `inputs` or is the target of one of their links, when it exists and
/// `overwrite` is false, or when it is a directory; written to a hidden `.NAME.partial-PID`
/// sibling and renamed into place.
pub fn write_file_safely(
    path: &Path,
    bytes: &[u8],
    overwrite: bool,
    inputs: &[&Path],
) -> Result<PathBuf> {
    let dest = check_output_file(path, overwrite, inputs)?;
    let tmp = partial_path(&dest, "");
    let written = std::fs::write(&tmp, bytes).and_then(|_| std::fs::rename(&tmp, &dest));
    if let Err(source) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::OutputNotWritable { path: dest, source });
    }
    Ok(dest)
}

/// The checks of [`write_file_safely`] alone (to refuse before a long computation); returns
/// the absolute destination.
pub fn check_output_file(path: &Path, overwrite: bool, inputs: &[&Path]) -> Result<PathBuf> {
    let dest = absolutize(path)?;
    for input in inputs {
        let input = absolutize(input)?;
        if dest.starts_with(&input) || resolved_files(&input).contains(&dest) {
            return Err(Error::OutputInsideSource {
                output: dest.clone(),
                source_dir: input,
            });
        }
    }
    if dest.is_dir() {
        return Err(Error::OutputNotWritable {
            path: dest,
            source: std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "a directory with this name exists",
            ),
        });
    }
    if dest.exists() && !overwrite {
        return Err(Error::OutputExists { path: dest });
    }
    Ok(dest)
}

/// The entries of directory `dir` with symlinks resolved (empty when `dir` is not a readable
/// directory): what replacing another directory must leave alone.
pub fn resolved_files(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.path().canonicalize().ok())
        .collect()
}

fn normalize(p: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            other => out.push(other),
        }
    }
    out
}

/// A directory being written: `path()` is a hidden sibling of the destination, moved into
/// place by [`StagedDir::commit`]; dropped uncommitted, it is removed.
/// Whether `name` (a file in an output directory) is one this tool writes: a checkpoint's
/// files (config, weights and index, tokenizer files, generation config, remote code,
/// `axolotl_config.yml`), a training run's (metrics, trainer state, optimizer state,
/// results, TensorBoard events, plot) and `compare --save-logits`'s (manifest, `.npy` files).
fn is_own_file(name: &str) -> bool {
    const OWN: [&str; 12] = [
        "config.json",
        "generation_config.json",
        crate::checkpoint::SINGLE_FILE,
        crate::checkpoint::INDEX_FILE,
        "axolotl_config.yml",
        crate::remote_code::CONFIGURATION_FILE,
        crate::remote_code::MODELING_FILE,
        "trainer_state.json",
        "optimizer.safetensors",
        "train_results.json",
        "eval_results.json",
        "all_results.json",
    ];
    let shard = || {
        let Some(rest) = name.strip_prefix("model-") else {
            return false;
        };
        let Some(rest) = rest.strip_suffix(".safetensors") else {
            return false;
        };
        let mut parts = rest.split("-of-");
        matches!(
            (parts.next(), parts.next(), parts.next()),
            (Some(a), Some(b), None) if !a.is_empty() && !b.is_empty()
                && a.bytes().chain(b.bytes()).all(|c| c.is_ascii_digit())
        )
    };
    OWN.contains(&name)
        || crate::convert::TOKENIZER_FILES.contains(&name)
        || name == crate::train::METRICS_FILE
        || name == "plot.png"
        || name.starts_with("events.out.tfevents.")
        // compare --save-logits
        || name == "manifest.json"
        || (name.starts_with("prompt") && name.ends_with(".npy"))
        || shard()
}

/// The entries of the directory `dir` that this tool did not write (see [`is_own_file`]; a
/// training run's `checkpoint-N` directories count as its own when everything in them does,
/// and so do its hidden staging names `.final.*`), as paths relative to `dir`, in name order.
pub fn foreign_entries(dir: &Path) -> Result<Vec<String>> {
    let mut out = Vec::new();
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .at(dir)?
        .collect::<std::io::Result<Vec<_>>>()
        .at(dir)?;
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let name = e.file_name().to_string_lossy().into_owned();
        let ty = e.file_type().at(e.path())?;
        if ty.is_dir() {
            let checkpoint = name
                .strip_prefix("checkpoint-")
                .is_some_and(|n| !n.is_empty() && n.bytes().all(|c| c.is_ascii_digit()));
            if name.starts_with(".final.") {
                continue;
            }
            if checkpoint {
                out.extend(
                    foreign_entries(&e.path())?
                        .into_iter()
                        .map(|f| format!("{name}/{f}")),
                );
            } else {
                out.push(format!("{name}/"));
            }
        } else if !(ty.is_file() && is_own_file(&name)) {
            out.push(name);
        }
    }
    Ok(out)
}

/// Refuses to replace `dir` (`--overwrite`) when it holds anything this tool did not write,
/// naming up to five of those entries: a user's files are never deleted without being named.
pub fn check_replaceable(dir: &Path) -> Result<()> {
    let foreign = foreign_entries(dir)?;
    if foreign.is_empty() {
        return Ok(());
    }
    let mut entries = foreign
        .iter()
        .take(5)
        .cloned()
        .collect::<Vec<_>>()
        .join(", ");
    if foreign.len() > 5 {
        entries.push_str(", …");
    }
    Err(Error::ForeignFiles {
        path: dir.to_path_buf(),
        count: foreign.len(),
        entries,
    })
}

/// One writer per output: an exclusive advisory lock (`flock`) on the hidden file
/// `.NAME.lock` beside the output `NAME`, holding the writer's PID, taken without waiting by
/// every command that writes a directory (`convert`, `export`, `import-gguf`, `train`) and kept
/// until the command ends. A second writer fails at once naming the holder's PID. The file is
/// removed when the lock is released (a killed holder leaves an unlocked one behind, which the
/// next writer takes over).
#[derive(Debug)]
pub struct OutputLock {
    file: std::fs::File,
    path: PathBuf,
}

impl OutputLock {
    /// Locks the output `dest` (which need not exist yet; its parent is created).
    pub fn acquire(dest: &Path) -> Result<Self> {
        use std::io::{Read, Seek, Write};
        let dest = absolutize(dest)?;
        let parent = dest.parent().unwrap_or(Path::new("/")).to_path_buf();
        std::fs::create_dir_all(&parent).map_err(|source| Error::OutputNotWritable {
            path: dest.clone(),
            source,
        })?;
        let name = dest.file_name().unwrap_or_default().to_string_lossy();
        let path = parent.join(format!(".{name}.lock"));
        loop {
            let mut file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path)
                .map_err(|source| Error::OutputNotWritable {
                    path: dest.clone(),
                    source,
                })?;
            match file.try_lock() {
                Ok(()) => {}
                Err(std::fs::TryLockError::WouldBlock) => {
                    let mut holder = String::new();
                    let _ = file.read_to_string(&mut holder);
                    return Err(Error::OutputLocked {
                        path: dest,
                        holder: holder.trim().parse().ok(),
                    });
                }
                Err(std::fs::TryLockError::Error(source)) => {
                    return Err(Error::Io { path, source })
                }
            }
            // The holder before us may have removed the file between our open and our lock:
            // then we locked a file nobody else will see; open the current one again.
            if !same_file(&file, &path) {
                continue;
            }
            file.set_len(0).at(&path)?;
            file.rewind().at(&path)?;
            write!(file, "{}", std::process::id()).at(&path)?;
            return Ok(Self { file, path });
        }
    }
}

#[cfg(unix)]
fn same_file(file: &std::fs::File, path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (file.metadata(), std::fs::metadata(path)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

#[cfg(not(unix))]
fn same_file(_: &std::fs::File, path: &Path) -> bool {
    path.exists()
}

impl Drop for OutputLock {
    fn drop(&mut self) {
        // Removed while still locked, so no other writer holds a lock on this file.
        let _ = std::fs::remove_file(&self.path);
        let _ = self.file.unlock();
    }
}

pub struct StagedDir {
    dest: PathBuf,
    tmp: PathBuf,
    overwrite: bool,
    committed: bool,
    /// Held from the checks to the rename into place (see [`OutputLock`]).
    _lock: OutputLock,
}

impl StagedDir {
    /// Checks the destination and creates the staging directory.
    ///
    /// Refuses a destination that is a file, a non-empty directory without `overwrite`, a
    /// directory equal to or inside any of `inputs` (or containing one of them when
    /// `overwrite` would delete it), and an unwritable parent.
    pub fn create(dest: &Path, overwrite: bool, inputs: &[&Path]) -> Result<Self> {
        let dest = absolutize(dest)?;
        for input in inputs {
            let input = absolutize(input)?;
            if dest.starts_with(&input) || (overwrite && input.starts_with(&dest)) {
                return Err(Error::OutputInsideSource {
                    output: dest.clone(),
                    source_dir: input,
                });
            }
            // Files of an input directory may be symlinks (the Hugging Face cache's layout):
            // replacing `dest` must not delete what one of them points to.
            if overwrite {
                if let Some(file) = resolved_files(&input)
                    .into_iter()
                    .find(|f| f.starts_with(&dest))
                {
                    return Err(Error::OutputInsideSource {
                        output: dest.clone(),
                        source_dir: file,
                    });
                }
            }
        }
        let lock = OutputLock::acquire(&dest)?;
        if dest.exists() {
            if !dest.is_dir() {
                return Err(Error::OutputNotWritable {
                    path: dest.clone(),
                    source: std::io::Error::new(
                        std::io::ErrorKind::AlreadyExists,
                        "a file with this name exists",
                    ),
                });
            }
            let non_empty = std::fs::read_dir(&dest).at(&dest)?.next().is_some();
            if non_empty && !overwrite {
                return Err(Error::OutputNotEmpty { path: dest });
            }
            if non_empty {
                check_replaceable(&dest)?;
            }
        }
        let parent = dest.parent().unwrap_or(Path::new("/")).to_path_buf();
        let name = dest
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "output".into());
        std::fs::create_dir_all(&parent).map_err(|source| Error::OutputNotWritable {
            path: dest.clone(),
            source,
        })?;
        sweep_dead_partials(&parent, &name);
        let tmp = partial_path(&dest, "");
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).at(&tmp)?;
        }
        std::fs::create_dir(&tmp).map_err(|source| Error::OutputNotWritable {
            path: dest.clone(),
            source,
        })?;
        Ok(Self {
            dest,
            tmp,
            overwrite,
            committed: false,
            _lock: lock,
        })
    }

    /// The staging directory to write into.
    pub fn path(&self) -> &Path {
        &self.tmp
    }

    /// The final destination (absolute).
    pub fn dest(&self) -> &Path {
        &self.dest
    }

    /// Moves the staging directory into place (replacing the destination when allowed).
    pub fn commit(mut self) -> Result<PathBuf> {
        if self.dest.exists() {
            if !self.overwrite
                && std::fs::read_dir(&self.dest)
                    .at(&self.dest)?
                    .next()
                    .is_some()
            {
                return Err(Error::OutputNotEmpty {
                    path: self.dest.clone(),
                });
            }
            let old = old_path(&self.dest);
            std::fs::rename(&self.dest, &old).at(&self.dest)?;
            std::fs::rename(&self.tmp, &self.dest).at(&self.dest)?;
            std::fs::remove_dir_all(&old).at(&old)?;
        } else {
            std::fs::rename(&self.tmp, &self.dest).at(&self.dest)?;
        }
        self.committed = true;
        Ok(self.dest.clone())
    }
}

impl Drop for StagedDir {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_dir_all(&self.tmp);
        }
    }
}

/// The hidden sibling `.NAME.old-PID` of `dest` that holds its previous contents while a
/// replacement is written.
pub(crate) fn old_path(dest: &Path) -> PathBuf {
    dest.with_file_name(format!(
        ".{}.old-{}",
        dest.file_name().unwrap_or_default().to_string_lossy(),
        std::process::id()
    ))
}

/// Cleans up after runs into `parent/name` that were killed (their process no longer exists):
/// - `.NAME.partial-PID` and `.NAME.format-a-PID` (incomplete outputs) are removed;
/// - `.NAME.old-PID` (the previous output an `--overwrite` run was replacing) is renamed back
///   to `NAME` when `NAME` is missing, and otherwise kept and named in a warning: never
///   deleted, since what it holds may be the only complete copy.
pub(crate) fn sweep_dead_partials(parent: &Path, name: &str) {
    let Ok(entries) = std::fs::read_dir(parent) else {
        return;
    };
    if !Path::new("/proc/self").exists() {
        return;
    }
    for e in entries.flatten() {
        let file = e.file_name().to_string_lossy().into_owned();
        let found = [".partial-", ".format-a-", ".old-"].iter().find_map(|tag| {
            file.strip_prefix(&format!(".{name}{tag}"))
                .and_then(|p| p.parse::<u32>().ok())
                .map(|pid| (*tag, pid))
        });
        let Some((tag, pid)) = found else { continue };
        if Path::new("/proc").join(pid.to_string()).exists() {
            continue;
        }
        let dest = parent.join(name);
        if tag != ".old-" {
            tracing::warn!("removing {} left by an interrupted run", e.path().display());
            let _ = std::fs::remove_dir_all(e.path());
        } else if !dest.exists() && std::fs::rename(e.path(), &dest).is_ok() {
            tracing::warn!(
                "restored {} from {}, which an interrupted run was replacing",
                dest.display(),
                e.path().display()
            );
        } else {
            tracing::warn!(
                "{} holds what an interrupted run was replacing; {} holds what that run left: remove the one you do not want",
                e.path().display(),
                dest.display()
            );
        }
    }
}

/// One tensor of an output file: its name, dtype and shape, known before any data is made.
#[derive(Debug, Clone)]
pub struct PlannedTensor {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
}

impl PlannedTensor {
    /// Size of the data in bytes.
    pub fn nbytes(&self) -> usize {
        self.shape.iter().product::<usize>() * self.dtype.size()
    }
}

/// Produces tensor data on demand, one tensor at a time, in the order the writer asks.
pub trait TensorProducer {
    /// The bytes of `t` (little endian, `t.dtype`, `t.nbytes()` long).
    fn produce(&self, t: &PlannedTensor) -> Result<Cow<'_, [u8]>>;
    /// Called once `t` has been written: release what was held for it.
    fn done(&self, _t: &PlannedTensor) {}
    /// After a failed write: the error to report instead when an input changed under the
    /// producer (a source file truncated during the run), which the write error would hide.
    fn inputs_changed(&self) -> Option<Error> {
        None
    }
}

struct WriteState {
    previous: Option<usize>,
    error: Option<Error>,
}

struct LazyView<'a> {
    idx: usize,
    tensors: &'a [PlannedTensor],
    producer: &'a dyn TensorProducer,
    state: &'a RefCell<WriteState>,
}

impl View for LazyView<'_> {
    fn dtype(&self) -> safetensors::Dtype {
        self.tensors[self.idx].dtype.to_safetensors()
    }
    fn shape(&self) -> &[usize] {
        &self.tensors[self.idx].shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        let t = &self.tensors[self.idx];
        let mut st = self.state.borrow_mut();
        // The writer asks for tensors one by one and writes each before asking for the next:
        // the previous one is on disk now.
        if let Some(prev) = st.previous.replace(self.idx) {
            self.producer.done(&self.tensors[prev]);
        }
        if st.error.is_none() {
            if let Err(e) = crate::interrupt::check() {
                st.error = Some(e);
            }
        }
        if st.error.is_some() {
            // The file is discarded: nothing more is produced (or written) for it.
            return Cow::Owned(Vec::new());
        }
        match self.producer.produce(t) {
            Ok(bytes) if bytes.len() == t.nbytes() => bytes,
            Ok(bytes) => {
                st.error = Some(Error::Safetensors {
                    path: PathBuf::from(&t.name),
                    msg: format!(
                        "internal error: produced {} bytes, expected {}",
                        bytes.len(),
                        t.nbytes()
                    ),
                });
                Cow::Owned(vec![0; t.nbytes()])
            }
            Err(e) => {
                st.error = Some(e);
                Cow::Owned(vec![0; t.nbytes()])
            }
        }
    }
    fn data_len(&self) -> usize {
        self.tensors[self.idx].nbytes()
    }
}

/// Parses sizes such as `5GB`, `500MB`, `2GiB`, `1000000` (bytes), `1536M`, `1.5G`. Units as in
/// transformers' `max_shard_size` (decimal for KB/MB/GB, binary for KiB/MiB/GiB), and the
/// single letters K/M/G/T as the cgroup files and `ulimit` read them (binary).
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let num: f64 = num.parse().ok()?;
    let mult: f64 = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 1.0,
        "KB" => 1e3,
        "MB" => 1e6,
        "GB" => 1e9,
        "TB" => 1e12,
        "KIB" | "K" => 1024.0,
        "MIB" | "M" => 1024.0 * 1024.0,
        "GIB" | "G" => 1024.0 * 1024.0 * 1024.0,
        "TIB" | "T" => 1024.0 * 1024.0 * 1024.0 * 1024.0,
        _ => return None,
    };
    let v = num * mult;
    (v >= 1.0).then_some(v as u64)
}

/// Writes `tensors` into `dir` as `model.safetensors`, or as
/// `model-0000i-of-0000n.safetensors` shards plus `model.safetensors.index.json` when their
/// total exceeds `max_shard_bytes`. Data is pulled from `producer` one tensor at a time, so
/// memory stays at about the largest tensor. Returns the written file names.
pub fn write_safetensors(
    dir: &Path,
    mut tensors: Vec<PlannedTensor>,
    max_shard_bytes: u64,
    producer: &dyn TensorProducer,
) -> Result<Vec<String>> {
    tensors.sort_by(|a, b| a.name.cmp(&b.name));
    let total: u64 = tensors.iter().map(|t| t.nbytes() as u64).sum();
    // Greedy packing in name order, as transformers' `save_pretrained` does in state-dict order.
    let mut shards: Vec<Vec<PlannedTensor>> = vec![Vec::new()];
    let mut current = 0u64;
    for t in tensors {
        let n = t.nbytes() as u64;
        if current > 0 && current + n > max_shard_bytes {
            shards.push(Vec::new());
            current = 0;
        }
        current += n;
        shards.last_mut().expect("non-empty").push(t);
    }
    let count = shards.len();
    let metadata: HashMap<String, String> = [("format".to_string(), "pt".to_string())].into();
    let mut names = Vec::new();
    let mut weight_map = BTreeMap::new();
    for (i, shard) in shards.iter().enumerate() {
        let file = if count == 1 {
            SINGLE_FILE.to_string()
        } else {
            format!("model-{:05}-of-{:05}.safetensors", i + 1, count)
        };
        let state = RefCell::new(WriteState {
            previous: None,
            error: None,
        });
        let views = (0..shard.len()).map(|idx| {
            (
                shard[idx].name.clone(),
                LazyView {
                    idx,
                    tensors: shard,
                    producer,
                    state: &state,
                },
            )
        });
        let path = dir.join(&file);
        safetensors::serialize_to_file(views, Some(metadata.clone()), &path).map_err(|e| {
            producer
                .inputs_changed()
                .unwrap_or_else(|| Error::Safetensors {
                    path: path.clone(),
                    msg: format!("cannot write: {e}"),
                })
        })?;
        // The writer's temporary file is created 0600; give the checkpoint the usual 0644.
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).at(&path)?;
        }
        let mut st = state.into_inner();
        if let Some(prev) = st.previous.take() {
            producer.done(&shard[prev]);
        }
        if let Some(e) = st.error {
            return Err(e);
        }
        for t in shard {
            weight_map.insert(t.name.clone(), Value::String(file.clone()));
        }
        names.push(file);
    }
    if count > 1 {
        let index = json!({
            "metadata": {"total_size": total},
            "weight_map": Value::Object(weight_map.into_iter().collect::<Map<_, _>>()),
        });
        crate::config::write_json(&dir.join(INDEX_FILE), &index)?;
        names.push(INDEX_FILE.to_string());
    }
    Ok(names)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_in_decimal_and_binary_units() {
        assert_eq!(parse_size("1234"), Some(1234));
        assert_eq!(parse_size("5GB"), Some(5_000_000_000));
        assert_eq!(parse_size("500kb"), Some(500_000));
        assert_eq!(parse_size("800M"), Some(800 << 20));
        assert_eq!(parse_size("1.5G"), Some(3 << 29));
        assert_eq!(parse_size(" 2GiB "), Some(2 << 30));
        assert_eq!(parse_size("1T"), Some(1 << 40));
        for bad in ["", "G", "-1G", "one", "1.5X", "nan", "1e30G", "0"] {
            assert_eq!(parse_size(bad), None, "{bad}");
        }
    }

    /// A pid no process has (above Linux's pid_max limit of 2^22).
    const DEAD: u32 = 4_999_999;

    #[test]
    fn sweep_restores_or_names_an_interrupted_replacement_and_removes_partials() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path();
        let old = p.join(format!(".out.old-{DEAD}"));
        std::fs::create_dir(&old).unwrap();
        std::fs::write(old.join("model.safetensors"), "previous").unwrap();
        std::fs::create_dir(p.join(format!(".out.partial-{DEAD}"))).unwrap();
        std::fs::create_dir(p.join(format!(".out.format-a-{DEAD}"))).unwrap();
        // A live process's staging is left alone.
        let live = p.join(format!(".out.partial-{}", std::process::id()));
        std::fs::create_dir(&live).unwrap();
        sweep_dead_partials(p, "out");
        assert_eq!(
            std::fs::read_to_string(p.join("out/model.safetensors")).unwrap(),
            "previous",
            "the replaced output is restored when nothing took its place"
        );
        assert!(!old.exists());
        assert!(!p.join(format!(".out.partial-{DEAD}")).exists());
        assert!(!p.join(format!(".out.format-a-{DEAD}")).exists());
        assert!(live.exists());
        // With something in its place (what the interrupted run left), both are kept.
        std::fs::create_dir(&old).unwrap();
        std::fs::write(old.join("model.safetensors"), "older").unwrap();
        sweep_dead_partials(p, "out");
        assert_eq!(
            std::fs::read_to_string(old.join("model.safetensors")).unwrap(),
            "older"
        );
        assert!(p.join("out/model.safetensors").is_file());
    }
}
