#!/usr/bin/env bash
# Checks the pip packaging (pyproject.toml, maturin with bin bindings): builds the wheel with
# `maturin build --release`, checks what it holds (the binary, python/diff_transformer and the
# metadata only: no python/tests, no bytecode, nothing huge), installs it into a fresh temporary
# venv without an index (so no mandatory dependency can hide, and no torch is needed), then, from
# outside the repository, runs `diff-transformer --help` from the venv's PATH and imports
# `diff_transformer` (version equal to the Cargo workspace's). Exits non-zero with the reason
# otherwise; the temporary venv and wheel are removed on exit.
#
# Python: $DIFF_TRANSFORMER_PYTHON (a python with maturin, e.g. the cached venv's), else
# scripts/python-env.sh's venv (created on first use). The cargo build directory is
# $CARGO_TARGET_DIR, default $DIFF_TRANSFORMER_CACHE/target as in .ci/run, so a cached release
# build is reused (the wheel takes the very binary `cargo build --release` makes).
# Prints one line on stdout at the end ("pip-install check: OK ..."); progress on stderr.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
cache="${DIFF_TRANSFORMER_CACHE:-$HOME/.cache/diff-transformer}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$cache/target}"
max_wheel_mb=64

fail() { echo "pip-install check FAILED: $*" >&2; exit 1; }
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1fs", b - a }'; }
t0=$(now)

py="${DIFF_TRANSFORMER_PYTHON:-}"
if [ -z "$py" ]; then
  py=$(scripts/python-env.sh | tail -n 1) || fail "scripts/python-env.sh could not provide a python"
fi
[ -x "$py" ] || fail "python '$py' (DIFF_TRANSFORMER_PYTHON or scripts/python-env.sh) is not an executable"
"$py" -m maturin --version >/dev/null 2>&1 \
  || fail "$py has no maturin (pip install 'maturin>=1.5,<2', or unset DIFF_TRANSFORMER_PYTHON to use scripts/python-env.sh)"
command -v cargo >/dev/null || fail "cargo is not on PATH (the wheel's binary is built with the Rust toolchain)"

work=$(mktemp -d "${TMPDIR:-/tmp}/dt-pipcheck.XXXXXX")
trap 'rm -rf "$work"' EXIT

# 1. The wheel.
t=$(now)
echo "check-pip-install: $("$py" -m maturin --version) building the wheel (CARGO_TARGET_DIR=$CARGO_TARGET_DIR)" >&2
"$py" -m maturin build --release --locked --out "$work/wheels" >&2 || fail "maturin build failed (output above)"
shopt -s nullglob
wheels=("$work"/wheels/*.whl)
shopt -u nullglob
[ "${#wheels[@]}" -eq 1 ] || fail "expected one wheel in $work/wheels, found ${#wheels[@]}"
wheel=${wheels[0]}
echo "check-pip-install: built $(basename "$wheel") in $(since "$t")" >&2

# 2. What it holds.
wheel_kb=$(du -k "$wheel" | cut -f1)
"$py" - "$wheel" "$max_wheel_mb" >&2 <<'PY' || fail "the wheel's contents are wrong (listed above)"
import sys, zipfile
wheel, max_mb = sys.argv[1], int(sys.argv[2])
z = zipfile.ZipFile(wheel)
names = z.namelist()
bad = []
for n in names:
    top = n.split("/", 1)[0]
    if top == "diff_transformer":
        if "__pycache__" in n or n.endswith(".pyc"):
            bad.append(f"bytecode: {n}")
    elif top.endswith(".dist-info"):
        pass
    elif top.endswith(".data"):
        if n != f"{top}/scripts/diff-transformer":
            bad.append(f"unexpected data file: {n}")
    else:
        bad.append(f"outside the package: {n}")
for want in ("diff_transformer/__init__.py",):
    if want not in names:
        bad.append(f"missing: {want}")
if not any(n.endswith(".data/scripts/diff-transformer") for n in names):
    bad.append("missing: the diff-transformer binary (*.data/scripts/diff-transformer)")
size = sum(i.file_size for i in z.infolist())
import os
packed = os.path.getsize(wheel)
if packed > max_mb << 20:
    bad.append(f"wheel is {packed / 2**20:.1f} MiB, over {max_mb} MiB")
print(f"check-pip-install: wheel {packed / 2**20:.1f} MiB ({size / 2**20:.1f} MiB unpacked), {len(names)} files:")
for i in z.infolist():
    print(f"  {i.file_size:>10}  {i.filename}")
for b in bad:
    print(f"  problem: {b}")
sys.exit(1 if bad else 0)
PY

# 3. A fresh venv, the wheel installed from the file alone.
t=$(now)
"$py" -m venv "$work/venv" || fail "could not create a venv with $py"
"$work/venv/bin/python" -m pip install --disable-pip-version-check --no-index --progress-bar off "$wheel" >&2 \
  || fail "pip install of the wheel into a fresh venv failed (a mandatory dependency? output above)"
echo "check-pip-install: installed into a fresh venv in $(since "$t")" >&2

# 4. From outside the repository: the binary on the venv's PATH, the package from site-packages.
cd "$work"
unset PYTHONPATH
bin=$(PATH="$work/venv/bin:$PATH" command -v diff-transformer) || fail "diff-transformer is not on the venv's PATH"
[ "$bin" = "$work/venv/bin/diff-transformer" ] || fail "diff-transformer resolves to $bin, not the venv's"
help=$("$bin" --help 2>&1) || fail "diff-transformer --help exited non-zero: $help"
grep -q '^Usage: diff-transformer' <<<"$help" || fail "diff-transformer --help printed no usage line: $help"
cargo_version=$(sed -n '/^\[workspace.package\]/,/^\[/s/^version *= *"\(.*\)"/\1/p' "$repo/Cargo.toml")
"$work/venv/bin/python" -I - "$work/venv" "$cargo_version" >&2 <<'PY' || fail "import diff_transformer from the installed wheel failed (above)"
import os, sys
from importlib.metadata import version
venv, cargo_version = sys.argv[1], sys.argv[2]
import diff_transformer
where = os.path.realpath(diff_transformer.__file__)
if not where.startswith(os.path.realpath(venv) + os.sep):
    sys.exit(f"diff_transformer was imported from {where}, not from the venv {venv}")
dist = version("diff-transformer")
if not (diff_transformer.__version__ == dist == cargo_version):
    sys.exit(f"versions differ: diff_transformer.__version__ {diff_transformer.__version__}, "
             f"distribution {dist}, Cargo workspace {cargo_version}")
print(f"check-pip-install: import diff_transformer {diff_transformer.__version__} from {where}")
PY
echo "pip-install check: OK ($(basename "$wheel"), $(awk -v k="$wheel_kb" 'BEGIN { printf "%.1f", k / 1024 }') MiB; diff-transformer --help and import diff_transformer from a fresh venv; $(since "$t0"))"
