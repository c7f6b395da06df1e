"""Configuration classes of the differential-attention checkpoints written by `diff-transformer`.

One class per `model_type` the tool writes (docs/formats.md):

| `model_type`                 | class                                | family block      |
|------------------------------|--------------------------------------|-------------------|
| `llama-differential`         | `LlamaDifferentialConfig`            | Llama (format A)  |
| `mistral-differential`       | `MistralDifferentialConfig`          | Mistral           |
| `qwen2-differential`         | `Qwen2DifferentialConfig`            | Qwen2             |
| `qwen3-differential`         | `Qwen3DifferentialConfig`            | Qwen3             |
| `gemma3_text-differential`   | `Gemma3TextDifferentialConfig`       | Gemma 3 (text)    |

Every key of config.json is kept as it is written (the source config verbatim plus the format's
keys: `split_heads`, `sublayer_norm`, `zero_init`, `mirror_weights`, `preserving_mirror`,
`diff_attn_mix`), so a checkpoint saved from Python is read by the Rust runtime exactly as the
one it was loaded from. The per-layer attention (window, RoPE base and scaling) is resolved
from those keys by `layer_attention`, with the rules of the source family's transformers config
class (docs/formats.md §3-4).

This file is also copied into every checkpoint as remote code (`auto_map`): it imports nothing
but transformers.
"""

from transformers import PretrainedConfig

# Per source family, what differs from Llama (transformers `models/<family>/modeling_<family>.py`;
# the Rust runtime's `families/*.rs` hold the same table).
FAMILIES = {
    "llama": dict(
        norm="weight", sandwich=False, activation_key="hidden_act", activation="silu",
        embed_scale=False, qk_norm=False, bias="attention_bias", windows="none",
        local_rope=None, query_pre_attn_scalar=None, final_logit_softcapping=False,
        rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=False,
    ),
}
FAMILIES["mistral"] = dict(FAMILIES["llama"], bias="never", windows="every_layer")
FAMILIES["qwen2"] = dict(FAMILIES["llama"], bias="qkv", windows="use_sliding_window")
FAMILIES["qwen3"] = dict(FAMILIES["llama"], qk_norm=True, windows="use_sliding_window")
FAMILIES["gemma3_text"] = dict(
    norm="one_plus_weight", sandwich=True, activation_key="hidden_activation",
    activation="gelu_pytorch_tanh", embed_scale=True, qk_norm=True, bias="attention_bias",
    windows="pattern", local_rope=("rope_local_base_freq", 10000.0),
    query_pre_attn_scalar=("query_pre_attn_scalar", 256.0), final_logit_softcapping=True,
    rope_theta=1_000_000.0, rms_norm_eps=1e-6, tie_word_embeddings=True,
)


class DifferentialConfig(PretrainedConfig):
    """Base of the differential configs: every config.json key kept as an attribute.

    `family` names the source family whose block the model keeps (a key of `FAMILIES`)."""

    model_type = "llama-differential"
    family = "llama"
    keys_to_ignore_at_inference = ["past_key_values", "cache"]

    def __init__(self, **kwargs):
        fam = FAMILIES[self.family]
        kwargs.setdefault("tie_word_embeddings", fam["tie_word_embeddings"])
        for key, default in (
            ("split_heads", False),
            ("sublayer_norm", True),
            ("zero_init", False),
            ("mirror_weights", False),
        ):
            kwargs.setdefault(key, default)
        # transformers >= 5 reads a `rope_scaling` attribute as `rope_parameters` (a property with
        # a deprecation warning): give it that name directly. Both are read by `rope()`.
        if isinstance(getattr(PretrainedConfig, "rope_scaling", None), property):
            scaling = kwargs.pop("rope_scaling", None)
            if scaling is not None and kwargs.get("rope_parameters") is None:
                kwargs["rope_parameters"] = scaling
        super().__init__(**kwargs)

    # --- resolved geometry (docs/formats.md; the Rust runtime's config.rs) ---

    def family_spec(self):
        return FAMILIES[self.family]

    @property
    def resolved_head_dim(self):
        d = getattr(self, "head_dim", None)
        return d if d else self.hidden_size // self.num_attention_heads

    @property
    def resolved_num_key_value_heads(self):
        return getattr(self, "num_key_value_heads", None) or self.num_attention_heads

    @property
    def resolved_rms_norm_eps(self):
        eps = getattr(self, "rms_norm_eps", None)
        return self.family_spec()["rms_norm_eps"] if eps is None else eps

    def has_bias(self, proj):
        rule = self.family_spec()["bias"]
        if rule == "attention_bias":
            return bool(getattr(self, "attention_bias", False))
        if rule == "qkv":
            return proj != "o_proj"
        return False

    def activation(self):
        fam = self.family_spec()
        return getattr(self, fam["activation_key"], None) or fam["activation"]

    def query_scale(self):
        """`query_pre_attn_scalar ** -0.5` (Gemma 3), else `head_dim ** -0.5`."""
        q = self.family_spec()["query_pre_attn_scalar"]
        if q is None:
            return self.resolved_head_dim ** -0.5
        key, default = q
        value = getattr(self, key, None)
        return (default if value is None else value) ** -0.5

    def final_logit_softcap(self):
        if not self.family_spec()["final_logit_softcapping"]:
            return None
        return getattr(self, "final_logit_softcapping", None)

    def rope(self):
        """(theta, scaling object or None) of the full-attention layers: transformers 4.x keys
        (`rope_theta`, `rope_scaling`) or 5.x `rope_parameters` (flat, or keyed by layer type)."""
        default = self.family_spec()["rope_theta"]
        params = getattr(self, "rope_parameters", None)
        if isinstance(params, dict):
            if isinstance(params.get("full_attention"), dict):
                params = params["full_attention"]
            theta = params.get("rope_theta", getattr(self, "rope_theta", None))
            return (default if theta is None else theta), params
        theta = getattr(self, "rope_theta", None)
        return (default if theta is None else theta), getattr(self, "rope_scaling", None)

    def _local_rope(self):
        local = self.family_spec()["local_rope"]
        if local is None:
            return None
        key, default = local
        params = getattr(self, "rope_parameters", None)
        if isinstance(params, dict) and isinstance(params.get("sliding_attention"), dict):
            sliding = params["sliding_attention"]
            return sliding.get("rope_theta", default), sliding
        value = getattr(self, key, None)
        return (default if value is None else value), None

    def _sliding_layers(self):
        n = self.num_hidden_layers
        rule = self.family_spec()["windows"]
        types = getattr(self, "layer_types", None)
        if rule == "none":
            return [False] * n
        if rule == "every_layer":
            return [True] * n
        if types is not None:
            if len(types) != n or any(t not in ("sliding_attention", "full_attention") for t in types):
                raise ValueError(f"layer_types {types!r}: expected {n} entries of sliding_attention / full_attention")
            return [t == "sliding_attention" for t in types]
        if rule == "use_sliding_window":
            first = getattr(self, "max_window_layers", None)
            first = 28 if first is None else first
            on = bool(getattr(self, "use_sliding_window", False))
            return [on and layer >= first for layer in range(n)]
        pattern = getattr(self, "sliding_window_pattern", None) or 6
        return [(layer + 1) % pattern != 0 for layer in range(n)]

    def layer_attention(self):
        """Per layer: (sliding_window or None, rope_theta, rope scaling object or None)."""
        rule = self.family_spec()["windows"]
        window = getattr(self, "sliding_window", None) if rule != "none" else None
        if rule == "use_sliding_window" and not getattr(self, "use_sliding_window", False):
            window = None
        full = self.rope()
        local = self._local_rope()
        out = []
        for sliding in self._sliding_layers():
            theta, scaling = local if (sliding and local is not None) else full
            out.append((window if sliding else None, theta, scaling))
        return out


class LlamaDifferentialConfig(DifferentialConfig):
    model_type = "llama-differential"
    family = "llama"


class MistralDifferentialConfig(DifferentialConfig):
    model_type = "mistral-differential"
    family = "mistral"


class Qwen2DifferentialConfig(DifferentialConfig):
    model_type = "qwen2-differential"
    family = "qwen2"


class Qwen3DifferentialConfig(DifferentialConfig):
    model_type = "qwen3-differential"
    family = "qwen3"


class Gemma3TextDifferentialConfig(DifferentialConfig):
    model_type = "gemma3_text-differential"
    family = "gemma3_text"


CONFIG_CLASSES = {
    c.model_type: c
    for c in (
        LlamaDifferentialConfig,
        MistralDifferentialConfig,
        Qwen2DifferentialConfig,
        Qwen3DifferentialConfig,
        Gemma3TextDifferentialConfig,
    )
}
