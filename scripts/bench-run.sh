#!/usr/bin/env bash
# Benchmark of our forward pass on the real model (f32, 2 threads): prefill tokens/s (one
# forward of 128 tokens) and decode tokens/s (KV cache, 64 greedy steps after a 16-token
# prompt), for the source SmolLM2-135M, its default double-heads conversion and its default
# V2 conversion (`--variant v2`).
# Reference on the 2-core machine (transformers 5.24 / torch 2.6, sdpa): Llama prefill
# 601 tok/s, decode 22.7 tok/s; the Python plugin's converted model 505 / 18.0 tok/s.
# Side by side with transformers on this machine: scripts/bench-compare.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/bench-common.sh
echo "source model (Llama):"
"$bin" bench --model "$work/src"
echo "default conversion (double heads, sub-layer norm):"
"$bin" bench --model "$work/diff"
echo "V2 conversion (--variant v2: 2H query heads, the source's KV heads):"
"$bin" bench --model "$work/diff-v2"
