"""Training through transformers with our callback: warm-up and monitoring, saved, reloaded by
our `evaluate` to the same eval loss; and the same under `accelerate launch` with 2 processes."""

import json
import os
import subprocess
import sys

import torch
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM

from conftest import F32, ROOT, WORDS, convert, fixture_copy, run_bin

EVAL_TEXT = " ".join(WORDS[10:40])
TRAIN_SCRIPT = os.path.join(os.path.dirname(__file__), "train_tiny.py")


def converted(tmp):
    src = fixture_copy("tiny", "llama_gqa", os.path.join(tmp, "src"))
    return convert(src, os.path.join(tmp, "conv"))


def our_eval_loss(tmp, model_dir):
    """`diff-transformer evaluate` on four copies of EVAL_TEXT (any split sees the same text)."""
    data = os.path.join(tmp, "eval.jsonl")
    with open(data, "w") as f:
        for _ in range(4):
            f.write(json.dumps({"text": EVAL_TEXT}) + "\n")
    yml = os.path.join(tmp, "eval.yml")
    with open(yml, "w") as f:
        f.write(f"base_model: {model_dir}\noutput_dir: {tmp}/unused\ndatasets:\n  - path: {data}\n"
                f"    type: completion\nval_set_size: 2\nsequence_len: 64\n")
    out = os.path.join(tmp, "eval.json")
    run_bin("evaluate", yml, "--json", out, "--overwrite")
    return json.load(open(out))["eval_loss"]


def python_eval_loss(model_dir):
    """The same loss in PyTorch: the text's tokens plus EOS, every token a label."""
    tok = Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))
    m = AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=True, **F32).eval()
    ids = tok.encode(EVAL_TEXT).ids + [m.config.eos_token_id]
    t = torch.tensor([ids])
    with torch.no_grad():
        return float(m(t, labels=t).loss), m


def run_training(tmp, conv, out, steps, launcher=()):
    cmd = [*launcher, TRAIN_SCRIPT, conv, out, str(steps)]
    if not launcher:
        cmd = [sys.executable, *cmd]
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "python"))
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    return json.load(open(os.path.join(out, "log_history.json"))), p


def test_trainer_warmup_monitoring_save_and_reload_by_our_evaluate(tmp):
    conv = converted(tmp)
    before = AutoModelForCausalLM.from_pretrained(conv, trust_remote_code=True, **F32)
    out = os.path.join(tmp, "trained")
    history, _ = run_training(tmp, conv, out, 3)
    mixes = [h["aggregate/diff_attn_mix"] for h in history if "aggregate/diff_attn_mix" in h]
    assert mixes == [0.0, 0.25, 0.5], history  # warm-up 4, before steps 0, 1, 2
    logged = [h for h in history if "layer_0/lambda_full" in h]
    assert len(logged) == 3
    for key in ("layer_0/attn1_mean", "layer_1/attn2_std", "aggregate/lambda_full_std", "layer_1/lambda_init"):
        assert key in logged[0], sorted(logged[0])
    # Every row of attention probabilities sums to 1: the mean is 1 / (keys visible), in (0, 1].
    assert 0 < logged[0]["layer_0/attn1_mean"] <= 1
    assert any("loss" in h for h in history)
    saved = json.load(open(os.path.join(out, "config.json")))
    assert saved["diff_attn_mix"] == 0.75  # the mix for the next step (3 of 4)
    assert saved["auto_map"]["AutoModelForCausalLM"].startswith("modeling_diff_transformer.")
    assert os.path.exists(os.path.join(out, "modeling_diff_transformer.py"))
    py_loss, after = python_eval_loss(out)
    rust_loss = our_eval_loss(tmp, out)
    assert abs(py_loss - rust_loss) <= 1e-4 * max(1.0, abs(py_loss)), (py_loss, rust_loss)
    # Training changed every lambda vector and every negative q row.
    a0, a1 = before.model.layers[0].self_attn, after.model.layers[0].self_attn
    for name in ("lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2"):
        assert not torch.equal(getattr(a0, name), getattr(a1, name)), name
    H, d = before.config.num_attention_heads, before.config.resolved_head_dim
    assert (a0.q_proj.weight[H * d:] - a1.q_proj.weight[H * d:]).abs().amax(dim=1).min() > 0


def test_accelerate_two_processes(tmp):
    conv = converted(tmp)
    out = os.path.join(tmp, "ddp")
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    history, p = run_training(tmp, conv, out, 2, launcher)
    ranks = sorted(open(os.path.join(out, f"rank{r}.txt")).read() for r in range(2))
    assert ranks == ["0 of 2", "1 of 2"], p.stdout[-2000:]
    assert [h["aggregate/diff_attn_mix"] for h in history if "aggregate/diff_attn_mix" in h] == [0.0, 0.25]
    assert [h["epoch"] for h in history if "loss" in h] == [0.25, 0.5]  # 2 processes x batch 2 of 16 samples
    py_loss, _ = python_eval_loss(out)
    rust_loss = our_eval_loss(tmp, out)
    assert abs(py_loss - rust_loss) <= 1e-4 * max(1.0, abs(py_loss)), (py_loss, rust_loss)


def test_axolotl_plugin_callbacks_and_preserving_rule(tmp, caplog):
    """The plugin's hooks with an axolotl-like cfg; a --preserving-mirror model ignores the
    warm-up (docs/spec.md §6): its first loss equals the source model's."""
    from transformers import Trainer, TrainingArguments

    from diff_transformer.axolotl import DifferentialTransformerArgs, DifferentialTransformerPlugin

    src = fixture_copy("tiny", "llama_gqa", os.path.join(tmp, "src"))
    conv = convert(src, os.path.join(tmp, "pm"), "--preserving-mirror", "--no-sublayer-norm")
    plugin = DifferentialTransformerPlugin()
    assert plugin.get_input_args() == "diff_transformer.axolotl.DifferentialTransformerArgs"
    assert DifferentialTransformerArgs().diff_attn_log_every == 100
    cfg = {"diff_attention": True, "diff_attn_warmup_steps": 4, "diff_attn_log_every": 1}
    plugin.pre_model_load(cfg)
    source = AutoModelForCausalLM.from_pretrained(src, **F32)
    try:
        plugin.post_model_load(cfg, source)
        raise AssertionError("a model without differential layers was accepted")
    except ValueError as e:
        assert "no differential attention layer" in str(e)
    model = AutoModelForCausalLM.from_pretrained(conv, **F32)
    plugin.post_model_load(cfg, model)
    ids = torch.tensor([[5, 9, 13, 2, 7, 30, 11, 42]] * 2)

    class Data(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return {"input_ids": ids[0], "labels": ids[0]}

    args = TrainingArguments(output_dir=os.path.join(tmp, "out"), max_steps=1, per_device_train_batch_size=1,
                             learning_rate=0.0, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True)
    # The source model under the same Trainer: its logged loss is the reference (the Trainer's
    # normalisation of the loss differs between transformers versions).
    source_trainer = Trainer(model=source, args=args, train_dataset=Data())
    source_trainer.train()
    (source_loss,) = [h["loss"] for h in source_trainer.state.log_history if "loss" in h]
    trainer = Trainer(model=model, args=args, train_dataset=Data())
    (cb,) = plugin.add_callbacks_post_trainer(cfg, trainer)
    assert cb.trainer is trainer and cb.warmup_steps == 4
    trainer.add_callback(cb)
    with caplog.at_level("WARNING", logger="diff_transformer"):
        trainer.train()
    assert "diff_attn_warmup_steps is ignored" in caplog.text
    assert cb.warmup_steps is None and getattr(model.config, "diff_attn_mix", None) is None
    (first,) = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert abs(first - source_loss) < 1e-3, (first, source_loss)  # the source's loss at step 0
    assert not any("aggregate/diff_attn_mix" in h for h in trainer.state.log_history)


def test_trainer_on_v2_preserving_monitors_the_gate_and_trains_every_new_row(tmp):
    src = fixture_copy("tiny", "llama_gqa", os.path.join(tmp, "src"))
    conv = convert(src, os.path.join(tmp, "conv"), "--variant", "v2", "--preserving-mirror")
    before = AutoModelForCausalLM.from_pretrained(conv, trust_remote_code=True, **F32)
    out = os.path.join(tmp, "trained")
    history, p = run_training(tmp, conv, out, 2)
    # The warm-up of train_tiny.py is ignored for the preserving V2 start.
    assert "o_proj is doubled" in p.stderr, p.stderr[-2000:]
    logged = [h for h in history if "aggregate/lambda_gate_mean" in h]
    assert len(logged) == 2, history
    assert logged[0]["aggregate/lambda_gate_mean"] == 0.5  # lambda_proj = 0 at the start
    assert logged[0]["layer_0/lambda_gate_std"] == 0.0
    for key in ("layer_1/attn2_mean", "layer_0/lambda_proj_norm", "aggregate/lambda_proj_norm_std"):
        assert key in logged[0], sorted(logged[0])
    assert not any("aggregate/diff_attn_mix" in h for h in history)
    py_loss, after = python_eval_loss(out)
    rust_loss = our_eval_loss(tmp, out)
    assert abs(py_loss - rust_loss) <= 1e-4 * max(1.0, abs(py_loss)), (py_loss, rust_loss)
    H, d = before.config.num_attention_heads, before.config.resolved_head_dim
    for l0, l1 in zip(before.model.layers, after.model.layers):
        a0, a1 = l0.self_attn, l1.self_attn
        assert (a0.lambda_proj.weight - a1.lambda_proj.weight).abs().amax(dim=1).min() > 0
        q0 = a0.q_proj.weight.view(H, 2, d, -1)[:, 1]
        q1 = a1.q_proj.weight.view(H, 2, d, -1)[:, 1]
        assert (q0 - q1).abs().amax(dim=-1).min() > 0  # every row of every new query head
