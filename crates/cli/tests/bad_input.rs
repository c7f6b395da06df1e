//! Every bad-input case of `convert` and `import-gguf` exits non-zero with one clear message
//! naming the file, key or value, and leaves no output directory.

use std::path::{Path, PathBuf};
use std::process::Command;

use diffattn_testutil::{write_gguf_from_hf, write_gguf_with, TinyLlama};

struct Case {
    dir: tempfile::TempDir,
}

impl Case {
    fn new() -> Self {
        Self {
            dir: tempfile::tempdir().unwrap(),
        }
    }
    fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }
    /// A tiny source model in `src/` and a config pointing to it.
    fn with_model(tiny: &TinyLlama) -> Self {
        let c = Self::new();
        tiny.write(&c.path("src"), 1).unwrap();
        c.write_config(&format!(
            "base_model: {}\noutput_dir: {}\n",
            c.path("src").display(),
            c.path("out").display()
        ));
        c
    }
    fn write_config(&self, text: &str) {
        std::fs::write(self.path("config.yml"), text).unwrap();
    }
    fn config(&self) -> String {
        self.path("config.yml").display().to_string()
    }
    /// Runs the binary; asserts failure, that stderr mentions every needle, and that no output
    /// directory (nor a staging sibling) was left.
    fn fails(&self, args: &[&str], needles: &[&str]) -> String {
        let out = Command::new(env!("CARGO_BIN_EXE_diff-transformer"))
            .args(args)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(
            !out.status.success(),
            "{args:?} succeeded; stderr: {stderr}"
        );
        for n in needles {
            assert!(
                stderr.contains(n),
                "{args:?}: stderr lacks {n:?}:\n{stderr}"
            );
        }
        assert_eq!(
            stderr.trim().lines().count(),
            1,
            "one message expected:\n{stderr}"
        );
        assert!(
            !self.path("out").exists(),
            "{args:?} left an output directory"
        );
        let leftovers: Vec<_> = std::fs::read_dir(self.dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
            .filter(|n| n.contains("partial"))
            .collect();
        assert!(leftovers.is_empty(), "staging left behind: {leftovers:?}");
        stderr
    }
}

fn st_file(c: &Case) -> PathBuf {
    c.path("src/model.safetensors")
}

#[test]
fn config_file_missing() {
    let c = Case::new();
    c.fails(&["convert", &c.config()], &["config.yml", "No such file"]);
}

#[test]
fn config_not_yaml() {
    let c = Case::new();
    c.write_config("base_model: [unclosed\noutput_dir: x\n");
    c.fails(&["convert", &c.config()], &["config.yml", "not valid YAML"]);
}

#[test]
fn config_without_base_model() {
    let c = Case::new();
    c.write_config("output_dir: out\n");
    c.fails(&["convert", &c.config()], &["config.yml", "`base_model`"]);
}

#[test]
fn config_without_output_dir() {
    let c = Case::with_model(&TinyLlama::default());
    c.write_config(&format!("base_model: {}\n", c.path("src").display()));
    c.fails(&["convert", &c.config()], &["config.yml", "`output_dir`"]);
}

#[test]
fn base_model_path_missing() {
    let c = Case::new();
    c.write_config("base_model: ./no/such/model\noutput_dir: out\n");
    c.fails(
        &["convert", &c.config()],
        &["`base_model`", "./no/such/model", "does not exist"],
    );
}

#[test]
fn hub_id_absent_offline_names_id_and_cache() {
    let c = Case::new();
    c.write_config(&format!(
        "base_model: org/not-cached\noutput_dir: {}\n",
        c.path("out").display()
    ));
    let out = Command::new(env!("CARGO_BIN_EXE_diff-transformer"))
        .args(["convert", &c.config()])
        .env("HF_HUB_CACHE", c.path("hub"))
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("org/not-cached") && stderr.contains(&c.path("hub").display().to_string()),
        "{stderr}"
    );
}

#[test]
fn model_config_json_missing() {
    let c = Case::with_model(&TinyLlama::default());
    std::fs::remove_file(c.path("src/config.json")).unwrap();
    c.fails(&["convert", &c.config()], &["src/config.json"]);
}

#[test]
fn model_config_json_not_json() {
    let c = Case::with_model(&TinyLlama::default());
    std::fs::write(c.path("src/config.json"), "{ not json").unwrap();
    c.fails(
        &["convert", &c.config()],
        &["src/config.json", "not valid JSON"],
    );
}

/// Valid JSON with a value of the wrong type, or without a required key: the message names
/// the key and the value, and does not call the file invalid JSON.
#[test]
fn model_config_wrong_type_or_missing_key_names_it() {
    for (edit, needles) in [
        (
            ("num_attention_heads", "-4"),
            &["src/config.json", "`num_attention_heads`", "-4"][..],
        ),
        (
            ("num_attention_heads", "\"4\""),
            &["`num_attention_heads`", "\"4\""][..],
        ),
        (("vocab_size", "null"), &["`vocab_size`"][..]),
        // A nested key: the value is found through the path's segments.
        (
            ("architectures", "[3]"),
            &["`architectures[0]`", "value 3:"][..],
        ),
    ] {
        let c = Case::with_model(&TinyLlama::default());
        let path = c.path("src/config.json");
        let mut cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        cfg[edit.0] = serde_json::from_str(edit.1).unwrap();
        std::fs::write(&path, cfg.to_string()).unwrap();
        let err = c.fails(&["convert", &c.config()], needles);
        assert!(!err.contains("not valid JSON"), "{err}");
    }
    let c = Case::with_model(&TinyLlama::default());
    let path = c.path("src/config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    cfg.as_object_mut().unwrap().remove("hidden_size");
    std::fs::write(&path, cfg.to_string()).unwrap();
    c.fails(&["convert", &c.config()], &["`hidden_size`", "missing"]);
}

/// Numbers the forward depends on are checked when config.json is read, by `convert` as by
/// `generate` (they used to run into NaN and print an empty generation, or be written into a
/// converted config that the tool then could not run).
#[test]
fn model_config_numbers_out_of_range() {
    for (key, value, needles) in [
        ("rope_theta", "0", &["`rope_theta`", "positive"][..]),
        ("rms_norm_eps", "-1", &["`rms_norm_eps`", "-1"][..]),
        (
            "max_position_embeddings",
            "-1",
            &["`max_position_embeddings`", "-1"][..],
        ),
        (
            "rope_scaling",
            r#"{"rope_type": "linear", "factor": 0}"#,
            &["`rope_scaling`", "positive numeric `factor`"][..],
        ),
        (
            "rope_scaling",
            r#"{"rope_type": "llama3", "factor": 8.0}"#,
            &["`rope_scaling`", "low_freq_factor"][..],
        ),
        (
            "rope_scaling",
            r#"{"type": "yarn", "factor": 2.0}"#,
            &["`rope_scaling`", "yarn"][..],
        ),
    ] {
        let c = Case::with_model(&TinyLlama::default());
        diffattn_testutil::write_word_tokenizer(&c.path("src"), 32).unwrap();
        let path = c.path("src/config.json");
        let mut cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        cfg[key] = serde_json::from_str(value).unwrap();
        std::fs::write(&path, cfg.to_string()).unwrap();
        c.fails(&["convert", &c.config()], needles);
        let src = c.path("src").display().to_string();
        c.fails(&["generate", "--model", &src, "--prompt", "the"], needles);
    }
}

/// A tokenizer with more tokens than the model's vocabulary: a prompt token the embedding
/// cannot look up is refused naming tokenizer.json and config.json's vocab_size.
#[test]
fn tokenizer_ids_beyond_the_vocabulary() {
    let c = Case::with_model(&TinyLlama::default()); // vocab_size 32
    diffattn_testutil::write_word_tokenizer(&c.path("src"), 64).unwrap();
    let src = c.path("src").display().to_string();
    c.fails(
        &["generate", "--model", &src, "--prompt", "the time said"],
        &["tokenizer.json", "vocab_size 32", "does not belong"],
    );
}

/// A boolean of a differential config that is not a boolean is refused by key, by the
/// forward and by export (it used to be read as the default).
#[test]
fn differential_flag_of_the_wrong_type() {
    let c = Case::with_model(&TinyLlama::default());
    let (ok, err) = cli(&["convert", &c.config()]);
    assert!(ok, "{err}");
    let conv = c.path("out");
    diffattn_testutil::write_word_tokenizer(&conv, 32).unwrap();
    let path = conv.join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    cfg["sublayer_norm"] = serde_json::json!("yes");
    std::fs::write(&path, cfg.to_string()).unwrap();
    let dir = conv.display().to_string();
    for args in [
        vec!["generate", "--model", &dir, "--prompt", "the"],
        vec![
            "export",
            "--to",
            "diffllama",
            &dir,
            "/nonexistent-dt-test/x",
        ],
    ] {
        let (ok, err) = cli(&args);
        assert!(
            !ok && err.contains("`sublayer_norm`") && err.contains("\"yes\""),
            "{args:?}: {err}"
        );
    }
}

#[test]
fn unsupported_architecture() {
    let c = Case::with_model(&TinyLlama::default());
    let text = std::fs::read_to_string(c.path("src/config.json")).unwrap();
    std::fs::write(
        c.path("src/config.json"),
        text.replace("LlamaForCausalLM", "GPT2LMHeadModel"),
    )
    .unwrap();
    c.fails(
        &["convert", &c.config()],
        &["GPT2LMHeadModel", "LlamaForCausalLM", "src/config.json"],
    );
}

#[test]
fn safetensors_truncated() {
    let c = Case::with_model(&TinyLlama::default());
    let bytes = std::fs::read(st_file(&c)).unwrap();
    std::fs::write(st_file(&c), &bytes[..bytes.len() - 100]).unwrap();
    c.fails(
        &["convert", &c.config()],
        &["model.safetensors", "truncated"],
    );
}

#[test]
fn safetensors_header_length_larger_than_file() {
    let c = Case::with_model(&TinyLlama::default());
    let mut bytes = std::fs::read(st_file(&c)).unwrap();
    bytes[..8].copy_from_slice(&(1u64 << 40).to_le_bytes());
    std::fs::write(st_file(&c), &bytes).unwrap();
    c.fails(
        &["convert", &c.config()],
        &[
            "model.safetensors",
            "header length 1099511627776 is larger than the file",
        ],
    );
}

#[test]
fn safetensors_header_not_json() {
    let c = Case::with_model(&TinyLlama::default());
    let mut bytes = std::fs::read(st_file(&c)).unwrap();
    bytes[8] = b'#';
    std::fs::write(st_file(&c), &bytes).unwrap();
    c.fails(
        &["convert", &c.config()],
        &["model.safetensors", "header is not valid JSON"],
    );
}

/// Rewrites src/model.safetensors through `edit` on the (name -> (dtype, shape, bytes)) map.
fn rewrite_tensors(
    c: &Case,
    edit: impl Fn(&mut Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)>),
) {
    let bytes = std::fs::read(st_file(c)).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut v: Vec<_> = st
        .tensors()
        .into_iter()
        .map(|(n, t)| (n, t.dtype(), t.shape().to_vec(), t.data().to_vec()))
        .collect();
    edit(&mut v);
    let views: Vec<_> = v
        .iter()
        .map(|(n, d, s, b)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, &st_file(c)).unwrap();
}

#[test]
fn tensor_missing() {
    let c = Case::with_model(&TinyLlama::default());
    rewrite_tensors(&c, |v| {
        v.retain(|(n, ..)| n != "model.layers.1.self_attn.k_proj.weight")
    });
    c.fails(
        &["convert", &c.config()],
        &["tensor `model.layers.1.self_attn.k_proj.weight` is missing"],
    );
}

#[test]
fn tensor_shape_differs_from_config() {
    let c = Case::with_model(&TinyLlama::default());
    let text = std::fs::read_to_string(c.path("src/config.json")).unwrap();
    std::fs::write(
        c.path("src/config.json"),
        text.replace("\"num_key_value_heads\": 2", "\"num_key_value_heads\": 4"),
    )
    .unwrap();
    c.fails(
        &["convert", &c.config()],
        &["k_proj.weight", "[8, 16]", "[16, 16]"],
    );
}

#[test]
fn tensor_of_unsupported_dtype() {
    let c = Case::with_model(&TinyLlama::default());
    rewrite_tensors(&c, |v| {
        for t in v.iter_mut().filter(|t| t.0 == "model.norm.weight") {
            t.1 = safetensors::Dtype::I32;
        }
    });
    c.fails(
        &["convert", &c.config()],
        &["model.norm.weight", "unsupported dtype I32"],
    );
}

#[test]
fn split_heads_with_odd_heads_names_both_counts() {
    let c = Case::with_model(&TinyLlama {
        hidden_size: 24,
        num_attention_heads: 6,
        num_key_value_heads: 3,
        ..Default::default()
    });
    c.fails(
        &["convert", &c.config(), "--split-heads"],
        &["num_attention_heads = 6", "num_key_value_heads = 3"],
    );
}

#[test]
fn zero_init_with_split_heads() {
    let c = Case::with_model(&TinyLlama::default());
    c.fails(
        &["convert", &c.config(), "--zero-init", "--split-heads"],
        &["--zero-init", "--split-heads"],
    );
}

#[test]
fn zero_init_with_mirror_weights() {
    let c = Case::with_model(&TinyLlama::default());
    c.fails(
        &["convert", &c.config(), "--zero-init", "--mirror-weights"],
        &["--zero-init", "--mirror-weights"],
    );
}

#[test]
fn mirror_weights_with_split_heads() {
    let c = Case::with_model(&TinyLlama::default());
    c.fails(
        &["convert", &c.config(), "--mirror-weights", "--split-heads"],
        &["--mirror-weights", "--split-heads"],
    );
}

#[test]
fn output_dir_not_empty_without_overwrite() {
    let c = Case::with_model(&TinyLlama::default());
    std::fs::create_dir(c.path("out")).unwrap();
    std::fs::write(c.path("out/keep.txt"), "precious").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_diff-transformer"))
        .args(["convert", &c.config()])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("is not empty") && stderr.contains("--overwrite"),
        "{stderr}"
    );
    assert_eq!(
        std::fs::read_to_string(c.path("out/keep.txt")).unwrap(),
        "precious"
    );
    // --overwrite does not delete a file this tool did not write: it is named instead.
    let (ok, err) = cli(&["convert", &c.config(), "--overwrite"]);
    assert!(!ok && err.contains("1 other entry (keep.txt)"), "{err}");
    assert_eq!(
        std::fs::read_to_string(c.path("out/keep.txt")).unwrap(),
        "precious"
    );
    // Moved away, the directory is replaced by a complete checkpoint.
    std::fs::remove_file(c.path("out/keep.txt")).unwrap();
    let (ok, err) = cli(&["convert", &c.config(), "--overwrite"]);
    assert!(ok, "{err}");
    assert!(c.path("out/model.safetensors").is_file());
}

#[test]
fn output_dir_not_writable() {
    let c = Case::with_model(&TinyLlama::default());
    std::fs::write(c.path("a-file"), "x").unwrap();
    let target = c.path("a-file/out");
    c.fails(
        &[
            "convert",
            &c.config(),
            "--output-dir",
            &target.display().to_string(),
        ],
        &["a-file/out", "not writable"],
    );
}

#[test]
fn output_dir_inside_source_is_refused() {
    let c = Case::with_model(&TinyLlama::default());
    let target = c.path("src/converted");
    c.fails(
        &[
            "convert",
            &c.config(),
            "--output-dir",
            &target.display().to_string(),
        ],
        &["inside", "src"],
    );
    assert!(!target.exists());
}

/// The source's weights are a symlink into the output directory (the Hugging Face cache links
/// its files the same way): `--overwrite` must not replace what the link points to.
#[cfg(unix)]
#[test]
fn overwrite_never_replaces_a_file_an_input_links_to() {
    let c = Case::with_model(&TinyLlama::default());
    std::fs::create_dir(c.path("out")).unwrap();
    std::fs::rename(st_file(&c), c.path("out/model.safetensors")).unwrap();
    std::os::unix::fs::symlink(c.path("out/model.safetensors"), st_file(&c)).unwrap();
    let before = std::fs::read(st_file(&c)).unwrap();
    let (ok, err) = cli(&["convert", &c.config(), "--overwrite"]);
    assert!(
        !ok && err.contains("overlap") && err.contains("model.safetensors"),
        "{err}"
    );
    assert_eq!(
        before,
        std::fs::read(st_file(&c)).unwrap(),
        "source weights kept"
    );
}

/// A shard index naming a file outside the checkpoint's directory is refused by name.
#[test]
fn shard_index_path_leaving_the_directory() {
    let c = Case::with_model(&TinyLlama::default());
    std::fs::create_dir(c.path("elsewhere")).unwrap();
    std::fs::rename(st_file(&c), c.path("elsewhere/model.safetensors")).unwrap();
    std::fs::write(
        c.path("src/model.safetensors.index.json"),
        r#"{"weight_map": {"model.embed_tokens.weight": "../elsewhere/model.safetensors"}}"#,
    )
    .unwrap();
    c.fails(
        &["convert", &c.config()],
        &[
            "model.safetensors.index.json",
            "weight_map.model.embed_tokens.weight",
            "../elsewhere/model.safetensors",
        ],
    );
}

#[test]
fn input_is_never_modified() {
    let c = Case::with_model(&TinyLlama::default());
    let before = std::fs::read(st_file(&c)).unwrap();
    let cfg_before = std::fs::read(c.path("config.yml")).unwrap();
    let ok = Command::new(env!("CARGO_BIN_EXE_diff-transformer"))
        .args(["convert", &c.config()])
        .output()
        .unwrap();
    assert!(ok.status.success());
    assert_eq!(before, std::fs::read(st_file(&c)).unwrap());
    assert_eq!(cfg_before, std::fs::read(c.path("config.yml")).unwrap());
}

fn gguf_case(arch: &str) -> Case {
    let c = Case::new();
    TinyLlama::default().write(&c.path("hf"), 2).unwrap();
    write_gguf_from_hf(&c.path("hf"), &c.path("m.gguf"), arch).unwrap();
    c
}

#[test]
fn gguf_truncated() {
    let c = gguf_case("llama");
    let bytes = std::fs::read(c.path("m.gguf")).unwrap();
    std::fs::write(c.path("m.gguf"), &bytes[..bytes.len() - 64]).unwrap();
    let out = c.path("out").display().to_string();
    c.fails(
        &["import-gguf", &c.path("m.gguf").display().to_string(), &out],
        &["m.gguf", "truncated"],
    );
}

#[test]
fn gguf_header_cut() {
    let c = gguf_case("llama");
    let bytes = std::fs::read(c.path("m.gguf")).unwrap();
    std::fs::write(c.path("m.gguf"), &bytes[..100]).unwrap();
    let out = c.path("out").display().to_string();
    c.fails(
        &["import-gguf", &c.path("m.gguf").display().to_string(), &out],
        &["m.gguf", "not a readable GGUF file"],
    );
}

/// `general.alignment = 0` makes candle's reader divide by zero: one error line, and no
/// panic message before it.
#[test]
fn gguf_alignment_zero() {
    let c = Case::new();
    TinyLlama::default().write(&c.path("hf"), 2).unwrap();
    diffattn_testutil::write_gguf_with(
        &c.path("hf"),
        &c.path("m.gguf"),
        "llama",
        &[("general.alignment", 0)],
    )
    .unwrap();
    let out = c.path("out").display().to_string();
    let stderr = c.fails(
        &["import-gguf", &c.path("m.gguf").display().to_string(), &out],
        &["m.gguf", "not a readable GGUF file"],
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn gguf_unsupported_architecture() {
    let c = gguf_case("mamba");
    let out = c.path("out").display().to_string();
    c.fails(
        &["import-gguf", &c.path("m.gguf").display().to_string(), &out],
        &[
            "m.gguf",
            "unsupported general.architecture \"mamba\"",
            "llama",
        ],
    );
}

#[test]
fn convert_writes_the_axolotl_config_next_to_the_model() {
    let c = Case::with_model(&TinyLlama::default());
    c.write_config(&format!(
        "# my run\nbase_model: {}  # source\nlearning_rate: 0.001\noutput_dir: {}\n",
        c.path("src").display(),
        c.path("out").display()
    ));
    let ok = Command::new(env!("CARGO_BIN_EXE_diff-transformer"))
        .args(["convert", &c.config(), "--debug"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&ok.stdout);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(
        stdout.contains("layout: double heads")
            && stdout.contains("KV-cache bytes per token: 128 -> 192"),
        "{stdout}"
    );
    assert!(stdout.contains("layer   1"), "{stdout}");
    assert!(stdout.contains("generation comparison skipped"), "{stdout}");
    let yml = std::fs::read_to_string(c.path("out/axolotl_config.yml")).unwrap();
    assert!(yml.starts_with("# my run\n"), "{yml}");
    assert!(
        yml.contains(&format!("base_model: {}", c.path("out").display())),
        "{yml}"
    );
    assert!(yml.contains("learning_rate: 0.001"));
    assert!(yml.contains("diff_attention: true"));
    assert!(yml.contains(diffattn::axolotl::PLUGIN));
    assert!(Path::new(&c.path("out/config.json")).is_file());
}

fn edit_config(c: &Case, from: &str, to: &str) {
    let text = std::fs::read_to_string(c.path("src/config.json")).unwrap();
    assert!(text.contains(from), "{from} not in config");
    std::fs::write(c.path("src/config.json"), text.replace(from, to)).unwrap();
}

#[test]
fn intermediate_size_differs_from_the_mlp_tensors() {
    let c = Case::with_model(&TinyLlama::default());
    edit_config(&c, "\"intermediate_size\": 24", "\"intermediate_size\": 20");
    c.fails(
        &["convert", &c.config()],
        &["mlp.down_proj.weight", "[16, 24]", "[16, 20]"],
    );
}

#[test]
fn config_declares_fewer_layers_than_the_weights() {
    let c = Case::with_model(&TinyLlama::default());
    edit_config(&c, "\"num_hidden_layers\": 2", "\"num_hidden_layers\": 1");
    c.fails(
        &["convert", &c.config()],
        &["belongs to layer 1", "num_hidden_layers = 1"],
    );
}

/// An absurd layer count is refused at once against the layers the weights hold (it used to
/// build a list of 10^15 expected tensors, or abort on an allocation in `generate`).
#[test]
fn config_declares_more_layers_than_the_weights() {
    let c = Case::with_model(&TinyLlama::default());
    diffattn_testutil::write_word_tokenizer(&c.path("src"), 32).unwrap();
    edit_config(
        &c,
        "\"num_hidden_layers\": 2",
        "\"num_hidden_layers\": 1000000000000000",
    );
    let needles = [
        "config.json",
        "`num_hidden_layers`",
        "1000000000000000",
        "2 decoder layers",
    ];
    c.fails(&["convert", &c.config()], &needles);
    let src = c.path("src").display().to_string();
    c.fails(&["generate", "--model", &src, "--prompt", "the"], &needles);
}

/// `tie_word_embeddings: false` without `lm_head.weight`: refused by name, not read as tied
/// (transformers would give the missing head random values).
#[test]
fn untied_config_without_lm_head() {
    let c = Case::with_model(&TinyLlama {
        tie_word_embeddings: true,
        ..TinyLlama::default()
    });
    diffattn_testutil::write_word_tokenizer(&c.path("src"), 32).unwrap();
    edit_config(
        &c,
        "\"tie_word_embeddings\": true",
        "\"tie_word_embeddings\": false",
    );
    let needles = ["lm_head.weight", "tie_word_embeddings: false"];
    c.fails(&["convert", &c.config()], &needles);
    let src = c.path("src").display().to_string();
    c.fails(&["generate", "--model", &src, "--prompt", "the"], &needles);
}

#[test]
fn zero_layers_and_unsupported_activation_are_refused() {
    let c = Case::with_model(&TinyLlama::default());
    edit_config(&c, "\"num_hidden_layers\": 2", "\"num_hidden_layers\": 0");
    c.fails(
        &["convert", &c.config()],
        &["`num_hidden_layers`", "must be positive"],
    );
    let c = Case::with_model(&TinyLlama::default());
    edit_config(&c, "\"hidden_act\": \"silu\"", "\"hidden_act\": \"gelu\"");
    c.fails(&["convert", &c.config()], &["`hidden_act`", "gelu"]);
}

#[test]
fn attention_bias_declared_but_absent() {
    let c = Case::with_model(&TinyLlama::default());
    edit_config(&c, "\"attention_bias\": false", "\"attention_bias\": true");
    c.fails(
        &["convert", &c.config()],
        &["self_attn.k_proj.bias` is missing"],
    );
}

#[test]
fn gguf_metadata_inconsistent_with_tensors() {
    for (key, value, needle) in [
        ("llama.block_count", 1u32, "does not fit the metadata"),
        ("llama.block_count", 3, "no tensor for"),
        ("llama.attention.head_count", 0, "num_attention_heads"),
        ("llama.feed_forward_length", 20, "has shape"),
    ] {
        let c = Case::new();
        TinyLlama::default().write(&c.path("hf"), 2).unwrap();
        write_gguf_with(&c.path("hf"), &c.path("m.gguf"), "llama", &[(key, value)]).unwrap();
        let out = c.path("out").display().to_string();
        c.fails(
            &["import-gguf", &c.path("m.gguf").display().to_string(), &out],
            &["m.gguf", needle],
        );
    }
}

#[test]
fn killed_runs_leave_no_lasting_staging_directories() {
    let c = Case::with_model(&TinyLlama::default());
    // A staging directory of a process that no longer exists (pid far above pid_max).
    let stale = c.path(".out.partial-4999999");
    std::fs::create_dir(&stale).unwrap();
    std::fs::write(stale.join("model.safetensors"), "half").unwrap();
    let ok = Command::new(env!("CARGO_BIN_EXE_diff-transformer"))
        .args(["convert", &c.config()])
        .output()
        .unwrap();
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(!stale.exists(), "stale staging directory not swept");
}

/// A tiny model with a tokenizer in `src/`, a dataset `data.jsonl` and a training config
/// (`extra` appended).
fn train_case(extra: &str) -> Case {
    let c = Case::new();
    TinyLlama::default().write(&c.path("src"), 1).unwrap();
    diffattn_testutil::write_word_tokenizer(&c.path("src"), 32).unwrap();
    std::fs::write(
        c.path("data.jsonl"),
        "{\"text\": \"the man said that the day was long\"}\n{\"text\": \"we know the way back\"}\n",
    )
    .unwrap();
    c.write_config(&format!(
        "base_model: {}\noutput_dir: {}\ndatasets:\n  - path: {}\n    type: completion\nlearning_rate: 0.001\nsequence_len: 16\nmax_steps: 1\n{extra}",
        c.path("src").display(),
        c.path("out").display(),
        c.path("data.jsonl").display()
    ));
    c
}

#[test]
fn train_missing_dataset_file() {
    let c = train_case("");
    std::fs::remove_file(c.path("data.jsonl")).unwrap();
    c.fails(
        &["train", &c.config()],
        &["data.jsonl", "no such local file"],
    );
}

#[test]
fn train_dataset_line_not_json() {
    let c = train_case("");
    std::fs::write(
        c.path("data.jsonl"),
        "{\"text\": \"ok\"}\n{\"text\": oops}\n",
    )
    .unwrap();
    c.fails(
        &["train", &c.config()],
        &["data.jsonl", "line 2", "not valid JSON"],
    );
}

#[test]
fn train_dataset_field_missing() {
    let c = train_case("");
    std::fs::write(c.path("data.jsonl"), "{\"content\": \"the day\"}\n").unwrap();
    c.fails(
        &["train", &c.config()],
        &["data.jsonl", "line 1", "field `text`"],
    );
}

#[test]
fn train_output_dir_is_the_model() {
    let c = train_case("");
    let text = std::fs::read_to_string(c.path("config.yml"))
        .unwrap()
        .replace(
            &format!("output_dir: {}", c.path("out").display()),
            &format!("output_dir: {}", c.path("src").display()),
        );
    c.write_config(&text);
    c.fails(
        &["train", &c.config()],
        &["`output_dir`", "overlaps the model being trained"],
    );
}

#[test]
fn train_refuses_adapter_and_8bit() {
    let c = train_case("adapter: lora\n");
    c.fails(
        &["train", &c.config()],
        &["config.yml", "`adapter`", "lora", "not supported"],
    );
    let c = train_case("load_in_8bit: true\n");
    c.fails(
        &["train", &c.config()],
        &["`load_in_8bit`", "not supported"],
    );
}

#[test]
fn train_sequence_len_beyond_context() {
    let c = train_case("");
    let text = std::fs::read_to_string(c.path("config.yml"))
        .unwrap()
        .replace("sequence_len: 16", "sequence_len: 100000");
    c.write_config(&text);
    c.fails(
        &["train", &c.config()],
        &["`sequence_len`", "100000", "max_position_embeddings"],
    );
}

#[test]
fn train_resume_from_missing_checkpoint() {
    let c = train_case("resume_from_checkpoint: /nonexistent/checkpoint-3\n");
    c.fails(
        &["train", &c.config()],
        &["`resume_from_checkpoint`", "/nonexistent/checkpoint-3"],
    );
}

#[test]
fn train_output_dir_not_empty() {
    let c = train_case("");
    std::fs::create_dir(c.path("prev")).unwrap();
    std::fs::write(c.path("prev/keep.txt"), "x").unwrap();
    let text = std::fs::read_to_string(c.path("config.yml"))
        .unwrap()
        .replace(
            &format!("output_dir: {}", c.path("out").display()),
            &format!("output_dir: {}", c.path("prev").display()),
        );
    c.write_config(&text);
    c.fails(
        &["train", &c.config()],
        &["`output_dir`", "not empty", "--overwrite"],
    );
    assert!(
        c.path("prev/keep.txt").is_file(),
        "the previous run is kept"
    );
}

#[test]
fn evaluate_without_validation_split() {
    let c = train_case("");
    c.fails(
        &["evaluate", &c.config()],
        &["`val_set_size`", "validation set", "test_datasets"],
    );
}

/// `evaluate --json` never replaces an input (the model's config.json here) nor, without
/// `--overwrite`, an existing file; with it, the file is replaced.
#[test]
fn evaluate_json_never_replaces_an_input_or_an_existing_file() {
    let c = train_case("val_set_size: 1\n");
    let src = c.path("src");
    let cfg_json = src.join("config.json");
    let before = std::fs::read(&cfg_json).unwrap();
    let config = c.config();
    for model in [None, Some(src.to_str().unwrap())] {
        let mut args = vec!["evaluate", &config];
        args.extend(model.map(|m| ["--model", m]).into_iter().flatten());
        let target = cfg_json.display().to_string();
        args.extend(["--json", &target, "--overwrite"]);
        let (ok, err) = cli(&args);
        assert!(
            !ok && err.contains("overlap") && err.contains("src"),
            "{err}"
        );
        assert_eq!(before, std::fs::read(&cfg_json).unwrap());
    }
    let out = c.path("metrics.json");
    std::fs::write(&out, "keep").unwrap();
    let target = out.display().to_string();
    let (ok, err) = cli(&["evaluate", &c.config(), "--json", &target]);
    assert!(
        !ok && err.contains("exists") && err.contains("--overwrite"),
        "{err}"
    );
    assert_eq!(std::fs::read_to_string(&out).unwrap(), "keep");
    let (ok, err) = cli(&["evaluate", &c.config(), "--json", &target, "--overwrite"]);
    assert!(ok, "{err}");
    let m: serde_json::Value = serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap();
    assert!(m["eval_loss"].as_f64().unwrap().is_finite(), "{m}");
}

/// `evaluate` reads the data keys only: a config without the training keys `learning_rate`
/// and `output_dir` evaluates.
#[test]
fn evaluate_without_training_keys() {
    let c = train_case("val_set_size: 1\n");
    let text: String = std::fs::read_to_string(c.path("config.yml"))
        .unwrap()
        .lines()
        .filter(|l| !l.starts_with("learning_rate:") && !l.starts_with("output_dir:"))
        .map(|l| format!("{l}\n"))
        .collect();
    c.write_config(&text);
    let (ok, err) = cli(&["evaluate", &c.config()]);
    assert!(ok, "{err}");
    let (ok, err) = cli(&["train", &c.config()]);
    assert!(
        !ok && err.contains("`learning_rate`"),
        "train still needs it: {err}"
    );
}

/// `compare --save-logits` refuses a directory inside either model and a non-empty directory
/// (without `--overwrite`), before running anything.
#[test]
fn compare_save_logits_refuses_inputs_and_non_empty_directories() {
    let c = Case::with_model(&TinyLlama::default());
    diffattn_testutil::write_word_tokenizer(&c.path("src"), 32).unwrap();
    let src = c.path("src").display().to_string();
    let inside = c.path("src/logits").display().to_string();
    let (ok, err) = cli(&["compare", &src, &src, "--save-logits", &inside]);
    assert!(!ok && err.contains("overlap"), "{err}");
    assert!(!c.path("src/logits").exists());
    std::fs::create_dir(c.path("logits")).unwrap();
    std::fs::write(c.path("logits/keep.txt"), "keep").unwrap();
    let dir = c.path("logits").display().to_string();
    let (ok, err) = cli(&["compare", &src, &src, "--save-logits", &dir]);
    assert!(
        !ok && err.contains("not empty") && err.contains("--overwrite"),
        "{err}"
    );
    assert!(c.path("logits/keep.txt").is_file());
    // --overwrite names the file it would not delete ...
    let (ok, err) = cli(&["compare", &src, &src, "--save-logits", &dir, "--overwrite"]);
    assert!(!ok && err.contains("(keep.txt)"), "{err}");
    assert!(c.path("logits/keep.txt").is_file());
    // ... and replaces a directory of saved logits.
    std::fs::remove_file(c.path("logits/keep.txt")).unwrap();
    for _ in 0..2 {
        let (ok, err) = cli(&["compare", &src, &src, "--save-logits", &dir, "--overwrite"]);
        assert!(ok, "{err}");
    }
    assert!(c.path("logits/manifest.json").is_file());
}

#[test]
fn plot_without_metrics() {
    let c = Case::new();
    std::fs::create_dir(c.path("run")).unwrap();
    c.fails(
        &["plot", c.path("run").to_str().unwrap()],
        &["metrics.jsonl"],
    );
}

fn cli(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_diff-transformer"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

/// Runs a 1-step training into `out` (the case's config); returns nothing, asserts success.
fn train_ok(c: &Case) {
    let (ok, err) = cli(&["train", &c.config()]);
    assert!(ok, "{err}");
}

#[test]
fn train_overwrite_never_deletes_an_input() {
    let c = train_case("");
    // The dataset lives inside output_dir.
    std::fs::create_dir(c.path("out")).unwrap();
    std::fs::rename(c.path("data.jsonl"), c.path("out/data.jsonl")).unwrap();
    let text = std::fs::read_to_string(c.path("config.yml"))
        .unwrap()
        .replace(
            &c.path("data.jsonl").display().to_string(),
            &c.path("out/data.jsonl").display().to_string(),
        );
    c.write_config(&text);
    let (ok, err) = cli(&["train", &c.config(), "--overwrite"]);
    assert!(
        !ok && err.contains("`output_dir`") && err.contains("--overwrite would delete it"),
        "{err}"
    );
    assert!(c.path("out/data.jsonl").is_file(), "the dataset is kept");
}

/// The base model's weights link into output_dir: `--overwrite` would delete them.
#[cfg(unix)]
#[test]
fn train_overwrite_never_deletes_a_file_the_model_links_to() {
    let c = train_case("");
    let model = c.path("src/model.safetensors");
    std::fs::create_dir(c.path("out")).unwrap();
    std::fs::rename(&model, c.path("out/model.safetensors")).unwrap();
    std::os::unix::fs::symlink(c.path("out/model.safetensors"), &model).unwrap();
    let before = std::fs::read(&model).unwrap();
    let (ok, err) = cli(&["train", &c.config(), "--overwrite"]);
    assert!(!ok && err.contains("--overwrite would delete it"), "{err}");
    assert_eq!(before, std::fs::read(&model).unwrap(), "base weights kept");
}

#[test]
fn train_resume_refuses_foreign_or_in_place_output() {
    let c = train_case("save_steps: 1\n");
    train_ok(&c);
    let ck = c.path("out/checkpoint-1");
    assert!(ck.join("trainer_state.json").is_file());
    // Another finished run's directory is not overwritten by a resume.
    std::fs::create_dir(c.path("other")).unwrap();
    std::fs::write(c.path("other/model.safetensors"), "precious").unwrap();
    let base = std::fs::read_to_string(c.path("config.yml")).unwrap();
    for (out, needle) in [
        (
            c.path("other"),
            "does not hold the checkpoint being resumed",
        ),
        (ck.clone(), "checkpoint being resumed"),
    ] {
        let text = base.replace(
            &format!("output_dir: {}", c.path("out").display()),
            &format!(
                "output_dir: {}\nresume_from_checkpoint: {}",
                out.display(),
                ck.display()
            ),
        );
        c.write_config(&text);
        let (ok, err) = cli(&["train", &c.config()]);
        assert!(
            !ok && err.contains("`output_dir`") && err.contains(needle),
            "{err}"
        );
    }
    assert_eq!(
        std::fs::read_to_string(c.path("other/model.safetensors")).unwrap(),
        "precious"
    );
    let st: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(ck.join("trainer_state.json")).unwrap())
            .unwrap();
    assert_eq!(st["global_step"], 1, "the checkpoint is untouched");
}

#[test]
fn train_divergence_is_an_error_not_a_saved_model() {
    let c = train_case("max_grad_norm: 0\n");
    let text = std::fs::read_to_string(c.path("config.yml"))
        .unwrap()
        .replace("learning_rate: 0.001", "learning_rate: 1.0e39");
    c.write_config(&text);
    let (ok, err) = cli(&["train", &c.config()]);
    assert!(
        !ok && err.contains("non-finite") && err.contains("learning_rate"),
        "{err}"
    );
    assert!(!c.path("out/config.json").exists(), "no final model saved");
}

#[test]
fn train_absurd_step_count_and_inconsistent_batch() {
    let c = train_case("");
    let text = std::fs::read_to_string(c.path("config.yml"))
        .unwrap()
        .replace("max_steps: 1\n", "num_epochs: 1.0e30\n");
    c.write_config(&text);
    c.fails(
        &["train", &c.config()],
        &["`num_epochs`", "optimizer steps"],
    );
    let c = train_case("gradient_accumulation_steps: 2\nbatch_size: 7\n");
    c.fails(
        &["train", &c.config()],
        &["`batch_size`", "7", "micro_batch_size"],
    );
    let c = train_case("special_tokens:\n  eos_token: 5\n");
    c.fails(
        &["train", &c.config()],
        &["`special_tokens.eos_token`", "5"],
    );
}

#[test]
fn plot_refuses_to_overwrite_a_non_png() {
    let c = train_case("");
    train_ok(&c);
    let target = c.path("out/model.safetensors");
    let before = std::fs::read(&target).unwrap();
    let (ok, err) = cli(&[
        "plot",
        c.path("out").to_str().unwrap(),
        "-o",
        target.to_str().unwrap(),
    ]);
    assert!(!ok && err.contains(".png"), "{err}");
    assert_eq!(std::fs::read(&target).unwrap(), before);
    let png = c.path("out/p.png");
    let (ok, err) = cli(&[
        "plot",
        c.path("out").to_str().unwrap(),
        "-o",
        png.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    // Re-plotting over our own PNG is fine.
    let (ok, err) = cli(&[
        "plot",
        c.path("out").to_str().unwrap(),
        "-o",
        png.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
}

/// `diff-transformer ... | head`: the reader closes the pipe early; the command ends without a
/// panic message (it used to print "failed printing to stdout: Broken pipe" and a backtrace).
#[cfg(unix)]
#[test]
fn closed_stdout_ends_quietly() {
    use std::os::unix::process::ExitStatusExt;
    use std::process::Stdio;
    let c = Case::with_model(&TinyLlama::default());
    let mut child = Command::new(env!("CARGO_BIN_EXE_diff-transformer"))
        .args(["convert", &c.config()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take()); // the reader is gone before anything is written
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stderr.contains("panicked") && !stderr.contains("Broken pipe"),
        "{stderr}"
    );
    assert!(
        out.status.success() || out.status.signal() == Some(13),
        "{:?}: {stderr}",
        out.status
    );
}

/// `--sublayer-norm --no-sublayer-norm` together is refused (the last one used to win
/// silently).
#[test]
fn sublayer_norm_flags_conflict() {
    let c = Case::with_model(&TinyLlama::default());
    let out = Command::new(env!("CARGO_BIN_EXE_diff-transformer"))
        .args([
            "convert",
            &c.config(),
            "--sublayer-norm",
            "--no-sublayer-norm",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("--sublayer-norm") && stderr.contains("cannot be used with"),
        "{stderr}"
    );
    assert!(!c.path("out").exists());
}

/// A tokenizer.json that does not load is refused by convert, naming it (it used to be copied
/// and to fail only later, in generate).
#[test]
fn garbage_tokenizer_is_refused_by_convert() {
    let c = Case::with_model(&TinyLlama::default());
    std::fs::write(c.path("src/tokenizer.json"), "{\"model\": 42}").unwrap();
    c.fails(
        &["convert", &c.config()],
        &["tokenizer.json", "not a tokenizer"],
    );
}

fn cli_limited(limit: &str, args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_diff-transformer"))
        .env("DIFF_TRANSFORMER_MEMORY_LIMIT", limit)
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

/// Under a memory limit below a command's estimate every command that loads a model refuses
/// with one line giving both figures (and what would need less) before it loads anything;
/// above it, the same commands run.
#[test]
fn commands_refuse_to_start_beyond_the_memory_limit() {
    let c = train_case("val_set_size: 1\n");
    let src = c.path("src").display().to_string();
    let cfg = c.config();
    let cases: Vec<Vec<&str>> = vec![
        vec!["generate", "--model", &src, "--prompt", "the man"],
        vec!["compare", &src, &src, "--prompt", "the man"],
        vec![
            "bench",
            "--model",
            &src,
            "--prefill-tokens",
            "8",
            "--decode-tokens",
            "4",
        ],
        vec!["evaluate", &cfg],
        vec!["train", &cfg],
    ];
    for args in &cases {
        let (ok, err) = cli_limited("50M", args);
        assert!(!ok, "{args:?} ran under 50M");
        assert_eq!(
            err.trim().lines().count(),
            1,
            "{args:?}: one line expected:\n{err}"
        );
        assert!(
            err.contains(&format!("{} needs about", args[0]))
                && err.contains(
                    "more than the 52 MB this process may use (DIFF_TRANSFORMER_MEMORY_LIMIT=50M)"
                ),
            "{args:?}: {err}"
        );
    }
    assert!(
        !c.path("out").exists(),
        "a refused train left its output_dir"
    );
    // The cause is named: weights copied into another dtype.
    let (ok, err) = cli_limited(
        "50M",
        &[
            "generate", "--model", &src, "--prompt", "the", "--dtype", "bf16",
        ],
    );
    assert!(
        !ok && err.contains("--dtype f32 reads the weights in place"),
        "{err}"
    );
    for args in &cases {
        let (ok, err) = cli_limited("4G", args);
        assert!(ok, "{args:?} refused under 4G: {err}");
    }
    let (ok, err) = cli_limited("lots", &cases[0]);
    assert!(
        !ok && err.contains("DIFF_TRANSFORMER_MEMORY_LIMIT=\"lots\"") && err.contains("1.5G"),
        "{err}"
    );
}

/// A run holds the lock of its output_dir (`.out.lock` beside it, with the holder's PID): a
/// second writer into it while the first is writing, even with --overwrite, is refused with one
/// line naming the holder and deletes nothing. The "first run" here is this test holding the lock.
#[test]
fn a_second_run_into_a_busy_output_dir_is_refused() {
    let c = train_case("");
    train_ok(&c);
    let before = std::fs::read(c.path("out/model.safetensors")).unwrap();
    let held = diffattn::output::OutputLock::acquire(&c.path("out")).unwrap();
    let holder = format!("process {} holds its lock", std::process::id());
    let (ok, err) = cli(&["train", &c.config(), "--overwrite"]);
    assert!(!ok, "the second run was not refused");
    assert!(
        err.contains("another run is writing into this directory")
            && err.contains(&holder)
            && err.trim().lines().count() == 1,
        "{err}"
    );
    assert_eq!(
        std::fs::read(c.path("out/model.safetensors")).unwrap(),
        before
    );
    drop(held);
    assert!(
        !c.path(".out.lock").exists(),
        "the lock file outlived its lock"
    );
    // Released (the run ended), the directory is replaced as asked.
    let (ok, err) = cli(&["train", &c.config(), "--overwrite"]);
    assert!(ok, "{err}");
    assert!(!c.path(".out.lock").exists());
}

/// convert, export and import-gguf take the same lock: a second writer fails at once naming
/// the holder's PID, writes nothing, and the output is written once the lock is released.
#[test]
fn convert_and_export_refuse_an_output_another_process_writes() {
    let c = Case::with_model(&TinyLlama::default());
    let held = diffattn::output::OutputLock::acquire(&c.path("out")).unwrap();
    let pid = std::process::id().to_string();
    c.fails(
        &["convert", &c.config()],
        &["another run is writing into this directory", &pid],
    );
    drop(held);
    let (ok, err) = cli(&["convert", &c.config()]);
    assert!(ok, "{err}");
    let held = diffattn::output::OutputLock::acquire(&c.path("b")).unwrap();
    let b = c.path("b").display().to_string();
    let src = c.path("out").display().to_string();
    let (ok, err) = cli(&["export", "--to", "diffllama", &src, &b]);
    assert!(!ok && err.contains(&pid) && !c.path("b").exists(), "{err}");
    drop(held);
    let names: Vec<String> = std::fs::read_dir(c.dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".lock"))
        .collect();
    assert!(names.is_empty(), "lock files left: {names:?}");
}

/// `train --overwrite` moves the previous run aside and removes it only once the new run has
/// completed: killed before, the previous run is still whole, and the next run restores or
/// names it; completed, nothing is left beside output_dir.
#[test]
fn train_overwrite_keeps_the_previous_run_until_the_new_one_completes() {
    let c = train_case("");
    let (mut child, previous, old) = start_replacing_run(&c);
    let text = std::fs::read_to_string(c.path("config.yml")).unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(
        std::fs::read(old.join("model.safetensors")).unwrap(),
        previous,
        "the previous run was not kept whole"
    );
    // The next run names both (one line of warning) and refuses the non-empty output_dir.
    let (ok, err) = cli(&["train", &c.config()]);
    assert!(
        !ok && err.contains(".out.old-") && err.contains("is not empty"),
        "{err}"
    );
    assert!(old.is_dir());
    // With the interrupted run's directory removed by the user, the previous run comes back.
    std::fs::remove_dir_all(c.path("out")).unwrap();
    let (_, err) = cli(&[
        "evaluate",
        &c.config(),
        "--model",
        c.path("missing").to_str().unwrap(),
    ]);
    let _ = err;
    let text = text.replace("max_steps: 100000", "max_steps: 1");
    c.write_config(&text);
    let (ok, err) = cli(&["train", &c.config()]);
    assert!(!ok && err.contains("restored"), "{err}");
    assert_eq!(
        std::fs::read(c.path("out/model.safetensors")).unwrap(),
        previous
    );
    // A completed --overwrite leaves nothing beside output_dir.
    train_ok_overwrite(&c);
    let left: Vec<_> = std::fs::read_dir(c.dir.path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".out."))
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

fn train_ok_overwrite(c: &Case) {
    let (ok, err) = cli(&["train", &c.config(), "--overwrite"]);
    assert!(ok, "{err}");
}

/// SIGINT or SIGTERM during a run: the command stops at its next step with one line and exit
/// status 128 + the signal, leaves no staging directory, and — having saved no checkpoint —
/// removes what it wrote and puts back the run `--overwrite` was replacing.
#[test]
fn a_signal_stops_a_run_cleanly() {
    for (signal, code) in [(libc::SIGINT, 130), (libc::SIGTERM, 143)] {
        let c = train_case("");
        let (child, previous, old) = start_replacing_run(&c);
        // SAFETY: sends a signal to our own child.
        unsafe { libc::kill(child.id() as i32, signal) };
        let out = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(code), "{err}");
        assert!(
            err.contains(&format!("interrupted by signal {signal}")),
            "{err}"
        );
        assert_eq!(
            std::fs::read(c.path("out/model.safetensors")).unwrap(),
            previous,
            "the replaced run was not put back"
        );
        assert!(
            !old.exists(),
            "the previous run was left aside in {}",
            old.display()
        );
        let staging: Vec<_> = std::fs::read_dir(c.path("out"))
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains(".partial-"))
            .collect();
        assert!(staging.is_empty(), "{staging:?}");
    }
}

/// After a completed 1-step run into `out`, starts a long `train --overwrite` of the same
/// config and waits until it has moved the previous run aside and begun writing; returns the
/// child, the previous run's model bytes and where it was moved.
fn start_replacing_run(c: &Case) -> (std::process::Child, Vec<u8>, PathBuf) {
    train_ok(c);
    let previous = std::fs::read(c.path("out/model.safetensors")).unwrap();
    let text = std::fs::read_to_string(c.path("config.yml"))
        .unwrap()
        .replace("max_steps: 1", "max_steps: 100000\nlogging_steps: 1");
    c.write_config(&text);
    let child = Command::new(env!("CARGO_BIN_EXE_diff-transformer"))
        .args(["train", &c.config(), "--overwrite"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let old = c.path(&format!(".out.old-{}", child.id()));
    let start = std::time::Instant::now();
    while !(old.is_dir() && c.path("out/metrics.jsonl").is_file()) {
        assert!(start.elapsed().as_secs() < 60, "the run never started");
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    (child, previous, old)
}

/// Found by the fuzz harness: a control character inside a JSON string of tokenizer.json made
/// the tokenizers library panic while reading its decoder; now one error naming the file.
#[test]
fn tokenizer_json_that_made_the_library_panic_is_refused() {
    let c = Case::with_model(&TinyLlama::default());
    diffattn_testutil::write_word_tokenizer(&c.path("src"), 32).unwrap();
    let path = c.path("src/tokenizer.json");
    let text = std::fs::read_to_string(&path).unwrap();
    let at = text.find("\"decoder\"").expect("a decoder entry");
    let broken = format!(
        "{}\"decoder\": {{\"type\": \"Word\u{1}Piece\"}},{}",
        &text[..at],
        &text[at..].split_once(',').map(|(_, r)| r).unwrap_or("")
    );
    std::fs::write(&path, broken).unwrap();
    let src = c.path("src").display().to_string();
    let (ok, err) = cli(&["generate", "--model", &src, "--prompt", "the"]);
    assert!(
        !ok && err.contains("tokenizer.json") && err.trim().lines().count() == 1,
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
}

/// Found by the fuzz harness (tests/fixtures/fuzz): GGUF tensors whose declared dimensions
/// multiply beyond `usize` overflowed the size check (a panic in debug builds, a wrapped size
/// in release); now one error naming the tensor and its shape.
#[test]
fn gguf_regression_cases_from_the_fuzz_harness_are_refused() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/fuzz");
    for (name, needle) in [
        ("gguf-dims-overflow-1.gguf", "declares shape"),
        ("gguf-dims-overflow-2.gguf", "declares shape"),
        // 3.5 million layers declared: listing their tensors took gigabytes and minutes.
        (
            "gguf-block-count-huge.gguf",
            "llama.block_count = 3538946, but the file holds tensors of 2 layers",
        ),
    ] {
        let c = Case::new();
        let gguf = dir.join(name).display().to_string();
        let out = c.path("out").display().to_string();
        let (ok, err) = cli(&["import-gguf", &gguf, &out]);
        assert!(
            !ok && err.contains(needle) && err.trim().lines().count() == 1,
            "{name}: {err}"
        );
        assert!(!c.path("out").exists());
    }
}

/// A GGUF header whose declared counts or lengths exceed the file is refused before anything
/// is allocated, naming what was declared where.
#[test]
fn gguf_declared_sizes_beyond_the_file_are_refused() {
    let c = gguf_case("llama");
    let path = c.path("m.gguf");
    let bytes = std::fs::read(&path).unwrap();
    let out = c.path("out").display().to_string();
    let gguf = path.display().to_string();
    // The tensor count (bytes 8..16) and the first key's length (bytes 24..32).
    for (at, what) in [(8usize, "tensors and"), (24, "metadata entry 0")] {
        let mut b = bytes.clone();
        b[at..at + 8].copy_from_slice(&(1u64 << 40).to_le_bytes());
        std::fs::write(&path, &b).unwrap();
        let (ok, err) = cli(&["import-gguf", &gguf, &out]);
        assert!(
            !ok && err.contains("beyond the end of the file") && err.contains(what),
            "{what}: {err}"
        );
    }
}

/// The training console explains its lambda figure: what it is a mean of and when it was
/// measured.
#[test]
fn training_console_explains_the_lambda_figure() {
    let c = train_case("");
    let conv = c.path("conv").display().to_string();
    let out = Command::new(env!("CARGO_BIN_EXE_diff-transformer"))
        .args(["convert", &c.config(), "--output-dir", &conv])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(c.path("config.yml"))
        .unwrap()
        .replace(&c.path("src").display().to_string(), &conv)
        .replace(
            "max_steps: 1",
            "max_steps: 2\nlogging_steps: 1\ndiff_attn_log_every: 1",
        );
    c.write_config(&text);
    let out = Command::new(env!("CARGO_BIN_EXE_diff-transformer"))
        .args(["train", &c.config()])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("lambda_full")
            && stdout.contains("mean over all layers, times the warm-up mix; measured at step 2"),
        "{stdout}"
    );
}

/// `--overwrite` replaces only a directory of this tool's own files: one that also holds a
/// user's files (a note, a sub-directory) is refused with the entries named, and nothing is
/// deleted; this tool's own outputs (a conversion, a training run with checkpoints) are replaced.
#[test]
fn overwrite_refuses_to_delete_files_this_tool_did_not_write() {
    let c = Case::with_model(&TinyLlama::default());
    let (ok, err) = cli(&["convert", &c.config()]);
    assert!(ok, "{err}");
    // A conversion written over itself: all its files are ours.
    let (ok, err) = cli(&["convert", &c.config(), "--overwrite"]);
    assert!(ok, "{err}");
    std::fs::write(c.path("out/thesis.txt"), "my thesis").unwrap();
    std::fs::create_dir(c.path("out/sub")).unwrap();
    std::fs::write(c.path("out/sub/notes.md"), "notes").unwrap();
    let (ok, err) = cli(&["convert", &c.config(), "--overwrite"]);
    assert!(!ok, "the directory with foreign files was replaced");
    assert!(
        err.contains("--overwrite replaces only what this tool writes")
            && err.contains("2 other entries (sub/, thesis.txt)")
            && err.trim().lines().count() == 1,
        "{err}"
    );
    assert_eq!(
        std::fs::read_to_string(c.path("out/thesis.txt")).unwrap(),
        "my thesis"
    );
    assert!(c.path("out/sub/notes.md").is_file() && c.path("out/model.safetensors").is_file());
    // train --overwrite follows the same rule, checkpoints included.
    let t = train_case("save_steps: 1\n");
    train_ok(&t);
    assert!(t.path("out/checkpoint-1").is_dir());
    let (ok, err) = cli(&["train", &t.config(), "--overwrite"]);
    assert!(ok, "a run of ours was not replaced: {err}");
    std::fs::write(t.path("out/checkpoint-1/mine.txt"), "x").unwrap();
    let (ok, err) = cli(&["train", &t.config(), "--overwrite"]);
    assert!(
        !ok && err.contains("1 other entry (checkpoint-1/mine.txt)"),
        "{err}"
    );
    assert!(t.path("out/checkpoint-1/mine.txt").is_file());
}

/// `resume_from_checkpoint: true` continues the checkpoint written last, not the highest step:
/// after a run (checkpoints 2, 4, 6) and a second run resumed from checkpoint-2 with another
/// learning rate (checkpoint-3), it continues checkpoint-3 and says why; a changed setting on
/// resume is reported with both values.
#[test]
fn resume_continues_the_run_that_wrote_last_and_reports_changed_settings() {
    let c = train_case("save_steps: 2\n");
    let text = std::fs::read_to_string(c.path("config.yml"))
        .unwrap()
        .replace("max_steps: 1", "max_steps: 6");
    c.write_config(&text);
    train_ok(&c);
    assert!(c.path("out/checkpoint-6/trainer_state.json").is_file());
    let run = |text: String| {
        c.write_config(&text);
        let out = Command::new(env!("CARGO_BIN_EXE_diff-transformer"))
            .args(["train", &c.config()])
            .output()
            .unwrap();
        let all = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "{all}");
        all
    };
    // Stopped after its checkpoint-3 (as if killed): max_steps 3.
    let branch = text
        .replace("learning_rate: 0.001", "learning_rate: 0.002")
        .replace("save_steps: 2", "save_steps: 1")
        .replace("max_steps: 6", "max_steps: 3")
        + &format!(
            "resume_from_checkpoint: {}\n",
            c.path("out/checkpoint-2").display()
        );
    let out = run(branch);
    assert!(
        out.contains("resuming with changed settings: learning_rate 0.001 -> 0.002"),
        "{out}"
    );
    assert!(c.path("out/checkpoint-3/trainer_state.json").is_file());
    let out =
        run(text.replace("save_steps: 2", "save_steps: 1") + "resume_from_checkpoint: true\n");
    assert!(
        out.contains("continues checkpoint-3, the checkpoint written last")
            && out
                .contains("checkpoint-6 has a higher step but was written before, by another run"),
        "{out}"
    );
    assert!(out.contains("checkpoint-3 at step 3"), "{out}");
    assert!(
        out.contains("learning_rate 0.002 -> 0.001"),
        "the change back was not reported: {out}"
    );
}

/// A base_model that is a symbolic link loop, or a link to nothing, is named as such (not
/// "does not exist" / "Not a directory").
#[cfg(unix)]
#[test]
fn symlink_loops_and_dangling_links_are_named() {
    let c = Case::new();
    std::os::unix::fs::symlink(c.path("loop"), c.path("loop")).unwrap();
    std::os::unix::fs::symlink(c.path("nowhere"), c.path("dangling")).unwrap();
    for (name, needle) in [
        ("loop", "a symbolic link loop"),
        ("dangling", "a symbolic link that cannot be followed"),
    ] {
        c.write_config(&format!(
            "base_model: {}\noutput_dir: {}\n",
            c.path(name).display(),
            c.path("out").display()
        ));
        c.fails(&["convert", &c.config()], &["base_model", needle]);
    }
}

/// A fresh run stopped before its first checkpoint leaves no output_dir behind (its metrics
/// resume nothing and would block the next run); one that saved a checkpoint keeps it.
#[cfg(unix)]
#[test]
fn an_interrupted_run_without_checkpoints_leaves_nothing() {
    for save in ["", "save_steps: 1\n"] {
        let c = train_case(save);
        let text = std::fs::read_to_string(c.path("config.yml"))
            .unwrap()
            .replace("max_steps: 1", "max_steps: 100000\nlogging_steps: 1");
        c.write_config(&text);
        let child = Command::new(env!("CARGO_BIN_EXE_diff-transformer"))
            .args(["train", &c.config()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let start = std::time::Instant::now();
        let ready = if save.is_empty() {
            "out/metrics.jsonl"
        } else {
            "out/checkpoint-1/trainer_state.json"
        };
        while !c.path(ready).is_file() {
            assert!(start.elapsed().as_secs() < 60, "the run never started");
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        // SAFETY: sends a signal to our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
        let out = child.wait_with_output().unwrap();
        assert_eq!(out.status.code(), Some(130));
        if save.is_empty() {
            assert!(
                !c.path("out").exists(),
                "an interrupted run without checkpoints left its output_dir"
            );
            // The same command runs again without --overwrite.
            let text = text.replace("max_steps: 100000", "max_steps: 1");
            c.write_config(&text);
            train_ok(&c);
        } else {
            assert!(
                c.path("out/checkpoint-1/trainer_state.json").is_file(),
                "the checkpoint was lost"
            );
        }
    }
}

/// Rewrites the header of the safetensors file `path` with `edit` (data untouched).
fn edit_safetensors_header(path: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    edit(&mut header);
    let text = serde_json::to_vec(&header).unwrap();
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend(text);
    out.extend(&bytes[8 + n..]);
    std::fs::write(path, out).unwrap();
}

/// A safetensors header whose tensor entry is wrong, or a file cut short, is reported naming
/// the tensor and what is wrong (the library said "invalid shape, data type, or offset for
/// tensor" or "incomplete metadata"); a truncated optimizer.safetensors on resume says so.
#[test]
fn safetensors_errors_name_the_tensor() {
    let c = Case::with_model(&TinyLlama::default());
    edit_safetensors_header(&st_file(&c), |h| {
        h["model.norm.weight"]["shape"] = serde_json::json!([3]);
    });
    c.fails(
        &["convert", &c.config()],
        &[
            "model.safetensors",
            "tensor `model.norm.weight`",
            "shape [3] of F32 needs 12 bytes",
        ],
    );
    let c = Case::with_model(&TinyLlama::default());
    let bytes = std::fs::read(st_file(&c)).unwrap();
    std::fs::write(st_file(&c), &bytes[..bytes.len() - 10]).unwrap();
    let err = c.fails(
        &["convert", &c.config()],
        &["model.safetensors", "truncated"],
    );
    assert!(err.contains("tensor `"), "{err}");
    // The optimizer state of a checkpoint being resumed.
    let t = train_case("save_steps: 1\n");
    train_ok(&t);
    let opt = t.path("out/checkpoint-1/optimizer.safetensors");
    let bytes = std::fs::read(&opt).unwrap();
    std::fs::write(&opt, &bytes[..bytes.len() / 2]).unwrap();
    let text =
        std::fs::read_to_string(t.path("config.yml")).unwrap() + "resume_from_checkpoint: true\n";
    t.write_config(&text);
    let (ok, err) = cli(&["train", &t.config()]);
    assert!(
        !ok && err.contains("optimizer.safetensors") && err.contains("truncated"),
        "{err}"
    );
}

/// A tensor name listed twice in a safetensors header is reported as such, naming it (the
/// library blamed the next tensor's offsets).
#[test]
fn safetensors_duplicate_tensor_name_is_named() {
    let c = Case::with_model(&TinyLlama::default());
    let path = st_file(&c);
    let bytes = std::fs::read(&path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header = std::str::from_utf8(&bytes[8..8 + n]).unwrap().to_string();
    // The entry of model.norm.weight written a second time at the end of the object.
    let h: serde_json::Value = serde_json::from_str(&header).unwrap();
    let entry = h["model.norm.weight"].to_string();
    let text = format!(
        "{},\"model.norm.weight\":{entry}}}",
        header.trim_end().strip_suffix('}').unwrap()
    );
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend(text.as_bytes());
    out.extend(&bytes[8 + n..]);
    std::fs::write(&path, out).unwrap();
    c.fails(
        &["convert", &c.config()],
        &[
            "model.safetensors",
            "tensor `model.norm.weight` is listed twice",
        ],
    );
}

/// A GGUF token list that its merges do not fit (a merge producing a token the list lacks) is
/// reported naming the file and the metadata keys (the tokenizers library said only "Token Ġa
/// out of vocabulary").
#[test]
fn gguf_broken_token_list_names_the_file_and_keys() {
    let c = gguf_case("llama");
    let mut bytes = std::fs::read(c.path("m.gguf")).unwrap();
    // The token "Ġa" (a GGUF string: u64 length 3, then its bytes) becomes "Ġz".
    let mut pat = 3u64.to_le_bytes().to_vec();
    pat.extend("Ġa".as_bytes());
    let at = bytes
        .windows(pat.len())
        .position(|w| w == pat.as_slice())
        .expect("the token list holds Ġa");
    bytes[at + pat.len() - 1] = b'z';
    std::fs::write(c.path("m.gguf"), &bytes).unwrap();
    let out = c.path("out").display().to_string();
    let err = c.fails(
        &["import-gguf", &c.path("m.gguf").display().to_string(), &out],
        &["m.gguf", "tokenizer.ggml.tokens", "does not build"],
    );
    assert!(!c.path("out").exists(), "{err}");
}

/// An output path that is not valid UTF-8 is refused before anything is written: the
/// axolotl_config.yml written into it would name another path (U+FFFD for its bytes).
#[cfg(unix)]
#[test]
fn a_non_utf8_output_dir_is_refused() {
    use std::os::unix::ffi::OsStrExt;
    let c = Case::with_model(&TinyLlama::default());
    let name = std::ffi::OsStr::from_bytes(b"out-\xff");
    let out = c.path("x").with_file_name(name);
    let res = Command::new(env!("CARGO_BIN_EXE_diff-transformer"))
        .arg("convert")
        .arg(c.config())
        .arg("--output-dir")
        .arg(&out)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&res.stderr);
    assert!(!res.status.success(), "{stderr}");
    assert!(stderr.contains("not valid UTF-8"), "{stderr}");
    assert!(!out.exists());
}

/// `--variant v2 --format diffllama` names the real reason (it used to blame a
/// `--no-sublayer-norm` the user never gave); nothing is written.
#[test]
fn v2_with_format_diffllama_names_the_reason() {
    let c = Case::with_model(&TinyLlama::default());
    let stderr = c.fails(
        &[
            "convert",
            &c.config(),
            "--variant",
            "v2",
            "--format",
            "diffllama",
        ],
        &["--variant v2", "cannot express V2"],
    );
    assert!(!stderr.contains("--no-sublayer-norm"), "{stderr}");
    assert!(!c.path("out").exists());
}
