//! Text generation with our forward pass: tokenizer and chat template from the model
//! directory, greedy decoding or temperature / top-k / top-p sampling, KV cache (or full
//! recomputation), left-padded batches, stop at `eos_token_id`.

use std::path::Path;
use std::time::Instant;

use candle_core::Tensor;
use rand::{Rng, SeedableRng};
use rand_xoshiro::Xoshiro256PlusPlus;
use serde_json::Value;

use crate::error::{Error, IoContext, Result};
use crate::model::{KvCache, Model};

/// Tokenizer, chat template and stop tokens of a model directory.
pub struct TextCodec {
    pub tokenizer: tokenizers::Tokenizer,
    chat_template: Option<String>,
    bos_token: Option<String>,
    eos_token: Option<String>,
    /// Stop ids: generation_config.json's `eos_token_id`, else config.json's.
    pub eos_token_ids: Vec<u32>,
    /// tokenizer.json's path and config.json's `vocab_size` (when the directory has one):
    /// ids the embedding cannot look up are refused naming both.
    tokenizer_path: std::path::PathBuf,
    vocab_size: Option<u64>,
}

fn read_json(path: &Path) -> Result<Option<Value>> {
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).at(path)?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|source| Error::Json {
            path: path.to_path_buf(),
            source,
        })
}

fn token_str(v: Option<&Value>) -> Option<String> {
    match v {
        Some(Value::String(s)) => Some(s.clone()),
        Some(Value::Object(o)) => o.get("content").and_then(Value::as_str).map(String::from),
        _ => None,
    }
}

/// Reads a tokenizer.json. Invalid JSON is refused with the position of the fault; a file the
/// tokenizers library cannot build a tokenizer from is refused with its message, including the
/// shapes it panics on instead of returning an error (tokenizers 0.23's decoder reader
/// `expect`s; found by the fuzz harness, `tests/fuzz.rs`).
fn load_tokenizer(path: &Path) -> Result<tokenizers::Tokenizer> {
    let bytes = std::fs::read(path).at(path)?;
    if let Err(e) = serde_json::from_slice::<serde::de::IgnoredAny>(&bytes) {
        return Err(Error::Tokenizer(format!(
            "{}: not valid JSON: {e}",
            path.display()
        )));
    }
    let build = || tokenizers::Tokenizer::from_bytes(&bytes);
    // The library's panic is a refusal of this file: caught, without the panic hook's message.
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let built = std::panic::catch_unwind(std::panic::AssertUnwindSafe(build));
    std::panic::set_hook(hook);
    match built {
        Ok(Ok(t)) => Ok(t),
        Ok(Err(e)) => Err(Error::Tokenizer(format!("{}: {e}", path.display()))),
        Err(panic) => {
            let why = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            Err(Error::Tokenizer(format!(
                "{}: not a tokenizer the tokenizers library can read ({})",
                path.display(),
                why.lines().next().unwrap_or_default()
            )))
        }
    }
}

impl TextCodec {
    /// Reads tokenizer.json, tokenizer_config.json, generation_config.json and config.json.
    pub fn load(dir: &Path) -> Result<Self> {
        let tok_path = dir.join("tokenizer.json");
        let tokenizer = load_tokenizer(&tok_path)?;
        let tc = read_json(&dir.join("tokenizer_config.json"))?.unwrap_or(Value::Null);
        let gc = read_json(&dir.join("generation_config.json"))?.unwrap_or(Value::Null);
        let cc = read_json(&dir.join("config.json"))?.unwrap_or(Value::Null);
        let mut eos = crate::config::token_ids(gc.get("eos_token_id"));
        if eos.is_empty() {
            eos = crate::config::token_ids(cc.get("eos_token_id"));
        }
        let chat_template = match tc.get("chat_template") {
            Some(Value::String(s)) => Some(s.clone()),
            _ => std::fs::read_to_string(dir.join("chat_template.jinja")).ok(),
        };
        Ok(Self {
            tokenizer,
            chat_template,
            bos_token: token_str(tc.get("bos_token")),
            eos_token: token_str(tc.get("eos_token")),
            eos_token_ids: eos,
            vocab_size: cc.get("vocab_size").and_then(Value::as_u64),
            tokenizer_path: tok_path,
        })
    }

    /// Token ids of a plain prompt (special tokens as the tokenizer's post-processor adds).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let ids = self
            .tokenizer
            .encode(text, true)
            .map_err(|e| Error::Tokenizer(e.to_string()))?
            .get_ids()
            .to_vec();
        if let Some(v) = self.vocab_size {
            if let Some(&id) = ids.iter().find(|&&id| u64::from(id) >= v) {
                return Err(Error::Tokenizer(format!(
                    "{}: the prompt's token id {id} ({:?}) is beyond config.json's vocab_size {v}: this tokenizer does not belong to the model",
                    self.tokenizer_path.display(),
                    self.tokenizer.id_to_token(id).unwrap_or_default()
                )));
            }
        }
        Ok(ids)
    }

    /// Renders the chat template for one user message with the generation prompt, as
    /// transformers' `apply_chat_template(..., add_generation_prompt=True)`.
    pub fn chat_prompt(&self, user: &str) -> Result<String> {
        let template = self
            .chat_template
            .as_deref()
            .ok_or_else(|| {
                let dir = self.tokenizer_path.parent().unwrap_or(Path::new("."));
                Error::Tokenizer(format!(
                    "{}: no chat_template in tokenizer_config.json and no chat_template.jinja (a base model has none): use --prompt",
                    dir.display()
                ))
            })?;
        let mut env = minijinja::Environment::new();
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    msg,
                ))
            },
        );
        env.add_template("chat", template)
            .map_err(|e| Error::Tokenizer(format!("chat_template: {e}")))?;
        let ctx = minijinja::context! {
            messages => vec![minijinja::context! { role => "user", content => user }],
            add_generation_prompt => true,
            bos_token => self.bos_token.clone().unwrap_or_default(),
            eos_token => self.eos_token.clone().unwrap_or_default(),
        };
        env.get_template("chat")
            .and_then(|t| t.render(ctx))
            .map_err(|e| Error::Tokenizer(format!("chat_template: {e}")))
    }

    /// Token ids of a rendered chat prompt (no extra special tokens, as transformers).
    pub fn encode_chat(&self, user: &str) -> Result<Vec<u32>> {
        let text = self.chat_prompt(user)?;
        Ok(self
            .tokenizer
            .encode(text, false)
            .map_err(|e| Error::Tokenizer(e.to_string()))?
            .get_ids()
            .to_vec())
    }

    /// Text of token ids (special tokens skipped).
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.tokenizer
            .decode(ids, true)
            .map_err(|e| Error::Tokenizer(e.to_string()))
    }
}

/// Decoding strategy. `temperature == 0` is greedy (argmax, first maximum on ties).
#[derive(Debug, Clone)]
pub struct Sampling {
    pub temperature: f64,
    pub top_k: Option<usize>,
    pub top_p: Option<f64>,
    pub seed: u64,
}

impl Default for Sampling {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_k: None,
            top_p: None,
            seed: 0,
        }
    }
}

/// One generated continuation.
#[derive(Debug, Clone)]
pub struct Generation {
    /// Generated ids (without the prompt; the eos token included when it stopped on one).
    pub ids: Vec<u32>,
    pub stopped_on_eos: bool,
    /// Seconds of the first forward (prompt) and of the decode steps.
    pub prefill_secs: f64,
    pub decode_secs: f64,
}

fn argmax(row: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in row.iter().enumerate() {
        if v > row[best] {
            best = i;
        }
    }
    best as u32
}

fn sample(row: &[f32], s: &Sampling, rng: &mut Xoshiro256PlusPlus) -> u32 {
    if s.temperature <= 0.0 {
        return argmax(row);
    }
    let mut idx: Vec<usize> = (0..row.len()).collect();
    idx.sort_by(|&a, &b| row[b].total_cmp(&row[a]));
    if let Some(k) = s.top_k.filter(|&k| k > 0) {
        idx.truncate(k);
    }
    let max = row[idx[0]] as f64;
    let mut probs: Vec<f64> = idx
        .iter()
        .map(|&i| ((row[i] as f64 - max) / s.temperature).exp())
        .collect();
    let total: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= total);
    if let Some(p) = s.top_p.filter(|&p| p < 1.0) {
        let mut acc = 0.0;
        let mut keep = probs.len();
        for (i, q) in probs.iter().enumerate() {
            acc += q;
            if acc >= p {
                keep = i + 1;
                break;
            }
        }
        probs.truncate(keep);
        idx.truncate(keep);
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= total);
    }
    let mut r: f64 = rng.random();
    for (i, q) in probs.iter().enumerate() {
        r -= q;
        if r <= 0.0 {
            return idx[i] as u32;
        }
    }
    idx[probs.len() - 1] as u32
}

/// Generates continuations of `prompts` together (left-padded with `pad_id`; each row's
/// positions start at 0 on its first real token, so a row equals its unbatched run).
/// `use_cache = false` recomputes the whole sequence at every step. `on_token(row, id)` is
/// called as tokens come.
pub fn generate_batch(
    model: &Model,
    prompts: &[Vec<u32>],
    max_new_tokens: usize,
    sampling: &Sampling,
    eos: &[u32],
    use_cache: bool,
    on_token: &mut dyn FnMut(usize, u32),
) -> Result<Vec<Generation>> {
    let b = prompts.len();
    let dev = &model.device;
    if !(sampling.temperature >= 0.0 && sampling.temperature.is_finite()) {
        return Err(Error::InvalidOptions(format!(
            "--temperature {}: must be a finite number >= 0 (0 = greedy)",
            sampling.temperature
        )));
    }
    if let Some(p) = sampling.top_p {
        if !(p > 0.0 && p <= 1.0) {
            return Err(Error::InvalidOptions(format!(
                "--top-p {p}: must be in (0, 1]"
            )));
        }
    }
    if sampling.top_k == Some(0) {
        return Err(Error::InvalidOptions(
            "--top-k 0: must be at least 1".into(),
        ));
    }
    let context = model.config.max_position_embeddings;
    let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
    if prompts.iter().any(Vec::is_empty) {
        return Err(Error::InvalidOptions("empty prompt (no tokens)".into()));
    }
    let pad_id = eos.first().copied().unwrap_or(0);
    // Per row: token ids (padded), key mask (1 = real), next position.
    let mut ids: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| {
            std::iter::repeat_n(pad_id, longest - p.len())
                .chain(p.iter().copied())
                .collect()
        })
        .collect();
    let mut keys: Vec<Vec<u8>> = prompts
        .iter()
        .map(|p| {
            std::iter::repeat_n(0u8, longest - p.len())
                .chain(std::iter::repeat_n(1u8, p.len()))
                .collect()
        })
        .collect();
    let padded = prompts.iter().any(|p| p.len() != longest);
    let mut rngs: Vec<Xoshiro256PlusPlus> = (0..b)
        .map(|i| Xoshiro256PlusPlus::seed_from_u64(sampling.seed.wrapping_add(i as u64)))
        .collect();
    let mut out: Vec<Generation> = (0..b)
        .map(|_| Generation {
            ids: vec![],
            stopped_on_eos: false,
            prefill_secs: 0.0,
            decode_secs: 0.0,
        })
        .collect();
    let mut done = vec![false; b];
    let mut cache = KvCache::new();
    let start = Instant::now();
    let mut prefill_secs = 0.0;
    if longest > context {
        return Err(Error::InvalidOptions(format!(
            "the prompt has {longest} tokens, more than max_position_embeddings ({context})"
        )));
    }
    for step in 0..max_new_tokens {
        let t = ids[0].len();
        if t >= context {
            tracing::warn!("stopping at max_position_embeddings ({context})");
            break;
        }
        let (input, past) = if use_cache && step > 0 {
            (1, t - 1)
        } else {
            (t, 0)
        };
        let tok: Vec<u32> = ids
            .iter()
            .flat_map(|r| r[t - input..].iter().copied())
            .collect();
        let positions: Vec<u32> = keys
            .iter()
            .flat_map(|k| {
                // The position of a real token is the number of real tokens before it
                // (transformers: attention_mask.cumsum(-1) - 1); padding gets 0.
                let mut p = Vec::with_capacity(t);
                let mut real = 0u32;
                for &m in k {
                    p.push(real);
                    real += u32::from(m);
                }
                p[t - input..].to_vec()
            })
            .collect();
        let tok = Tensor::from_vec(tok, (b, input), dev)?;
        let pos = Tensor::from_vec(positions, (b, input), dev)?;
        let mask = if input == 1 && !padded {
            None
        } else {
            Some(model.mask(b, input, past, padded.then_some(keys.as_slice()))?)
        };
        let cache_ref = if use_cache { Some(&mut cache) } else { None };
        let hidden = model.forward_hidden(&tok, &pos, mask.as_ref(), cache_ref, None)?;
        let last = hidden.narrow(1, input - 1, 1)?;
        let logits = model.logits(&last)?.squeeze(1)?.to_vec2::<f32>()?;
        if step == 0 {
            prefill_secs = start.elapsed().as_secs_f64();
        }
        for (r, row) in logits.iter().enumerate() {
            let bad = row.iter().filter(|x| !x.is_finite()).count();
            if bad > 0 && !done[r] {
                return Err(Error::NonFiniteLogits(format!(
                    "{bad} of the {} logits of the next token (generated token {}, row {r}) are NaN or infinite: a weight or an activation of the model is not finite, so no token can be chosen",
                    row.len(),
                    step + 1
                )));
            }
            let next = if done[r] {
                pad_id
            } else {
                sample(row, sampling, &mut rngs[r])
            };
            ids[r].push(next);
            keys[r].push(1);
            if !done[r] {
                out[r].ids.push(next);
                on_token(r, next);
                if eos.contains(&next) {
                    done[r] = true;
                    out[r].stopped_on_eos = true;
                }
            }
        }
        if done.iter().all(|&d| d) {
            break;
        }
    }
    let total = start.elapsed().as_secs_f64();
    for g in &mut out {
        g.prefill_secs = prefill_secs;
        g.decode_secs = total - prefill_secs;
    }
    Ok(out)
}

/// Generates one continuation (a batch of one).
pub fn generate(
    model: &Model,
    prompt: &[u32],
    max_new_tokens: usize,
    sampling: &Sampling,
    eos: &[u32],
    use_cache: bool,
    on_token: &mut dyn FnMut(u32),
) -> Result<Generation> {
    let mut g = generate_batch(
        model,
        &[prompt.to_vec()],
        max_new_tokens,
        sampling,
        eos,
        use_cache,
        &mut |_, t| on_token(t),
    )?;
    Ok(g.remove(0))
}
