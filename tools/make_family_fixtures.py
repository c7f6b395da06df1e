#!/usr/bin/env python3
"""Golden fixtures of the model families, from the Python reference (transformers 5.x).

Writes tests/fixtures/families/<case>/ with config.json and model.safetensors as
`save_pretrained` writes them, and expected.json: the prompt ids (longer than every sliding
window), transformers' float32 logits [seq, vocab] (eager attention), and what the case
exercises. One tiny random model per family, built to exercise what makes the family differ
from Llama:
  * mistral_window   MistralForCausalLM, sliding_window 8 < a 24-token prompt, GQA
  * qwen2_window     Qwen2ForCausalLM, q/k/v biases, use_sliding_window with
                     max_window_layers 1 (layer 0 full, layers 1-2 sliding, window 6)
  * qwen2_full       Qwen2ForCausalLM without a window (a Llama config expresses it)
  * qwen3_qk_norm    Qwen3ForCausalLM, head_dim 12 != hidden/heads = 8, q_norm/k_norm
  * gemma3_sliding   Gemma3ForCausalLM (gemma3_text): layers sliding, sliding, full, window 6,
                     own RoPE base for sliding layers, query_pre_attn_scalar 16 != head_dim,
                     final_logit_softcapping, tied embeddings
With --bin (our release binary), also the format-A read-back of a Llama-expressible family:
qwen2_full converted by *our* `convert --mirror-weights` is run by make_fixtures.py's
`format_a_forward` (a PyTorch forward written from the format-A semantics, checked there
against transformers' LlamaForCausalLM) and its logits recorded as expected_format_a.json,
so the test proves that a Llama-config loader reads what we write as we do; and the same
conversion written by `convert --format diffllama --mirror-weights`, read by transformers' own
DiffLlamaForCausalLM (expected_diffllama.json).

Needs torch and transformers >= 5 (pip install torch transformers safetensors).
Run from the repository root: python3 tools/make_family_fixtures.py [--bin target/release/diff-transformer]
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

import torch
from safetensors.torch import load_file
from transformers import (Gemma3ForCausalLM, Gemma3TextConfig, MistralConfig, MistralForCausalLM,
                          Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM)

OUT = os.path.join("tests", "fixtures", "families")
IDS = [1, 5, 9, 13, 2, 7, 30, 11, 42, 3, 17, 23, 8, 60, 4, 33, 19, 27, 50, 6, 12, 44, 31, 10]
COMMON = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6,
              bos_token_id=1, eos_token_id=2, pad_token_id=0)


def randomize(model, seed, gemma=False):
    """Weights with std 0.15; norm weights 1 + N(0, 0.1) (Gemma's (1 + w) norms: N(0, 0.1))
    so that logits are O(1); biases too."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if name.endswith("norm.weight"):
                p.copy_((0.0 if gemma else 1.0) + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.15 * torch.randn(p.shape, generator=g))


def case(name, model_cls, config, seed, what, gemma=False):
    torch.manual_seed(seed)
    config._attn_implementation = "eager"
    model = model_cls(config).eval()
    randomize(model, seed, gemma)
    d = os.path.join(OUT, name)
    os.makedirs(d, exist_ok=True)
    model.save_pretrained(d)
    with torch.no_grad():
        logits = model(torch.tensor([IDS])).logits[0].float()
    with open(os.path.join(d, "expected.json"), "w") as f:
        json.dump({"input_ids": IDS, "logits": logits.tolist(), "source": "transformers",
                   "exercises": what}, f)
    print(f"{name}: {sum(p.numel() for p in model.parameters())} parameters, logits {tuple(logits.shape)}")
    return d


def format_a_readback(bin_, src, name):
    """Our conversion of `src` (format A, mirror init) run by format_a_forward."""
    sys.path.insert(0, os.path.dirname(__file__))
    from make_fixtures import format_a_forward
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "out")
        cfg_yml = os.path.join(tmp, "c.yml")
        with open(cfg_yml, "w") as f:
            f.write(f"base_model: {os.path.abspath(src)}\noutput_dir: {out}\n")
        subprocess.run([bin_, "convert", cfg_yml, "--mirror-weights"], check=True, capture_output=True)
        cfg = json.load(open(os.path.join(out, "config.json")))
        assert cfg["model_type"] == "llama-differential" and cfg["attention_bias"] is True, cfg
        sd = load_file(os.path.join(out, "model.safetensors"))
        logits = format_a_forward(cfg, sd, IDS)
    with open(os.path.join(src, "expected_format_a.json"), "w") as f:
        json.dump({"input_ids": IDS, "logits": logits.tolist(), "source": "format_a_forward",
                   "conversion": ["--mirror-weights"]}, f)
    print(f"{name}: format A read back by format_a_forward, logits {tuple(logits.shape)}")


def diffllama_readback(bin_, src, name):
    """Our `--format diffllama` conversion of `src` (mirror init) run by transformers."""
    from transformers import DiffLlamaForCausalLM
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "out")
        cfg_yml = os.path.join(tmp, "c.yml")
        with open(cfg_yml, "w") as f:
            f.write(f"base_model: {os.path.abspath(src)}\noutput_dir: {out}\n")
        subprocess.run([bin_, "convert", cfg_yml, "--mirror-weights", "--format", "diffllama"],
                       check=True, capture_output=True)
        cfg = json.load(open(os.path.join(out, "config.json")))
        assert cfg["model_type"] == "diffllama" and cfg["attention_bias"] is True, cfg
        model = DiffLlamaForCausalLM.from_pretrained(out, dtype=torch.float32,
                                                     attn_implementation="eager").eval()
        with torch.no_grad():
            logits = model(torch.tensor([IDS])).logits[0].float()
    with open(os.path.join(src, "expected_diffllama.json"), "w") as f:
        json.dump({"input_ids": IDS, "logits": logits.tolist(),
                   "source": "transformers DiffLlamaForCausalLM on our conversion",
                   "conversion": ["--mirror-weights", "--format", "diffllama"]}, f)
    print(f"{name}: --format diffllama read back by DiffLlamaForCausalLM, logits {tuple(logits.shape)}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", help="our release binary, for the format-A read-back fixture")
    args = ap.parse_args()
    case("mistral_window", MistralForCausalLM,
         MistralConfig(**COMMON, num_hidden_layers=2, sliding_window=8, head_dim=8,
                       tie_word_embeddings=False), 31,
         "sliding window 8 shorter than the 24-token prompt, GQA")
    case("qwen2_window", Qwen2ForCausalLM,
         Qwen2Config(**COMMON, num_hidden_layers=3, use_sliding_window=True, sliding_window=6,
                     max_window_layers=1, tie_word_embeddings=False), 32,
         "q/k/v biases; layer 0 full, layers 1-2 sliding window 6 (use_sliding_window, max_window_layers 1)")
    full = case("qwen2_full", Qwen2ForCausalLM,
                Qwen2Config(**COMMON, num_hidden_layers=2, use_sliding_window=False,
                            tie_word_embeddings=True), 33,
                "q/k/v biases without a window, tied embeddings: expressible as format A")
    case("qwen3_qk_norm", Qwen3ForCausalLM,
         Qwen3Config(**COMMON, num_hidden_layers=2, head_dim=12, tie_word_embeddings=False), 34,
         "head_dim 12 != hidden/heads, q_norm/k_norm before RoPE")
    gcfg = dict(COMMON, bos_token_id=2, eos_token_id=1, pad_token_id=0)
    case("gemma3_sliding", Gemma3ForCausalLM,
         Gemma3TextConfig(**gcfg, num_hidden_layers=3, head_dim=8, sliding_window=6,
                          layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                          query_pre_attn_scalar=16, final_logit_softcapping=3.0,
                          rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1000000.0},
                                           "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}},
                          hidden_activation="gelu_pytorch_tanh"), 35,
         "(1 + w) norms, four per block, sqrt(D) embedding scale, GELU-tanh, q/k norms, sliding/full layers with their own RoPE bases, query_pre_attn_scalar 16 != head_dim 8, final_logit_softcapping 3, tied embeddings",
         gemma=True)
    if args.bin:
        format_a_readback(args.bin, full, "qwen2_full")
        diffllama_readback(args.bin, full, "qwen2_full")


if __name__ == "__main__":
    main()
