"""Every format `convert` writes, read by our PyTorch modeling, against our Rust runtime
(docs/formats.md): logits within 1e-4 on tiny fixtures (f32), for every family and layout.
Also: the source logits our runtime computes equal transformers' own model of the source."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

import transformers

from conftest import F32, PROMPT, ROOT, convert, fixture_copy, runtime_logits

# (fixture kind, name, conversions): each conversion is a list of convert flags.
DEFAULT, SPLIT, NO_SUBLN = [], ["--split-heads"], ["--zero-init", "--no-sublayer-norm"]
PRESERVING = ["--preserving-mirror", "--no-sublayer-norm"]
MIRROR = ["--mirror-weights"]
V2, V2_MIRROR, V2_PRESERVING = ["--variant", "v2"], ["--variant", "v2", "--mirror-weights"], \
    ["--variant", "v2", "--preserving-mirror"]
CASES = [
    ("tiny", "llama_gqa", [DEFAULT, SPLIT, NO_SUBLN, PRESERVING, V2, V2_PRESERVING]),
    ("tiny", "llama_head_dim_llama3", [DEFAULT, MIRROR, V2_MIRROR]),
    ("tiny", "llama_linear_rope", [DEFAULT]),
    ("tiny", "llama_mqa_tied_bias", [DEFAULT, PRESERVING, V2]),
    ("families", "mistral_window", [DEFAULT, SPLIT, PRESERVING, V2]),
    ("families", "qwen2_full", [DEFAULT, SPLIT]),
    ("families", "qwen2_window", [DEFAULT, PRESERVING, V2, V2_PRESERVING]),
    ("families", "qwen3_qk_norm", [DEFAULT, SPLIT, PRESERVING, V2]),
    ("families", "gemma3_sliding", [DEFAULT, NO_SUBLN, PRESERVING, V2, V2_PRESERVING]),
]
TRANSFORMERS_5 = int(transformers.__version__.split(".")[0]) >= 5
PARAMS = [(k, n, f) for k, n, fl in CASES for f in fl]


def python_logits(model_dir, ids, **kw):
    m = AutoModelForCausalLM.from_pretrained(model_dir, **F32, **kw).eval()
    with torch.no_grad():
        return m(torch.tensor([list(ids)])).logits[0].numpy(), m


@pytest.mark.parametrize("kind,name,flags", PARAMS, ids=[f"{n}{''.join(f)}" for _, n, f in PARAMS])
def test_forward_matches_the_runtime(tmp, kind, name, flags):
    src = fixture_copy(kind, name, os.path.join(tmp, "src"))
    conv = convert(src, os.path.join(tmp, "conv"), *flags)
    ids, src_rt, conv_rt = runtime_logits(src, conv, tmp)
    assert len(ids) >= 30
    ours, model = python_logits(conv, ids, trust_remote_code=True)
    # The checkpoint's remote code, or the same classes from the package once another test of
    # this process has registered them (test_remote_code_works_with_nothing_installed checks
    # the remote code alone).
    module = type(model).__module__
    assert module.startswith("transformers_modules") or module == "diff_transformer.modeling_diff_transformer", module
    err = float(np.abs(ours - conv_rt).max())
    assert err <= 1e-4, f"{name} {flags}: max |python - runtime| = {err}"
    if not TRANSFORMERS_5:
        return  # the fixtures' source configs are transformers 5 files (rope_parameters, Qwen3, Gemma 3)
    # The source as transformers reads it: the runtime's source logits are the reference's.
    theirs, _ = python_logits(src, ids)
    src_err = float(np.abs(theirs - src_rt).max())
    assert src_err <= 1e-4, f"{name}: source max |transformers - runtime| = {src_err}"
    if flags in (PRESERVING, V2_PRESERVING):
        assert float(np.abs(ours - theirs).max()) <= 1e-4


def test_registered_classes_load_without_remote_code(tmp):
    import diff_transformer

    assert "qwen3-differential" in diff_transformer.register()
    src = fixture_copy("families", "qwen3_qk_norm", os.path.join(tmp, "src"))
    conv = convert(src, os.path.join(tmp, "conv"), *SPLIT)
    ids, _, conv_rt = runtime_logits(src, conv, tmp)
    ours, model = python_logits(conv, ids)
    assert type(model).__module__ == "diff_transformer.modeling_diff_transformer"
    assert float(np.abs(ours - conv_rt).max()) <= 1e-4


def test_remote_code_works_with_nothing_installed(tmp):
    """A fresh interpreter that cannot import diff_transformer loads the checkpoint."""
    src = fixture_copy("families", "gemma3_sliding", os.path.join(tmp, "src"))
    conv = convert(src, os.path.join(tmp, "conv"))
    ids, _, conv_rt = runtime_logits(src, conv, tmp)
    np.save(os.path.join(tmp, "ids.npy"), ids)
    code = (
        "import sys, numpy as np, torch\n"
        "try:\n    import diff_transformer\n    sys.exit('diff_transformer is importable')\nexcept ImportError: pass\n"
        "from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({conv!r}, trust_remote_code=True, **{F32!r}).eval()\n"
        f"ids = np.load({os.path.join(tmp, 'ids.npy')!r})\n"
        "with torch.no_grad(): out = m(torch.tensor([ids])).logits[0].numpy()\n"
        f"np.save({os.path.join(tmp, 'out.npy')!r}, out)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_MODULES_CACHE"] = os.path.join(tmp, "hf_modules")
    p = subprocess.run([sys.executable, "-c", code], cwd=tmp, env=env, capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr
    out = np.load(os.path.join(tmp, "out.npy"))
    assert float(np.abs(out - conv_rt).max()) <= 1e-4


def assert_cached_generation_equals_full_recompute(conv):
    """generate() with the KV cache equals greedy decoding by full forwards, 10 tokens."""
    m = AutoModelForCausalLM.from_pretrained(conv, trust_remote_code=True, **F32).eval()
    ids = torch.tensor([[3 + (i * 7) % 60 for i in range(12)]])
    with torch.no_grad():
        out = m.generate(ids, max_new_tokens=10, do_sample=False, attention_mask=torch.ones_like(ids))
        seq = ids
        for _ in range(10):
            nxt = m(seq).logits[0, -1].argmax()
            seq = torch.cat([seq, nxt.view(1, 1)], dim=1)
    assert out.tolist() == seq.tolist()


def test_cached_generation_equals_full_recompute(tmp):
    """Past a sliding window too (Mistral, window 8)."""
    src = fixture_copy("families", "mistral_window", os.path.join(tmp, "src"))
    assert_cached_generation_equals_full_recompute(convert(src, os.path.join(tmp, "conv")))


def test_diff_attn_mix_is_read_and_saved(tmp):
    src = fixture_copy("tiny", "llama_gqa", os.path.join(tmp, "src"))
    conv = convert(src, os.path.join(tmp, "conv"))
    m = AutoModelForCausalLM.from_pretrained(conv, trust_remote_code=True, **F32).eval()
    ids = torch.tensor([[5, 9, 13, 2, 7]])
    with torch.no_grad():
        full = m(ids).logits
        m.set_diff_attn_mix(0.25)
        quarter = m(ids).logits
    assert float((full - quarter).abs().max()) > 1e-3
    out = os.path.join(tmp, "saved")
    m.save_pretrained(out)
    again = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, **F32).eval()
    assert again.config.diff_attn_mix == 0.25
    with torch.no_grad():
        assert torch.equal(again(ids).logits, quarter)


@pytest.mark.skipif(not TRANSFORMERS_5, reason="the V2 fixtures' configs are transformers 5 files")
@pytest.mark.parametrize("name", sorted(os.listdir(os.path.join(ROOT, "tests", "fixtures", "v2"))))
def test_v2_matches_its_pytorch_reference(tmp, name):
    """Our V2 modeling on tools/make_v2_fixtures.py's checkpoints: the logits of the reference
    written there (V2 attention inside transformers' model of the family), <= 1e-4."""
    import json

    import diff_transformer

    diff_transformer.register()
    d = os.path.join(ROOT, "tests", "fixtures", "v2", name)
    expected = json.load(open(os.path.join(d, "expected.json")))
    ours, model = python_logits(d, expected["input_ids"])
    assert type(model.model.layers[0].self_attn).__name__ == "DifferentialAttentionV2"
    err = float(np.abs(ours - np.array(expected["logits"])).max())
    assert err <= 1e-4, f"{name}: max |python - reference| = {err}"


def test_v2_cached_generation_equals_full_recompute(tmp):
    src = fixture_copy("families", "gemma3_sliding", os.path.join(tmp, "src"))
    assert_cached_generation_equals_full_recompute(convert(src, os.path.join(tmp, "conv"), *V2))
