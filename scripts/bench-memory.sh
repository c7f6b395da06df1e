#!/usr/bin/env bash
# Benchmark: a Llama-shaped bf16 checkpoint with random weights (SHAPE=llama-3.2-1b, the
# default, 2.5 GB; or llama-3.1-8b, 16 GB in 4 shards), converted with --zero-init
# --no-sublayer-norm, then `compare --expect-preserved` on the pair: the logits must be preserved
# (<= 1e-4) while the weights stay in bf16, read in place from the files.
#
# Prints wall time, peak anonymous memory (RssAnon of /proc/PID/status, sampled every 20 ms:
# what the process itself allocated; file pages of the mapped weights are page cache the kernel
# may reclaim) and peak RSS (anonymous + resident file pages) of each command. Then runs the
# same compare under a memory limit smaller than the model (LIMIT, default 1536M): as root with
# a cgroup v1 memory controller, a cgroup of that limit (the kernel enforces it, page cache
# included); otherwise only the tool's own DIFF_TRANSFORMER_MEMORY_LIMIT (its estimate must fit).
set -euo pipefail
cd "$(dirname "$0")/.."
shape="${SHAPE:-llama-3.2-1b}"
limit="${LIMIT:-1536M}"
export RAYON_NUM_THREADS="${RAYON_NUM_THREADS:-2}"
cargo build --release --quiet -p diff-transformer
bin="${CARGO_TARGET_DIR:-$PWD/target}/release/diff-transformer"
work=$(mktemp -d "${TMPDIR:-/tmp}/dt-bench-memory.XXXXXX")
cg=""
cleanup() {
  rm -rf "$work"
  if [ -n "$cg" ]; then rmdir "$cg" 2>/dev/null || true; fi
}
trap cleanup EXIT

# measure LABEL CMD...: runs CMD, samples its memory, prints the figures; fails with CMD.
measure() {
  local label=$1; shift
  local start end pid anon=0 hwm=0 a h rc=0
  start=$(date +%s.%N)
  "$@" >"$work/out.txt" 2>"$work/err.txt" &
  pid=$!
  while kill -0 "$pid" 2>/dev/null; do
    if [ -r "/proc/$pid/status" ]; then
      a=$(awk '/^RssAnon:/ {print $2}' "/proc/$pid/status" 2>/dev/null || true)
      h=$(awk '/^VmHWM:/ {print $2}' "/proc/$pid/status" 2>/dev/null || true)
      [ -n "$a" ] && [ "$a" -gt "$anon" ] && anon=$a
      [ -n "$h" ] && [ "$h" -gt "$hwm" ] && hwm=$h
    fi
    sleep 0.02
  done
  wait "$pid" || rc=$?
  end=$(date +%s.%N)
  printf '%-58s wall %7.2f s   peak anonymous %7.1f MB   peak RSS %7.1f MB\n' "$label" \
    "$(echo "$end - $start" | bc)" "$(echo "$anon / 1024" | bc -l)" "$(echo "$hwm / 1024" | bc -l)"
  if [ "$rc" -ne 0 ]; then
    echo "  exit $rc:"; sed 's/^/  /' "$work/err.txt" "$work/out.txt" | tail -20
    return "$rc"
  fi
}

echo "nproc: $(nproc); shape: $shape; $(grep MemTotal /proc/meminfo)"
t0=$(date +%s)
python3 tools/make_random_checkpoint.py "$shape" "$work/src"
echo "wrote $(du -sh "$work/src" | cut -f1) of random bf16 weights in $(( $(date +%s) - t0 )) s"
printf 'base_model: %s\noutput_dir: %s\n' "$work/src" "$work/diff" >"$work/c.yml"
measure "convert --zero-init --no-sublayer-norm" "$bin" convert "$work/c.yml" --zero-init --no-sublayer-norm
prompt="w1 w5 w9 w13 w2 w7 w30 w11 w42 w3 w17 w19 w23 w29 w31 w37"
compare=("$bin" compare "$work/src" "$work/diff" --prompt "$prompt" --max-new-tokens 4 --expect-preserved --tolerance 1e-4)
measure "compare --expect-preserved (bf16 weights, f32 compute)" "${compare[@]}"
grep -E "max \|delta" "$work/out.txt" | head -1 | sed 's/^/  /'
tail -1 "$work/err.txt" | sed 's/^/  /'

if [ "$(id -u)" = 0 ] && [ -w /sys/fs/cgroup/memory ]; then
  cg=/sys/fs/cgroup/memory/dt-bench-$$
  mkdir "$cg"
  echo "$limit" >"$cg/memory.limit_in_bytes"
  # Swap would hide the limit.
  echo "$limit" >"$cg/memory.memsw.limit_in_bytes" 2>/dev/null || true
  # Out of the page cache, so that the weights read inside the cgroup are charged to it and
  # the kernel must reclaim them to stay under the limit.
  sync
  echo 1 >/proc/sys/vm/drop_caches 2>/dev/null || echo "(page cache not dropped: no write access to drop_caches)"
  echo "cgroup $cg: memory.limit_in_bytes $(cat "$cg/memory.limit_in_bytes") (the model is $(du -sh "$work/src" | cut -f1))"
  measure "compare under the cgroup limit $limit" \
    bash -c 'echo $$ >"$0/cgroup.procs" && exec "$@"' "$cg" "${compare[@]}"
  grep -E "max \|delta" "$work/out.txt" | head -1 | sed 's/^/  /'
  tail -1 "$work/err.txt" | sed 's/^/  /'
  echo "  cgroup peak usage (page cache included): $(( $(cat "$cg/memory.max_usage_in_bytes") / 1048576 )) MiB, OOM kills: $(awk '/oom_kill / {print $2}' "$cg/memory.oom_control" 2>/dev/null || echo 0)"
else
  echo "not root with a cgroup v1 memory controller: the limit is the tool's own"
  measure "compare with DIFF_TRANSFORMER_MEMORY_LIMIT=$limit" \
    env DIFF_TRANSFORMER_MEMORY_LIMIT="$limit" "${compare[@]}"
fi
# The refusal, for scale: the same compare with the weights rounded to f16 (held in memory).
if DIFF_TRANSFORMER_MEMORY_LIMIT="$limit" "${compare[@]}" --dtype f16 >/dev/null 2>"$work/err.txt"; then
  echo "compare --dtype f16 under $limit: ran"
else
  echo "compare --dtype f16 under $limit: refused: $(cat "$work/err.txt")"
fi
