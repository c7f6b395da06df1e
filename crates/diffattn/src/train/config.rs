//! The training keys of an axolotl config (docs/spec.md §8 and the plugin keys), read strictly: a key
//! of the wrong type names the file, the key and the value; a key whose meaning we do not
//! implement and that would change what training computes is refused by name rather than
//! ignored.

use std::path::{Path, PathBuf};

use serde_yaml_ng::{Mapping, Value};

use super::data::{DatasetSpec, DatasetType, ValSetSize};
use super::optim::AdamWParams;
use super::schedule::Scheduler;
use crate::axolotl::AxolotlConfig;
use crate::error::{Error, Result};

/// Keys refused when set to anything but null / false / empty, with the reason.
pub const REFUSED_KEYS: &[(&str, &str)] = &[
    (
        "load_in_8bit",
        "8-bit quantised training is not implemented",
    ),
    (
        "load_in_4bit",
        "4-bit quantised training is not implemented",
    ),
    (
        "adapter",
        "LoRA / QLoRA adapters are not implemented; training updates every weight",
    ),
    ("lora_model_dir", "LoRA adapters are not implemented"),
    ("peft_use_dora", "DoRA adapters are not implemented"),
    ("gptq", "GPTQ models are not supported"),
    (
        "sample_packing",
        "sample packing is not implemented (each sequence holds one sample)",
    ),
    (
        "deepspeed",
        "DeepSpeed runs in axolotl, not here: train there with our checkpoint",
    ),
    (
        "fsdp",
        "FSDP runs in axolotl, not here: train there with our checkpoint",
    ),
    (
        "fsdp_config",
        "FSDP runs in axolotl, not here: train there with our checkpoint",
    ),
    ("rl", "preference / RL training is not implemented"),
    (
        "neftune_noise_alpha",
        "NEFTune embedding noise is not implemented",
    ),
    (
        "noisy_embedding_alpha",
        "NEFTune embedding noise is not implemented",
    ),
    ("relora_steps", "ReLoRA is not implemented"),
    ("unfrozen_parameters", "partial freezing is not implemented"),
    (
        "lr_quadratic_warmup",
        "quadratic warm-up is not implemented",
    ),
    ("cosine_min_lr_ratio", "a cosine floor is not implemented"),
    (
        "cosine_constant_lr_ratio",
        "a constant cosine tail is not implemented",
    ),
    (
        "pretraining_dataset",
        "streaming pre-training datasets are not implemented",
    ),
    ("loraplus_lr_ratio", "LoRA+ is not implemented"),
    (
        "embedding_lr",
        "per-group learning rates are not implemented",
    ),
    (
        "embedding_lr_scale",
        "per-group learning rates are not implemented",
    ),
];

/// Optimizer names that mean PyTorch AdamW.
pub const ADAMW_NAMES: &[&str] = &["adamw_torch", "adamw_torch_fused", "adamw_hf", "adamw"];

/// `resume_from_checkpoint`.
#[derive(Debug, Clone, PartialEq)]
pub enum Resume {
    /// A `checkpoint-N` directory.
    Path(PathBuf),
    /// `true`: the latest `checkpoint-N` in `output_dir`.
    Latest,
}

/// Everything `train` and `evaluate` read from the YAML.
#[derive(Debug, Clone)]
pub struct TrainConfig {
    pub axolotl: AxolotlConfig,
    pub datasets: Vec<DatasetSpec>,
    /// `test_datasets`: the validation set, read as it is (no split of `datasets`).
    pub test_datasets: Vec<DatasetSpec>,
    pub val_set_size: Option<ValSetSize>,
    pub sequence_len: usize,
    pub micro_batch_size: usize,
    pub eval_batch_size: usize,
    pub gradient_accumulation_steps: usize,
    pub num_epochs: f64,
    pub max_steps: Option<usize>,
    pub learning_rate: f64,
    pub lr_scheduler: Scheduler,
    pub warmup_steps: Option<usize>,
    pub warmup_ratio: Option<f64>,
    pub adamw: AdamWParams,
    /// 0 disables clipping.
    pub max_grad_norm: f64,
    pub logging_steps: Option<usize>,
    pub save_steps: Option<usize>,
    /// Keep at most this many `checkpoint-N` directories (the oldest are deleted).
    pub save_total_limit: Option<usize>,
    pub eval_steps: Option<usize>,
    /// `eval_on_start` (transformers' TrainingArguments): evaluate before the first step of a
    /// run that is not resumed, logged at step 0.
    pub eval_on_start: bool,
    pub output_dir: PathBuf,
    pub resume_from_checkpoint: Option<Resume>,
    pub seed: u64,
    pub train_on_inputs: bool,
    /// axolotl's `gradient_checkpointing`: recompute each layer's activations in the
    /// backward instead of keeping them.
    pub gradient_checkpointing: bool,
    pub special_tokens: Vec<(String, String)>,
    pub diff_attn_warmup_steps: Option<usize>,
    pub diff_attn_log_every: usize,
    pub diff_attn_num_monitor_layers: usize,
}

fn active(v: &Value) -> bool {
    match v {
        Value::Null | Value::Bool(false) => false,
        Value::String(s) => !s.trim().is_empty(),
        Value::Sequence(s) => !s.is_empty(),
        Value::Mapping(m) => !m.is_empty(),
        _ => true,
    }
}

struct Reader<'a> {
    map: &'a Mapping,
    path: &'a Path,
}

impl Reader<'_> {
    fn get(&self, key: &str) -> Option<&Value> {
        match self.map.get(key) {
            None | Some(Value::Null) => None,
            Some(v) => Some(v),
        }
    }
    fn invalid(&self, key: &str, v: &Value, reason: &str) -> Error {
        Error::InvalidValue {
            path: self.path.to_path_buf(),
            key: key.into(),
            value: crate::axolotl::show_value(v),
            reason: reason.into(),
        }
    }
    fn number(&self, key: &str) -> Result<Option<f64>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => {
                let x = match v {
                    Value::Number(n) => n.as_f64(),
                    Value::String(s) => s.trim().parse::<f64>().ok(),
                    _ => None,
                };
                match x {
                    Some(x) if x.is_finite() => Ok(Some(x)),
                    _ => Err(self.invalid(key, v, "expected a number")),
                }
            }
        }
    }
    fn count(&self, key: &str, min: usize) -> Result<Option<usize>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => match v.as_u64() {
                Some(n) if n as usize >= min => Ok(Some(n as usize)),
                _ => Err(self.invalid(key, v, &format!("expected an integer >= {min}"))),
            },
        }
    }
    fn boolean(&self, key: &str) -> Result<Option<bool>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(self.invalid(key, v, "expected true or false")),
        }
    }
    fn string(&self, key: &str) -> Result<Option<String>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(v) => Err(self.invalid(key, v, "expected a string")),
        }
    }
}

/// A dataset path: as written when it exists (relative to the working directory, as axolotl),
/// else relative to the config file's directory.
fn dataset_path(p: &str, config: &Path) -> PathBuf {
    let direct = PathBuf::from(p);
    if direct.exists() || direct.is_absolute() {
        return direct;
    }
    let beside = config.parent().unwrap_or(Path::new(".")).join(p);
    if beside.exists() {
        beside
    } else {
        direct
    }
}

impl TrainConfig {
    /// Reads the training keys of an already parsed axolotl config.
    pub fn from_axolotl(axolotl: AxolotlConfig) -> Result<Self> {
        let path = axolotl.path.clone();
        let map = axolotl
            .value
            .as_mapping()
            .expect("checked by AxolotlConfig");
        let r = Reader { map, path: &path };
        for (key, why) in REFUSED_KEYS {
            if let Some(v) = map.get(*key) {
                if active(v) {
                    return Err(r.invalid(key, v, &format!("not supported: {why}")));
                }
            }
        }
        let datasets_v = r.get("datasets").ok_or_else(|| Error::MissingKey {
            path: path.clone(),
            key: "datasets".into(),
        })?;
        let datasets = parse_datasets(&r, "datasets", datasets_v, &path)?;
        // axolotl's `test_datasets`: a held-out set of its own (the same entry format), in place
        // of a `val_set_size` split of `datasets`.
        let test_datasets = match r.get("test_datasets") {
            None | Some(Value::Null) => Vec::new(),
            Some(v) => parse_datasets(&r, "test_datasets", v, &path)?,
        };
        let val_set_size = match r.get("val_set_size") {
            None => None,
            Some(v) => match r.number("val_set_size")? {
                Some(0.0) => None,
                Some(x) if x > 0.0 && x < 1.0 => Some(ValSetSize::Fraction(x)),
                Some(x) if x >= 1.0 && x.fract() == 0.0 => Some(ValSetSize::Count(x as usize)),
                _ => {
                    return Err(r.invalid(
                        "val_set_size",
                        v,
                        "expected a fraction in (0, 1) or a whole number of samples",
                    ))
                }
            },
        };
        if let (Some(_), false) = (&val_set_size, test_datasets.is_empty()) {
            return Err(r.invalid(
                "val_set_size",
                r.get("val_set_size").expect("read above"),
                "test_datasets is the validation set already: set val_set_size to 0 or remove it",
            ));
        }
        let micro_batch_size = r.count("micro_batch_size", 1)?.unwrap_or(1);
        let gradient_accumulation_steps = match (
            r.count("gradient_accumulation_steps", 1)?,
            r.count("batch_size", 1)?,
        ) {
            (Some(g), Some(b)) if b != g * micro_batch_size => {
                return Err(r.invalid(
                    "batch_size",
                    &Value::from(b as u64),
                    &format!(
                        "disagrees with micro_batch_size ({micro_batch_size}) x gradient_accumulation_steps ({g}); set one of them"
                    ),
                ))
            }
            (Some(g), _) => g,
            (None, Some(b)) => {
                if b % micro_batch_size != 0 {
                    return Err(r.invalid(
                        "batch_size",
                        &Value::from(b as u64),
                        &format!("must be a multiple of micro_batch_size ({micro_batch_size})"),
                    ));
                }
                b / micro_batch_size
            }
            (None, None) => 1,
        };
        let learning_rate = r
            .number("learning_rate")?
            .ok_or_else(|| Error::MissingKey {
                path: path.clone(),
                key: "learning_rate".into(),
            })?;
        if learning_rate < 0.0 {
            return Err(r.invalid(
                "learning_rate",
                r.get("learning_rate").unwrap(),
                "must be >= 0",
            ));
        }
        let lr_scheduler = match r.string("lr_scheduler")? {
            None => Scheduler::Cosine,
            Some(s) => Scheduler::parse(&s).ok_or_else(|| {
                r.invalid(
                    "lr_scheduler",
                    &Value::String(s.clone()),
                    "supported: cosine, linear, constant",
                )
            })?,
        };
        let warmup_steps = r.count("warmup_steps", 0)?;
        let warmup_ratio = r.number("warmup_ratio")?;
        if let Some(w) = warmup_ratio {
            if !(0.0..1.0).contains(&w) {
                return Err(r.invalid(
                    "warmup_ratio",
                    r.get("warmup_ratio").unwrap(),
                    "expected a fraction in [0, 1)",
                ));
            }
            if warmup_steps.is_some() {
                return Err(r.invalid(
                    "warmup_ratio",
                    r.get("warmup_ratio").unwrap(),
                    "set warmup_steps or warmup_ratio, not both",
                ));
            }
        }
        if let Some(o) = r.string("optimizer")? {
            if !ADAMW_NAMES.contains(&o.as_str()) {
                return Err(r.invalid(
                    "optimizer",
                    &Value::String(o),
                    &format!("not supported: only AdamW ({})", ADAMW_NAMES.join(", ")),
                ));
            }
        }
        let mut adamw = AdamWParams::default();
        for (k, dst) in [
            ("adam_beta1", &mut adamw.beta1),
            ("adam_beta2", &mut adamw.beta2),
        ] {
            if let Some(x) = r.number(k)? {
                if !(0.0..1.0).contains(&x) {
                    return Err(r.invalid(k, r.get(k).unwrap(), "expected a value in [0, 1)"));
                }
                *dst = x;
            }
        }
        for (k, dst) in [
            ("adam_epsilon", &mut adamw.eps),
            ("weight_decay", &mut adamw.weight_decay),
        ] {
            if let Some(x) = r.number(k)? {
                if x < 0.0 {
                    return Err(r.invalid(k, r.get(k).unwrap(), "must be >= 0"));
                }
                *dst = x;
            }
        }
        let max_grad_norm = r.number("max_grad_norm")?.unwrap_or(1.0);
        if max_grad_norm < 0.0 {
            return Err(r.invalid(
                "max_grad_norm",
                r.get("max_grad_norm").unwrap(),
                "must be >= 0 (0 disables clipping)",
            ));
        }
        let num_epochs = r.number("num_epochs")?.unwrap_or(1.0);
        if num_epochs <= 0.0 {
            return Err(r.invalid("num_epochs", r.get("num_epochs").unwrap(), "must be > 0"));
        }
        let max_steps = match r.get("max_steps") {
            Some(Value::Number(n)) if n.as_i64() == Some(-1) => None,
            _ => r.count("max_steps", 1)?,
        };
        let output_dir = axolotl
            .output_dir
            .clone()
            .ok_or_else(|| Error::MissingKey {
                path: path.clone(),
                key: "output_dir".into(),
            })?;
        let resume_from_checkpoint = match r.get("resume_from_checkpoint") {
            None | Some(Value::Bool(false)) => None,
            Some(Value::Bool(true)) => Some(Resume::Latest),
            Some(Value::String(s)) if !s.trim().is_empty() => Some(Resume::Path(PathBuf::from(s))),
            Some(v) => {
                return Err(r.invalid(
                    "resume_from_checkpoint",
                    v,
                    "expected a checkpoint directory or true (the latest in output_dir)",
                ))
            }
        };
        let special_tokens = match r.get("special_tokens") {
            None => Vec::new(),
            Some(Value::Mapping(m)) => {
                let mut out = Vec::new();
                for (k, v) in m {
                    let name = k.as_str().unwrap_or_default().to_string();
                    match v.as_str() {
                        Some(tok) if !name.is_empty() => out.push((name, tok.to_string())),
                        _ => {
                            return Err(r.invalid(
                                &format!("special_tokens.{name}"),
                                v,
                                "expected a token string such as \"</s>\"",
                            ))
                        }
                    }
                }
                out
            }
            Some(v) => {
                return Err(r.invalid(
                    "special_tokens",
                    v,
                    "expected a mapping such as {eos_token: \"</s>\"}",
                ))
            }
        };
        let sequence_len = r.count("sequence_len", 2)?.unwrap_or(2048);
        let diff_attn_warmup_steps = match r.count("diff_attn_warmup_steps", 0)? {
            Some(0) | None => None,
            w => w,
        };
        Ok(Self {
            datasets,
            test_datasets,
            val_set_size,
            sequence_len,
            micro_batch_size,
            eval_batch_size: r.count("eval_batch_size", 1)?.unwrap_or(micro_batch_size),
            gradient_accumulation_steps,
            num_epochs,
            max_steps,
            learning_rate,
            lr_scheduler,
            warmup_steps,
            warmup_ratio,
            adamw,
            max_grad_norm,
            logging_steps: r.count("logging_steps", 1)?,
            save_steps: r.count("save_steps", 1)?,
            save_total_limit: r.count("save_total_limit", 1)?,
            eval_steps: r.count("eval_steps", 1)?,
            eval_on_start: r.boolean("eval_on_start")?.unwrap_or(false),
            output_dir,
            resume_from_checkpoint,
            seed: axolotl.seed.unwrap_or(42),
            train_on_inputs: r.boolean("train_on_inputs")?.unwrap_or(false),
            gradient_checkpointing: r.boolean("gradient_checkpointing")?.unwrap_or(false),
            special_tokens,
            diff_attn_warmup_steps,
            diff_attn_log_every: r.count("diff_attn_log_every", 1)?.unwrap_or(100),
            diff_attn_num_monitor_layers: r.count("diff_attn_num_monitor_layers", 0)?.unwrap_or(3),
            axolotl,
        })
    }

    /// Reads `path` (an axolotl YAML).
    pub fn from_file(path: &Path) -> Result<Self> {
        Self::from_axolotl(AxolotlConfig::from_file(path)?)
    }

    /// [`TrainConfig::from_file`] for `evaluate`, which reads only the data keys (datasets,
    /// `val_set_size`, `seed`, `sequence_len`...): the training-only keys `learning_rate` and
    /// `output_dir` may be absent (every key present is still checked).
    pub fn from_file_for_evaluation(path: &Path) -> Result<Self> {
        let mut a = AxolotlConfig::from_file(path)?;
        if let Some(m) = a.value.as_mapping_mut() {
            if !m.contains_key("learning_rate") {
                m.insert("learning_rate".into(), 0.0.into());
            }
        }
        if a.output_dir.is_none() {
            a.output_dir = Some(PathBuf::from("."));
        }
        Self::from_axolotl(a)
    }

    /// Warm-up steps of the learning rate for `total` steps.
    pub fn lr_warmup(&self, total: usize) -> usize {
        match (self.warmup_steps, self.warmup_ratio) {
            (Some(w), _) => w,
            (None, Some(r)) => (r * total as f64).ceil() as usize,
            _ => 0,
        }
    }

    /// Logging interval: `logging_steps`, else axolotl's default
    /// `max(min(int(0.005 · total), 10), 1)`.
    pub fn logging_interval(&self, total: usize) -> usize {
        self.logging_steps
            .unwrap_or_else(|| ((0.005 * total as f64) as usize).clamp(1, 10))
    }
}

/// The entries of a `datasets` or `test_datasets` list (`list_key`), each checked by key.
fn parse_datasets(
    r: &Reader,
    list_key: &str,
    datasets_v: &Value,
    path: &Path,
) -> Result<Vec<DatasetSpec>> {
    let path = path.to_path_buf();
    let list = datasets_v
        .as_sequence()
        .filter(|s| !s.is_empty())
        .ok_or_else(|| {
            r.invalid(
                list_key,
                datasets_v,
                "expected a non-empty list of {path, type}",
            )
        })?;
    let mut datasets = Vec::new();
    for (i, d) in list.iter().enumerate() {
        let key = |k: &str| format!("{list_key}[{i}].{k}");
        let m = d.as_mapping().ok_or_else(|| {
            r.invalid(
                &format!("{list_key}[{i}]"),
                d,
                "expected a mapping with `path` and `type`",
            )
        })?;
        let dp = match m.get("path") {
            Some(Value::String(s)) if !s.trim().is_empty() => s.clone(),
            Some(v) => return Err(r.invalid(&key("path"), v, "expected a file or directory path")),
            None => {
                return Err(Error::MissingKey {
                    path: path.clone(),
                    key: key("path"),
                })
            }
        };
        for k in ["data_files", "name", "shards", "preprocess_shards"] {
            if let Some(v) = m.get(k) {
                if active(v) {
                    return Err(r.invalid(&key(k), v, "not supported: `path` must be a local .json/.jsonl file or a directory of them"));
                }
            }
        }
        if let Some(v) = m.get("ds_type") {
            if !matches!(v.as_str(), Some("json") | None)
                || !matches!(v, Value::String(_) | Value::Null)
            {
                return Err(r.invalid(&key("ds_type"), v, "only json datasets are supported"));
            }
        }
        if let Some(v) = m.get("split") {
            if active(v) && v.as_str() != Some("train") {
                return Err(r.invalid(
                    &key("split"),
                    v,
                    "only the `train` split of a local file exists",
                ));
            }
        }
        let kind = match m.get("type") {
            Some(Value::String(t)) if t == "alpaca" => DatasetType::Alpaca,
            Some(Value::String(t)) if t == "completion" => DatasetType::Completion {
                field: match m.get("field") {
                    None | Some(Value::Null) => "text".into(),
                    Some(Value::String(f)) if !f.is_empty() => f.clone(),
                    Some(v) => return Err(r.invalid(&key("field"), v, "expected a field name")),
                },
            },
            Some(v) => {
                return Err(r.invalid(
                    &key("type"),
                    v,
                    "supported dataset types: alpaca, completion",
                ))
            }
            None => {
                return Err(Error::MissingKey {
                    path: path.clone(),
                    key: key("type"),
                })
            }
        };
        datasets.push(DatasetSpec {
            path: dataset_path(&dp, &path),
            kind,
        });
    }
    Ok(datasets)
}
