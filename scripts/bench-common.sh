# Sourced by the bench-*.sh scripts (run from the repository root): builds the release binary
# (`$bin`), imports the real model at f32 into `$work/src` and converts it with default flags
# into `$work/diff` (`$work`: a temporary directory removed on exit), and writes
# `$work/long.jsonl`: one long text (all paragraphs of data/notes-completion.jsonl, three
# times) for 256-token training windows.
export RAYON_NUM_THREADS="${RAYON_NUM_THREADS:-2}"
cargo build --release --quiet -p diff-transformer
bin="$PWD/target/release/diff-transformer"
gguf=$(scripts/fetch-smollm2.sh)
work=$(mktemp -d "${TMPDIR:-/tmp}/dt-bench.XXXXXX")
trap 'rm -rf "$work"' EXIT
"$bin" import-gguf "$gguf" "$work/src" >/dev/null
printf 'base_model: %s\noutput_dir: %s\n' "$work/src" "$work/diff" >"$work/c.yml"
"$bin" convert "$work/c.yml" >/dev/null
python3 - "$work/long.jsonl" <<'PY'
import json, sys
paras = [json.loads(l)["text"] for l in open("data/notes-completion.jsonl")]
with open(sys.argv[1], "w") as f:
    f.write(json.dumps({"text": " ".join(paras * 3)}) + "\n")
PY
