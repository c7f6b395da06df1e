#!/usr/bin/env python3
"""Golden fixtures from the Python reference (Hugging Face transformers + PyTorch).

Writes tests/fixtures/tiny/<case>/ with config.json, model.safetensors and expected.json
(input ids and float32 logits [seq, vocab]) for:
  * tiny LlamaForCausalLM models built and run by transformers (GQA, MQA, attention bias,
    head_dim != hidden/heads, tied/untied embeddings, rope_scaling llama3 and linear);
  * tiny `llama-differential` (format A) models: a Llama base plus negative q/k rows, lambda
    vectors, stored lambda_init and subln weights, run by `format_a_forward` below, a PyTorch
    forward written from docs/formats.md §1 (double and split heads, sub-layer norm
    on/off, GQA/MQA, bias, head_dim != D/H, warm-up factor mix).
`format_a_forward` is checked against transformers' LlamaForCausalLM on the plain cases
(lambda = 0, no subln) before anything is written.

  * tiny DiffLlamaForCausalLM models built and run by transformers (H=4/Hkv=2, H=8/Hkv=2,
    head_dim != D/H), and the format-A fixtures exported to diffllama by *our*
    `diff-transformer export` (--bin), loaded back by transformers' DiffLlamaForCausalLM: their
    logits must equal the format-A logits (asserted here) and are recorded, so the fixture
    proves that the Python side reads what we write.
Optionally (--gguf FILE) records tensors of the SmolLM2 GGUF as transformers' GGUF loader
dequantizes and un-permutes them (tests/fixtures/smollm2_gguf_reference.json), the independent
check of import-gguf. Optionally (--real DIR) records transformers' top-20 logits and 20 greedy ids for two prompts
on the imported SmolLM2 checkpoint in tests/fixtures/smollm2_reference.json.

Needs torch and transformers >= 4.48 (pip install torch transformers safetensors); CI never runs it.
Run from the repository root: python3 tools/make_fixtures.py [--real demo/SmolLM2-135M-Instruct]
"""
import argparse
import json
import math
import os

import torch
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

OUT = os.path.join("tests", "fixtures", "tiny")
IDS = [1, 5, 9, 13, 2, 7, 30, 11, 42, 3]


def base_config(**kw):
    c = dict(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False, attention_bias=False,
        bos_token_id=1, eos_token_id=2, torch_dtype="float32",
    )
    c.update(kw)
    return LlamaConfig(**c)


def randomize(model, seed):
    """Weights with std 0.15 (norm weights 1 + N(0, 0.1)) so that logits are O(1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.15 * torch.randn(p.shape, generator=g))


def lambda_init_fn(layer):
    return 0.8 - 0.6 * math.exp(-0.3 * layer)


def rms(x, w, eps):
    x32 = x.float()
    y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return y if w is None else y * w


def repeat_kv(x, n):
    return x if n == 1 else x.repeat_interleave(n, dim=1)


def format_a_forward(cfg, sd, ids, mix=1.0):
    """Format A (llama-differential) forward from docs/formats.md §1; a plain Llama when the
    state dict has no lambda tensors. ids: [seq] -> logits [seq, vocab] (float32)."""
    D, H = cfg["hidden_size"], cfg["num_attention_heads"]
    Hkv = cfg.get("num_key_value_heads") or H
    d = cfg.get("head_dim") or D // H
    eps = cfg["rms_norm_eps"]
    split = cfg.get("split_heads", False)
    lc = LlamaConfig(**{k: v for k, v in cfg.items() if k not in ("model_type", "architectures")})
    rope = LlamaRotaryEmbedding(lc)
    x = sd["model.embed_tokens.weight"][torch.tensor(ids)][None]  # [1, s, D]
    s = len(ids)
    pos = torch.arange(s)[None]
    cos, sin = rope(x, pos)
    mask = torch.full((s, s), float("-inf")).triu(1)
    lin = lambda t, p: torch.nn.functional.linear(t, sd[p + ".weight"], sd.get(p + ".bias"))
    for l in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{l}."
        h = rms(x, sd[p + "input_layernorm.weight"], eps)
        a = p + "self_attn."
        q, k, v = lin(h, a + "q_proj"), lin(h, a + "k_proj"), lin(h, a + "v_proj")
        heads = lambda t: t.view(1, s, -1, d).transpose(1, 2)  # [1, n, s, d]
        v = heads(v)
        if a + "lambda_q1" not in sd:
            q, k = heads(q), heads(k)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            att = (q @ repeat_kv(k, H // Hkv).transpose(-1, -2)) / math.sqrt(d) + mask
            o = torch.softmax(att.float(), -1) @ repeat_kv(v, H // Hkv)
        else:
            q1, q2 = [heads(t) for t in q.chunk(2, -1)]
            k1, k2 = [heads(t) for t in k.chunk(2, -1)]
            q1, k1 = apply_rotary_pos_emb(q1, k1, cos, sin)
            q2, k2 = apply_rotary_pos_emb(q2, k2, cos, sin)
            nq, nk = q1.shape[1], k1.shape[1]
            v = repeat_kv(v, H // Hkv)
            if split:
                v = torch.cat(v.chunk(2, dim=1), dim=-1)  # [1, H/2, s, 2d]
            a1 = torch.softmax(((q1 @ repeat_kv(k1, nq // nk).transpose(-1, -2)) / math.sqrt(d) + mask).float(), -1)
            a2 = torch.softmax(((q2 @ repeat_kv(k2, nq // nk).transpose(-1, -2)) / math.sqrt(d) + mask).float(), -1)
            lam = (torch.exp(torch.sum(sd[a + "lambda_q1"].float() * sd[a + "lambda_k1"].float()))
                   - torch.exp(torch.sum(sd[a + "lambda_q2"].float() * sd[a + "lambda_k2"].float()))
                   + sd[a + "lambda_init"].float())
            o = a1 @ v - mix * lam * (a2 @ v)
            if a + "subln.weight" in sd:
                o = rms(o, sd[a + "subln.weight"], eps)
        o = o.transpose(1, 2).reshape(1, s, -1)
        x = x + lin(o, a + "o_proj")
        h = rms(x, sd[p + "post_attention_layernorm.weight"], eps)
        m = p + "mlp."
        x = x + lin(torch.nn.functional.silu(lin(h, m + "gate_proj")) * lin(h, m + "up_proj"), m + "down_proj")
    x = rms(x, sd["model.norm.weight"], eps)
    head = sd.get("lm_head.weight", sd["model.embed_tokens.weight"])
    return (x @ head.T)[0].float()


def save_case(name, cfg_dict, sd, logits, ids, extra=None):
    d = os.path.join(OUT, name)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(cfg_dict, f, indent=2)
    save_file({k: v.contiguous() for k, v in sd.items()}, os.path.join(d, "model.safetensors"), metadata={"format": "pt"})
    exp = {"input_ids": ids, "logits": logits.tolist(), "source": "transformers" if extra is None else "format_a_forward"}
    if extra:
        exp.update(extra)
    with open(os.path.join(d, "expected.json"), "w") as f:
        json.dump(exp, f)


def llama_case(name, seed, **kw):
    cfg = base_config(**kw)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).eval()
    randomize(model, seed)
    with torch.no_grad():
        logits = model(torch.tensor([IDS])).logits[0].float()
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if cfg.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    cfg_dict = cfg.to_dict()
    cfg_dict["architectures"] = ["LlamaForCausalLM"]
    with torch.no_grad():
        mine = format_a_forward(cfg_dict, sd, IDS)
    err = (mine - logits).abs().max().item()
    assert err < 1e-5, f"{name}: format_a_forward disagrees with transformers by {err}"
    save_case(name, cfg_dict, sd, logits, IDS)
    return cfg_dict, sd


def diff_case(name, base, layout, sublayer_norm, seed, mix=1.0):
    cfg, sd = base
    cfg = dict(cfg)
    g = torch.Generator().manual_seed(seed)
    H, Hkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    d = cfg.get("head_dim") or cfg["hidden_size"] // H
    out = {}
    for k, v in sd.items():
        out[k] = v.clone()
    for l in range(cfg["num_hidden_layers"]):
        a = f"model.layers.{l}.self_attn."
        if layout == "double":
            for proj in ("q_proj", "k_proj"):
                w = sd[a + proj + ".weight"]
                out[a + proj + ".weight"] = torch.cat([w, 0.15 * torch.randn(w.shape, generator=g)], 0)
                if a + proj + ".bias" in sd:
                    b = sd[a + proj + ".bias"]
                    out[a + proj + ".bias"] = torch.cat([b, 0.1 * torch.randn(b.shape, generator=g)], 0)
        for n in ("lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2"):
            out[a + n] = 0.1 * torch.randn(d, generator=g)
        out[a + "lambda_init"] = torch.tensor(lambda_init_fn(l), dtype=torch.float32)
        if sublayer_norm:
            width = d if layout == "double" else 2 * d
            out[a + "subln.weight"] = 1.0 + 0.1 * torch.randn(width, generator=g)
    cfg.update(model_type="llama-differential", architectures=["LlamaDifferentialForCausalLM"],
               split_heads=layout == "split", sublayer_norm=sublayer_norm, zero_init=False, mirror_weights=False)
    with torch.no_grad():
        logits = format_a_forward(cfg, out, IDS, mix=mix)
    save_case(name, cfg, out, logits, IDS, extra={"mix": mix})


def diffllama_case(name, seed, **kw):
    from transformers import DiffLlamaConfig, DiffLlamaForCausalLM
    c = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
             rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False, bos_token_id=1,
             eos_token_id=2, lambda_std_dev=0.1)
    c.update(kw)
    cfg = DiffLlamaConfig(**c)
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = DiffLlamaForCausalLM(cfg).eval()
    randomize(model, seed)
    with torch.no_grad():
        # lambda vectors: N(0, 0.1) as at initialisation, not the 0.15 of randomize().
        g = torch.Generator().manual_seed(seed + 100)
        for n, p in model.named_parameters():
            if "lambda_" in n:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
        logits = model(torch.tensor([IDS])).logits[0].float()
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    cfg_dict = cfg.to_dict()
    cfg_dict["architectures"] = ["DiffLlamaForCausalLM"]
    save_case(name, cfg_dict, sd, logits, IDS)


def exported_case(bin_, case):
    """Our exporter's diffllama output of a format-A fixture, read by transformers."""
    import shutil
    import subprocess
    from transformers import DiffLlamaForCausalLM
    src = os.path.join(OUT, case)
    dst = os.path.join("tests", "fixtures", "exported", case + "_to_diffllama")
    if os.path.exists(dst):
        shutil.rmtree(dst)
    subprocess.run([bin_, "export", "--to", "diffllama", src, dst], check=True)
    model = DiffLlamaForCausalLM.from_pretrained(dst, torch_dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        logits = model(torch.tensor([IDS])).logits[0].float()
    a = json.load(open(os.path.join(src, "expected.json")))
    err = (logits - torch.tensor(a["logits"])).abs().max().item()
    assert err < 1e-4, f"{case}: transformers' DiffLlama on our export differs from format A by {err}"
    with open(os.path.join(dst, "expected.json"), "w") as f:
        json.dump({"input_ids": IDS, "logits": logits.tolist(), "source": "transformers DiffLlamaForCausalLM on our export",
                   "max_abs_vs_format_a": err}, f)
    print(f"{case}: transformers reads our diffllama export; max |delta| vs format A = {err:.2e}")


def gradient_case(case):
    """Loss (mean next-token cross-entropy over IDS) and the L2 norm of every parameter's
    gradient after one backward through format_a_forward, for a format-A fixture."""
    from safetensors.torch import load_file
    d = os.path.join(OUT, case)
    cfg = json.load(open(os.path.join(d, "config.json")))
    sd = load_file(os.path.join(d, "model.safetensors"))
    params = {k: v.clone().requires_grad_(not k.endswith("lambda_init")) for k, v in sd.items()}
    with torch.enable_grad():
        logits = format_a_forward(cfg, params, IDS)
        loss = torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(IDS[1:]))
        loss.backward()
    norms = {k: v.grad.norm().item() for k, v in params.items() if v.grad is not None}
    with open(os.path.join(d, "gradients.json"), "w") as f:
        json.dump({"input_ids": IDS, "loss": loss.item(), "grad_norms": norms,
                   "source": "torch autograd through format_a_forward"}, f, indent=1)
    print(f"{case}: loss {loss.item():.6f}, {len(norms)} gradient norms")


SAMPLED_TENSORS = [
    "model.embed_tokens.weight", "model.norm.weight",
    "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight",
    "model.layers.0.self_attn.v_proj.weight", "model.layers.0.self_attn.o_proj.weight",
    "model.layers.0.input_layernorm.weight", "model.layers.14.mlp.down_proj.weight",
    "model.layers.29.self_attn.q_proj.weight", "model.layers.29.self_attn.k_proj.weight",
]


def gguf_reference(gguf_path):
    """transformers' own GGUF loader (gguf-py dequantization + its q/k un-permutation) on the
    SmolLM2 GGUF: per tensor the shape, float64 sum and sum of squares, and 256 sampled entries
    (row (37 i) mod R, column (13 i) mod C), so that a wrong row permutation is caught."""
    model = LlamaForCausalLM.from_pretrained(os.path.dirname(gguf_path), gguf_file=os.path.basename(gguf_path),
                                             torch_dtype=torch.float32).eval()
    sd = model.state_dict()
    out = {"transformers": __import__("transformers").__version__, "tensors": {}}
    for name in SAMPLED_TENSORS:
        t = sd[name].double()
        t2 = t if t.dim() == 2 else t[:, None]
        R, C = t2.shape
        idx = [((37 * i) % R, (13 * i) % C) for i in range(256)]
        out["tensors"][name] = {"shape": list(sd[name].shape), "sum": t.sum().item(), "sum_sq": (t * t).sum().item(),
                                "samples": [[r, c, t2[r, c].item()] for r, c in idx]}
    with open(os.path.join("tests", "fixtures", "smollm2_gguf_reference.json"), "w") as f:
        json.dump(out, f)
    print(f"gguf reference: {len(SAMPLED_TENSORS)} tensors")


def real(dir_):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(dir_)
    model = LlamaForCausalLM.from_pretrained(dir_, torch_dtype=torch.float32).eval()
    prompts = ["The capital of France is", "def fibonacci(n):"]
    res = {"model": "SmolLM2-135M-Instruct Q4_1 GGUF imported by diff-transformer import-gguf (f32)",
           "transformers": __import__("transformers").__version__, "torch": torch.__version__, "prompts": []}
    for p in prompts:
        ids = tok(p, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0].float()
            gen = model.generate(torch.tensor([ids]), max_new_tokens=20, do_sample=False)[0][len(ids):].tolist()
        top = torch.topk(logits, 20, dim=-1)
        res["prompts"].append({"prompt": p, "input_ids": ids, "greedy_ids": gen,
                               "top20_ids": top.indices.tolist(), "top20_logits": top.values.tolist()})
    with open(os.path.join("tests", "fixtures", "smollm2_reference.json"), "w") as f:
        json.dump(res, f)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--real", help="imported SmolLM2 directory (from import-gguf)")
    ap.add_argument("--bin", default="target/release/diff-transformer", help="our binary, for the export fixtures")
    ap.add_argument("--gguf", help="the SmolLM2 GGUF, for transformers' GGUF-loader reference tensors")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    gqa = llama_case("llama_gqa", 1)
    mqa = llama_case("llama_mqa_tied_bias", 2, num_key_value_heads=1, tie_word_embeddings=True, attention_bias=True)
    hd = llama_case("llama_head_dim_llama3", 3, head_dim=12,
                    rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 8})
    lin = llama_case("llama_linear_rope", 4, rope_scaling={"rope_type": "linear", "factor": 2.0})
    diff_case("diff_double_subln_gqa", gqa, "double", True, 10)
    diff_case("diff_double_nosubln_mqa_bias", mqa, "double", False, 11)
    diff_case("diff_split_subln_gqa", gqa, "split", True, 12)
    diff_case("diff_double_head_dim_llama3", hd, "double", True, 13)
    diff_case("diff_split_nosubln_linear_mix", lin, "split", False, 14, mix=0.5)
    diffllama_case("diffllama_h4_kv2", 20)
    diffllama_case("diffllama_h8_kv2", 21, num_attention_heads=8)
    diffllama_case("diffllama_head_dim", 22, head_dim=12)
    for case in ("diff_double_subln_gqa", "diff_split_subln_gqa", "diff_double_head_dim_llama3"):
        exported_case(args.bin, case)
    for case in ("diff_double_subln_gqa", "diff_split_subln_gqa", "diff_double_nosubln_mqa_bias"):
        gradient_case(case)
    if args.real:
        real(args.real)
    if args.gguf:
        gguf_reference(args.gguf)


if __name__ == "__main__":
    main()
