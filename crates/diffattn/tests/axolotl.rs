//! The axolotl config: typed reading and the lossless rewrite for the converted model.

use std::path::Path;

use diffattn::axolotl::{converted_config_text, AxolotlConfig, DtypeChoice, PLUGIN};

const INPUT: &str = "\
# Fine-tune of a small Llama.
base_model: HuggingFaceTB/SmolLM2-135M-Instruct  # the source
zeta_last: 1
alpha_after: two   # not alphabetical on purpose

datasets:
  - path: data/train.jsonl
    type: completion
# training
learning_rate: 0.0002
bf16: auto
output_dir: ./out
";

#[test]
fn rewrite_preserves_comments_order_and_unknown_keys() {
    let out = converted_config_text(INPUT, "/models/diff", true).unwrap();
    for line in [
        "# Fine-tune of a small Llama.",
        "# the source",
        "alpha_after: two   # not alphabetical on purpose",
        "# training",
        "learning_rate: 0.0002",
        "  - path: data/train.jsonl",
    ] {
        assert!(out.contains(line), "lost {line:?} in:\n{out}");
    }
    let pos = |k: &str| {
        out.find(k)
            .unwrap_or_else(|| panic!("{k} missing in:\n{out}"))
    };
    assert!(pos("base_model:") < pos("zeta_last:"));
    assert!(pos("zeta_last:") < pos("alpha_after:"));
    assert!(pos("alpha_after:") < pos("datasets:"));
    let cfg = AxolotlConfig::from_str(&out, Path::new("out.yml")).unwrap();
    assert_eq!(cfg.base_model, "/models/diff");
    assert_eq!(
        cfg.value["diff_attention"],
        serde_yaml_ng::Value::Bool(true)
    );
    assert_eq!(cfg.value["plugins"][0].as_str(), Some(PLUGIN));
    assert_eq!(cfg.value["zeta_last"].as_u64(), Some(1));
    assert_eq!(
        cfg.value["datasets"][0]["type"].as_str(),
        Some("completion")
    );
}

#[test]
fn converting_twice_does_not_duplicate_the_plugin() {
    let once = converted_config_text(INPUT, "/models/diff", true).unwrap();
    let twice = converted_config_text(&once, "/models/diff2", true).unwrap();
    assert_eq!(twice.matches(PLUGIN).count(), 1, "{twice}");
    assert_eq!(twice.matches("diff_attention").count(), 1, "{twice}");
    let cfg = AxolotlConfig::from_str(&twice, Path::new("x.yml")).unwrap();
    assert_eq!(cfg.base_model, "/models/diff2");
}

#[test]
fn existing_plugins_list_is_extended() {
    let text =
        "base_model: a/b\nplugins:\n  - axolotl.integrations.liger.LigerPlugin\noutput_dir: o\n";
    let out = converted_config_text(text, "/m", true).unwrap();
    let cfg = AxolotlConfig::from_str(&out, Path::new("x.yml")).unwrap();
    let plugins: Vec<&str> = cfg.value["plugins"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(
        plugins,
        vec!["axolotl.integrations.liger.LigerPlugin", PLUGIN]
    );
}

#[test]
fn without_plugin_no_plugins_key_is_added() {
    let out = converted_config_text(INPUT, "/m", false).unwrap();
    assert!(!out.contains("plugins"));
    assert!(out.contains("diff_attention: true"));
}

#[test]
fn typed_keys_and_dtype_choice() {
    let cfg = AxolotlConfig::from_str(INPUT, Path::new("in.yml")).unwrap();
    assert_eq!(cfg.base_model, "HuggingFaceTB/SmolLM2-135M-Instruct");
    assert_eq!(cfg.output_dir.as_deref(), Some(Path::new("./out")));
    assert_eq!(cfg.dtype, DtypeChoice::Keep);
    let bf = AxolotlConfig::from_str("base_model: x\nbf16: true\nseed: 5\n", Path::new("a.yml"))
        .unwrap();
    assert_eq!(bf.dtype, DtypeChoice::BF16);
    assert_eq!(bf.seed, Some(5));
    let fp = AxolotlConfig::from_str("base_model: x\nfp16: true\n", Path::new("a.yml")).unwrap();
    assert_eq!(fp.dtype, DtypeChoice::F16);
    let both = AxolotlConfig::from_str(
        "base_model: x\nfp16: true\nbf16: true\n",
        Path::new("a.yml"),
    );
    assert!(both.unwrap_err().to_string().contains("bf16 and fp16"));
    let bad = AxolotlConfig::from_str("base_model: x\nseed: -3\n", Path::new("a.yml"))
        .unwrap_err()
        .to_string();
    assert!(
        bad.contains("a.yml") && bad.contains("`seed`") && bad.contains("-3"),
        "{bad}"
    );
}

/// `plugins` that is not a list of names is refused by key (it used to be replaced silently),
/// and a UTF-8 byte order mark is not taken for YAML content.
#[test]
fn plugins_not_a_list_and_byte_order_mark() {
    let p = std::path::Path::new("c.yml");
    for bad in [
        "plugins: notalist\n",
        "plugins:\n  x: 1\n",
        "plugins:\n  - 3\n",
    ] {
        let text = format!("base_model: a/b\noutput_dir: o\n{bad}");
        let err = AxolotlConfig::from_str(&text, p).unwrap_err().to_string();
        assert!(
            err.contains("`plugins`") && err.contains("list of plugin names"),
            "{err}"
        );
    }
    let cfg = AxolotlConfig::from_str("\u{feff}base_model: a/b\noutput_dir: o\n", p).unwrap();
    assert_eq!(cfg.base_model, "a/b");
}

/// Deeply nested flow collections are refused before the parser (whose time grows with the
/// square of the depth) sees them, quoted brackets and comments are not counted, oversized
/// files are refused, and a long value is cut in the message.
#[test]
fn yaml_depth_size_and_long_values_are_bounded() {
    let path = Path::new("deep.yml");
    let deep = format!("base_model: x\nlist: {}\n", "[".repeat(100_000));
    let start = std::time::Instant::now();
    let err = AxolotlConfig::from_str(&deep, path)
        .unwrap_err()
        .to_string();
    assert!(
        start.elapsed().as_secs_f64() < 1.0,
        "took {:?}",
        start.elapsed()
    );
    assert!(
        err.contains("deep.yml") && err.contains("line 2") && err.contains("nested more than 64"),
        "{err}"
    );
    let fine = "base_model: x\nq: \"[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[\"\n# [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[\nl: [[1, 2], {a: [3]}]\n";
    AxolotlConfig::from_str(fine, path).unwrap();
    let big = format!("base_model: x\npad: {}\n", "a".repeat(5 << 20));
    let err = AxolotlConfig::from_str(&big, path).unwrap_err().to_string();
    assert!(err.contains("more than the 4194304"), "{err}");
    let long = format!("base_model: [{}]\n", "y".repeat(100_000));
    let err = AxolotlConfig::from_str(&long, path)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("(100002 characters)") && err.len() < 600,
        "{err}"
    );
    let list = AxolotlConfig::from_str("base_model:\n  - a\n  - b\n", path).unwrap_err();
    assert_eq!(list.to_string().lines().count(), 1, "{list}");
}

#[test]
fn converted_config_trains_elsewhere_and_names_our_plugin_once() {
    let text = "base_model: a/b\noutput_dir: ./conv\nplugins:\n  - axolotl_diff_transformer.plugin.DifferentialTransformerPlugin\n  - axolotl.integrations.liger.LigerPlugin\n";
    let out = converted_config_text(text, "/models/conv", true).unwrap();
    let cfg = AxolotlConfig::from_str(&out, Path::new("x.yml")).unwrap();
    // Training into the converted model's own directory would overwrite it.
    assert_eq!(
        cfg.output_dir.as_deref(),
        Some(Path::new("/models/conv-trained"))
    );
    let plugins: Vec<&str> = cfg.value["plugins"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    // The older plugin's line is replaced by ours (both would register the same types).
    assert_eq!(
        plugins,
        vec!["axolotl.integrations.liger.LigerPlugin", PLUGIN]
    );
    assert_eq!(
        PLUGIN,
        "diff_transformer.axolotl.DifferentialTransformerPlugin"
    );
    let b = diffattn::axolotl::without_plugin(&out).unwrap();
    assert!(!b.contains("DifferentialTransformerPlugin"), "{b}");
    assert!(b.contains("LigerPlugin"));
}

#[test]
fn without_key_removes_one_top_level_key() {
    let text = "base_model: m\n# warm-up\ndiff_attn_warmup_steps: 4  # steps\nlearning_rate: 0.1\n";
    let (out, old) = diffattn::axolotl::without_key(text, "diff_attn_warmup_steps").unwrap();
    assert_eq!(old.as_deref(), Some("4"));
    assert!(!out.contains("diff_attn_warmup_steps"), "{out}");
    assert!(out.contains("learning_rate: 0.1") && out.contains("base_model: m"));
    let (same, none) = diffattn::axolotl::without_key(&out, "diff_attn_warmup_steps").unwrap();
    assert_eq!((same.as_str(), none), (out.as_str(), None));
}

#[test]
fn merge_keys_count_as_given() {
    // axolotl reads configs with PyYAML, which resolves `<<: *anchor`.
    let text = "defaults: &defaults\n  base_model: ./m\n  learning_rate: 0.001\n<<: *defaults\noutput_dir: ./out\n";
    let cfg = AxolotlConfig::from_str(text, Path::new("m.yml")).unwrap();
    assert_eq!(cfg.base_model, "./m");
    assert_eq!(cfg.value["learning_rate"].as_f64(), Some(0.001));
    // An explicit key wins over the merged one, as in PyYAML.
    let text = "d: &d\n  base_model: ./a\n<<: *d\nbase_model: ./b\noutput_dir: o\n";
    assert_eq!(
        AxolotlConfig::from_str(text, Path::new("m.yml"))
            .unwrap()
            .base_model,
        "./b"
    );
}
