#!/usr/bin/env python3
"""Writes a Llama checkpoint of a real model's shape with random bf16 weights (for benchmarks).

    tools/make_random_checkpoint.py llama-3.2-1b OUT_DIR
    tools/make_random_checkpoint.py llama-3.1-8b OUT_DIR   # 4 shards + index

Shapes are those of the released config.json files (meta-llama/Llama-3.2-1B, Llama-3.1-8B).
Weights: N(0, 0.02) for matrices, 1 for norms, drawn once as a 4 MiB block of bf16 values and
read from it at a different offset per tensor (writing 16 GB of independent draws in pure
Python would take an hour; the benchmarks need realistic magnitudes, not independence).
The tokenizer is a word-level one over `w0 ... w999` (ids below every vocabulary), enough to
feed prompts to `compare` and `generate`. Needs only the Python standard library.
"""
import json
import os
import random
import struct
import sys

SHAPES = {
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                         vocab_size=128256, tie_word_embeddings=True, shards=1),
    "llama-3.1-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                         vocab_size=128256, tie_word_embeddings=False, shards=4),
}


def block(n, seed=0):
    rng = random.Random(seed)
    out = bytearray(2 * n)
    for i in range(n):
        bits = struct.unpack("<I", struct.pack("<f", rng.gauss(0.0, 0.02)))[0]
        # Round to nearest even bf16.
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        out[2 * i:2 * i + 2] = struct.pack("<H", bits)
    return bytes(out)


def tensors(s):
    h, i, d = s["hidden_size"], s["intermediate_size"], s["head_dim"]
    q, kv = s["num_attention_heads"] * d, s["num_key_value_heads"] * d
    yield "model.embed_tokens.weight", [s["vocab_size"], h]
    for l in range(s["num_hidden_layers"]):
        p = f"model.layers.{l}."
        yield p + "input_layernorm.weight", [h]
        yield p + "self_attn.q_proj.weight", [q, h]
        yield p + "self_attn.k_proj.weight", [kv, h]
        yield p + "self_attn.v_proj.weight", [kv, h]
        yield p + "self_attn.o_proj.weight", [h, q]
        yield p + "post_attention_layernorm.weight", [h]
        yield p + "mlp.gate_proj.weight", [i, h]
        yield p + "mlp.up_proj.weight", [i, h]
        yield p + "mlp.down_proj.weight", [h, i]
    yield "model.norm.weight", [h]
    if not s["tie_word_embeddings"]:
        yield "lm_head.weight", [s["vocab_size"], h]


def write_shard(path, items, data):
    header, offset = {}, 0
    for name, shape in items:
        n = 2
        for x in shape:
            n *= x
        header[name] = {"dtype": "BF16", "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    one = struct.pack("<H", 0x3F80)  # bf16 1.0
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for k, (name, shape) in enumerate(items):
            n = 1
            for x in shape:
                n *= x
            if len(shape) == 1:
                f.write(one * n)
                continue
            need, at = 2 * n, (k * 7919 * 2) % len(data)
            while need > 0:
                chunk = data[at:at + need]
                f.write(chunk)
                need -= len(chunk)
                at = 0


def main():
    kind, out = sys.argv[1], sys.argv[2]
    s = SHAPES[kind]
    os.makedirs(out, exist_ok=True)
    data = block(2 << 20)
    items = list(tensors(s))
    if s["shards"] == 1:
        write_shard(os.path.join(out, "model.safetensors"), items, data)
    else:
        per = -(-len(items) // s["shards"])
        weight_map = {}
        for k in range(s["shards"]):
            name = f"model-{k + 1:05d}-of-{s['shards']:05d}.safetensors"
            part = items[k * per:(k + 1) * per]
            write_shard(os.path.join(out, name), part, data)
            weight_map.update({t: name for t, _ in part})
        json.dump({"metadata": {}, "weight_map": weight_map},
                  open(os.path.join(out, "model.safetensors.index.json"), "w"))
    config = {k: v for k, v in s.items() if k != "shards"}
    config.update(architectures=["LlamaForCausalLM"], model_type="llama", hidden_act="silu",
                  rms_norm_eps=1e-5, rope_theta=500000.0, max_position_embeddings=131072,
                  rope_scaling={"rope_type": "llama3", "factor": 8.0 if kind.endswith("8b") else 32.0,
                                "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                "original_max_position_embeddings": 8192},
                  attention_bias=False, mlp_bias=False, bos_token_id=0, eos_token_id=1,
                  torch_dtype="bfloat16", initializer_range=0.02)
    json.dump(config, open(os.path.join(out, "config.json"), "w"), indent=1)
    vocab = {"[UNK]": 0, "[EOS]": 1}
    vocab.update({f"w{j}": j + 2 for j in range(1000)})
    tok = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": [],
           "normalizer": None, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": None,
           "decoder": {"type": "WordPiece", "prefix": "##", "cleanup": True},
           "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "[UNK]"}}
    json.dump(tok, open(os.path.join(out, "tokenizer.json"), "w"))


if __name__ == "__main__":
    main()
