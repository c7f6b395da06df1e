#!/usr/bin/env python3
"""Golden fixtures for Gemma 3 270M (Q4_K_M GGUF) from transformers' own GGUF loader.

    python3 tools/make_gemma3_fixtures.py GGUF            # writes the two fixtures below
    python3 tools/make_gemma3_fixtures.py GGUF --check DIR  # also compares an import-gguf output

GGUF is the file scripts/fetch-gemma3.sh prints. Everything recorded comes from transformers
(`from_pretrained(..., gguf_file=...)`: gguf-py dequantization, its tensor name map and Gemma's
norm `w - 1`, its config and its GGUF tokenizer converter), never from our own output:

  * tests/fixtures/gemma3_gguf_reference.json: per sampled tensor the shape, float64 sum and sum
    of squares, and 128 entries at (row (37 i) mod R, column (13 i) mod C); the config fields
    transformers builds; the token ids of two prompts (BOS added, as the tokenizer does);
  * tests/fixtures/gemma3_reference.json: the top-20 logits at every position and 20 greedy ids
    for those prompts, Gemma3ForCausalLM in float32 (same schema as smollm2_reference.json).

`--check DIR` (not a fixture): loads DIR, the output of `diff-transformer import-gguf GGUF DIR`,
with transformers and asserts that its tensors, token ids and logits equal the GGUF-loaded ones.

Needs torch, transformers >= 5, gguf, sentencepiece; CI never runs it.
"""
import argparse
import json
import os

import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

PROMPTS = ["The capital of France is",
           "The quick brown fox jumps over the lazy dog, and then it runs into the forest."]

SAMPLED_TENSORS = [
    "model.embed_tokens.weight", "model.norm.weight",
    "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight",
    "model.layers.0.self_attn.v_proj.weight", "model.layers.0.self_attn.o_proj.weight",
    "model.layers.0.self_attn.q_norm.weight", "model.layers.0.self_attn.k_norm.weight",
    "model.layers.0.input_layernorm.weight", "model.layers.0.post_attention_layernorm.weight",
    "model.layers.0.pre_feedforward_layernorm.weight", "model.layers.0.post_feedforward_layernorm.weight",
    "model.layers.0.mlp.gate_proj.weight", "model.layers.17.mlp.down_proj.weight",
    "model.layers.5.self_attn.q_proj.weight",
]

CONFIG_FIELDS = [
    "model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "vocab_size", "max_position_embeddings", "rms_norm_eps",
    "sliding_window", "layer_types", "query_pre_attn_scalar", "hidden_activation",
    "tie_word_embeddings", "rope_parameters", "attn_logit_softcapping", "final_logit_softcapping",
    "attention_bias", "bos_token_id", "eos_token_id", "pad_token_id",
]


def load(gguf):
    d, f = os.path.dirname(os.path.abspath(gguf)), os.path.basename(gguf)
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32,
                                                 attn_implementation="eager").eval()
    return tok, model


def run_prompts(tok, model):
    out = []
    for p in PROMPTS:
        ids = tok(p)["input_ids"]
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0].float()
            gen = model.generate(torch.tensor([ids]), max_new_tokens=20, do_sample=False)[0][len(ids):].tolist()
        top = torch.topk(logits, 20, dim=-1)
        out.append({"prompt": p, "input_ids": ids, "greedy_ids": gen, "logits": logits,
                    "top20_ids": top.indices.tolist(), "top20_logits": top.values.tolist()})
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("gguf")
    ap.add_argument("--check", help="an import-gguf output directory to compare with the GGUF loader")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    tok, model = load(args.gguf)
    assert type(model).__name__ == "Gemma3ForCausalLM", type(model).__name__
    sd = model.state_dict()
    cfg = model.config.to_dict()
    res = run_prompts(tok, model)
    assert res[0]["input_ids"] == [2, 818, 5279, 529, 7001, 563], res[0]["input_ids"]
    for r in res:
        assert tok.decode(r["input_ids"], skip_special_tokens=True) == r["prompt"]

    ref = {"transformers": transformers.__version__, "gguf": os.path.basename(args.gguf),
           "config": {k: cfg.get(k) for k in CONFIG_FIELDS}, "tensors": {},
           "prompts": [{"prompt": r["prompt"], "input_ids": r["input_ids"]} for r in res]}
    for name in SAMPLED_TENSORS:
        t = sd[name].double()
        t2 = t if t.dim() == 2 else t[:, None]
        R, C = t2.shape
        idx = [((37 * i) % R, (13 * i) % C) for i in range(128)]
        ref["tensors"][name] = {"shape": list(sd[name].shape), "sum": t.sum().item(), "sum_sq": (t * t).sum().item(),
                                "samples": [[r, c, t2[r, c].item()] for r, c in idx]}
    with open(os.path.join("tests", "fixtures", "gemma3_gguf_reference.json"), "w") as f:
        json.dump(ref, f)
    logits_ref = {"model": "Gemma 3 270M base Q4_K_M GGUF loaded by transformers' GGUF loader (f32, eager attention)",
                  "transformers": transformers.__version__, "torch": torch.__version__,
                  "prompts": [{k: r[k] for k in ("prompt", "input_ids", "greedy_ids", "top20_ids", "top20_logits")}
                              for r in res]}
    with open(os.path.join("tests", "fixtures", "gemma3_reference.json"), "w") as f:
        json.dump(logits_ref, f)
    print(f"gemma3 fixtures: {len(SAMPLED_TENSORS)} tensors, {len(res)} prompts; greedy: "
          + " | ".join(tok.decode(r["greedy_ids"]) for r in res))

    if args.check:
        c2 = AutoConfig.from_pretrained(args.check).to_dict()
        for k in CONFIG_FIELDS:
            a, b = c2.get(k), cfg.get(k)
            # rms_norm_eps: import-gguf writes the f32's shortest form (1e-6), transformers the
            # f32 widened (9.999999974752427e-07).
            same = abs(a - b) <= 1e-7 * abs(b) if isinstance(b, float) else a == b
            assert same, f"config {k}: {a!r} vs {b!r}"
        tok2 = AutoTokenizer.from_pretrained(args.check)
        m2 = AutoModelForCausalLM.from_pretrained(args.check, dtype=torch.float32, attn_implementation="eager").eval()
        assert type(m2).__name__ == "Gemma3ForCausalLM", type(m2).__name__
        sd2 = m2.state_dict()
        worst = max((sd2[k] - v).abs().max().item() for k, v in sd.items())
        assert worst == 0.0, f"tensors differ by up to {worst}"
        worst_logit = 0.0
        for r in res:
            ids = tok2(r["prompt"])["input_ids"]
            assert ids == r["input_ids"], (ids, r["input_ids"])
            assert tok2.decode(ids, skip_special_tokens=True) == r["prompt"]
            d = (m2(torch.tensor([ids])).logits[0].float() - r["logits"]).abs().max().item()
            assert d < 1e-4, f"{r['prompt']!r}: logits differ by up to {d}"
            worst_logit = max(worst_logit, d)
        print(f"--check {args.check}: config, all {len(sd)} tensors and token ids identical to the GGUF loader; "
              f"logits within {worst_logit:.2e}")


if __name__ == "__main__":
    main()
