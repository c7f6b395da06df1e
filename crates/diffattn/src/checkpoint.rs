//! Reading Hugging Face safetensors checkpoints (one file or shards with
//! `model.safetensors.index.json`) without loading them: files are memory-mapped, each
//! tensor's bytes are touched only when asked for, and [`Checkpoint::release`] hands the pages
//! back to the kernel so that a streaming conversion keeps its resident memory near the size
//! of the largest tensor.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::{Mmap, UncheckedAdvice};
use safetensors::SafeTensors;
use serde_json::Value;

use crate::dtype::DType;
use crate::error::{Error, IoContext, Result};

/// Where one tensor lives.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    pub dtype: DType,
    pub shape: Vec<usize>,
    shard: usize,
    /// Absolute byte range in the shard file.
    start: usize,
    end: usize,
}

impl TensorInfo {
    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

struct Shard {
    path: PathBuf,
    mmap: std::sync::Arc<Mmap>,
}

/// A memory-mapped safetensors checkpoint.
pub struct Checkpoint {
    /// The model directory.
    pub dir: PathBuf,
    shards: Vec<Shard>,
    tensors: BTreeMap<String, TensorInfo>,
}

/// Safetensors file names a checkpoint directory can hold.
pub const SINGLE_FILE: &str = "model.safetensors";
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// Maps a safetensors file read-only and checks its header before the library parses it: the
/// 8-byte length, a header inside the file, valid JSON, and every tensor entry
/// ([`check_header_entries`]); returns the map and the header length.
fn map_checked(path: &Path) -> Result<(Mmap, u64)> {
    let file = File::open(path).at(path)?;
    let len = file.metadata().at(path)?.len() as usize;
    let err = |msg: String| Error::Safetensors {
        path: path.to_path_buf(),
        msg,
    };
    if len < 8 {
        return Err(err(format!(
            "truncated: {len} bytes, shorter than the 8-byte header length"
        )));
    }
    // SAFETY: the file is opened read-only and we never write through the map. A file
    // truncated by another process while mapped would fault; that is the usual mmap caveat
    // shared with every safetensors loader.
    let mmap = unsafe { Mmap::map(&file) }.at(path)?;
    let header_len = u64::from_le_bytes(mmap[..8].try_into().expect("8 bytes"));
    if header_len > (len - 8) as u64 {
        return Err(err(format!(
            "header length {header_len} is larger than the file ({len} bytes): truncated or not a safetensors file"
        )));
    }
    let header = &mmap[8..8 + header_len as usize];
    let parsed = match serde_json::from_slice::<Value>(header) {
        Ok(v) => v,
        Err(e) => return Err(err(format!("header is not valid JSON: {e}"))),
    };
    // A JSON object keeps the last of two equal keys: the earlier entry would vanish, and the
    // library then blames the tensor whose offsets no longer follow.
    if let Some(name) = duplicate_key(header) {
        return Err(err(format!(
            "tensor `{name}` is listed twice in the header"
        )));
    }
    check_header_entries(&parsed, len - 8 - header_len as usize).map_err(err)?;
    Ok((mmap, header_len))
}

/// The first top-level key of a JSON object that occurs twice (None when none does, or when
/// `json` is not an object).
fn duplicate_key(json: &[u8]) -> Option<String> {
    struct Keys;
    impl<'de> serde::de::Visitor<'de> for Keys {
        type Value = Option<String>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a JSON object")
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(
            self,
            mut map: A,
        ) -> std::result::Result<Self::Value, A::Error> {
            let mut seen = std::collections::HashSet::new();
            let mut dup = None;
            while let Some(k) = map.next_key::<String>()? {
                map.next_value::<serde::de::IgnoredAny>()?;
                if dup.is_none() && !seen.insert(k.clone()) {
                    dup = Some(k);
                }
            }
            Ok(dup)
        }
    }
    let mut de = serde_json::Deserializer::from_slice(json);
    serde::Deserializer::deserialize_map(&mut de, Keys)
        .ok()
        .flatten()
}

/// Checks a safetensors file (as [`Checkpoint::open`] checks each shard) before another reader
/// (candle's, for the optimizer state) loads it, so that a truncated or corrupt file is
/// reported by name, tensor and what is wrong.
pub fn check_safetensors_file(path: &Path) -> Result<()> {
    let (mmap, _) = map_checked(path)?;
    SafeTensors::deserialize(&mmap).map_err(|e| Error::Safetensors {
        path: path.to_path_buf(),
        msg: format!("invalid safetensors file: {e}"),
    })?;
    Ok(())
}

/// Checks each tensor entry of a parsed safetensors header before the library does, so that
/// an error names the tensor: its dtype, `data_offsets` `[start, end]` (end >= start), a byte
/// length equal to `shape` x the dtype's size, and an end inside the `data_len` bytes after
/// the header ("truncated" otherwise). Sub-byte dtypes (F4, F6) are left to the library.
fn check_header_entries(header: &Value, data_len: usize) -> std::result::Result<(), String> {
    let Some(map) = header.as_object() else {
        return Err("the header is not a JSON object".into());
    };
    for (name, entry) in map {
        if name == "__metadata__" {
            continue;
        }
        let bad = |what: String| format!("tensor `{name}`: {what}");
        let dtype = entry
            .get("dtype")
            .and_then(Value::as_str)
            .ok_or_else(|| bad("no dtype".into()))?;
        let shape: Vec<u64> = entry
            .get("shape")
            .and_then(Value::as_array)
            .and_then(|a| a.iter().map(Value::as_u64).collect())
            .ok_or_else(|| bad("shape is not a list of sizes".into()))?;
        let offsets: Vec<u64> = entry
            .get("data_offsets")
            .and_then(Value::as_array)
            .and_then(|a| a.iter().map(Value::as_u64).collect())
            .filter(|o: &Vec<u64>| o.len() == 2)
            .ok_or_else(|| bad("data_offsets is not [start, end]".into()))?;
        let (start, end) = (offsets[0], offsets[1]);
        if end < start {
            return Err(bad(format!(
                "data_offsets [{start}, {end}] end before they start"
            )));
        }
        let width: u64 = match dtype {
            "BOOL" | "U8" | "I8" | "F8_E5M2" | "F8_E4M3" | "F8_E8M0" => 1,
            "I16" | "U16" | "F16" | "BF16" => 2,
            "I32" | "U32" | "F32" => 4,
            "I64" | "U64" | "F64" | "C64" => 8,
            "F4" | "F6_E2M3" | "F6_E3M2" => continue,
            other => return Err(bad(format!("unknown dtype {other:?}"))),
        };
        let bytes = shape
            .iter()
            .try_fold(width, |a, &d| a.checked_mul(d))
            .ok_or_else(|| bad(format!("shape {shape:?} is too large")))?;
        if end - start != bytes {
            return Err(bad(format!(
                "shape {shape:?} of {dtype} needs {bytes} bytes, but data_offsets [{start}, {end}] hold {}",
                end - start
            )));
        }
        if end > data_len as u64 {
            return Err(bad(format!(
                "truncated: its data ends at byte {end} of the data section, which holds {data_len} bytes"
            )));
        }
    }
    Ok(())
}

impl Checkpoint {
    /// Opens `dir/model.safetensors` or the shards listed in `dir/model.safetensors.index.json`.
    ///
    /// Errors name the file: missing weights, truncated file, header length larger than the
    /// file, header not JSON, a tensor of a dtype other than F32/F16/BF16, an index entry
    /// pointing to a missing shard or tensor.
    pub fn open(dir: &Path) -> Result<Self> {
        let single = dir.join(SINGLE_FILE);
        let index = dir.join(INDEX_FILE);
        let mut ckpt = Checkpoint {
            dir: dir.to_path_buf(),
            shards: Vec::new(),
            tensors: BTreeMap::new(),
        };
        if single.is_file() {
            ckpt.add_shard(&single, None)?;
        } else if index.is_file() {
            let text = std::fs::read_to_string(&index).at(&index)?;
            let value: Value = serde_json::from_str(&text).map_err(|source| Error::Json {
                path: index.clone(),
                source,
            })?;
            let map = value
                .get("weight_map")
                .and_then(Value::as_object)
                .ok_or_else(|| Error::MissingKey {
                    path: index.clone(),
                    key: "weight_map".into(),
                })?;
            let mut by_file: BTreeMap<String, Vec<String>> = BTreeMap::new();
            for (name, file) in map {
                let file = file.as_str().ok_or_else(|| Error::InvalidValue {
                    path: index.clone(),
                    key: format!("weight_map.{name}"),
                    value: file.to_string(),
                    reason: "must be a file name".into(),
                })?;
                // A shard is a file of this directory: no absolute path, no `..`, no
                // subdirectory (transformers writes plain names).
                if Path::new(file).file_name() != Some(std::ffi::OsStr::new(file)) {
                    return Err(Error::InvalidValue {
                        path: index.clone(),
                        key: format!("weight_map.{name}"),
                        value: file.to_string(),
                        reason: "must be the name of a file in the checkpoint's directory".into(),
                    });
                }
                by_file
                    .entry(file.to_string())
                    .or_default()
                    .push(name.clone());
            }
            for (file, names) in by_file {
                let path = dir.join(&file);
                if !path.is_file() {
                    return Err(Error::Safetensors {
                        path: index.clone(),
                        msg: format!("shard {file:?} listed in weight_map does not exist"),
                    });
                }
                ckpt.add_shard(&path, Some(&names))?;
            }
        } else {
            return Err(Error::Safetensors {
                path: dir.to_path_buf(),
                msg: format!("no {SINGLE_FILE} and no {INDEX_FILE} in this directory"),
            });
        }
        Ok(ckpt)
    }

    fn add_shard(&mut self, path: &Path, expected: Option<&[String]>) -> Result<()> {
        let (mmap, header_len) = map_checked(path)?;
        let len = mmap.len();
        let err = |msg: String| Error::Safetensors {
            path: path.to_path_buf(),
            msg,
        };
        let st = SafeTensors::deserialize(&mmap).map_err(|e| match e {
            safetensors::SafeTensorError::MetadataIncompleteBuffer => err(format!(
                "truncated: the header describes more tensor data than the file's {len} bytes hold"
            )),
            other => err(format!("invalid safetensors file: {other}")),
        })?;
        let data_start = 8 + header_len as usize;
        let base = mmap.as_ptr() as usize;
        let shard = self.shards.len();
        for (name, view) in st.tensors() {
            let dtype =
                DType::from_safetensors(view.dtype()).ok_or_else(|| Error::UnsupportedDtype {
                    path: path.to_path_buf(),
                    name: name.clone(),
                    dtype: format!("{:?}", view.dtype()),
                })?;
            let start = view.data().as_ptr() as usize - base;
            debug_assert!(start >= data_start);
            let end = start + view.data().len();
            self.tensors.insert(
                name,
                TensorInfo {
                    dtype,
                    shape: view.shape().to_vec(),
                    shard,
                    start,
                    end,
                },
            );
        }
        if let Some(names) = expected {
            for name in names {
                if !self.tensors.contains_key(name) {
                    return Err(Error::MissingTensor {
                        path: path.to_path_buf(),
                        name: name.clone(),
                    });
                }
            }
        }
        drop(st);
        self.shards.push(Shard {
            path: path.to_path_buf(),
            mmap: std::sync::Arc::new(mmap),
        });
        Ok(())
    }

    /// The safetensors files of this checkpoint.
    pub fn files(&self) -> Vec<PathBuf> {
        self.shards.iter().map(|s| s.path.clone()).collect()
    }

    /// All tensor names, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    /// Metadata of a tensor, if present.
    pub fn info(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.get(name)
    }

    /// Metadata of a tensor; a missing tensor is an error naming the checkpoint.
    pub fn require(&self, name: &str) -> Result<&TensorInfo> {
        self.tensors.get(name).ok_or_else(|| Error::MissingTensor {
            path: self.dir.clone(),
            name: name.to_string(),
        })
    }

    /// Checks that `name` exists with `shape`.
    pub fn require_shape(&self, name: &str, shape: &[usize]) -> Result<&TensorInfo> {
        let info = self.require(name)?;
        if info.shape != shape {
            return Err(Error::ShapeMismatch {
                path: self.shards[info.shard].path.clone(),
                name: name.to_string(),
                expected: shape.to_vec(),
                found: info.shape.clone(),
            });
        }
        Ok(info)
    }

    /// Checks that the checkpoint matches `expected` (name -> shape): every expected tensor is
    /// present with its shape. `lm_head.weight`, when present, must have `lm_head_shape`. (The
    /// layer count is [`Checkpoint::check_layer_count`]'s.)
    pub fn check_against(
        &self,
        expected: &BTreeMap<String, Vec<usize>>,
        lm_head_shape: &[usize],
    ) -> Result<()> {
        for (name, shape) in expected {
            self.require_shape(name, shape)?;
        }
        if self.info("lm_head.weight").is_some() {
            self.require_shape("lm_head.weight", lm_head_shape)?;
        }
        Ok(())
    }

    /// [`check_layer_count`] over this checkpoint's tensor names.
    pub fn check_layer_count(&self, num_layers: usize, config: &Path) -> Result<()> {
        check_layer_count(self.names(), num_layers, config)
    }

    /// Raw little-endian bytes of a tensor (borrowed from the memory map).
    pub fn bytes(&self, name: &str) -> Result<&[u8]> {
        let info = self.require(name)?;
        Ok(&self.shards[info.shard].mmap[info.start..info.end])
    }

    /// A matrix tensor (2-D) kept where it is: its elements read from the file's map, which
    /// the matrix shares (see [`crate::model::stored`]).
    pub fn stored_matrix(&self, name: &str) -> Result<crate::model::stored::StoredMatrix> {
        let info = self.require(name)?;
        let [rows, cols] = info.shape[..] else {
            return Err(Error::Safetensors {
                path: self.shards[info.shard].path.clone(),
                msg: format!("tensor `{name}` is not a matrix (shape {:?})", info.shape),
            });
        };
        Ok(crate::model::stored::StoredMatrix::mapped(
            self.shards[info.shard].mmap.clone(),
            info.start,
            rows,
            cols,
            info.dtype,
        ))
    }

    /// Bytes of tensor data in the checkpoint, by dtype.
    pub fn total_bytes(&self) -> usize {
        self.tensors.values().map(|i| i.end - i.start).sum()
    }

    /// The tensor decoded to f32.
    pub fn to_f32(&self, name: &str) -> Result<Vec<f32>> {
        let info = self.require(name)?;
        Ok(crate::dtype::to_f32(self.bytes(name)?, info.dtype))
    }

    /// Refuses a file of this checkpoint that is now shorter than when it was mapped (another
    /// program truncated or rewrote it): reading its tensors would fault or copy garbage, and
    /// the kernel reports a copy from the lost pages as a failed write of the *output*.
    pub fn check_unchanged(&self) -> Result<()> {
        for shard in &self.shards {
            let now = std::fs::metadata(&shard.path).at(&shard.path)?.len();
            let was = shard.mmap.len() as u64;
            if now < was {
                return Err(Error::Safetensors {
                    path: shard.path.clone(),
                    msg: format!(
                        "truncated while being read: {was} bytes when opened, {now} now (was the file modified during the run?)"
                    ),
                });
            }
        }
        Ok(())
    }

    /// The file holding a tensor.
    pub fn file_of(&self, name: &str) -> Option<&Path> {
        self.tensors
            .get(name)
            .map(|i| self.shards[i.shard].path.as_path())
    }

    /// Hands the pages of a tensor back to the kernel (they are re-read from the page cache if
    /// touched again). Keeps the resident set of a streaming pass small.
    /// [`crate::dtype::scan`] of a tensor (NaN/Inf count, largest finite |x|), read from the
    /// file in 4 MB blocks rather than through the memory map: touching every mapped page of
    /// a tensor that is copied as it is (and written by the kernel from the page cache) would
    /// fault it in, which costs more than the copy itself.
    pub fn scan(&self, name: &str) -> Result<(usize, f32)> {
        let info = self.require(name)?;
        let shard = &self.shards[info.shard];
        #[cfg(unix)]
        {
            use std::os::unix::fs::FileExt;
            let file = std::fs::File::open(&shard.path).at(&shard.path)?;
            let block = 4 << 20;
            let mut buf = vec![0u8; block];
            let (mut bad, mut max) = (0usize, 0f32);
            let mut at = info.start;
            while at < info.end {
                let n = block.min(info.end - at);
                file.read_exact_at(&mut buf[..n], at as u64)
                    .at(&shard.path)?;
                let (b, m) = crate::dtype::scan(&buf[..n], info.dtype);
                bad += b;
                max = max.max(m);
                at += n;
            }
            Ok((bad, max))
        }
        #[cfg(not(unix))]
        {
            Ok(crate::dtype::scan(
                &shard.mmap[info.start..info.end],
                info.dtype,
            ))
        }
    }

    pub fn release(&self, name: &str) {
        let Some(info) = self.tensors.get(name) else {
            return;
        };
        let mmap = &self.shards[info.shard].mmap;
        // madvise needs a page-aligned start: release only the whole pages inside the range.
        let page = 4096;
        let start = info.start.div_ceil(page) * page;
        let end = (info.end / page) * page;
        if end > start {
            // SAFETY: the map is private and read-only; DONTNEED drops clean file-backed pages,
            // which are transparently re-read on the next access. No borrowed slice into these
            // pages is alive when the callers release (they release after writing).
            let _ = unsafe {
                mmap.unchecked_advise_range(UncheckedAdvice::DontNeed, start, end - start)
            };
        }
    }
}

/// The decoder layer a tensor name belongs to (`model.layers.N.…`).
fn layer_of(name: &str) -> Option<usize> {
    name.strip_prefix("model.layers.")?
        .split('.')
        .next()?
        .parse()
        .ok()
}

/// Checks `num_hidden_layers` of `config` against the layers the tensor `names` hold, before
/// anything is sized by it: more layers than the weights hold (an absurd count would
/// otherwise allocate or loop for each missing layer), or a tensor of a layer beyond it.
pub fn check_layer_count<'a>(
    names: impl Iterator<Item = &'a str>,
    num_layers: usize,
    config: &Path,
) -> Result<()> {
    let mut present = 0;
    let mut beyond = None;
    for name in names {
        if let Some(l) = layer_of(name) {
            present = present.max(l + 1);
            if l >= num_layers && beyond.is_none() {
                beyond = Some((name.to_string(), l));
            }
        }
    }
    if let Some((name, l)) = beyond {
        return Err(Error::Safetensors {
            path: config.to_path_buf(),
            msg: format!(
                "tensor `{name}` belongs to layer {l}, but config.json has num_hidden_layers = {num_layers}"
            ),
        });
    }
    if num_layers > present {
        return Err(Error::InvalidValue {
            path: config.to_path_buf(),
            key: "num_hidden_layers".into(),
            value: num_layers.to_string(),
            reason: format!("the weights hold {present} decoder layers (model.layers.N tensors)"),
        });
    }
    Ok(())
}
