"""The axolotl plugin of diff-transformer.

In an axolotl config (the `axolotl_config.yml` that `diff-transformer convert` writes names it):

    plugins:
      - diff_transformer.axolotl.DifferentialTransformerPlugin
    diff_attention: true
    diff_attn_warmup_steps: 100       # optional: mix = min(1, step / 100) scales lambda
    diff_attn_log_every: 100          # lambda / attention metrics every N optimizer steps
    diff_attn_num_monitor_layers: 3   # layers monitored in detail

What it does:
- registers the differential model types (`llama-differential`, `<model_type>-differential`)
  with transformers' `Auto*` classes before axolotl loads the model (remote code is then not
  needed; `trust_remote_code: true` works as well);
- adds `diff_transformer.callbacks.DiffAttnCallback` to the trainer: the warm-up (the mix saved
  with every checkpoint as `diff_attn_mix`), and the monitoring metrics logged through the
  trainer's own `log` (console, TensorBoard, wandb); a `--preserving-mirror` model ignores the
  warm-up with a warning (its outputs equal the source's only at mix = 1);
- refuses to train when `diff_attention` is set and the loaded model has no differential layer
  (nothing is silently disabled).

It reads the same keys as the older `axolotl_diff_transformer` plugin, which it replaces.
"""

from typing import Optional

from . import callbacks

try:
    from axolotl.integrations.base import BasePlugin
except ImportError:  # usable (and testable) without axolotl installed
    BasePlugin = object

try:
    from pydantic import BaseModel
except ImportError:
    BaseModel = object


class DifferentialTransformerArgs(BaseModel):
    """The plugin's keys in axolotl's config schema."""

    diff_attention: Optional[bool] = None
    diff_attn_warmup_steps: Optional[int] = None
    diff_attn_log_every: Optional[int] = 100
    diff_attn_num_monitor_layers: Optional[int] = 3


def _get(cfg, key, default=None):
    value = cfg.get(key) if hasattr(cfg, "get") else getattr(cfg, key, None)
    return default if value is None else value


class DifferentialTransformerPlugin(BasePlugin):
    """axolotl plugin: model registration, warm-up and monitoring (module docstring)."""

    def get_input_args(self):
        return "diff_transformer.axolotl.DifferentialTransformerArgs"

    def register(self, cfg):
        from . import register

        register()

    def pre_model_load(self, cfg):
        from . import register

        register()

    def post_model_load(self, cfg, model):
        if _get(cfg, "diff_attention") and not callbacks.differential_layers(model):
            raise ValueError(
                f"diff_attention: true, but {type(model).__name__} has no differential attention "
                "layer of diff_transformer: base_model must be a checkpoint written by diff-transformer"
            )

    def add_callbacks_pre_trainer(self, cfg, model):
        return []

    def add_callbacks_post_trainer(self, cfg, trainer):
        if not _get(cfg, "diff_attention"):
            return []
        return [
            callbacks.DiffAttnCallback(
                warmup_steps=_get(cfg, "diff_attn_warmup_steps"),
                log_every=_get(cfg, "diff_attn_log_every", 100),
                num_monitor_layers=_get(cfg, "diff_attn_num_monitor_layers", 3),
                trainer=trainer,
            )
        ]
