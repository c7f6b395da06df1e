#!/usr/bin/env bash
# Benchmark of fine-tuning on the real model (f32, 2 threads, sequence 256, micro batch 1,
# AdamW): seconds per optimizer step for the source SmolLM2-135M and its default conversion.
# Each run does STEPS steps (default 6) on full 256-token windows of data/notes-completion.jsonl;
# the first step (allocation warm-up, step-0 monitoring) is excluded; median, min and max of the
# rest are printed. Reference on the 2-core machine (transformers 5.24 / torch 2.6 AdamW):
# Llama 1.76 s/step, the Python plugin's converted model 2.31 s/step.
# Side by side with transformers on this machine: scripts/bench-compare.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
steps="${STEPS:-6}"
source scripts/bench-common.sh
for model in src diff; do
  train_config "$work/t-$model.yml" "$work/$model" "$work/run-$model" "$steps"
  "$bin" train "$work/t-$model.yml" >/dev/null
  python3 - "$work/run-$model/metrics.jsonl" "$model" <<'PY'
import json, statistics, sys
recs = [json.loads(l) for l in open(sys.argv[1])]
t = [r["step_time"] for r in recs if "step_time" in r][1:]
name = {"src": "source model (Llama)", "diff": "default conversion (double heads, sub-layer norm)"}[sys.argv[2]]
print(f"{name}: {statistics.median(t):.2f} s/step (median of {len(t)}; min {min(t):.2f}, max {max(t):.2f})")
PY
  rm -rf "$work/run-$model"
done
