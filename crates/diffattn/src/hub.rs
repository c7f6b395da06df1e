//! Resolving `base_model` to a local directory: a path, or a Hugging Face repo id looked up in
//! the local hub cache (`HF_HUB_CACHE`, else `HF_HOME/hub`, else `~/.cache/huggingface/hub`,
//! the layout `models--ORG--NAME/snapshots/REV/`), downloaded with `hf-hub` only when the cache
//! lacks it and `HF_HUB_OFFLINE` is not set.

use std::path::{Path, PathBuf};

use crate::checkpoint::{INDEX_FILE, SINGLE_FILE};
use crate::error::{Error, Result};

/// The hub cache directory, following huggingface_hub's environment variables.
pub fn cache_dir() -> PathBuf {
    if let Some(p) = std::env::var_os("HF_HUB_CACHE").filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    if let Some(p) = std::env::var_os("HF_HOME").filter(|p| !p.is_empty()) {
        return PathBuf::from(p).join("hub");
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_default();
    home.join(".cache").join("huggingface").join("hub")
}

fn offline() -> bool {
    matches!(
        std::env::var("HF_HUB_OFFLINE")
            .as_deref()
            .map(str::to_ascii_lowercase)
            .as_deref(),
        Ok("1" | "true" | "yes" | "on")
    )
}

/// Whether a `base_model` string is meant as a filesystem path rather than a repo id.
fn looks_like_path(s: &str) -> bool {
    s.starts_with('/')
        || s.starts_with('.')
        || s.starts_with('~')
        || s.ends_with('/')
        || s.matches('/').count() > 1
        || s.contains('\\')
}

/// `~/rest` as `$HOME/rest` (as a shell and axolotl's Python would read it); any other path
/// unchanged.
pub fn expand_home(path: &str) -> PathBuf {
    match path.strip_prefix("~/") {
        Some(rest) => std::env::var_os("HOME")
            .map(|h| PathBuf::from(h).join(rest))
            .unwrap_or_else(|| PathBuf::from(path)),
        None => PathBuf::from(path),
    }
}

/// Resolves a model reference to a directory holding config.json (and weights when
/// `need_weights`). `key` and `config_path` name the YAML key and file in errors.
pub fn resolve_model(
    reference: &str,
    need_weights: bool,
    key: &str,
    config_path: &Path,
) -> Result<PathBuf> {
    let expanded = expand_home(reference);
    if expanded.is_dir() {
        return Ok(expanded);
    }
    if looks_like_path(reference) || expanded.exists() {
        return Err(Error::InvalidValue {
            path: config_path.to_path_buf(),
            key: key.into(),
            value: reference.into(),
            reason: match std::fs::metadata(&expanded) {
                Ok(_) => "this is not a directory (give the model's directory)".into(),
                // The link itself exists but cannot be followed.
                Err(e) if std::fs::symlink_metadata(&expanded).is_ok() => {
                    if e.raw_os_error() == Some(40) {
                        "a symbolic link loop (the link leads back to itself)".into()
                    } else {
                        format!("a symbolic link that cannot be followed ({e})")
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    "this directory does not exist".into()
                }
                Err(e) => format!("cannot be read: {e}"),
            },
        });
    }
    let cache_path = cache_dir();
    let cache = hf_hub::Cache::new(cache_path.clone());
    let repo = cache.model(reference.to_string());
    if let Some(config) = repo.get("config.json") {
        let dir = config.parent().expect("a file has a parent").to_path_buf();
        if !need_weights || dir.join(SINGLE_FILE).is_file() || dir.join(INDEX_FILE).is_file() {
            return Ok(dir);
        }
    }
    if offline() {
        return Err(Error::ModelNotFound {
            id: reference.into(),
            cache: cache_path,
            detail: " and HF_HUB_OFFLINE is set, so nothing is downloaded".into(),
        });
    }
    download(reference, need_weights, &cache_path).map_err(|detail| Error::ModelNotFound {
        id: reference.into(),
        cache: cache_path.clone(),
        detail: format!("; download failed: {detail}"),
    })
}

/// Downloads config, weights and tokenizer files of `id` into the cache.
fn download(
    id: &str,
    need_weights: bool,
    cache_path: &Path,
) -> std::result::Result<PathBuf, String> {
    let api =
        hf_hub::api::sync::ApiBuilder::from_cache(hf_hub::Cache::new(cache_path.to_path_buf()))
            .with_progress(false)
            .build()
            .map_err(|e| e.to_string())?;
    let repo = api.model(id.to_string());
    let config = repo.get("config.json").map_err(|e| e.to_string())?;
    let dir = config.parent().expect("a file has a parent").to_path_buf();
    if need_weights {
        match repo.get(INDEX_FILE) {
            Ok(index) => {
                let text = std::fs::read_to_string(&index).map_err(|e| e.to_string())?;
                let value: serde_json::Value =
                    serde_json::from_str(&text).map_err(|e| e.to_string())?;
                let mut files: Vec<&str> = value["weight_map"]
                    .as_object()
                    .map(|m| m.values().filter_map(|v| v.as_str()).collect())
                    .unwrap_or_default();
                files.sort_unstable();
                files.dedup();
                for f in files {
                    repo.get(f).map_err(|e| e.to_string())?;
                }
            }
            Err(_) => {
                repo.get(SINGLE_FILE).map_err(|e| e.to_string())?;
            }
        }
    }
    for f in crate::convert::TOKENIZER_FILES
        .iter()
        .chain(["generation_config.json"].iter())
    {
        let _ = repo.get(f);
    }
    Ok(dir)
}
