//! Error type of the library. Every variant carries the file, key or tensor name and the
//! offending value, so that a message alone tells the user what to fix.

use std::path::PathBuf;

/// Errors raised while reading, converting or writing checkpoints and configs.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: another run is writing into this directory ({}); wait for it to end or choose another output", match holder { Some(pid) => format!("process {pid} holds its lock"), None => "a process holds its lock".to_string() })]
    OutputLocked { path: PathBuf, holder: Option<u32> },

    #[error("interrupted by signal {signal}: partial outputs were removed (a training run keeps the checkpoints it completed; resume_from_checkpoint: true continues it)")]
    Interrupted { signal: i32 },

    #[error("{0}")]
    NotEnoughMemory(Box<crate::memory::Shortfall>),

    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("{path}: not valid JSON: {source}")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },

    #[error("{path}: not valid YAML: {msg}")]
    Yaml { path: PathBuf, msg: String },

    #[error("{path}: required key `{key}` is missing")]
    MissingKey { path: PathBuf, key: String },

    #[error("{path}: key `{key}` has invalid value {value}: {reason}")]
    InvalidValue {
        path: PathBuf,
        key: String,
        value: String,
        reason: String,
    },

    #[error("{path}: unsupported architecture {value:?}; supported values: {supported}")]
    UnsupportedArchitecture {
        path: PathBuf,
        value: String,
        supported: String,
    },

    #[error("{path}: {msg}")]
    Safetensors { path: PathBuf, msg: String },

    #[error("{path}: tensor `{name}` is missing")]
    MissingTensor { path: PathBuf, name: String },

    #[error("{path}: tensor `{name}` is not part of a {model} (check config.json's architectures, attention_bias and split_heads/sublayer_norm)")]
    UnexpectedTensor {
        path: PathBuf,
        name: String,
        model: String,
    },

    #[error("{path}: tensor `{name}` has shape {found:?}, but config.json implies {expected:?}")]
    ShapeMismatch {
        path: PathBuf,
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },

    #[error("{path}: tensor `{name}` has unsupported dtype {dtype}; supported: F32, F16, BF16")]
    UnsupportedDtype {
        path: PathBuf,
        name: String,
        dtype: String,
    },

    #[error("{path}: {msg}")]
    Gguf { path: PathBuf, msg: String },

    #[error("non-finite logits: {0}")]
    NonFiniteLogits(String),

    #[error("invalid options: {0}")]
    InvalidOptions(String),

    #[error(
        "--split-heads needs an even number of attention heads and of key/value heads, \
         but num_attention_heads = {num_attention_heads} and num_key_value_heads = {num_key_value_heads}"
    )]
    OddHeads {
        num_attention_heads: usize,
        num_key_value_heads: usize,
    },

    #[error("output directory {path} is not empty; pass --overwrite to replace it")]
    OutputNotEmpty { path: PathBuf },

    #[error("{path}: --overwrite replaces only what this tool writes, and this directory also holds {count} other entr{} ({entries}); move {} away or choose another output", if *count == 1 { "y" } else { "ies" }, if *count == 1 { "it" } else { "them" })]
    ForeignFiles {
        path: PathBuf,
        count: usize,
        entries: String,
    },

    #[error("output file {path} exists; pass --overwrite to replace it")]
    OutputExists { path: PathBuf },

    #[error("output directory {path} is not writable: {source}")]
    OutputNotWritable {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("output directory {output} would overlap the input {source_dir} (the same directory, inside it, or containing it); choose another output directory")]
    OutputInsideSource {
        output: PathBuf,
        source_dir: PathBuf,
    },

    #[error(
        "base_model {id:?} is neither a local directory nor a model in the Hugging Face cache \
         (searched {cache}){detail}"
    )]
    ModelNotFound {
        id: String,
        cache: PathBuf,
        detail: String,
    },

    #[error("{path}: {msg}")]
    Dataset { path: PathBuf, msg: String },

    #[error("tokenizer: {0}")]
    Tokenizer(String),

    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// Result alias of the library.
pub type Result<T> = std::result::Result<T, Error>;

/// Attaches a path to an `std::io::Error`.
pub(crate) trait IoContext<T> {
    fn at(self, path: impl Into<PathBuf>) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn at(self, path: impl Into<PathBuf>) -> Result<T> {
        self.map_err(|source| Error::Io {
            path: path.into(),
            source,
        })
    }
}
