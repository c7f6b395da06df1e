#!/usr/bin/env bash
# Our speed and the Python reference's, measured alternately on this machine (f32, 2 threads).
#
# The speed targets are figures of transformers + PyTorch; on a shared 2-core
# machine the same program varies by +-30% between runs minutes apart, so this script runs ours
# and the reference (tools/bench_reference.py) in alternation, ROUNDS times (default 3), and
# prints the median of each side and our speed as a fraction of the reference's.
#   forward : `diff-transformer bench` vs the same measurement in transformers (prefill 128
#             tokens, decode 64 tokens after 16), best of 3 within a round;
#   training: `diff-transformer train` (sequence 256, micro batch 1, AdamW, 6 steps, first
#             excluded) vs the same loop in PyTorch.
# Models (MODEL=smollm2, the default): the source SmolLM2-135M (Llama, both sides) and the
# default conversion (ours: llama-differential double heads with sub-layer norm; reference: the
# same conversion written as diffllama and run by transformers' DiffLlamaForCausalLM, standing in
# for the axolotl plugin).
# MODEL=gemma3: the source Gemma 3 270M (transformers' Gemma3ForCausalLM on the other side) and
# its default conversion (gemma3_text-differential). No Python loader reads that format yet, so
# the conversion's reference column is transformers running the *source* model: the ratio then
# says what the differential attention costs against the baseline users run today.
#
# bf16 rows: the source imported with `--dtype bf16` (weights read in place as bf16, f32
# arithmetic) against transformers running the same checkpoint in bfloat16; then our bf16
# decode as a multiple of our f32 decode, both as a fraction of the machine's read bandwidth
# (`bench --bandwidth`), and the bf16 model's logits and 32 greedy tokens against the f32 one's
# (`compare`).
# Needs a Python with torch and transformers: PYTHON=/path/to/python (default python3).
# WHAT=run|train|all (default all).
set -euo pipefail
cd "$(dirname "$0")/.."
py="${PYTHON:-python3}"
rounds="${ROUNDS:-3}"
what="${WHAT:-all}"
"$py" -c 'import torch, transformers' 2>/dev/null || {
  echo "bench-compare: $py cannot import torch and transformers (set PYTHON=...)" >&2
  exit 2
}
source scripts/bench-common.sh
if [[ $model == smollm2 ]]; then
  "$bin" convert "$work/c.yml" --format diffllama --output-dir "$work/diffllama" >/dev/null
  ref_conversion="$work/diffllama"
else
  ref_conversion="$work/src"
fi
results="$work/results.jsonl"
"$bin" import-gguf "$gguf" "$work/src-bf16" --dtype bf16 >/dev/null
ours_run() { # model-dir label
  "$bin" bench --model "$1" --repeat 3 --bandwidth | tee -a "$work/bandwidth.txt" | python3 -c '
import json, re, sys
line = sys.stdin.read()
p, d = re.findall(r"([0-9.]+) tok/s", line)
print(json.dumps({"side": "ours", "model": sys.argv[1], "prefill_tok_s": float(p), "decode_tok_s": float(d)}))
' "$2" >>"$results"
}
ref_run() { # model-dir label [dtype]
  "$py" tools/bench_reference.py run "$1" --dtype "${3:-float32}" 2>/dev/null | tail -1 | python3 -c '
import json, sys
r = json.loads(sys.stdin.read())
print(json.dumps({"side": "reference", "model": sys.argv[1], "prefill_tok_s": r["prefill_tok_s"], "decode_tok_s": r["decode_tok_s"]}))
' "$2" >>"$results"
}
ours_train() {
  train_config "$work/t.yml" "$1" "$work/run" 6
  "$bin" train "$work/t.yml" --overwrite >/dev/null
  python3 -c '
import json, statistics, sys
t = [r["step_time"] for r in map(json.loads, open(sys.argv[1])) if "step_time" in r][1:]
print(json.dumps({"side": "ours", "model": sys.argv[2], "step_s": statistics.median(t)}))
' "$work/run/metrics.jsonl" "$2" >>"$results"
}
ref_train() {
  "$py" tools/bench_reference.py train "$1" --text "$work/long.jsonl" 2>/dev/null | tail -1 |
    python3 -c '
import json, sys
r = json.loads(sys.stdin.read())
print(json.dumps({"side": "reference", "model": sys.argv[1], "step_s": r["step_s_median"]}))
' "$2" >>"$results"
}
for round in $(seq "$rounds"); do
  echo "round $round/$rounds" >&2
  if [[ $what == run || $what == all ]]; then
    ours_run "$work/src" source; ref_run "$work/src" source
    ours_run "$work/diff" conversion; ref_run "$ref_conversion" conversion
    ours_run "$work/src-bf16" source-bf16; ref_run "$work/src-bf16" source-bf16 bfloat16
  fi
  if [[ $what == train || $what == all ]]; then
    ours_train "$work/src" source; ref_train "$work/src" source
    ours_train "$work/diff" conversion; ref_train "$ref_conversion" conversion
  fi
done
python3 - "$results" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
print("per run, in the order run:")
for r in rows:
    figs = ", ".join(f"{k} {r[k]:.2f}" for k in ("prefill_tok_s", "decode_tok_s", "step_s") if k in r)
    print(f"  {r['side']:9} {r['model']:10} {figs}")
def med(side, model, key):
    v = [r[key] for r in rows if r["side"] == side and r["model"] == model and key in r]
    return (statistics.median(v), min(v), max(v)) if v else None
print(f"{'':34} {'ours (median, range)':>24} {'reference (median, range)':>27} {'ours/ref':>9}")
for key, label, higher in [("prefill_tok_s", "prefill 128, tok/s", True),
                           ("decode_tok_s", "decode 64, tok/s", True),
                           ("step_s", "training, s/step", False)]:
    for model in ["source", "conversion", "source-bf16"]:
        o, r = med("ours", model, key), med("reference", model, key)
        if not o or not r:
            continue
        ratio = o[0] / r[0] if higher else r[0] / o[0]
        print(f"{label + ', ' + model:34} {o[0]:8.2f} ({o[1]:.2f}-{o[2]:.2f}) {r[0]:10.2f} ({r[1]:.2f}-{r[2]:.2f}) {ratio:8.2f}x")
print("ours/ref > 1 means ours is faster (for training: reference s/step / ours).")
# Our bf16 decode against our f32 decode, run by run (same round, same machine state).
f32 = [r["decode_tok_s"] for r in rows if r["side"] == "ours" and r["model"] == "source"]
b16 = [r["decode_tok_s"] for r in rows if r["side"] == "ours" and r["model"] == "source-bf16"]
if f32 and b16:
    ratios = [b / f for f, b in zip(f32, b16)]
    print(f"our bf16 decode / our f32 decode, per round: {', '.join(f'{x:.2f}' for x in ratios)} (median {statistics.median(ratios):.2f}x)")
PY
echo "decode traffic against read bandwidth (ours, every run):"
grep "^decode reads" "$work/bandwidth.txt" | sed 's/^/  /'
"$bin" compare "$work/src" "$work/src-bf16" --max-new-tokens 32 --json \
  --prompt "The capital of France is" --prompt "def fibonacci(n):" >"$work/bf16.json"
python3 - "$work/bf16.json" <<'PY'
import json, sys
for r in json.load(open(sys.argv[1])):
    s, c = r["source"]["ids"], r["converted"]["ids"]
    same = sum(a == b for a, b in zip(s, c))
    print(f"bf16 vs f32 weights, prompt {r['prompt']!r}: max |delta logit| {r['max_abs_logit_diff']:.3e}, "
          f"top-1 agreement over the prompt {100 * r['top1_agreement']:.0f}%, "
          f"greedy tokens identical {same}/{len(s)}" + (" (all)" if s == c else " (DIFFER)"))
PY
