//! The axolotl YAML config: typed reading of the keys we use (docs/spec.md §8) and a lossless edit
//! that writes the converted model's config with key order and comments preserved.
//!
//! Reading uses `serde_yaml_ng` (strict parser, precise error positions); editing uses
//! `yaml-edit`, a lossless concrete-syntax-tree editor, so that everything the user wrote
//! survives except the keys we set.

use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde_yaml_ng::Value;

use crate::dtype::DType;
use crate::error::{Error, IoContext, Result};

/// Our axolotl plugin (the `diff_transformer` Python package): registers the differential
/// model types, the warm-up of lambda and the monitoring (docs/spec.md §5-6).
pub const PLUGIN: &str = "diff_transformer.axolotl.DifferentialTransformerPlugin";

/// The older Python plugin's line (package `axolotl_diff_transformer`); a converted config
/// names ours instead (it reads the same keys, and the older one fails to load on current
/// transformers, after which axolotl trains without warm-up or monitoring).
pub const LEGACY_PLUGIN: &str = "axolotl_diff_transformer.plugin.DifferentialTransformerPlugin";

/// Appended to a converted model's directory to name the training `output_dir` written into
/// its `axolotl_config.yml` (training there never overwrites the converted checkpoint).
pub const TRAINED_SUFFIX: &str = "-trained";

/// Output dtype requested by `bf16` / `fp16` (docs/spec.md §8).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DtypeChoice {
    /// `bf16: auto`, or neither key true: keep the source dtype (CPU conversion).
    Keep,
    /// `bf16: true`
    BF16,
    /// `fp16: true`
    F16,
}

impl DtypeChoice {
    /// The dtype to write, given the source dtype.
    pub fn resolve(self, source: DType) -> DType {
        match self {
            DtypeChoice::Keep => source,
            DtypeChoice::BF16 => DType::BF16,
            DtypeChoice::F16 => DType::F16,
        }
    }
}

/// The keys of an axolotl config that conversion reads. Unknown keys stay in `text`.
#[derive(Debug, Clone)]
pub struct AxolotlConfig {
    pub path: PathBuf,
    /// The file's text, edited losslessly for the output config.
    pub text: String,
    /// The parsed document (a mapping).
    pub value: Value,
    /// `base_model`: a local directory or a Hugging Face repo id.
    pub base_model: String,
    /// `base_model_config`: where config.json comes from (default: `base_model`).
    pub base_model_config: Option<String>,
    /// `tokenizer_config`: where tokenizer files come from (default: `base_model`).
    pub tokenizer_config: Option<String>,
    /// `output_dir`
    pub output_dir: Option<PathBuf>,
    pub dtype: DtypeChoice,
    /// `seed`
    pub seed: Option<u64>,
}

impl AxolotlConfig {
    /// Reads `path`. Errors: file missing, not YAML, not a mapping, `base_model` missing or
    /// not a string, `bf16`/`fp16`/`seed` of the wrong type, `bf16` and `fp16` both true.
    pub fn from_file(path: &Path) -> Result<Self> {
        // Not read at all beyond the size limit (a device or a huge file by mistake).
        let mut text = String::new();
        std::io::Read::read_to_string(
            &mut std::io::Read::take(
                std::fs::File::open(path).at(path)?,
                MAX_YAML_BYTES as u64 + 1,
            ),
            &mut text,
        )
        .at(path)?;
        Self::from_str(&text, path)
    }

    /// Parses YAML text; `path` names the source in errors.
    pub fn from_str(text: &str, path: &Path) -> Result<Self> {
        // A UTF-8 byte order mark (some Windows editors write one) is not YAML content.
        let text = text.strip_prefix('\u{feff}').unwrap_or(text);
        check_yaml_shape(text, path)?;
        let mut value: Value = serde_yaml_ng::from_str(text).map_err(|e| Error::Yaml {
            path: path.to_path_buf(),
            msg: e.to_string(),
        })?;
        // Merge keys (`<<: *defaults`), which axolotl's PyYAML resolves: keys given through
        // them count as given.
        value.apply_merge().map_err(|e| Error::Yaml {
            path: path.to_path_buf(),
            msg: format!("merge key (<<): {e}"),
        })?;
        let map = value.as_mapping().ok_or_else(|| Error::Yaml {
            path: path.to_path_buf(),
            msg: "the document must be a mapping of keys to values".into(),
        })?;
        let invalid = |key: &str, v: &Value, reason: &str| Error::InvalidValue {
            path: path.to_path_buf(),
            key: key.into(),
            value: show_value(v),
            reason: reason.into(),
        };
        let string = |key: &str| -> Result<Option<String>> {
            match map.get(key) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::String(s)) if !s.trim().is_empty() => Ok(Some(s.clone())),
                Some(v) => Err(invalid(key, v, "expected a non-empty string")),
            }
        };
        // axolotl reads `plugins` as a list of names; the converted config appends to it.
        match map.get("plugins") {
            None | Some(Value::Null) => {}
            Some(Value::Sequence(items)) if items.iter().all(Value::is_string) => {}
            Some(v) => return Err(invalid("plugins", v, "expected a list of plugin names")),
        }
        let base_model = string("base_model")?.ok_or_else(|| Error::MissingKey {
            path: path.to_path_buf(),
            key: "base_model".into(),
        })?;
        let flag = |key: &str| -> Result<Option<Value>> {
            match map.get(key) {
                None | Some(Value::Null) => Ok(None),
                Some(v @ Value::Bool(_)) => Ok(Some(v.clone())),
                Some(v @ Value::String(s)) if s == "auto" => Ok(Some(v.clone())),
                Some(v) => Err(invalid(key, v, "expected true, false or auto")),
            }
        };
        let bf16 = flag("bf16")?;
        let fp16 = flag("fp16")?;
        let dtype = match (bf16, fp16) {
            (Some(Value::Bool(true)), Some(Value::Bool(true))) => {
                return Err(invalid(
                    "fp16",
                    &Value::Bool(true),
                    "bf16 and fp16 cannot both be true",
                ))
            }
            (Some(Value::Bool(true)), _) => DtypeChoice::BF16,
            (_, Some(Value::Bool(true))) => DtypeChoice::F16,
            _ => DtypeChoice::Keep,
        };
        let seed = match map.get("seed") {
            None | Some(Value::Null) => None,
            Some(v) => Some(
                v.as_u64()
                    .ok_or_else(|| invalid("seed", v, "expected a non-negative integer"))?,
            ),
        };
        Ok(Self {
            path: path.to_path_buf(),
            text: text.to_string(),
            base_model,
            base_model_config: string("base_model_config")?,
            tokenizer_config: string("tokenizer_config")?,
            // `~/x` expanded as for base_model (it was taken literally: a directory named `~`).
            output_dir: string("output_dir")?.map(|s| crate::hub::expand_home(&s)),
            dtype,
            seed,
            value,
        })
    }
}

/// Returns the config for the converted model: `text` with `base_model` (and
/// `base_model_config`, when present) pointing to `model_dir`, `diff_attention: true`, and,
/// when `with_plugin`, [`PLUGIN`] appended to `plugins` (created if absent, never duplicated).
/// Key order, comments and every other key are preserved.
/// Largest config file read (axolotl configs are a few kB).
pub const MAX_YAML_BYTES: usize = 4 << 20;

/// Deepest nesting of flow collections (`[`, `{`) read.
pub const MAX_YAML_DEPTH: usize = 64;

/// Refuses a config larger than [`MAX_YAML_BYTES`] or nesting flow collections deeper than
/// [`MAX_YAML_DEPTH`], before the YAML parser sees it: its time grows with the square of the
/// nesting (100,000 nested `[` in 200 kB took 85 s to be rejected). The scan skips quoted
/// scalars and comments.
pub fn check_yaml_shape(text: &str, path: &Path) -> Result<()> {
    let bad = |msg: String| Error::Yaml {
        path: path.to_path_buf(),
        msg,
    };
    if text.len() > MAX_YAML_BYTES {
        return Err(bad(format!(
            "{} bytes, more than the {MAX_YAML_BYTES} an axolotl config may have",
            text.len()
        )));
    }
    let (mut depth, mut line) = (0usize, 1usize);
    let mut chars = text.chars().peekable();
    let mut prev = '\n';
    while let Some(c) = chars.next() {
        match c {
            '\n' => line += 1,
            '#' if prev.is_whitespace() => {
                while chars.peek().is_some_and(|&n| n != '\n') {
                    chars.next();
                }
            }
            '"' | '\'' if !prev.is_alphanumeric() => {
                while let Some(n) = chars.next() {
                    if n == '\n' {
                        line += 1;
                    }
                    if n == '\\' && c == '"' {
                        chars.next();
                    } else if n == c {
                        break;
                    }
                }
            }
            '[' | '{' => {
                depth += 1;
                if depth > MAX_YAML_DEPTH {
                    return Err(bad(format!(
                        "line {line}: collections nested more than {MAX_YAML_DEPTH} deep"
                    )));
                }
            }
            ']' | '}' => depth = depth.saturating_sub(1),
            _ => {}
        }
        prev = c;
    }
    Ok(())
}

/// A YAML value for an error message: its text on one line (a list's items joined by ` `),
/// cut after 200 characters.
pub fn show_value(v: &Value) -> String {
    let text = serde_yaml_ng::to_string(v).unwrap_or_default();
    let text = text.trim().lines().collect::<Vec<_>>().join(" ");
    let n = text.chars().count();
    if n <= 200 {
        text.to_string()
    } else {
        format!(
            "{}… ({n} characters)",
            text.chars().take(200).collect::<String>()
        )
    }
}

pub fn converted_config_text(text: &str, model_dir: &str, with_plugin: bool) -> Result<String> {
    let (doc, map) = edit_document(text)?;
    map.set("base_model", model_dir);
    if map.contains_key("base_model_config") {
        map.set("base_model_config", model_dir);
    }
    map.set("output_dir", format!("{model_dir}{TRAINED_SUFFIX}"));
    map.set("diff_attention", true);
    remove_plugins(&map);
    if with_plugin {
        match map.get_sequence("plugins") {
            Some(seq) => seq.push(PLUGIN),
            None => {
                if map.contains_key("plugins") {
                    // `plugins:` with no items (null) or a scalar: replace with a list.
                    map.remove("plugins");
                }
                let seq = yaml_edit::Sequence::new();
                seq.push(PLUGIN);
                map.set("plugins", seq);
            }
        }
    }
    Ok(doc.to_string())
}

/// Removes our plugin and the older one from `plugins` (and the key when it becomes empty).
fn remove_plugins(map: &yaml_edit::Mapping) {
    if let Some(seq) = map.get_sequence("plugins") {
        let idx: Vec<usize> = seq
            .values()
            .enumerate()
            .filter(|(_, v)| {
                v.as_scalar()
                    .map(|s| {
                        let s = s.as_string();
                        s == PLUGIN || s == LEGACY_PLUGIN
                    })
                    .unwrap_or(false)
            })
            .map(|(i, _)| i)
            .collect();
        if idx.is_empty() {
            return;
        }
        for i in idx.into_iter().rev() {
            seq.remove(i);
        }
        if seq.is_empty() {
            map.remove("plugins");
        }
    }
}

/// Removes [`PLUGIN`] (and [`LEGACY_PLUGIN`]) from `plugins` (and the key when it becomes
/// empty), preserving the rest: format B loads in vanilla transformers, without the plugin.
pub fn without_plugin(text: &str) -> Result<String> {
    let (doc, map) = edit_document(text)?;
    remove_plugins(&map);
    Ok(doc.to_string())
}

/// Removes the top-level `key` (comments and the rest preserved); returns the text and the
/// removed value as written, or None when the key was absent.
pub fn without_key(text: &str, key: &str) -> Result<(String, Option<String>)> {
    let (doc, map) = edit_document(text)?;
    let old = map.get(key).map(|v| v.to_string().trim().to_string());
    if old.is_some() {
        map.remove(key);
    }
    Ok((doc.to_string(), old))
}

/// Parses `text` for lossless editing; the document must be a mapping.
fn edit_document(text: &str) -> Result<(yaml_edit::Document, yaml_edit::Mapping)> {
    let bad = |msg: String| Error::Yaml {
        path: PathBuf::from("<axolotl config>"),
        msg,
    };
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let doc = yaml_edit::Document::from_str(text).map_err(|e| bad(e.to_string()))?;
    let map = doc
        .as_mapping()
        .ok_or_else(|| bad("the document must be a mapping".into()))?;
    Ok((doc, map))
}
