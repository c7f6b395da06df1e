#!/usr/bin/env bash
# Creates (once) and reuses the Python environment of the Python tests and the pip-install
# check: a venv at $DIFF_TRANSFORMER_CACHE/venv (default ~/.cache/diff-transformer/venv) with
# torch (PyPI's default wheel, which runs on CPU; it brings the CUDA libraries along: about
# 3 GB to download and 5.6 GB installed, 3 to 4 minutes on a fast link), transformers 5,
# accelerate, safetensors, numpy, pytest and maturin, all from PyPI.
#
# Prints the venv's python path as its last line on stdout, and everything else on stderr:
#   py=$(scripts/python-env.sh | tail -1)
#
# A marker file written after a successful install records the requirement list and the
# versions installed; a venv without it (an interrupted run) or with another requirement list
# is built again from scratch. With the marker in place the script returns at once.
# The base interpreter is python3 (3.10 or later: transformers 5 needs it), or
# $DIFF_TRANSFORMER_BASE_PYTHON.
#
# `scripts/python-env.sh --axolotl` builds the environment of scripts/axolotl-smollm2.sh:
# axolotl 0.19.0 with the torch and transformers it pins ($DIFF_TRANSFORMER_CACHE/venv-axolotl,
# about 3.5 GB to download).
# `scripts/python-env.sh --oldest` builds the second environment the tests use, with the oldest
# versions the Python side supports (transformers 4.48.3, the first with DiffLlama, and torch
# 2.6.0): $DIFF_TRANSFORMER_CACHE/venv-transformers-4.48, about the same size.
set -euo pipefail
cache="${DIFF_TRANSFORMER_CACHE:-$HOME/.cache/diff-transformer}"
venv="$cache/venv"
oldest=0
axolotl=0
if [ "${1:-}" = "--oldest" ]; then
  oldest=1
  venv="$cache/venv-transformers-4.48"
elif [ "${1:-}" = "--axolotl" ]; then
  axolotl=1
  venv="$cache/venv-axolotl"
elif [ -n "${1:-}" ]; then
  echo "usage: scripts/python-env.sh [--oldest | --axolotl]" >&2
  exit 2
fi
py="$venv/bin/python"
marker="$venv/.diff-transformer-env"
base_python="${DIFF_TRANSFORMER_BASE_PYTHON:-python3}"

# Pinned only where the tests need it: transformers 5 (the modeling code follows its API),
# maturin 1.5+ (bin bindings with a python-source folder).
requirements=(
  torch
  "transformers>=5,<6"
  accelerate
  safetensors
  numpy
  pytest
  "maturin>=1.5,<2"
)
if [ "$axolotl" = 1 ]; then
  requirements=("axolotl==0.19.0")
fi
if [ "$oldest" = 1 ]; then
  requirements=(
    "torch==2.6.0"
    "transformers==4.48.3"
    "accelerate>=1.0,<1.4"
    safetensors
    "numpy<2.3"
    pytest
  )
fi
# The marker's first line; any change of the list rebuilds the venv.
want="requirements: ${requirements[*]}"

using() { echo "python-env: using $venv ($(tail -n +2 "$marker" | tr '\n' ' ' | sed 's/ $//'))" >&2; }
ready() { [ -x "$py" ] && [ -f "$marker" ] && [ "$(head -n 1 "$marker")" = "$want" ] && "$py" -c '' 2>/dev/null; }

if ! ready; then
  mkdir -p "$cache"
  # One builder at a time (cargo runs tests in parallel): the others wait, then find it ready.
  exec 9>"$venv.lock"
  if command -v flock >/dev/null; then
    if ! flock -n 9; then
      echo "python-env: another run is building $venv; waiting for it" >&2
      flock 9
    fi
  fi
  if ! ready; then
    command -v "$base_python" >/dev/null || { echo "python-env: $base_python not found (need Python 3.10+ with venv and pip)" >&2; exit 1; }
    "$base_python" -c 'import sys; sys.exit(sys.version_info < (3, 10))' || {
      echo "python-env: $base_python is Python $("$base_python" -c 'import platform; print(platform.python_version())'); transformers 5 needs 3.10 or later (set DIFF_TRANSFORMER_BASE_PYTHON)" >&2
      exit 1
    }
    start=$(date +%s)
    if [ -e "$venv" ]; then
      echo "python-env: $venv is incomplete or out of date (no marker, or another requirement list); removing it to build it again" >&2
      rm -rf "$venv"
    fi
    echo "python-env: creating $venv with $("$base_python" -c 'import sys; print(sys.executable, sys.version.split()[0])')" >&2
    "$base_python" -m venv "$venv"
    echo "python-env: installing from PyPI: ${requirements[*]}" >&2
    echo "python-env: torch is PyPI's default wheel with its CUDA libraries: about 3 GB to download, 5.6 GB on disk" >&2
    # --progress-bar off: pip's bar is meant for a terminal; its lines ("Downloading X (N MB)",
    # "Collecting", "Installing collected packages") still say what it is doing and how large.
    # The log (kept in the venv) gives the total downloaded below.
    "$py" -m pip install --disable-pip-version-check --progress-bar off "${requirements[@]}" 2>&1 \
      | tee "$venv/pip-install.log" >&2
    downloaded=$(grep -oE '^ *Downloading .* \(([0-9.]+) (kB|MB|GB)\)$' "$venv/pip-install.log" \
      | sed -E 's/.*\(([0-9.]+) (kB|MB|GB)\)$/\1 \2/' \
      | awk '{ v = $1; if ($2 == "kB") v /= 1000; if ($2 == "GB") v *= 1000; s += v } END { printf "%.0f MB", s }')
    versions=$("$py" - "${requirements[@]}" <<'PY'
import re, sys
from importlib.metadata import version
for req in sys.argv[1:]:
    name = re.split(r"[<>=!~ \[]", req, maxsplit=1)[0]
    print(f"{name}=={version(name)}")
PY
)
    elapsed=$(( $(date +%s) - start ))
    echo "python-env: installed in ${elapsed}s ($downloaded downloaded), venv $(du -sh "$venv" | cut -f1) on disk; versions:" >&2
    sed 's/^/  /' <<<"$versions" >&2
    # Written last, to a temporary name first: only a complete install has a marker.
    { echo "$want"; echo "python: $("$py" -c 'import platform; print(platform.python_version())')"; echo "$versions"; } >"$marker.tmp"
    mv "$marker.tmp" "$marker"
  else
    using
  fi
else
  using
fi
echo "$py"
