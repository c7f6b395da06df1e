//! Training on the tiny fixture models: warm-up persistence, resume, monitoring values,
//! TensorBoard file, accumulation, format B, refusals, the zero-init warning and the plot.

use std::cell::RefCell;
use std::path::{Path, PathBuf};

mod common;

use candle_core::{DType, Device};
use common::tiny as fixture;
use diffattn::axolotl::AxolotlConfig;
use diffattn::model::Model;
use diffattn::train::{self, Event, TrainConfig, TrainOptions};
use serde_json::Value;

const TEXTS: [&str; 12] = [
    "the man said that the world was good and the day was long",
    "we know the way back to the state and the people there",
    "it is time to work on what we made in the first two years",
    "they could see the little man at the back of the state",
    "what can we do now that the day is over and the work is done",
    "people should know how much good work was made by them",
    "there was one day when all the men were out of work",
    "the first life of the world was very long and good",
    "my own work must be well made and each day is new",
    "if they may see it then we could make it over there",
    "after the day the people went back to their own state",
    "any man can see that the way is long but good",
];

/// A tmp dir with the fixture model (plus a word tokenizer) and both dataset types.
struct Setup {
    _tmp: tempfile::TempDir,
    root: PathBuf,
    model: PathBuf,
}

fn setup(case: &str) -> Setup {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().to_path_buf();
    let model = root.join("model");
    std::fs::create_dir(&model).unwrap();
    for e in std::fs::read_dir(fixture(case)).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), model.join(e.file_name())).unwrap();
    }
    diffattn_testutil::write_word_tokenizer(&model, 64).unwrap();
    let mut completion = String::new();
    for t in TEXTS {
        completion.push_str(&serde_json::json!({ "text": t }).to_string());
        completion.push('\n');
    }
    std::fs::write(root.join("text.jsonl"), completion).unwrap();
    let alpaca: Vec<Value> = TEXTS
        .iter()
        .take(6)
        .map(|t| serde_json::json!({"instruction": "say it again", "input": "", "output": t}))
        .collect();
    std::fs::write(root.join("alpaca.json"), Value::Array(alpaca).to_string()).unwrap();
    Setup {
        _tmp: tmp,
        root,
        model,
    }
}

impl Setup {
    /// A config with `extra` YAML lines appended; output_dir `out`.
    fn config(&self, out: &str, extra: &str) -> TrainConfig {
        let text = format!(
            "base_model: {}\noutput_dir: {}\nseed: 7\ndatasets:\n  - path: {}\n    type: completion\n  - path: {}\n    type: alpaca\nsequence_len: 32\n{}learning_rate: 0.01\nlogging_steps: 1\ndiff_attn_log_every: 1\n{extra}",
            self.model.display(),
            self.root.join(out).display(),
            self.root.join("text.jsonl").display(),
            self.root.join("alpaca.json").display(),
            if extra.contains("val_set_size") { "" } else { "val_set_size: 4\n" },
        );
        let path = self.root.join(format!("{out}.yml"));
        std::fs::write(&path, &text).unwrap();
        TrainConfig::from_axolotl(AxolotlConfig::from_str(&text, &path).unwrap()).unwrap()
    }
    /// A one-step completion-only config training `base` into `out`, with `extra` appended.
    fn completion_config(&self, base: &Path, out: &str, extra: &str) -> TrainConfig {
        let text = format!(
            "base_model: {}\noutput_dir: {}\ndatasets:\n  - path: {}\n    type: completion\nsequence_len: 32\nlearning_rate: 0.01\nmax_steps: 1\n{extra}",
            base.display(),
            self.root.join(out).display(),
            self.root.join("text.jsonl").display()
        );
        let path = self.root.join(format!("{out}.yml"));
        std::fs::write(&path, &text).unwrap();
        TrainConfig::from_axolotl(AxolotlConfig::from_str(&text, &path).unwrap()).unwrap()
    }
    fn out(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }
}

fn run(cfg: &TrainConfig) -> (train::TrainReport, Vec<Event>) {
    let events = RefCell::new(Vec::new());
    let r = train::train(cfg, &TrainOptions::default(), &|e| {
        events.borrow_mut().push(e)
    })
    .unwrap();
    (r, events.into_inner())
}

fn jsonl(dir: &Path) -> Vec<Value> {
    std::fs::read_to_string(dir.join(train::METRICS_FILE))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn read_json(p: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

/// Records with a train `loss`, by step.
fn train_records(dir: &Path) -> Vec<Value> {
    jsonl(dir)
        .into_iter()
        .filter(|r| r.get("loss").is_some())
        .collect()
}

fn weights(dir: &Path) -> Vec<(String, Vec<f32>)> {
    let mut w: Vec<(String, Vec<f32>)> =
        diffattn::model::load_weights(dir, DType::F32, &Device::Cpu)
            .unwrap()
            .into_iter()
            .map(|(n, t)| (n, t.flatten_all().unwrap().to_vec1::<f32>().unwrap()))
            .collect();
    w.sort_by(|a, b| a.0.cmp(&b.0));
    w
}

fn max_weight_diff(a: &Path, b: &Path) -> f32 {
    let (wa, wb) = (weights(a), weights(b));
    assert_eq!(wa.len(), wb.len());
    wa.iter()
        .zip(&wb)
        .map(|((na, xa), (nb, xb))| {
            assert_eq!(na, nb);
            xa.iter()
                .zip(xb)
                .map(|(x, y)| (x - y).abs())
                .fold(0.0, f32::max)
        })
        .fold(0.0, f32::max)
}

#[test]
fn warmup_mix_is_saved_and_reload_reproduces_eval_loss() {
    let s = setup("diff_double_subln_gqa");
    let cfg = s.config("run", "max_steps: 4\ndiff_attn_warmup_steps: 10\n");
    let (report, events) = run(&cfg);
    let out = s.out("run");
    assert_eq!(report.mix, 0.4);
    let config = read_json(&out.join("config.json"));
    assert_eq!(config["diff_attn_mix"], 0.4);
    assert!(events
        .iter()
        .any(|e| matches!(e, Event::Warning(m) if m.contains("mid-warm-up"))));
    // The mix of each step: 0, 0.1, 0.2, 0.3.
    let mixes: Vec<f64> = train_records(&out)
        .iter()
        .map(|r| r["diff_attn_mix"].as_f64().unwrap())
        .collect();
    assert_eq!(mixes, vec![0.0, 0.1, 0.2, 0.3]);
    let before = report.metrics["eval_loss"];
    let (_, after) = train::evaluate(&cfg, Some(&out)).unwrap();
    assert!(
        (before - after.loss).abs() <= 1e-6 * before.abs(),
        "eval loss {before} before save, {} after reload",
        after.loss
    );
    let written = read_json(&out.join("all_results.json"))["eval_loss"]
        .as_f64()
        .unwrap();
    assert!(
        (written - before).abs() <= 1e-12 * before,
        "{written} vs {before}"
    );
    // The stored mix matters: the same weights with mix 1 give another loss.
    let mut m = Model::load(&out, DType::F32, &Device::Cpu).unwrap();
    assert_eq!(m.mix, 0.4);
    m.mix = 1.0;
    let data = train::prepare_data(
        &cfg,
        &out,
        &diffattn::config::ModelConfig::from_file(&out.join("config.json")).unwrap(),
    )
    .unwrap();
    let other = train::evaluate_samples(&m, &data.val, 1, data.pad_id).unwrap();
    assert!(
        (other.loss - before).abs() > 1e-4,
        "{} vs {before}",
        other.loss
    );
    // Metrics a user of axolotl knows.
    for k in train::TRAINER_METRICS {
        assert!(report.metrics.contains_key(k), "{k}");
    }
}

/// Resuming in the run's directory with `save_total_limit: 1` rotates away the checkpoint the
/// run resumed from before the final save: the final model still carries the tokenizer and
/// generation files (read when training starts), so it loads and tokenizes.
#[test]
fn resumed_run_whose_checkpoint_is_rotated_away_keeps_its_tokenizer() {
    let s = setup("llama_gqa");
    std::fs::write(
        s.model.join("generation_config.json"),
        r#"{"eos_token_id": 2}"#,
    )
    .unwrap();
    let (first, _) = run(&s.config("rot", "max_steps: 2\nsave_steps: 2\n"));
    assert_eq!(first.global_step, 2);
    // What an interrupted run leaves: its checkpoints only.
    for e in std::fs::read_dir(s.out("rot")).unwrap() {
        let p = e.unwrap().path();
        if !p.ends_with("checkpoint-2") {
            if p.is_dir() {
                std::fs::remove_dir_all(&p).unwrap();
            } else {
                std::fs::remove_file(&p).unwrap();
            }
        }
    }
    let resumed = s.config(
        "rot",
        "max_steps: 4\nsave_steps: 2\nsave_total_limit: 1\nresume_from_checkpoint: true\n",
    );
    let (report, _) = run(&resumed);
    assert_eq!(report.global_step, 4);
    let out = s.out("rot");
    assert!(!out.join("checkpoint-2").exists(), "rotated away");
    for dir in [out.clone(), out.join("checkpoint-4")] {
        for f in [
            "tokenizer.json",
            "tokenizer_config.json",
            "generation_config.json",
        ] {
            assert_eq!(
                std::fs::read(dir.join(f)).unwrap(),
                std::fs::read(s.model.join(f)).unwrap(),
                "{}/{f}",
                dir.display()
            );
        }
    }
    diffattn::generate::TextCodec::load(&out).unwrap();
}

#[test]
fn resume_continues_step_count_and_schedule() {
    let s = setup("diff_split_subln_gqa");
    let extra = "max_steps: 6\nsave_steps: 3\nwarmup_steps: 2\nlr_scheduler: cosine\ndiff_attn_warmup_steps: 4\nweight_decay: 0.1\nmicro_batch_size: 2\n";
    let (full, _) = run(&s.config("full", extra));
    assert_eq!(full.global_step, 6);
    let ck = s.out("full").join("checkpoint-3");
    let st = read_json(&ck.join("trainer_state.json"));
    assert_eq!(st["global_step"], 3);
    assert_eq!(st["diff_attn_mix"], 0.75);
    assert_eq!(read_json(&ck.join("config.json"))["diff_attn_mix"], 0.75);
    let resumed_cfg = s.config(
        "resumed",
        &format!("{extra}resume_from_checkpoint: {}\n", ck.display()),
    );
    let (resumed, events) = run(&resumed_cfg);
    assert!(events
        .iter()
        .any(|e| matches!(e, Event::Info(m) if m.contains("resuming") && m.contains("step 3"))));
    assert_eq!(resumed.global_step, 6);
    let a = train_records(&s.out("full"));
    let b = train_records(&s.out("resumed"));
    assert_eq!(a.len(), 6);
    assert_eq!(
        b.iter()
            .map(|r| r["step"].as_u64().unwrap())
            .collect::<Vec<_>>(),
        vec![4, 5, 6]
    );
    for (ra, rb) in a[3..].iter().zip(&b) {
        for k in [
            "loss",
            "learning_rate",
            "grad_norm",
            "diff_attn_mix",
            "epoch",
        ] {
            let (x, y) = (ra[k].as_f64().unwrap(), rb[k].as_f64().unwrap());
            assert!(
                (x - y).abs() <= 1e-5 * x.abs().max(1e-3),
                "step {}: {k} {x} vs {y}",
                ra["step"]
            );
        }
    }
    let d = max_weight_diff(&s.out("full"), &s.out("resumed"));
    assert!(d <= 1e-5, "final weights differ by {d}");
    // train_loss covers all 6 steps in both; the last step is a save step too.
    assert!(
        (full.metrics["train_loss"] - resumed.metrics["train_loss"]).abs()
            <= 1e-5 * full.metrics["train_loss"]
    );
    assert!(s
        .out("full")
        .join("checkpoint-6/trainer_state.json")
        .is_file());
    // No record twice after the resume.
    let steps: Vec<(u64, bool)> = jsonl(&s.out("resumed"))
        .iter()
        .map(|r| (r["step"].as_u64().unwrap(), r.get("loss").is_some()))
        .collect();
    let mut dedup = steps.clone();
    dedup.dedup();
    assert_eq!(steps, dedup);
    assert!((full.metrics["eval_loss"] - resumed.metrics["eval_loss"]).abs() <= 1e-5);
}

/// CRC-32C bit by bit (Castagnoli polynomial, reflected 0x82F63B78), independent of the crate.
fn crc32c(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0x82F6_3B78
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

fn masked(c: u32) -> u32 {
    c.rotate_right(15).wrapping_add(0xa282_ead8)
}

fn varint(b: &[u8], i: &mut usize) -> u64 {
    let (mut v, mut shift) = (0u64, 0);
    loop {
        let x = b[*i];
        *i += 1;
        v |= ((x & 0x7f) as u64) << shift;
        if x < 0x80 {
            return v;
        }
        shift += 7;
    }
}

/// Protobuf fields of a message: (field number, wire type, payload bytes or varint value).
fn fields(b: &[u8]) -> Vec<(u64, u64, Vec<u8>, u64)> {
    let mut i = 0;
    let mut out = Vec::new();
    while i < b.len() {
        let key = varint(b, &mut i);
        let (f, w) = (key >> 3, key & 7);
        match w {
            0 => {
                let v = varint(b, &mut i);
                out.push((f, w, vec![], v));
            }
            1 => {
                out.push((f, w, b[i..i + 8].to_vec(), 0));
                i += 8;
            }
            2 => {
                let n = varint(b, &mut i) as usize;
                out.push((f, w, b[i..i + n].to_vec(), 0));
                i += n;
            }
            5 => {
                out.push((f, w, b[i..i + 4].to_vec(), 0));
                i += 4;
            }
            _ => panic!("wire type {w}"),
        }
    }
    out
}

/// Decodes a TensorBoard event file: (file_version, [(step, tag, value)]).
fn decode_events(path: &Path) -> (String, Vec<(u64, String, f32)>) {
    let b = std::fs::read(path).unwrap();
    let mut i = 0;
    let (mut version, mut scalars) = (String::new(), Vec::new());
    while i < b.len() {
        let len_bytes = &b[i..i + 8];
        let len = u64::from_le_bytes(len_bytes.try_into().unwrap()) as usize;
        let len_crc = u32::from_le_bytes(b[i + 8..i + 12].try_into().unwrap());
        assert_eq!(len_crc, masked(crc32c(len_bytes)), "length CRC at {i}");
        let data = &b[i + 12..i + 12 + len];
        let data_crc = u32::from_le_bytes(b[i + 12 + len..i + 16 + len].try_into().unwrap());
        assert_eq!(data_crc, masked(crc32c(data)), "data CRC at {i}");
        i += 16 + len;
        let ev = fields(data);
        let step = ev.iter().find(|f| f.0 == 2).map(|f| f.3).unwrap_or(0);
        assert!(
            ev.iter().any(|f| f.0 == 1 && f.1 == 1),
            "every event has wall_time"
        );
        for (f, _, payload, _) in &ev {
            match f {
                3 => version = String::from_utf8(payload.clone()).unwrap(),
                5 => {
                    for (vf, _, value, _) in fields(payload) {
                        assert_eq!(vf, 1);
                        let v = fields(&value);
                        let tag = v
                            .iter()
                            .find(|x| x.0 == 1)
                            .map(|x| String::from_utf8(x.2.clone()).unwrap())
                            .unwrap();
                        let val = v
                            .iter()
                            .find(|x| x.0 == 2)
                            .map(|x| f32::from_le_bytes(x.2.clone().try_into().unwrap()))
                            .unwrap();
                        scalars.push((step, tag, val));
                    }
                }
                _ => {}
            }
        }
    }
    (version, scalars)
}

/// Monitoring values at step 0 recomputed from the checkpoint's own tensors (docs/spec.md §5-6), the
/// TensorBoard file decoded and compared with metrics.jsonl, and the plot.
#[test]
fn monitoring_tensorboard_and_plot() {
    let s = setup("diff_double_subln_gqa");
    let cfg = s.config("mon", "max_steps: 3\ndiff_attn_warmup_steps: 2\ndiff_attn_num_monitor_layers: 3\nval_set_size: 0\n");
    run(&cfg);
    let out = s.out("mon");
    let recs = jsonl(&out);
    // The first step's forward (g = 0) is monitored; records carry the 1-based step.
    let step0 = recs
        .iter()
        .find(|r| r["step"] == 1 && r.get("layer_0/lambda1").is_some())
        .expect("monitoring at step 1");
    // L = 2, k = 3 -> layers 0 and 1 only.
    assert!(step0.get("layer_1/lambda1").is_some() && step0.get("layer_2/lambda1").is_none());
    let st = safetensors::SafeTensors::deserialize(Box::leak(
        std::fs::read(s.model.join("model.safetensors"))
            .unwrap()
            .into_boxed_slice(),
    ))
    .unwrap();
    let vec = |name: &str| -> Vec<f64> {
        st.tensor(name)
            .unwrap()
            .data()
            .chunks(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64)
            .collect()
    };
    let dot = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f64>();
    for l in 0..2 {
        let p = format!("model.layers.{l}.self_attn.");
        let (q1, k1, q2, k2) = (
            vec(&format!("{p}lambda_q1")),
            vec(&format!("{p}lambda_k1")),
            vec(&format!("{p}lambda_q2")),
            vec(&format!("{p}lambda_k2")),
        );
        let init = vec(&format!("{p}lambda_init"))[0];
        let (l1, l2) = (dot(&q1, &k1).exp(), dot(&q2, &k2).exp());
        let close = |k: &str, want: f64| {
            let got = step0[format!("layer_{l}/{k}")].as_f64().unwrap();
            assert!(
                (got - want).abs() <= 1e-5 * want.abs().max(1.0),
                "layer {l} {k}: {got} vs {want}"
            );
        };
        close("lambda1", l1);
        close("lambda2", l2);
        close("lambda_init", init);
        close("lambda_full", l1 - l2 + init);
        close("lambda_q1_norm", dot(&q1, &q1).sqrt());
        close("lambda_k2_norm", dot(&k2, &k2).sqrt());
        // Causal softmax rows sum to 1: the mean over [b, heads, s, s] is 1/s exactly.
        let seq = 1.0 / step0[format!("layer_{l}/attn1_mean")].as_f64().unwrap();
        assert!((seq - seq.round()).abs() < 1e-3, "attn1_mean = 1/{seq}");
        assert!(
            (step0[format!("layer_{l}/attn2_mean")].as_f64().unwrap() * seq.round() - 1.0).abs()
                < 1e-4
        );
        assert!(step0[format!("layer_{l}/attn1_std")].as_f64().unwrap() > 0.0);
    }
    // Aggregates with mix (0 at step 0) and the sample std over the two layers.
    assert_eq!(step0["aggregate/diff_attn_mix"], 0.0);
    assert_eq!(step0["aggregate/lambda_full_mean"], 0.0);
    let l1s: Vec<f64> = (0..2)
        .map(|l| step0[format!("layer_{l}/lambda1")].as_f64().unwrap())
        .collect();
    let want_std = (l1s[0] - l1s[1]).abs() / 2f64.sqrt();
    assert!((step0["aggregate/lambda1_std"].as_f64().unwrap() - want_std).abs() < 1e-9);

    // TensorBoard: CRCs verified while decoding; values equal metrics.jsonl.
    let ev = std::fs::read_dir(&out)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("events.out.tfevents.")
        })
        .expect("event file");
    let (version, scalars) = decode_events(&ev);
    assert_eq!(version, "brain.Event:2");
    for r in train_records(&out) {
        let step = r["step"].as_u64().unwrap();
        let tb = scalars
            .iter()
            .find(|(s, t, _)| *s == step && t == "train/loss")
            .expect("train/loss");
        assert_eq!(tb.2, r["loss"].as_f64().unwrap() as f32);
    }
    let lam = scalars
        .iter()
        .find(|(s, t, _)| *s == 1 && t == "diff_attn/layer_1/lambda_full")
        .expect("lambda_full tag");
    assert_eq!(lam.2, step0["layer_1/lambda_full"].as_f64().unwrap() as f32);

    // plot: a 1200x800 PNG.
    let png = out.join("plot.png");
    train::plot::plot(&out, &png).unwrap();
    let b = std::fs::read(&png).unwrap();
    assert_eq!(&b[..8], b"\x89PNG\r\n\x1a\n");
    assert_eq!(&b[12..16], b"IHDR");
    assert_eq!(u32::from_be_bytes(b[16..20].try_into().unwrap()), 1200);
    assert_eq!(u32::from_be_bytes(b[20..24].try_into().unwrap()), 800);
    assert!(b.len() > 20_000, "{} bytes: text and lines drawn", b.len());
}

#[test]
fn accumulation_equals_a_larger_micro_batch() {
    let s = setup("diff_double_nosubln_mqa_bias");
    let (a, _) = run(&s.config(
        "mb2",
        "max_steps: 3\nmicro_batch_size: 2\ngradient_accumulation_steps: 1\n",
    ));
    let (b, _) = run(&s.config(
        "acc2",
        "max_steps: 3\nmicro_batch_size: 1\ngradient_accumulation_steps: 2\n",
    ));
    let (ra, rb) = (train_records(&s.out("mb2")), train_records(&s.out("acc2")));
    for (x, y) in ra.iter().zip(&rb) {
        let (x, y) = (x["loss"].as_f64().unwrap(), y["loss"].as_f64().unwrap());
        assert!((x - y).abs() <= 1e-5 * x, "{x} vs {y}");
    }
    let d = max_weight_diff(&s.out("mb2"), &s.out("acc2"));
    // Equal up to summation order; AdamW's normalised update turns a 1e-7 gradient
    // difference into up to ~1% of one lr-sized step.
    assert!(d <= 1e-4, "{d}");
    assert!((a.metrics["eval_loss"] - b.metrics["eval_loss"]).abs() <= 1e-5);
}

#[test]
fn diffllama_trains_and_saves_diffllama() {
    let s = setup("diffllama_h4_kv2");
    let cfg = s.config("b", "max_steps: 2\ndiff_attn_warmup_steps: 4\n");
    let (r, _) = run(&cfg);
    let out = s.out("b");
    let config = read_json(&out.join("config.json"));
    assert_eq!(config["architectures"][0], "DiffLlamaForCausalLM");
    assert_eq!(config["diff_attn_mix"], 0.5);
    let names: Vec<String> = weights(&out).into_iter().map(|(n, _)| n).collect();
    assert!(!names
        .iter()
        .any(|n| n.contains("lambda_init") || n.contains("subln")));
    assert_eq!(
        names,
        weights(&s.model)
            .into_iter()
            .map(|(n, _)| n)
            .collect::<Vec<_>>()
    );
    assert!(
        max_weight_diff(&out, &s.model) > 0.0,
        "training changed the weights"
    );
    let (_, e) = train::evaluate(&cfg, Some(&out)).unwrap();
    assert!((e.loss - r.metrics["eval_loss"]).abs() <= 1e-6 * e.loss);
}

#[test]
fn llama_trains_without_differential_keys() {
    let s = setup("llama_mqa_tied_bias");
    let (r, _) = run(&s.config("l", "max_steps: 2\nnum_epochs: 1\n"));
    let out = s.out("l");
    let config = read_json(&out.join("config.json"));
    assert_eq!(config["architectures"][0], "LlamaForCausalLM");
    assert!(config.get("diff_attn_mix").is_none());
    assert!(!jsonl(&out)
        .iter()
        .any(|r| r.get("aggregate/lambda1_mean").is_some()));
    assert!(r.metrics["train_loss"].is_finite());
    // Tied embeddings stay tied: no lm_head written.
    assert!(!weights(&out).iter().any(|(n, _)| n == "lm_head.weight"));
}

#[test]
fn zero_init_start_is_reported_as_stationary() {
    let s = setup("llama_gqa");
    let conv = s.root.join("zero");
    let src = diffattn::convert::Source::from_dir(&s.model).unwrap();
    let opts = diffattn::convert::ConvertOptions {
        layout: diffattn::convert::Layout::DoubleHeads,
        init: diffattn::convert::Init::Zero,
        sublayer_norm: false,
        seed: 1,
        dtype: diffattn::axolotl::DtypeChoice::Keep,
        max_shard_bytes: u64::MAX,
        overwrite: false,
    };
    let plan = diffattn::convert::plan(&src, &opts).unwrap();
    diffattn::convert::execute(&src, &plan, &conv, None, &|_| {}).unwrap();
    let cfg = s.completion_config(&conv, "zout", "");
    let (_, events) = run(&cfg);
    assert!(
        events
            .iter()
            .any(|e| matches!(e, Event::Warning(m) if m.contains("stationary"))),
        "{events:?}"
    );
    // A --preserving-mirror start with a warm-up is warned about (it preserves only at mix 1).
    let pm = s.root.join("pm");
    let plan = diffattn::convert::plan(
        &src,
        &diffattn::convert::ConvertOptions {
            init: diffattn::convert::Init::PreservingMirror,
            ..opts.clone()
        },
    )
    .unwrap();
    diffattn::convert::execute(&src, &plan, &pm, None, &|_| {}).unwrap();
    let cfg = s.completion_config(&pm, "pmout", "diff_attn_warmup_steps: 4\n");
    let (_, events) = run(&cfg);
    assert!(
        events.iter().any(|e| matches!(e, Event::Warning(m) if m.contains("diff_attn_warmup_steps is ignored") && m.contains("--preserving-mirror") && m.contains("mix = 1"))),
        "{events:?}"
    );
    // ... and ignored: the same losses as without the key, and no mix in the metrics.
    let plain = s.completion_config(&pm, "pmplain", "");
    run(&plain);
    let losses = |dir: &Path| -> Vec<f64> {
        jsonl(dir)
            .iter()
            .filter_map(|r| r.get("loss").and_then(Value::as_f64))
            .collect()
    };
    let with_key = losses(&s.root.join("pmout"));
    assert!(!with_key.is_empty());
    assert_eq!(with_key, losses(&s.root.join("pmplain")));
    assert!(jsonl(&s.root.join("pmout"))
        .iter()
        .all(|r| r.get("aggregate/diff_attn_mix").is_none()));
    assert!(!events
        .iter()
        .any(|e| matches!(e, Event::Warning(m) if m.contains("stationary"))));
    // A default (random) conversion is not reported.
    let s2 = setup("diff_double_subln_gqa");
    let (_, events) = run(&s2.config("r", "max_steps: 1\n"));
    assert!(!events
        .iter()
        .any(|e| matches!(e, Event::Warning(m) if m.contains("stationary"))));
}

#[test]
fn semantics_changing_keys_are_refused_by_name() {
    let s = setup("llama_gqa");
    let base = format!(
        "base_model: {}\noutput_dir: {}\ndatasets:\n  - path: {}\n    type: completion\nlearning_rate: 0.01\n",
        s.model.display(),
        s.root.join("o").display(),
        s.root.join("text.jsonl").display()
    );
    let path = s.root.join("c.yml");
    for (extra, key) in [
        ("load_in_8bit: true\n", "load_in_8bit"),
        ("load_in_4bit: true\n", "load_in_4bit"),
        ("adapter: lora\n", "adapter"),
        ("sample_packing: true\n", "sample_packing"),
        ("deepspeed: ds.json\n", "deepspeed"),
        ("optimizer: adamw_bnb_8bit\n", "optimizer"),
        ("lr_scheduler: one_cycle\n", "lr_scheduler"),
        ("warmup_steps: 2\nwarmup_ratio: 0.1\n", "warmup_ratio"),
        ("val_set_size: 1.5\n", "val_set_size"),
        ("micro_batch_size: 0\n", "micro_batch_size"),
    ] {
        let text = format!("{base}{extra}");
        let err = TrainConfig::from_axolotl(AxolotlConfig::from_str(&text, &path).unwrap())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(&format!("`{key}`")) && err.contains("c.yml"),
            "{extra}: {err}"
        );
    }
    let text = base.replace("type: completion", "type: sharegpt");
    let err = TrainConfig::from_axolotl(AxolotlConfig::from_str(&text, &path).unwrap())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("datasets[0].type") && err.contains("sharegpt"),
        "{err}"
    );
    // Disabled values are fine.
    let text = format!("{base}load_in_8bit: false\nadapter:\nsample_packing: false\n");
    TrainConfig::from_axolotl(AxolotlConfig::from_str(&text, &path).unwrap()).unwrap();
}

#[test]
fn alpaca_masks_the_prompt_unless_train_on_inputs() {
    let s = setup("llama_gqa");
    let cfg = s.config("a", "max_steps: 1\n");
    let codec = diffattn::generate::TextCodec::load(&s.model).unwrap();
    let spec = &cfg.datasets[1];
    let (samples, _) =
        train::data::tokenize(std::slice::from_ref(spec), &codec, 2, 64, false).unwrap();
    let prompt = codec
        .tokenizer
        .encode(train::data::alpaca_prompt("say it again", ""), true)
        .unwrap()
        .get_ids()
        .len();
    let smp = &samples[0];
    assert!(smp.labels[..prompt]
        .iter()
        .all(|&l| l == train::data::IGNORE));
    assert!(smp.labels[prompt..].iter().all(|&l| l >= 0));
    assert_eq!(*smp.input_ids.last().unwrap(), 2, "EOS appended");
    let (samples, _) =
        train::data::tokenize(std::slice::from_ref(spec), &codec, 2, 64, true).unwrap();
    assert!(samples[0].labels.iter().all(|&l| l >= 0));
}

#[test]
fn training_is_bit_reproducible() {
    let s = setup("diff_split_nosubln_linear_mix");
    let extra = "max_steps: 3\nmicro_batch_size: 2\ndiff_attn_warmup_steps: 2\nweight_decay: 0.1\n";
    let (a, _) = run(&s.config("r1", extra));
    let (b, _) = run(&s.config("r2", extra));
    assert_eq!(max_weight_diff(&s.out("r1"), &s.out("r2")), 0.0);
    assert_eq!(a.metrics["eval_loss"], b.metrics["eval_loss"]);
    assert_eq!(a.metrics["train_loss"], b.metrics["train_loss"]);
}

/// `warmup_steps` covering the whole run is warned about (the learning rate never reaches
/// `learning_rate`; with max_steps 1 the only step runs at lr 0), and `output_dir: ~/x` is
/// read as `$HOME/x`, as `base_model` is.
#[test]
fn whole_run_warm_up_is_warned_and_home_is_expanded() {
    let s = setup("llama_gqa");
    let cfg = s.completion_config(&s.model, "wout", "warmup_steps: 1000\n");
    let path = s.root.join("wout.yml");
    let (_, events) = run(&cfg);
    assert!(
        events
            .iter()
            .any(|e| matches!(e, Event::Warning(m) if m.contains("warmup_steps 1000 >= the run's 1 steps"))),
        "{events:?}"
    );
    let home = std::env::var("HOME").unwrap();
    let a = AxolotlConfig::from_str("base_model: x\noutput_dir: ~/some-run\n", &path).unwrap();
    assert_eq!(a.output_dir.unwrap(), Path::new(&home).join("some-run"));
}

/// `gradient_checkpointing`: the loss and every parameter's gradient equal those of the plain
/// backward (within f32 rounding of the recomputation's summation order), for a source model
/// and differential ones (double and split heads, sub-layer norm, biases), and a run trains.
#[test]
fn gradient_checkpointing_gives_the_same_gradients() {
    use candle_core::Tensor;
    use diffattn::model::layout::WeightGradSink;
    let ids: Vec<u32> = vec![1, 5, 9, 13, 2, 7, 30, 11, 42, 3, 8, 21];
    for case in [
        "llama_gqa",
        "diff_double_subln_gqa",
        "diff_split_nosubln_linear_mix",
        "diff_double_nosubln_mqa_bias",
        "diffllama_h4_kv2",
    ] {
        let dir = fixture(case);
        let (mut model, vars) = Model::load_trainable(&dir, &Device::Cpu).unwrap();
        let mut results = Vec::new();
        for flag in [false, true] {
            model.gradient_checkpointing = flag;
            let sink = WeightGradSink::open().unwrap();
            let t = Tensor::new(ids.as_slice(), &Device::Cpu)
                .unwrap()
                .unsqueeze(0)
                .unwrap();
            let logits = model.forward(&t).unwrap();
            let targets: Vec<u32> = ids[1..].to_vec();
            let rows = logits
                .narrow(1, 0, ids.len() - 1)
                .unwrap()
                .squeeze(0)
                .unwrap();
            let loss = diffattn::train::loss::nll_sum(&rows, &targets).unwrap();
            let mut grads = loss.backward().unwrap();
            let tensors: Vec<&Tensor> = vars.iter().map(|(_, v)| v.as_tensor()).collect();
            sink.finish(&tensors, &mut grads).unwrap();
            let g: Vec<(String, Vec<f32>)> = vars
                .iter()
                .map(|(n, v)| {
                    let g = grads.get(v.as_tensor()).unwrap_or_else(|| {
                        panic!("{case} checkpointing {flag}: no gradient for {n}")
                    });
                    (
                        n.clone(),
                        g.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                    )
                })
                .collect();
            results.push((loss.to_scalar::<f32>().unwrap(), g));
        }
        let ((l0, g0), (l1, g1)) = (&results[0], &results[1]);
        assert!(
            (l0 - l1).abs() <= 1e-5 * l0.abs(),
            "{case}: loss {l0} vs {l1}"
        );
        for ((n, a), (_, b)) in g0.iter().zip(g1) {
            let scale = a.iter().fold(0f32, |m, x| m.max(x.abs()));
            let diff = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
            assert!(
                diff <= 1e-4 * scale.max(1e-6),
                "{case} {n}: gradients differ by {diff} (scale {scale})"
            );
        }
    }
    let s = setup("diff_double_subln_gqa");
    let (r, _) = run(&s.config("gc", "max_steps: 2\ngradient_checkpointing: true\n"));
    assert_eq!(r.global_step, 2);
}

/// V2 (`--variant v2 --preserving-mirror`): the first loss is the source's, one optimizer step
/// changes every `lambda_proj` row and every new (odd) query head row, the gate is monitored,
/// the warm-up key is ignored with a warning, and `evaluate` reads the trained model back.
#[test]
fn v2_preserving_trains_every_new_row_and_monitors_the_gate() {
    let s = setup("llama_gqa");
    let src = diffattn::convert::Source::from_dir(&s.model).unwrap();
    let opts = diffattn::convert::ConvertOptions {
        layout: diffattn::convert::Layout::V2,
        init: diffattn::convert::Init::PreservingMirror,
        sublayer_norm: false,
        seed: 1,
        dtype: diffattn::axolotl::DtypeChoice::Keep,
        max_shard_bytes: u64::MAX,
        overwrite: false,
    };
    let conv = s.root.join("v2");
    let plan = diffattn::convert::plan(&src, &opts).unwrap();
    diffattn::convert::execute(&src, &plan, &conv, None, &|_| {}).unwrap();
    let extra = "diff_attn_log_every: 1\nlogging_steps: 1\ndiff_attn_warmup_steps: 4\n";
    let (_, events) = run(&s.completion_config(&conv, "v2out", extra));
    assert!(
        events.iter().any(|e| matches!(e, Event::Warning(m) if m.contains("diff_attn_warmup_steps is ignored") && m.contains("o_proj is doubled"))),
        "{events:?}"
    );
    // The same first loss as the source under the same run.
    let (_, _) = run(&s.completion_config(&s.model, "srcout", "logging_steps: 1\n"));
    let first = |dir: &str| {
        jsonl(&s.root.join(dir))
            .iter()
            .find_map(|r| r.get("loss").and_then(Value::as_f64))
            .unwrap()
    };
    let (a, b) = (first("v2out"), first("srcout"));
    assert!((a - b).abs() <= 1e-4 * b, "first loss {a} vs source {b}");
    let out = s.root.join("v2out");
    let rec = jsonl(&out);
    let m = rec
        .iter()
        .find(|r| r.get("aggregate/lambda_gate_mean").is_some())
        .expect("gate metrics logged");
    // lambda_proj = 0 at the start: every gate is exactly 1/2.
    assert_eq!(m["aggregate/lambda_gate_mean"], 0.5);
    assert!(m.get("layer_0/lambda_gate_std").is_some() && m.get("layer_0/attn2_mean").is_some());
    assert!(m.get("aggregate/diff_attn_mix").is_none());
    let before: std::collections::HashMap<_, _> = weights(&conv).into_iter().collect();
    let after: std::collections::HashMap<_, _> = weights(&out).into_iter().collect();
    let (h, dm) = (4usize, 32usize);
    let cfg = read_json(&conv.join("config.json"));
    assert_eq!(cfg["num_attention_heads"], h);
    assert_eq!(cfg["hidden_size"], dm);
    let d = cfg["head_dim"]
        .as_u64()
        .map(|x| x as usize)
        .unwrap_or(dm / h);
    let layers = cfg["num_hidden_layers"].as_u64().unwrap() as usize;
    for l in 0..layers {
        let lp = format!("model.layers.{l}.self_attn.lambda_proj.weight");
        for (r, (x, y)) in before[&lp]
            .chunks(dm)
            .zip(after[&lp].chunks(dm))
            .enumerate()
        {
            assert!(x != y, "layer {l}: lambda_proj row {r} unchanged");
        }
        let q = format!("model.layers.{l}.self_attn.q_proj.weight");
        for i in 0..h {
            for row in 0..d {
                let at = ((2 * i + 1) * d + row) * dm;
                assert!(
                    before[&q][at..at + dm] != after[&q][at..at + dm],
                    "layer {l}: new query head {} row {row} unchanged",
                    2 * i + 1
                );
            }
        }
    }
    // The plot shows the gate of the monitored layers.
    let series = train::plot::read_series(&out.join(train::METRICS_FILE)).unwrap();
    assert!(
        series.contains_key("layer_0/lambda_gate_mean"),
        "{:?}",
        series.keys()
    );
    let png = s.root.join("v2.png");
    train::plot::plot(&out, &png).unwrap();
    assert!(std::fs::read(&png).unwrap().starts_with(b"\x89PNG"));
    // Read back by evaluate.
    let (_, e) = train::evaluate(
        &s.completion_config(&out, "unused", "val_set_size: 2\n"),
        Some(&out),
    )
    .unwrap();
    assert!(e.loss.is_finite());
}

/// `test_datasets` is the validation set as it is: evaluation reads exactly its samples (the
/// same loss as `evaluate` on a config whose datasets are that file), and it cannot be
/// combined with `val_set_size`.
#[test]
fn test_datasets_is_the_validation_set() {
    let s = setup("llama_gqa");
    let held = s.root.join("held.jsonl");
    std::fs::write(
        &held,
        "{\"text\": \"the held out text is not in training\"}\n{\"text\": \"nor is this one\"}\n",
    )
    .unwrap();
    let extra = format!(
        "test_datasets:\n  - path: {}\n    type: completion\neval_steps: 1\n",
        held.display()
    );
    let (r, _) =
        run(&s.completion_config(&s.model, "td", &format!("{extra}eval_on_start: true\n")));
    let out = s.root.join("td");
    let step0 = jsonl(&out)
        .into_iter()
        .find(|r| r["step"] == 0)
        .expect("eval_on_start logs step 0");
    // The final model evaluated on the held-out file alone.
    let only = format!(
        "base_model: {}\noutput_dir: {}\ndatasets:\n  - path: {}\n    type: completion\nsequence_len: 32\nval_set_size: 2\n",
        out.display(),
        s.root.join("unused").display(),
        held.display()
    );
    let p = s.root.join("only.yml");
    std::fs::write(&p, only).unwrap();
    let (_, e) =
        train::evaluate(&TrainConfig::from_file_for_evaluation(&p).unwrap(), None).unwrap();
    assert_eq!(e.samples, 2);
    // The step-0 record is the evaluation of the model trained from.
    let before = p.with_file_name("before.yml");
    std::fs::write(
        &before,
        std::fs::read_to_string(&p)
            .unwrap()
            .replace(&out.display().to_string(), &s.model.display().to_string()),
    )
    .unwrap();
    let (_, e0) = train::evaluate(
        &TrainConfig::from_file_for_evaluation(&before).unwrap(),
        None,
    )
    .unwrap();
    let l0 = step0["eval_loss"].as_f64().unwrap();
    assert!((e0.loss - l0).abs() <= 1e-5 * l0, "{} vs {l0}", e0.loss);
    assert!((e0.loss - e.loss).abs() > 1e-4, "training changed nothing");
    assert!(
        (e.loss - r.metrics["eval_loss"]).abs() <= 1e-5 * e.loss,
        "{} vs {}",
        e.loss,
        r.metrics["eval_loss"]
    );
    let both = s.root.join("both.yml");
    std::fs::write(
        &both,
        format!(
            "base_model: {}\noutput_dir: {}\ndatasets:\n  - path: {}\n    type: completion\n{extra}val_set_size: 0.1\n",
            s.model.display(),
            s.root.join("b").display(),
            held.display()
        ),
    )
    .unwrap();
    let err = TrainConfig::from_file(&both).err().unwrap().to_string();
    assert!(
        err.contains("val_set_size") && err.contains("test_datasets"),
        "{err}"
    );
}
