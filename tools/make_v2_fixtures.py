#!/usr/bin/env python3
"""Golden fixtures of Differential Transformer V2 (docs/formats.md "V2"), from a PyTorch
reference written here from the V2 definition and run inside transformers' own model of each
family (transformers computes everything but the attention: embeddings, norms, RoPE, sliding
windows, q/k norms, soft caps).

For every source fixture (tests/fixtures/tiny/llama_gqa, tests/fixtures/families/*) it writes
tests/fixtures/v2/<case>/ with:
  * model.safetensors: the source weights with each layer's q_proj grown to 2H heads (source
    head i at head 2i, a new random head at 2i+1, biases too) and a random lambda_proj [H, D];
  * config.json: the source config as our V2 checkpoints carry it (`<model_type>-differential`,
    `diff_attn_variant: "v2"`);
  * expected.json: the prompt ids and the float32 logits [seq, vocab] of the reference.

The reference attention (`v2_attention`): one softmax attention over the 2H query heads, query
head j reading K/V head j // (2H / Hkv); per output head i, O_i = A_2i - sigmoid(x W_lambda^T)_i
* A_2i+1; o_proj unchanged in shape. Before any fixture is written it is checked on a tiny case
against the formulation of microsoft/unilm `Diff-Transformer-V2/multihead_flashdiffv2.py`
(attention output `[b, s, 2H, d]`, `attn[:, :, 0::2] - sigmoid(lambda_proj(x))[..., None] *
attn[:, :, 1::2]`), with torch's own GQA attention in place of flash-attn.

Needs torch and transformers >= 5. Run from the repository root: python3 tools/make_v2_fixtures.py
"""
import json
import os

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from transformers import AttentionInterface, AutoModelForCausalLM
from transformers.masking_utils import AttentionMaskInterface, eager_mask

OUT = os.path.join("tests", "fixtures", "v2")
SOURCES = {
    "llama_gqa": os.path.join("tests", "fixtures", "tiny", "llama_gqa"),
    "mistral_window": os.path.join("tests", "fixtures", "families", "mistral_window"),
    "qwen2_window": os.path.join("tests", "fixtures", "families", "qwen2_window"),
    "qwen3_qk_norm": os.path.join("tests", "fixtures", "families", "qwen3_qk_norm"),
    "gemma3_sliding": os.path.join("tests", "fixtures", "families", "gemma3_sliding"),
}
CLASSES = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3",
           "gemma3_text": "Gemma3"}
NEW_STD = 0.15     # new query rows and biases (as the fixtures' other weights)
LAMBDA_STD = 0.5   # lambda_proj: gates spread over (0, 1) across tokens and heads


def v2_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """V2 attention as transformers calls an attention function: query [b, 2H, s, d], key and
    value [b, Hkv, t, d], an additive mask; returns ([b, s, H, d], None)."""
    b, nq, s, d = query.shape
    g = nq // key.shape[1]
    k = key.repeat_interleave(g, dim=1)
    v = value.repeat_interleave(g, dim=1)
    scores = (query @ k.transpose(2, 3)) * (scaling if scaling is not None else d ** -0.5)
    if attention_mask is not None:
        scores = scores + attention_mask[:, :, :, : k.shape[2]]
    a = torch.softmax(scores.float(), dim=-1).to(query.dtype) @ v      # [b, 2H, s, d]
    a = a.view(b, nq // 2, 2, s, d)
    lam = torch.sigmoid(module.lambda_proj(module.v2_input))          # [b, s, H]
    o = a[:, :, 0] - lam.transpose(1, 2).unsqueeze(-1) * a[:, :, 1]   # [b, H, s, d]
    return o.transpose(1, 2).contiguous(), None


def unilm_attention(q, k, v, lambda_val):
    """unilm's formulation: q [b, s, 2H, d], k/v [b, s, Hkv, d] -> [b, s, H, d] (causal)."""
    attn = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                          is_causal=True, enable_gqa=True).transpose(1, 2)
    attn1, attn2 = attn[:, :, 0::2], attn[:, :, 1::2]
    return attn1 - torch.sigmoid(lambda_val).unsqueeze(-1) * attn2


def check_against_unilm():
    torch.manual_seed(0)
    b, s, h, hkv, d, dm = 2, 7, 4, 2, 8, 16
    x = torch.randn(b, s, dm)
    q = torch.randn(b, s, 2 * h, d)
    k = torch.randn(b, s, hkv, d)
    v = torch.randn(b, s, hkv, d)
    module = torch.nn.Module()
    module.lambda_proj = torch.nn.Linear(dm, h, bias=False)
    module.v2_input = x
    mask = torch.full((s, s), torch.finfo(torch.float32).min).triu(1)[None, None]
    ours, _ = v2_attention(module, q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask)
    ref = unilm_attention(q, k, v, module.lambda_proj(x))
    diff = (ours - ref).abs().max().item()
    assert diff < 1e-5, f"v2_attention differs from unilm's formulation by {diff}"
    print(f"v2_attention = unilm's formulation to {diff:.1e}")


def to_v2(model, seed):
    """Grows each layer's q_proj to 2H heads (source head i at 2i) and adds lambda_proj."""
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    h, d, dm = cfg.num_attention_heads, cfg.head_dim if getattr(cfg, "head_dim", None) else \
        cfg.hidden_size // cfg.num_attention_heads, cfg.hidden_size
    for layer in model.model.layers:
        attn = layer.self_attn
        old = attn.q_proj
        new = torch.nn.Linear(dm, 2 * h * d, bias=old.bias is not None)
        with torch.no_grad():
            w = torch.empty(h, 2, d, dm)
            w[:, 0] = old.weight.view(h, d, dm)
            w[:, 1] = NEW_STD * torch.randn(h, d, dm, generator=g)
            new.weight.copy_(w.reshape(2 * h * d, dm))
            if old.bias is not None:
                bias = torch.empty(h, 2, d)
                bias[:, 0] = old.bias.view(h, d)
                bias[:, 1] = NEW_STD * torch.randn(h, d, generator=g)
                new.bias.copy_(bias.reshape(-1))
        attn.q_proj = new
        attn.lambda_proj = torch.nn.Linear(dm, h, bias=False)
        with torch.no_grad():
            attn.lambda_proj.weight.copy_(LAMBDA_STD * torch.randn(h, dm, generator=g))

        def keep_input(module, args, kwargs):
            module.v2_input = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        attn.register_forward_pre_hook(keep_input, with_kwargs=True)


def main():
    check_against_unilm()
    AttentionInterface.register("v2_reference", v2_attention)
    AttentionMaskInterface.register("v2_reference", eager_mask)
    for i, (name, src) in enumerate(SOURCES.items()):
        expected = json.load(open(os.path.join(src, "expected.json")))
        ids = expected["input_ids"]
        model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32,
                                                     attn_implementation="v2_reference").eval()
        assert getattr(model.config, "attn_logit_softcapping", None) is None
        to_v2(model, 100 + i)
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0].float()
        cfg = json.load(open(os.path.join(src, "config.json")))
        mt = cfg["model_type"]
        cfg.update({
            "model_type": f"{mt}-differential",
            "architectures": [f"{CLASSES[mt]}DifferentialForCausalLM"],
            "diff_attn_variant": "v2",
            "split_heads": False,
            "sublayer_norm": False,
        })
        out = os.path.join(OUT, name)
        os.makedirs(out, exist_ok=True)
        sd = {k: t.contiguous() for k, t in model.state_dict().items()}
        if model.config.tie_word_embeddings:
            sd.pop("lm_head.weight", None)
        save_file(sd, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
        with open(os.path.join(out, "config.json"), "w") as f:
            json.dump(cfg, f, indent=2)
        with open(os.path.join(out, "expected.json"), "w") as f:
            json.dump({"input_ids": ids, "logits": logits.tolist(),
                       "source": "tools/make_v2_fixtures.py v2_attention in transformers' "
                                 f"{type(model).__name__}"}, f)
        print(f"{name}: {sum(t.numel() for t in sd.values())} parameters, logits {tuple(logits.shape)}")


if __name__ == "__main__":
    main()
