"""transformers `TrainerCallback` for differential-attention training (docs/spec.md §5-6).

- **Warm-up** (`warmup_steps`, the axolotl key `diff_attn_warmup_steps`): before optimizer step
  g (g = completed steps, from 0) every layer's lambda is scaled by `mix = min(1, g / warmup)`;
  the mix in force is saved with each checkpoint as `diff_attn_mix` in config.json.
  A model converted with `--preserving-mirror` (`preserving_mirror: true`) computes its source
  only at mix = 1, because its `o_proj` carries 1/(1 - lambda): for it the warm-up is ignored,
  with a warning (the Rust trainer does the same).
- **Monitoring** (`log_every`, `num_monitor_layers`; axolotl keys `diff_attn_log_every`,
  `diff_attn_num_monitor_layers`): on steps with g % log_every == 0, per monitored layer
  `layer_{l}/lambda_q1_norm ... lambda_full, attn1_mean, attn1_std, attn2_mean, attn2_std` and
  over all layers `aggregate/{name}_mean|_std` (sample std) and `aggregate/diff_attn_mix`
  (with a warm-up). The attention statistics come from the step's first micro-batch. The
  metrics go through `trainer.log`, so every reporting integration (console, TensorBoard,
  wandb) and `state.log_history` get them. Monitored layers: k = min(n, L) layers spread evenly,
  `round(i * (L - 1) / (k - 1))` with round-half-to-even (L = 30, k = 3: 0, 14, 29).

  Differential Transformer V2 layers (`diff_attn_variant: "v2"`) have no lambda vectors: per
  monitored layer `lambda_proj_norm`, `lambda_gate_mean`, `lambda_gate_std` (the gate
  sigmoid(lambda_proj(x)) over every token and head, without mix) and the attention statistics of
  the pairs (heads 2i, 2i+1); over all layers `aggregate/lambda_proj_norm_mean|_std` and
  `aggregate/lambda_gate_mean` (mean over monitored layers of mix times the gate mean), as the
  Rust trainer names them.

Usage with a plain `Trainer`: `diff_transformer.callbacks.attach(trainer, warmup_steps=100)`.
"""

import logging
import math
import statistics

from transformers import TrainerCallback

logger = logging.getLogger("diff_transformer")


def monitored_layers(num_layers, k):
    """Layer indices monitored in detail (docs/spec.md §6)."""
    k = min(k, num_layers)
    if k <= 0:
        return []
    stride = (num_layers - 1) / (k - 1) if k > 1 else 0.0
    return [int(round(i * stride)) for i in range(k)]


def mix_at(step, warmup_steps):
    """`min(1, g / warmup_steps)`; 1 without a warm-up."""
    if not warmup_steps:
        return 1.0
    return min(1.0, step / warmup_steps)


def differential_layers(model):
    """The differential attention modules of `model` (ours, however wrapped), in layer order."""
    return [m for m in model.modules()
            if hasattr(m, "capture_stats") and (hasattr(m, "lambda_full") or hasattr(m, "lambda_proj"))]


def _sample_std(xs):
    return statistics.stdev(xs) if len(xs) > 1 else 0.0


class DiffAttnCallback(TrainerCallback):
    """Warm-up of lambda and lambda / attention monitoring (module docstring).

    `trainer` is the `Trainer` whose `log` receives the metrics (set by `attach` and by the
    axolotl plugin); without one, the metrics are appended to `state.log_history`."""

    def __init__(self, warmup_steps=None, log_every=100, num_monitor_layers=3, trainer=None):
        if warmup_steps is not None and warmup_steps < 0:
            raise ValueError(f"diff_attn_warmup_steps must be >= 0, got {warmup_steps}")
        if log_every is None or log_every < 1:
            raise ValueError(f"diff_attn_log_every must be >= 1, got {log_every}")
        self.warmup_steps = warmup_steps or None
        self.log_every = int(log_every)
        self.num_monitor_layers = int(num_monitor_layers)
        self.trainer = trainer
        self.layers = []
        self.monitored = []

    def _attach_model(self, model):
        self.layers = differential_layers(model)
        if not self.layers:
            raise ValueError(
                "diff_attention is set but the model has no differential attention layer of "
                "diff_transformer (load a checkpoint written by diff-transformer)"
            )
        self.config = self.layers[0].config
        if self.warmup_steps and getattr(self.config, "preserving_mirror", False):
            fold = ("--variant v2 --preserving-mirror, whose o_proj is doubled (lambda = 1/2)"
                    if getattr(self.config, "diff_attn_variant", None) == "v2"
                    else "--preserving-mirror, whose o_proj carries 1/(1 - lambda)")
            logger.warning(
                "diff_attn_warmup_steps is ignored (mix = 1 throughout): this model was converted "
                f"with {fold}, so it computes the source model only at mix = 1; a warm-up from "
                "mix = 0 would start from a rescaled attention output"
            )
            self.warmup_steps = None
        self.monitored = monitored_layers(len(self.layers), self.num_monitor_layers)

    def _set_mix(self, step):
        # Without a warm-up a checkpoint's own diff_attn_mix is left as it is.
        if self.warmup_steps:
            self.config.diff_attn_mix = mix_at(step, self.warmup_steps)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._attach_model(model)
        self._set_mix(state.global_step)

    def on_step_begin(self, args, state, control, **kwargs):
        g = state.global_step
        self._set_mix(g)
        if g % self.log_every == 0:
            for l in self.monitored:
                self.layers[l].capture_stats = True

    def on_step_end(self, args, state, control, **kwargs):
        g = state.global_step - 1  # the step just done
        if g % self.log_every == 0:
            mix = mix_at(g, self.warmup_steps) if self.warmup_steps else self._mix()
            # trainer.log clears control.should_log, which the trainer's own loss logging of
            # this step (decided before us) still needs.
            should_log = control.should_log
            self._log(self.metrics(mix), state)
            control.should_log = should_log
        self._set_mix(state.global_step)

    def _mix(self):
        m = getattr(self.config, "diff_attn_mix", None)
        return 1.0 if m is None else float(m)

    def metrics(self, mix):
        """The metrics of docs/spec.md §6 from the layers' current lambdas and captured stats."""
        if hasattr(self.layers[0], "lambda_proj"):
            return self._v2_metrics(mix)
        out = {}
        values = []
        # Computed from the parameters, not through methods of the layer: the layer may be the
        # remote code of a checkpoint written by another version of this package.
        for layer in self.layers:
            v = {
                "lambda_q1_norm": float(layer.lambda_q1.detach().float().norm()),
                "lambda_k1_norm": float(layer.lambda_k1.detach().float().norm()),
                "lambda_q2_norm": float(layer.lambda_q2.detach().float().norm()),
                "lambda_k2_norm": float(layer.lambda_k2.detach().float().norm()),
                "lambda1": math.exp(float((layer.lambda_q1.detach().float() * layer.lambda_k1.detach().float()).sum())),
                "lambda2": math.exp(float((layer.lambda_q2.detach().float() * layer.lambda_k2.detach().float()).sum())),
                "lambda_init": float(layer.lambda_init),
            }
            v["lambda_full"] = v["lambda1"] - v["lambda2"] + v["lambda_init"]
            values.append(v)
        for l in self.monitored:
            for k, x in values[l].items():
                out[f"layer_{l}/{k}"] = x
            captured = self.layers[l].captured
            if captured is not None:
                (m1, s1), (m2, s2) = captured
                out.update({f"layer_{l}/attn1_mean": m1, f"layer_{l}/attn1_std": s1,
                            f"layer_{l}/attn2_mean": m2, f"layer_{l}/attn2_std": s2})
                self.layers[l].captured = None
        for name in ("lambda_q1_norm", "lambda_k1_norm", "lambda_q2_norm", "lambda_k2_norm",
                     "lambda1", "lambda2", "lambda_full"):
            xs = [v[name] * (mix if name == "lambda_full" else 1.0) for v in values]
            out[f"aggregate/{name}_mean"] = statistics.fmean(xs)
            out[f"aggregate/{name}_std"] = _sample_std(xs)
        if self.warmup_steps:
            out["aggregate/diff_attn_mix"] = mix
        return out

    def _v2_metrics(self, mix):
        out = {}
        norms = [float(layer.lambda_proj.weight.detach().float().norm()) for layer in self.layers]
        gate_means = []
        for l in self.monitored:
            out[f"layer_{l}/lambda_proj_norm"] = norms[l]
            captured = self.layers[l].captured
            if captured is not None:
                (m1, s1), (m2, s2), (mg, sg) = captured
                out.update({f"layer_{l}/attn1_mean": m1, f"layer_{l}/attn1_std": s1,
                            f"layer_{l}/attn2_mean": m2, f"layer_{l}/attn2_std": s2,
                            f"layer_{l}/lambda_gate_mean": mg, f"layer_{l}/lambda_gate_std": sg})
                gate_means.append(mg * mix)
                self.layers[l].captured = None
        out["aggregate/lambda_proj_norm_mean"] = statistics.fmean(norms)
        out["aggregate/lambda_proj_norm_std"] = _sample_std(norms)
        if gate_means:
            out["aggregate/lambda_gate_mean"] = statistics.fmean(gate_means)
        if self.warmup_steps:
            out["aggregate/diff_attn_mix"] = mix
        return out

    def _log(self, metrics, state):
        if self.trainer is not None:
            self.trainer.log(metrics)
        else:
            state.log_history.append({**metrics, "step": state.global_step})


def attach(trainer, warmup_steps=None, log_every=100, num_monitor_layers=3):
    """Adds a `DiffAttnCallback` bound to `trainer` (its metrics go through `trainer.log`)."""
    cb = DiffAttnCallback(warmup_steps, log_every, num_monitor_layers, trainer=trainer)
    trainer.add_callback(cb)
    return cb
