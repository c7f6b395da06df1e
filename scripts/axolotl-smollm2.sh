#!/usr/bin/env bash
# `axolotl train` on a converted SmolLM2-135M-Instruct with our axolotl plugin, then the trained
# model read back by this tool (`evaluate`, `generate`).
#
#   AXOLOTL_PYTHON=/path/to/venv/bin/python scripts/axolotl-smollm2.sh [WORK_DIR]
#
# AXOLOTL_PYTHON: an interpreter with axolotl installed (`pip install axolotl`, or
# `scripts/python-env.sh --axolotl`, which the tests use); default python3. DIFF_TRANSFORMER_BIN:
# the binary to use (default: a release build of this checkout). The diff_transformer package is taken from this checkout (PYTHONPATH=python), or
# from the environment when `pip install .` was run there. WORK_DIR defaults to demo/axolotl.
# INIT: the convert flags (default --mirror-weights); INIT="--preserving-mirror
# --no-sublayer-norm" shows the other rule: the plugin ignores the warm-up, with a warning, and
# training starts from the source model's loss.
#
# Steps: import the GGUF, convert with --mirror-weights (a sub-layer norm model, so that the
# warm-up of lambda applies: with --preserving-mirror the plugin ignores it, by design), add
# datasets and a 4-step budget with diff_attn_warmup_steps: 2 and diff_attn_log_every: 1 to the
# axolotl_config.yml that convert wrote, run `axolotl train` on it (CPU), and check the log
# for the plugin's metrics (aggregate/diff_attn_mix 0 -> 0.5 -> 1, layer_0/lambda_full ...).
set -euo pipefail
cd "$(dirname "$0")/.."
py="${AXOLOTL_PYTHON:-python3}"
work="${1:-demo/axolotl}"
export PYTHONPATH="$PWD/python${PYTHONPATH:+:$PYTHONPATH}"
# No telemetry (offline machines would log every failed upload).
export AXOLOTL_DO_NOT_TRACK="${AXOLOTL_DO_NOT_TRACK:-1}"
"$py" -c 'import axolotl, diff_transformer.axolotl' 2>/dev/null || {
  echo "axolotl-smollm2: $py cannot import axolotl (pip install axolotl) and diff_transformer" >&2
  exit 1
}
bin="${DIFF_TRANSFORMER_BIN:-}"
if [ -z "$bin" ]; then
  echo "== build (cargo build --release; minutes the first time)" >&2
  cargo build --release -p diff-transformer
  bin="${CARGO_TARGET_DIR:-target}/release/diff-transformer"
fi
gguf=$(scripts/fetch-smollm2.sh)
mkdir -p "$work"
work=$(cd "$work" && pwd)

echo "== import-gguf" >&2
"$bin" import-gguf "$gguf" "$work/SmolLM2-135M-Instruct" --overwrite
cat >"$work/convert.yml" <<EOF
base_model: $work/SmolLM2-135M-Instruct
output_dir: $work/SmolLM2-135M-Instruct-diff
seed: 42
EOF
init="${INIT:---mirror-weights}"
echo "== convert $init" >&2
# shellcheck disable=SC2086
"$bin" convert "$work/convert.yml" --overwrite $init
cfg="$work/SmolLM2-135M-Instruct-diff/axolotl_config.yml"
cat >>"$cfg" <<EOF
datasets:
  - path: $PWD/data/alpaca-mini.jsonl
    type: alpaca
sequence_len: 128
micro_batch_size: 1
gradient_accumulation_steps: 1
max_steps: 4
learning_rate: 0.0001
optimizer: adamw_torch
lr_scheduler: constant
logging_steps: 1
save_strategy: "no"
val_set_size: 0
bf16: false
fp16: false
tf32: false
dataset_prepared_path: $work/prepared
diff_attn_warmup_steps: 2
diff_attn_log_every: 1
diff_attn_num_monitor_layers: 3
EOF
echo "== $cfg" >&2
cat "$cfg" >&2
trained="$work/SmolLM2-135M-Instruct-diff-trained"
rm -rf "$trained"
echo "== axolotl train (CPU)" >&2
log="$work/axolotl-train.log"
"$py" -m axolotl.cli.train "$cfg" 2>&1 | tee "$log"
needles=("layer_0/lambda_full" "layer_29/attn2_std")
case "$init" in
  *--preserving-mirror*) needles+=("diff_attn_warmup_steps is ignored") ;;
  *) needles+=("aggregate/diff_attn_mix") ;;
esac
for needle in "${needles[@]}"; do
  grep -q "$needle" "$log" || { echo "axolotl-smollm2: '$needle' is not in the axolotl log" >&2; exit 1; }
done
echo "== the warm-up factor logged: $(grep -o "'aggregate/diff_attn_mix': '[0-9.e-]*'" "$log" | cut -d"'" -f4 | tr '\n' ' ')" >&2
echo "== the losses logged: $(grep -o "{'loss': '[0-9.e+-]*'" "$log" | cut -d"'" -f4 | tr '\n' ' ')" >&2
echo "== read back by diff-transformer: generate" >&2
"$bin" generate --model "$trained" --prompt "The capital of France is" --max-new-tokens 12
echo "axolotl-smollm2: OK (log: $log, model: $trained)" >&2
