//! The Python modeling every differential checkpoint carries as transformers remote code.
//!
//! `convert`, `export` (to `llama-differential`) and `train` write the two files of the
//! `diff_transformer` Python package (`python/diff_transformer/`) next to config.json and an
//! `auto_map` naming their classes, so that
//! `AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)` reads the checkpoint with
//! the semantics of docs/formats.md without anything installed. Format B (`diffllama`) and
//! source models are transformers' own classes: they get no remote code, and an `auto_map` of
//! ours is removed from them.

use std::path::Path;

use serde_json::{json, Map, Value};

use crate::error::{IoContext, Result};

/// File names, as in the Python package and in every checkpoint.
pub const CONFIGURATION_FILE: &str = "configuration_diff_transformer.py";
pub const MODELING_FILE: &str = "modeling_diff_transformer.py";

const CONFIGURATION: &str =
    include_str!("../../../python/diff_transformer/configuration_diff_transformer.py");
const MODELING: &str =
    include_str!("../../../python/diff_transformer/modeling_diff_transformer.py");

/// (config class, model class) of a `model_type` the Python modeling reads.
pub fn classes(model_type: &str) -> Option<(&'static str, &'static str)> {
    Some(match model_type {
        "llama-differential" => ("LlamaDifferentialConfig", "LlamaDifferentialForCausalLM"),
        "mistral-differential" => (
            "MistralDifferentialConfig",
            "MistralDifferentialForCausalLM",
        ),
        "qwen2-differential" => ("Qwen2DifferentialConfig", "Qwen2DifferentialForCausalLM"),
        "qwen3-differential" => ("Qwen3DifferentialConfig", "Qwen3DifferentialForCausalLM"),
        "gemma3_text-differential" => (
            "Gemma3TextDifferentialConfig",
            "Gemma3TextDifferentialForCausalLM",
        ),
        _ => return None,
    })
}

/// Whether an `auto_map` entry points into our files.
fn is_ours(v: &Value) -> bool {
    v.as_str().is_some_and(|s| {
        s.starts_with("configuration_diff_transformer.")
            || s.starts_with("modeling_diff_transformer.")
    })
}

/// Sets (or removes) `auto_map` in a config.json about to be written, by its `model_type`:
/// ours gets `AutoConfig` and `AutoModelForCausalLM`; any other loses the entries that point to
/// our files (an `auto_map` of someone else's is kept). Returns whether the checkpoint needs
/// the remote-code files.
pub fn set_auto_map(config: &mut Map<String, Value>) -> bool {
    let model_type = config
        .get("model_type")
        .and_then(Value::as_str)
        .unwrap_or("");
    match classes(model_type) {
        Some((cfg, model)) => {
            config.insert(
                "auto_map".into(),
                json!({
                    "AutoConfig": format!("configuration_diff_transformer.{cfg}"),
                    "AutoModelForCausalLM": format!("modeling_diff_transformer.{model}"),
                }),
            );
            true
        }
        None => {
            if let Some(Value::Object(m)) = config.get_mut("auto_map") {
                m.retain(|_, v| !is_ours(v));
                if m.is_empty() {
                    config.remove("auto_map");
                }
            }
            false
        }
    }
}

/// Writes the two remote-code files into `dir`; returns their names.
pub fn write_files(dir: &Path) -> Result<Vec<String>> {
    for (name, text) in [
        (CONFIGURATION_FILE, CONFIGURATION),
        (MODELING_FILE, MODELING),
    ] {
        let p = dir.join(name);
        std::fs::write(&p, text).at(&p)?;
    }
    Ok(vec![CONFIGURATION_FILE.into(), MODELING_FILE.into()])
}

/// [`set_auto_map`] on `config`, then the files into `dir` when needed; returns the files written.
pub fn attach(dir: &Path, config: &mut Map<String, Value>) -> Result<Vec<String>> {
    if set_auto_map(config) {
        write_files(dir)
    } else {
        Ok(Vec::new())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_map_follows_the_model_type() {
        let mut c = Map::new();
        c.insert("model_type".into(), json!("qwen3-differential"));
        assert!(set_auto_map(&mut c));
        assert_eq!(
            c["auto_map"]["AutoModelForCausalLM"],
            json!("modeling_diff_transformer.Qwen3DifferentialForCausalLM")
        );
        // Exported to diffllama: our entries go, someone else's stay.
        c.insert("model_type".into(), json!("diffllama"));
        c["auto_map"]["AutoTokenizer"] = json!("tokenization_x.XTokenizer");
        assert!(!set_auto_map(&mut c));
        assert_eq!(
            c["auto_map"],
            json!({"AutoTokenizer": "tokenization_x.XTokenizer"})
        );
        c["auto_map"] =
            json!({"AutoConfig": "configuration_diff_transformer.LlamaDifferentialConfig"});
        set_auto_map(&mut c);
        assert!(!c.contains_key("auto_map"));
    }

    #[test]
    fn every_class_is_defined_in_the_python_files() {
        for t in [
            "llama-differential",
            "mistral-differential",
            "qwen2-differential",
            "qwen3-differential",
            "gemma3_text-differential",
        ] {
            let (cfg, model) = classes(t).unwrap();
            assert!(CONFIGURATION.contains(&format!("class {cfg}(")), "{cfg}");
            assert!(
                MODELING.contains(&format!("{model} = _model_class(")),
                "{model}"
            );
            assert!(
                CONFIGURATION.contains(&format!("model_type = \"{t}\"")),
                "{t}"
            );
        }
    }
}
