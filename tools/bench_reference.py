#!/usr/bin/env python3
"""The Python reference's speed on *this* machine, measured the way our benchmarks measure ours.

The speed targets of the forward pass and of fine-tuning were given as figures of Hugging Face
transformers + PyTorch on "this machine class". A shared 2-core machine varies by +-30% between
runs minutes apart, so a figure measured elsewhere, or an hour earlier, says little; this script
measures the reference now, and `scripts/bench-compare.sh` runs it alternately with ours.

  run   : prefill tokens/s (one forward of 128 tokens, logits for every position, best of
          --repeat) and decode tokens/s (KV cache, 64 greedy steps after a 16-token prompt, best
          of --repeat; the prompt's forward is not timed). The same synthetic ids as
          `diff-transformer bench`: id_i = (7919 i + 13) mod vocab.
  train : seconds per optimizer step, sequence 256, micro batch 1, AdamW (lr 1e-5, weight decay
          0.01 on tensors of 2+ dimensions, as ours), gradient clipping at 1.0, loss on every
          token; consecutive 256-token windows of the given text file's "text" fields; the first
          step is excluded, median / min / max of the rest.

Models: a Llama directory (our `import-gguf` output) runs as LlamaForCausalLM; a `diffllama`
directory (our `convert --format diffllama`) runs as transformers' DiffLlamaForCausalLM, the
stand-in for the axolotl plugin's converted model (the plugin needs all of axolotl; both compute
two softmax maps per head). Attention implementation: transformers' default (sdpa where the model
supports it). f32, torch.set_num_threads(--threads).

Prints one JSON object per line. Needs torch and transformers (pip install torch transformers);
CI never runs it. Example:
  python3 tools/bench_reference.py run demo/SmolLM2-135M-Instruct
  python3 tools/bench_reference.py train demo/SmolLM2-135M-Instruct --text long.jsonl
"""
import argparse
import json
import statistics
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


DTYPE = torch.float32


def load(path, train):
    m = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPE)
    return m.train() if train else m.eval()


def synthetic_ids(n, vocab):
    return torch.tensor([[(i * 7919 + 13) % vocab for i in range(n)]])


@torch.no_grad()
def bench_run(args):
    m = load(args.model, train=False)
    vocab = m.config.vocab_size
    prefill = synthetic_ids(args.prefill_tokens, vocab)
    m(prefill)  # warm-up (allocations, kernel selection)
    best_prefill = best_decode = float("inf")
    for _ in range(args.repeat):
        t = time.perf_counter()
        m(prefill)
        best_prefill = min(best_prefill, time.perf_counter() - t)
        out = m(synthetic_ids(args.prompt_tokens, vocab), use_cache=True)
        cache, tok = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        t = time.perf_counter()
        for _ in range(args.decode_tokens):
            out = m(tok, past_key_values=cache, use_cache=True)
            cache, tok = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        best_decode = min(best_decode, time.perf_counter() - t)
    return {
        "impl": "transformers",
        "model": args.model,
        "model_type": m.config.model_type,
        "threads": torch.get_num_threads(),
        "prefill_tok_s": args.prefill_tokens / best_prefill,
        "decode_tok_s": args.decode_tokens / best_decode,
    }


def bench_train(args):
    m = load(args.model, train=True)
    tok = AutoTokenizer.from_pretrained(args.model)
    text = " ".join(json.loads(l)["text"] for l in open(args.text) if l.strip())
    ids = tok(text, return_tensors="pt").input_ids[0]
    n = args.sequence_len
    windows = [ids[i : i + n] for i in range(0, len(ids) - n + 1, n)]
    if len(windows) < args.steps:
        raise SystemExit(f"{args.text}: {len(windows)} windows of {n} tokens, need {args.steps}")
    decay = [p for p in m.parameters() if p.dim() >= 2]
    no_decay = [p for p in m.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
        lr=1e-5,
    )
    times = []
    for step in range(args.steps):
        x = windows[step].unsqueeze(0)
        t = time.perf_counter()
        loss = m(x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
    rest = times[1:]
    return {
        "impl": "transformers",
        "model": args.model,
        "model_type": m.config.model_type,
        "threads": torch.get_num_threads(),
        "step_s_median": statistics.median(rest),
        "step_s_min": min(rest),
        "step_s_max": max(rest),
        "steps_timed": len(rest),
    }


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("what", choices=["run", "train"])
    p.add_argument("model")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--prefill-tokens", type=int, default=128)
    p.add_argument("--prompt-tokens", type=int, default=16)
    p.add_argument("--decode-tokens", type=int, default=64)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="dtype the model is loaded and run in (run only)")
    p.add_argument("--text", help="JSONL file with a \"text\" field per line (train)")
    p.add_argument("--sequence-len", type=int, default=256)
    p.add_argument("--steps", type=int, default=6)
    args = p.parse_args()
    global DTYPE
    DTYPE = getattr(torch, args.dtype)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.what == "run":
        print(json.dumps(bench_run(args)))
    else:
        if not args.text:
            p.error("train needs --text")
        print(json.dumps(bench_train(args)))


if __name__ == "__main__":
    main()
