//! `base_model` given as a Hugging Face repo id resolves through a local hub cache
//! (`models--ORG--NAME/refs/main` + `snapshots/REV/`), with no network.

use std::process::Command;

use diffattn_testutil::TinyLlama;

#[test]
fn repo_id_resolves_from_the_local_cache_offline() {
    let tmp = tempfile::tempdir().unwrap();
    let hub = tmp.path().join("hub");
    let repo = hub.join("models--tiny-org--tiny-llama");
    let snapshot = repo.join("snapshots").join("0123abcd");
    TinyLlama::default().write(&snapshot, 4).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs").join("main"), "0123abcd").unwrap();
    let out = tmp.path().join("out");
    let cfg = tmp.path().join("c.yml");
    std::fs::write(
        &cfg,
        format!(
            "base_model: tiny-org/tiny-llama\noutput_dir: {}\n",
            out.display()
        ),
    )
    .unwrap();
    for (var, value) in [
        ("HF_HUB_CACHE", hub.clone()),
        ("HF_HOME", tmp.path().to_path_buf()),
    ] {
        let _ = std::fs::remove_dir_all(&out);
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_diff-transformer"));
        cmd.args(["convert", cfg.to_str().unwrap()])
            .env_remove("HF_HUB_CACHE")
            .env_remove("HF_HOME")
            .env("HF_HUB_OFFLINE", "1");
        if var == "HF_HOME" {
            // HF_HOME/hub is the cache.
            cmd.env("HF_HOME", &value);
        } else {
            cmd.env(var, &value);
        }
        let res = cmd.output().unwrap();
        assert!(
            res.status.success(),
            "{var}: {}",
            String::from_utf8_lossy(&res.stderr)
        );
        let stdout = String::from_utf8_lossy(&res.stdout);
        assert!(stdout.contains("snapshots/0123abcd"), "{stdout}");
        assert!(out.join("model.safetensors").is_file());
    }
}
