"""diff-transformer's Python side.

- `diff_transformer.modeling_diff_transformer`: PyTorch modeling of every differential format the
  `diff-transformer` tool writes (`llama-differential` and the `<model_type>-differential`
  family formats); every checkpoint carries the same two files as remote code, so
  `AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)` needs nothing installed.
- `diff_transformer.callbacks`: transformers `TrainerCallback`s for the warm-up of lambda
  (`diff_attn_warmup_steps`) and the lambda / attention monitoring (`diff_attn_log_every`,
  `diff_attn_num_monitor_layers`).
- `diff_transformer.axolotl`: the axolotl plugin
  (`plugins: [diff_transformer.axolotl.DifferentialTransformerPlugin]`).

Importing the package needs nothing; `register()` (called by the plugin, and on import when
torch and transformers are installed) makes the model types known to the `Auto*` classes, so
`AutoModelForCausalLM.from_pretrained(dir)` works without `trust_remote_code`.
"""

__version__ = "0.1.0"

MODEL_TYPES = (
    "llama-differential",
    "mistral-differential",
    "qwen2-differential",
    "qwen3-differential",
    "gemma3_text-differential",
)


def register():
    """Registers our config and model classes with `AutoConfig` / `AutoModelForCausalLM`.

    A model type that another package (the older axolotl differential-transformer plugin, say)
    registered first is re-registered to ours; it reads the same format. Returns the types."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from .configuration_diff_transformer import CONFIG_CLASSES
    from .modeling_diff_transformer import MODEL_CLASSES

    for model_type, config_class in CONFIG_CLASSES.items():
        AutoConfig.register(model_type, config_class, exist_ok=True)
        AutoModelForCausalLM.register(config_class, MODEL_CLASSES[model_type], exist_ok=True)
    return tuple(CONFIG_CLASSES)


def remote_code_files():
    """Paths of the two files a checkpoint carries as remote code."""
    import os

    here = os.path.dirname(os.path.abspath(__file__))
    return [os.path.join(here, n) for n in ("configuration_diff_transformer.py", "modeling_diff_transformer.py")]


try:  # registration is free when the heavy dependencies are there
    import torch  # noqa: F401
    import transformers  # noqa: F401
except ImportError:
    pass
else:
    register()
