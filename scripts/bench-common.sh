# Sourced by the bench-*.sh scripts (run from the repository root): builds the release binary
# (`$bin`), imports the real model at f32 into `$work/src` and converts it with default flags
# into `$work/diff` (`$work`: a temporary directory removed on exit), and writes
# `$work/long.jsonl`: one long text (all paragraphs of data/notes-completion.jsonl, three
# times) for 256-token training windows, and defines `train_config` (below).
export RAYON_NUM_THREADS="${RAYON_NUM_THREADS:-2}"
cargo build --release --quiet -p diff-transformer
bin="${CARGO_TARGET_DIR:-$PWD/target}/release/diff-transformer"
# MODEL=smollm2 (default; SmolLM2-135M-Instruct, Llama) or gemma3 (Gemma 3 270M base).
model="${MODEL:-smollm2}"
case "$model" in
  smollm2) gguf=$(scripts/fetch-smollm2.sh) ;;
  gemma3) gguf=$(scripts/fetch-gemma3.sh) ;;
  *) echo "MODEL must be smollm2 or gemma3, not $model" >&2; exit 2 ;;
esac
work=$(mktemp -d "${TMPDIR:-/tmp}/dt-bench.XXXXXX")
trap 'rm -rf "$work"' EXIT
"$bin" import-gguf "$gguf" "$work/src" >/dev/null
printf 'base_model: %s\noutput_dir: %s\n' "$work/src" "$work/diff" >"$work/c.yml"
"$bin" convert "$work/c.yml" >/dev/null
# The V2 conversion (`$work/diff-v2`): the KV cache of the source, twice its query heads.
printf 'base_model: %s\noutput_dir: %s\n' "$work/src" "$work/diff-v2" >"$work/c2.yml"
"$bin" convert "$work/c2.yml" --variant v2 >/dev/null
python3 - "$work/long.jsonl" <<'PY'
import json, sys
paras = [json.loads(l)["text"] for l in open("data/notes-completion.jsonl")]
with open(sys.argv[1], "w") as f:
    f.write(json.dumps({"text": " ".join(paras * 3)}) + "\n")
PY

# train_config FILE MODEL_DIR OUTPUT_DIR STEPS: the benchmark's training config (sequence 256,
# micro batch 1, AdamW at a constant 1e-5 with weight decay 0.01, monitoring off) on long.jsonl.
train_config() {
  cat >"$1" <<YML
base_model: $2
output_dir: $3
datasets:
  - path: $work/long.jsonl
    type: completion
sequence_len: 256
micro_batch_size: 1
gradient_accumulation_steps: 1
max_steps: $4
learning_rate: 0.00001
lr_scheduler: constant
weight_decay: 0.01
logging_steps: 1
diff_attn_log_every: 1000000
YML
}
