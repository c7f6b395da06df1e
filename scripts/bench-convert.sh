#!/usr/bin/env bash
# Benchmark: import the real SmolLM2-135M GGUF at f32, then convert it (default flags, f32)
# several times; prints wall time and peak RSS of each run (/usr/bin/time -v).
# Targets on the 2-core reference machine: convert wall <= 0.55 s, peak RSS <= 235 MB.
set -euo pipefail
cd "$(dirname "$0")/.."
runs="${RUNS:-5}"
cargo build --release --quiet -p diff-transformer
bin="${CARGO_TARGET_DIR:-$PWD/target}/release/diff-transformer"
gguf=$(scripts/fetch-smollm2.sh)
work=$(mktemp -d "${TMPDIR:-/tmp}/dt-bench.XXXXXX")
trap 'rm -rf "$work"' EXIT

measure() { # label, command...
  local label=$1; shift
  /usr/bin/time -v "$@" >"$work/out.txt" 2>"$work/time.txt" || { cat "$work/out.txt" "$work/time.txt"; exit 1; }
  local wall rss
  wall=$(awk -F': ' '/Elapsed \(wall clock\)/ {n=split($2,a,":"); s=0; for(i=1;i<=n;i++) s=s*60+a[i]; print s}' "$work/time.txt")
  rss=$(awk -F': ' '/Maximum resident set size/ {printf "%.1f", $2/1024}' "$work/time.txt")
  printf '%-40s wall %6.2f s   peak RSS %7.1f MB\n' "$label" "$wall" "$rss"
}

echo "nproc: $(nproc); model: $gguf"
measure "import-gguf (Q4_1 -> f32)" "$bin" import-gguf "$gguf" "$work/src" --dtype f32
cat >"$work/c.yml" <<YML
base_model: $work/src
output_dir: $work/out
YML
# Each run writes a fresh output directory (removing the previous one is not timed).
for i in $(seq "$runs"); do
  rm -rf "$work/out"; sync
  measure "convert default (f32) run $i" "$bin" convert "$work/c.yml"
done
for flags in "--zero-init --no-sublayer-norm" "--mirror-weights" "--sublayer-norm --seed 7"; do
  rm -rf "$work/out"; sync
  # shellcheck disable=SC2086
  measure "convert $flags" "$bin" convert "$work/c.yml" $flags
done
measure "convert default, --overwrite of previous" "$bin" convert "$work/c.yml" --overwrite
du -sh "$work/src" "$work/out" | sed 's/^/size: /'
