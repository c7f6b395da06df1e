"""Shared helpers of the Python tests: the `diff-transformer` binary, tiny fixtures with a
word-level tokenizer, conversions and the Rust runtime's logits (`compare --save-logits`).

Run from the repository root: `python -m pytest python/tests` (torch, transformers, numpy,
pytest; the binary from `DIFF_TRANSFORMER_BIN`, else target/debug). `cargo test --workspace`
runs them through crates/cli/tests/python.rs with the cached venv of scripts/python-env.sh."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
sys.path.insert(0, os.path.join(ROOT, "python"))
FIXTURES = os.path.join(ROOT, "tests", "fixtures")

# Words of the tiny tokenizer (ids 3...); the fixtures' vocabularies have 64 ids.
WORDS = (
    "the a an of to and in is it that for on with as are was be by this at from or not but "
    "what which one all were when we there can they has more if no out so up said time about "
    "into than them only other new some could these two may then do first any like now my"
).split()
# 30 words: longer than every fixture's sliding window (6 or 8).
PROMPT = " ".join(WORDS[:30])


def binary():
    b = os.environ.get("DIFF_TRANSFORMER_BIN")
    if b:
        return b
    target = os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target"))
    return os.path.join(target, "debug", "diff-transformer")


def run_bin(*args, check=True):
    p = subprocess.run([binary(), *map(str, args)], capture_output=True, text=True)
    if check and p.returncode != 0:
        raise AssertionError(f"diff-transformer {' '.join(map(str, args))} exited {p.returncode}:\n{p.stdout}\n{p.stderr}")
    return p


def write_word_tokenizer(dir_, vocab_size=64):
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for w in WORDS:
        if len(vocab) >= vocab_size:
            break
        vocab.setdefault(w, len(vocab))
    special = lambda i, c: {"id": i, "content": c, "single_word": False, "lstrip": False,
                            "rstrip": False, "normalized": False, "special": True}
    tok = {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [special(0, "<unk>"), special(1, "<s>"), special(2, "</s>")],
        "normalizer": {"type": "Lowercase"}, "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": None, "decoder": {"type": "WordPiece", "prefix": "##", "cleanup": True},
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"},
    }
    with open(os.path.join(dir_, "tokenizer.json"), "w") as f:
        json.dump(tok, f)
    with open(os.path.join(dir_, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "unk_token": "<unk>",
                   "bos_token": "<s>", "eos_token": "</s>"}, f)


def fixture_copy(kind, name, dst):
    """A fixture model (tests/fixtures/<kind>/<name>) with a tokenizer, copied to dst."""
    shutil.copytree(os.path.join(FIXTURES, kind, name), dst,
                    ignore=shutil.ignore_patterns("expected.json"))
    write_word_tokenizer(dst)
    return dst


def convert(src, out, *flags, extra_yaml=""):
    yml = f"{out}.yml"
    with open(yml, "w") as f:
        f.write(f"base_model: {src}\noutput_dir: {out}\nseed: 7\n{extra_yaml}")
    run_bin("convert", yml, "--overwrite", *flags)
    return out


def runtime_logits(src, conv, tmp, prompt=PROMPT):
    """(input_ids, source logits, converted logits) [seq, vocab] as our runtime computes them."""
    d = os.path.join(tmp, "logits")
    run_bin("compare", src, conv, "--prompt", prompt, "--max-new-tokens", "1",
            "--save-logits", d, "--overwrite")
    m = json.load(open(os.path.join(d, "manifest.json")))["prompts"][0]
    load = lambda k: np.load(os.path.join(d, m[k]))
    return load("input_ids").astype(np.int64).reshape(-1), load("source_logits"), load("converted_logits")


@pytest.fixture
def tmp(tmp_path):
    return str(tmp_path)


def _f32_kwargs():
    import torch
    import transformers

    major = int(transformers.__version__.split(".")[0])
    return {"dtype" if major >= 5 else "torch_dtype": torch.float32}


# `from_pretrained(..., **F32)`: float32 weights (transformers 5 says `dtype`, 4.x `torch_dtype`).
F32 = _f32_kwargs()
