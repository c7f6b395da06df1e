#!/usr/bin/env python3
"""Reads a training run's TensorBoard event file with TensorBoard's own EventAccumulator and
checks every scalar against metrics.jsonl (the same values, as float32).

    python tools/check_tensorboard.py OUTPUT_DIR

Needs `pip install tensorboard`; CI does not (the Rust test decodes the file itself).
"""
import glob
import json
import math
import sys

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def main(run_dir: str) -> None:
    files = glob.glob(f"{run_dir}/events.out.tfevents.*")
    assert files, f"no event file in {run_dir}"
    acc = EventAccumulator(run_dir, size_guidance={"scalars": 0})
    acc.Reload()
    tags = acc.Tags()["scalars"]
    expected = {}
    for line in open(f"{run_dir}/metrics.jsonl"):
        rec = json.loads(line)
        step = rec["step"]
        for k, v in rec.items():
            if k == "step" or not isinstance(v, (int, float)):
                continue
            if k.startswith("layer_") or k.startswith("aggregate/"):
                tag = f"diff_attn/{k}"
            elif k.startswith("eval_"):
                tag = f"eval/{k[5:]}"
            elif k == "perplexity":  # logged with the eval record (train/mod.rs Sinks::log)
                tag = "eval/perplexity"
            else:
                tag = f"train/{k}"
            expected[(tag, step)] = v
    seen = set()
    for tag in tags:
        for ev in acc.Scalars(tag):
            want = expected[(tag, ev.step)]
            assert math.isclose(ev.value, want, rel_tol=1e-6, abs_tol=1e-30), (tag, ev.step, ev.value, want)
            seen.add((tag, ev.step))
    assert seen == set(expected), set(expected) ^ seen
    print(f"{files[0]}: TensorBoard read {len(tags)} tags, {len(seen)} (tag, step) scalars, all equal to metrics.jsonl")


if __name__ == "__main__":
    main(sys.argv[1])
