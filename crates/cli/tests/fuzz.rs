//! Mutation fuzzing of the file formats the tool reads (proptest, bounded, stable Rust): valid
//! seed files (a tiny checkpoint's model.safetensors and config.json, a word-level
//! tokenizer.json, an axolotl YAML) get 1-8 random byte edits,
//! truncations or insertions, and each mutated file is handed to its reader. Every case must
//! end in `Ok` or a typed error, within a second: a panic, a hang or an abort fails the case
//! (proptest then shrinks it to a minimal input and prints it).
//!
//! Cases per format: `DIFF_TRANSFORMER_FUZZ_CASES` (default 2,000, five formats: 10,000 in all),
//! drawn from a fixed seed (the same cases every run); the count and the time are printed.
//!
//! Found so far, now refused with an error and kept as regression cases in `bad_input.rs`:
//! tokenizer.json with a control character inside a string made the tokenizers library panic;
//! a GGUF tensor whose declared dimensions multiply beyond `usize` overflowed the size check
//! (`tests/fixtures/fuzz/`); a GGUF declaring a count or length far beyond the file made the
//! reader allocate gigabytes (the header is now walked and checked against the file length
//! first).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use diffattn_testutil::{write_word_tokenizer, TinyLlama};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};

/// One edit of a seed file.
#[derive(Debug, Clone)]
enum Edit {
    /// Replace the byte at (position modulo length).
    Set(prop::sample::Index, u8),
    /// Insert a byte.
    Insert(prop::sample::Index, u8),
    /// Cut the file there.
    Truncate(prop::sample::Index),
    /// Overwrite 8 bytes with a little-endian integer (lengths, offsets, counts).
    Word(prop::sample::Index, u64),
}

fn edits() -> impl Strategy<Value = Vec<Edit>> {
    let edit = prop_oneof![
        6 => (any::<prop::sample::Index>(), any::<u8>()).prop_map(|(i, b)| Edit::Set(i, b)),
        2 => (any::<prop::sample::Index>(), any::<u8>()).prop_map(|(i, b)| Edit::Insert(i, b)),
        1 => any::<prop::sample::Index>().prop_map(Edit::Truncate),
        2 => (any::<prop::sample::Index>(), prop_oneof![
                Just(0u64), Just(u64::MAX), Just(1 << 40), Just(u32::MAX as u64), any::<u64>()
            ])
            .prop_map(|(i, w)| Edit::Word(i, w)),
    ];
    prop::collection::vec(edit, 1..8)
}

fn apply(seed: &[u8], edits: &[Edit]) -> Vec<u8> {
    let mut b = seed.to_vec();
    for e in edits {
        if b.is_empty() {
            break;
        }
        match e {
            Edit::Set(i, v) => {
                let at = i.index(b.len());
                b[at] = *v;
            }
            Edit::Insert(i, v) => {
                let at = i.index(b.len());
                b.insert(at, *v);
            }
            Edit::Truncate(i) => {
                let at = i.index(b.len());
                b.truncate(at);
            }
            Edit::Word(i, w) => {
                let at = i.index(b.len());
                let end = (at + 8).min(b.len());
                b[at..end].copy_from_slice(&w.to_le_bytes()[..end - at]);
            }
        }
    }
    b
}

struct Seeds {
    _tmp: tempfile::TempDir,
    model: PathBuf,
}

fn seeds() -> Seeds {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model");
    TinyLlama::default().write(&model, 1).unwrap();
    write_word_tokenizer(&model, 32).unwrap();
    Seeds { _tmp: tmp, model }
}

fn cases() -> u32 {
    std::env::var("DIFF_TRANSFORMER_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000)
}

/// Runs `read` on `cases()` mutations of `seed` written to `file` inside a copy of the model
/// directory; every case must return (Ok or Err) within a second.
fn fuzz(name: &str, seeds: &Seeds, seed_file: &Path, read: &dyn Fn(&Path, &Path) -> bool) {
    let seed = std::fs::read(seed_file).unwrap();
    let work = tempfile::tempdir().unwrap();
    let dir = work.path().join("m");
    std::fs::create_dir(&dir).unwrap();
    for e in std::fs::read_dir(&seeds.model).unwrap().flatten() {
        std::fs::copy(e.path(), dir.join(e.file_name())).unwrap();
    }
    let target = dir.join(seed_file.file_name().unwrap());
    let config = Config {
        cases: cases(),
        failure_persistence: None,
        ..Config::default()
    };
    let rng = proptest::test_runner::TestRng::deterministic_rng(config.rng_algorithm);
    let mut runner = TestRunner::new_with_rng(config, rng);
    let start = Instant::now();
    let counts = std::cell::RefCell::new((0u32, 0u32));
    let result = runner.run(&edits(), |e| {
        let bytes = apply(&seed, &e);
        std::fs::write(&target, &bytes).unwrap();
        let t = Instant::now();
        let fine = read(&target, &dir);
        prop_assert!(
            t.elapsed() < Duration::from_secs(1),
            "{name}: a case took {:?}",
            t.elapsed()
        );
        let mut c = counts.borrow_mut();
        if fine {
            c.0 += 1;
        } else {
            c.1 += 1;
        }
        Ok(())
    });
    let (ok, refused) = *counts.borrow();
    let line = format!(
        "fuzz {name}: {} cases in {:.1} s ({ok} read, {refused} refused with an error)",
        ok + refused,
        start.elapsed().as_secs_f64()
    );
    println!("{line}");
    // For .ci/run, which prints the summary after the tests (test output is captured).
    if let Ok(path) = std::env::var("DIFF_TRANSFORMER_FUZZ_REPORT") {
        use std::io::Write;
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
        {
            let _ = writeln!(f, "{line}");
        }
    }
    if let Err(e) = result {
        panic!("{name}: {e}");
    }
}

#[test]
fn every_reader_survives_mutated_inputs() {
    let s = seeds();
    // safetensors: the header, offsets and data, read as a checkpoint and loaded as a model.
    let loads = |dir: &Path| {
        diffattn::model::Model::load(dir, candle_core::DType::F32, &candle_core::Device::Cpu)
            .is_ok()
    };
    // safetensors: the header, offsets and data, read as a checkpoint and loaded as a model.
    fuzz(
        "model.safetensors",
        &s,
        &s.model.join("model.safetensors"),
        &|_, dir| diffattn::checkpoint::Checkpoint::open(dir).is_ok() && loads(dir),
    );
    fuzz(
        "config.json",
        &s,
        &s.model.join("config.json"),
        &|f, dir| diffattn::config::ModelConfig::from_file(f).is_ok() && loads(dir),
    );
    fuzz(
        "tokenizer.json",
        &s,
        &s.model.join("tokenizer.json"),
        &|_, dir| {
            diffattn::generate::TextCodec::load(dir)
                .and_then(|c| c.encode("the man said"))
                .is_ok()
        },
    );
    // GGUF: the header (counts, lengths, metadata values, tensor infos) and the data, read
    // and imported as a Hugging Face checkpoint.
    let gguf = s.model.parent().unwrap().join("tiny.gguf");
    diffattn_testutil::write_gguf_from_hf(&s.model, &gguf, "llama").unwrap();
    fuzz("GGUF", &s, &gguf, &|f, dir| {
        let out = dir.join("imported");
        let _ = std::fs::remove_dir_all(&out);
        diffattn::gguf::import_gguf(f, &out, diffattn::dtype::DType::F32, true, &|_| {}).is_ok()
    });
    let yaml = s.model.parent().unwrap().join("config.yml");
    std::fs::write(
        &yaml,
        "base_model: ./m\noutput_dir: ./out\ndatasets:\n  - path: data.jsonl\n    type: completion\nlearning_rate: 0.001\nsequence_len: 16\nmax_steps: 1\nplugins:\n  - x\nbf16: auto\ndiff_attn_warmup_steps: 2\n",
    )
    .unwrap();
    fuzz("axolotl YAML", &s, &yaml, &|f, _| {
        diffattn::axolotl::AxolotlConfig::from_file(f)
            .and_then(diffattn::train::TrainConfig::from_axolotl)
            .is_ok()
    });
}
