"""PyTorch modeling of the differential-attention checkpoints written by `diff-transformer`.

Reads format A (`llama-differential`, double or split heads, with or without the sub-layer
norm) and the family formats (`mistral-differential`, `qwen2-differential`,
`qwen3-differential`, `gemma3_text-differential`) with the semantics of docs/formats.md, which
the Rust runtime implements too. Format B (`diffllama`) is transformers' own
`DiffLlamaForCausalLM`.

One attention layer, x: [batch, seq, hidden]; H query heads, Hkv key/value heads, head dim d:

    q, k, v = q_proj(x), k_proj(x), v_proj(x)        # q/k rows: positive heads, then negative
    (q_norm / k_norm per head, then RoPE, on every head)
    A1 = softmax(Q1 K1^T * scale + M), A2 = softmax(Q2 K2^T * scale + M)   (f32)
    lambda_full = mix * (exp(<lq1, lk1>) - exp(<lq2, lk2>) + lambda_init)  (f32, stored lambda_init)
    O = A1 V - lambda_full * A2 V;  O = subln(O) (x/rms * w over each head's value width, f32)
    out = o_proj(concat heads)                          # no (1 - lambda_init) factor

Double heads: Q1 = heads [0, H), Q2 = heads [H, 2H) of q_proj's 2H heads, values of width d.
Split heads: Q1 = heads [0, H/2), Q2 = [H/2, H), value head j = [v_j ; v_{j + H/2}] (width 2d).
`mix` is `config.diff_attn_mix` (the warm-up factor a checkpoint was saved with; 1 when absent).

Differential Transformer V2 (`diff_attn_variant: "v2"`; unilm `multihead_flashdiffv2.py`):

    q = q_proj(x): 2H heads, pair (2i, 2i+1) in the GQA group of output head i; k, v: Hkv heads
    A = softmax(Q K^T * scale + M) V over all 2H heads (f32)
    lam = mix * sigmoid(lambda_proj(x))              # [b, s, H], per token and head
    O_i = A_2i - lam_i * A_2i+1;  out = o_proj(concat heads)   # no sub-layer norm, no lambda_init

Works with transformers 4.48+ and 5.x (`past_key_values` or `cache` for the KV cache). This
file is copied into every checkpoint as remote code (`auto_map`) and imports only torch,
transformers and its configuration file.
"""

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_diff_transformer import (
    DifferentialConfig,
    Gemma3TextDifferentialConfig,
    LlamaDifferentialConfig,
    MistralDifferentialConfig,
    Qwen2DifferentialConfig,
    Qwen3DifferentialConfig,
)

_OUTPUT_FIELDS = {f.name for f in dataclasses.fields(CausalLMOutputWithPast)}
# transformers 5.x names the KV cache `cache`, 4.x `past_key_values`.
_CACHE_FIELD = "cache" if "cache" in _OUTPUT_FIELDS else "past_key_values"


class RMSNorm(nn.Module):
    """`x / sqrt(mean(x^2) + eps)` in f32, times `w` (Llama, subln) or `(1 + w)` (Gemma 3)."""

    def __init__(self, width, eps, one_plus=False):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(width) if one_plus else torch.ones(width))
        self.eps = eps
        self.one_plus = one_plus

    def forward(self, x):
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.one_plus:  # transformers Gemma3RMSNorm
            return (x * (1.0 + self.weight.float())).to(dtype)
        return self.weight * x.to(dtype)  # transformers LlamaRMSNorm


def rope_inv_freq(head_dim, theta, scaling):
    """RoPE inverse frequencies [head_dim / 2] (transformers `modeling_rope_utils.py`:
    default, `linear`, `llama3`); other scaling types are refused by name."""
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    kind = "default"
    if scaling:
        kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return inv
    if kind == "linear":
        return inv / scaling["factor"]
    if kind == "llama3":
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old = scaling["original_max_position_embeddings"]
        low_wavelen, high_wavelen = old / low, old / high
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > low_wavelen, inv / factor, inv)
        smooth = (old / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return torch.where(medium, smoothed, scaled)
    raise ValueError(f"rope scaling type {kind!r} is not supported (default, linear, llama3)")


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def repeat_kv(x, n):
    """[b, h, s, d] -> [b, h * n, s, d], each head repeated n times in place (GQA)."""
    return x if n == 1 else x.repeat_interleave(n, dim=1)


class Masks:
    """Additive attention masks [b or 1, 1, s, kv] (f32: 0 or the f32 minimum) of one forward,
    built once per (sliding window, key count) and shared by the layers that need them: causal
    on cache slots, the window (a query at slot i sees keys j with i - window < j <= i), and the
    2-D padding mask [b, total] (1 = token)."""

    def __init__(self, query_index, pad_mask):
        self.query_index = query_index  # [s] cache slots of the queries
        self.pad_mask = pad_mask
        self.built = {}

    def get(self, window, kv_len):
        key = (window, kv_len)
        if key not in self.built:
            q = self.query_index
            total = int(q[-1]) + 1
            # The cache returns a contiguous suffix of the sequence.
            k = torch.arange(total - kv_len, total, device=q.device)
            allowed = k[None, :] <= q[:, None]
            if window is not None:
                allowed = allowed & (q[:, None] - k[None, :] < window)
            allowed = allowed[None, None]
            if self.pad_mask is not None:
                allowed = allowed & self.pad_mask[:, None, None, -kv_len:].bool()
            bias = torch.zeros(allowed.shape, dtype=torch.float32, device=q.device)
            self.built[key] = bias.masked_fill(~allowed, torch.finfo(torch.float32).min)
        return self.built[key]


def _mix(config):
    """The warm-up factor in force: `config.diff_attn_mix`, 1 when absent."""
    mix = getattr(config, "diff_attn_mix", None)
    return 1.0 if mix is None else float(mix)


def _init_common(layer, config, window, theta, scaling):
    """What both attention variants hold besides their projections: the family's q/k norms,
    query scale, the layer's window and RoPE table, and the monitoring hooks."""
    d, eps = layer.head_dim, config.resolved_rms_norm_eps
    if config.family_spec()["qk_norm"]:
        one_plus = config.family_spec()["norm"] == "one_plus_weight"
        layer.q_norm = RMSNorm(d, eps, one_plus)
        layer.k_norm = RMSNorm(d, eps, one_plus)
    else:
        layer.q_norm = layer.k_norm = None
    layer.scaling = config.query_scale()
    layer.sliding_window = window
    layer.register_buffer("inv_freq", rope_inv_freq(d, theta, scaling), persistent=False)
    layer.capture_stats = False
    layer.captured = None


def _rope(layer, positions, dtype):
    """cos, sin [b, 1, s, d] for positions [b, s] (computed in f32, as transformers)."""
    freqs = positions[:, :, None].float() * layer.inv_freq.float()[None, None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos()[:, None].to(dtype), emb.sin()[:, None].to(dtype)


def _project(layer, x, positions, masks, cache):
    """q, k, v as heads [b, n, s, d] after the q/k norms and RoPE, k and v extended by the KV
    cache, and the layer's additive mask over the keys."""
    b, s, _ = x.shape
    d = layer.head_dim
    q = layer.q_proj(x).view(b, s, -1, d).transpose(1, 2)
    k = layer.k_proj(x).view(b, s, -1, d).transpose(1, 2)
    v = layer.v_proj(x).view(b, s, -1, d).transpose(1, 2)
    if layer.q_norm is not None:
        q, k = layer.q_norm(q), layer.k_norm(k)
    cos, sin = _rope(layer, positions, q.dtype)
    q = q * cos + rotate_half(q) * sin
    k = k * cos + rotate_half(k) * sin
    if cache is not None:
        k, v = cache.update(k, v, layer.layer_idx)
    return q, k, v, masks.get(layer.sliding_window, k.shape[2])


class DifferentialAttention(nn.Module):
    """One differential attention layer (module docstring); tensors of docs/formats.md §1/§3."""

    def __init__(self, config, layer_idx, window, theta, scaling):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        D = config.hidden_size
        H, Hkv, d = config.num_attention_heads, config.resolved_num_key_value_heads, config.resolved_head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = H, Hkv, d
        self.split = bool(config.split_heads)
        if self.split and (H % 2 or Hkv % 2):
            raise ValueError(f"split_heads needs even num_attention_heads ({H}) and num_key_value_heads ({Hkv})")
        q_rows = H * d if self.split else 2 * H * d
        k_rows = Hkv * d if self.split else 2 * Hkv * d
        self.q_proj = nn.Linear(D, q_rows, bias=config.has_bias("q_proj"))
        self.k_proj = nn.Linear(D, k_rows, bias=config.has_bias("k_proj"))
        self.v_proj = nn.Linear(D, Hkv * d, bias=config.has_bias("v_proj"))
        self.o_proj = nn.Linear(H * d, D, bias=config.has_bias("o_proj"))
        for name in ("lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2"):
            setattr(self, name, nn.Parameter(torch.zeros(d)))
        # Stored, not trained (the Rust trainer keeps it fixed as well).
        self.register_buffer("lambda_init", torch.zeros(()), persistent=True)
        eps = config.resolved_rms_norm_eps
        self.subln = RMSNorm(2 * d if self.split else d, eps) if config.sublayer_norm else None
        # Set by the monitoring callback: (mean, std) of A1 and A2 of the next forward.
        _init_common(self, config, window, theta, scaling)

    def lambda_full(self):
        """exp(<lq1, lk1>) - exp(<lq2, lk2>) + lambda_init, a 0-dim f32 tensor (without mix)."""
        l1 = torch.exp(torch.sum(self.lambda_q1.float() * self.lambda_k1.float()))
        l2 = torch.exp(torch.sum(self.lambda_q2.float() * self.lambda_k2.float()))
        return l1 - l2 + self.lambda_init.float()

    def forward(self, x, positions, masks, cache):
        b, s, _ = x.shape
        # q [b, 2H or H, s, d], k [b, 2Hkv or Hkv, kv, d], v [b, Hkv, kv, d]
        q, k, v, bias = _project(self, x, positions, masks, cache)
        q1, q2 = q.chunk(2, dim=1)
        k1, k2 = k.chunk(2, dim=1)
        group = q1.shape[1] // k1.shape[1]
        v = repeat_kv(v, self.num_heads // self.num_kv_heads)  # [b, H, kv, d]
        if self.split:
            v = torch.cat(v.chunk(2, dim=1), dim=-1)  # [b, H/2, kv, 2d]

        def probs(qh, kh):
            scores = torch.matmul(qh, repeat_kv(kh, group).transpose(-1, -2)).float() * self.scaling
            return torch.softmax(scores + bias, dim=-1)

        a1, a2 = probs(q1, k1), probs(q2, k2)
        if self.capture_stats:
            self.captured = tuple(
                (float(a.detach().mean()), float(a.detach().std())) for a in (a1, a2)
            )
            self.capture_stats = False
        mix = _mix(self.config)
        vf = v.float()
        o = torch.matmul(a1, vf) - (mix * self.lambda_full()) * torch.matmul(a2, vf)
        if self.subln is not None:
            o = self.subln(o)  # o is f32: the norm and its weight in f32
        o = o.to(x.dtype).transpose(1, 2).reshape(b, s, -1)
        return self.o_proj(o)


class DifferentialAttentionV2(nn.Module):
    """One Differential Transformer V2 attention layer (module docstring): `q_proj` [2H*d, D],
    `k_proj`/`v_proj` [Hkv*d, D] and the KV cache as the source's, `lambda_proj` [H, D]."""

    def __init__(self, config, layer_idx, window, theta, scaling):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        D = config.hidden_size
        H, Hkv, d = config.num_attention_heads, config.resolved_num_key_value_heads, config.resolved_head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = H, Hkv, d
        self.q_proj = nn.Linear(D, 2 * H * d, bias=config.has_bias("q_proj"))
        self.k_proj = nn.Linear(D, Hkv * d, bias=config.has_bias("k_proj"))
        self.v_proj = nn.Linear(D, Hkv * d, bias=config.has_bias("v_proj"))
        self.o_proj = nn.Linear(H * d, D, bias=config.has_bias("o_proj"))
        self.lambda_proj = nn.Linear(D, H, bias=False)
        # Set by the monitoring callback: (mean, std) of A1 (heads 2i), A2 (heads 2i+1) and of
        # the gate sigmoid(lambda_proj(x)) of the next forward.
        _init_common(self, config, window, theta, scaling)

    def forward(self, x, positions, masks, cache):
        b, s, _ = x.shape
        H, d = self.num_heads, self.head_dim
        # q [b, 2H, s, d], k and v [b, Hkv, kv, d]
        q, k, v, bias = _project(self, x, positions, masks, cache)
        group = 2 * H // self.num_kv_heads
        scores = torch.matmul(q, repeat_kv(k, group).transpose(-1, -2)).float() * self.scaling
        p = torch.softmax(scores + bias, dim=-1)  # [b, 2H, s, kv]
        a = torch.matmul(p, repeat_kv(v, group).float()).view(b, H, 2, s, d)
        gate = torch.sigmoid(self.lambda_proj(x).float())  # [b, s, H]
        if self.capture_stats:
            self.captured = tuple(
                (float(t.detach().mean()), float(t.detach().std()))
                for t in (p[:, 0::2], p[:, 1::2], gate)
            )
            self.capture_stats = False
        mix = _mix(self.config)
        lam = (mix * gate).transpose(1, 2).unsqueeze(-1)  # [b, H, s, 1]
        o = a[:, :, 0] - lam * a[:, :, 1]
        o = o.to(x.dtype).transpose(1, 2).reshape(b, s, -1)
        return self.o_proj(o)


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        D, inter = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(D, inter, bias=False)
        self.up_proj = nn.Linear(D, inter, bias=False)
        self.down_proj = nn.Linear(inter, D, bias=False)
        act = config.activation()
        if act in ("silu", "swish"):
            self.act = F.silu
        elif act in ("gelu_pytorch_tanh", "gelu_tanh"):
            self.act = lambda t: F.gelu(t, approximate="tanh")
        else:
            raise ValueError(f"activation {act!r} is not supported (silu, gelu_pytorch_tanh)")

    def forward(self, x):
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """The family's block with differential attention: pre-norm (Llama, Mistral, Qwen) or
    Gemma 3's four norms (input, post-attention, pre- and post-feedforward)."""

    def __init__(self, config, layer_idx, attention):
        super().__init__()
        fam = config.family_spec()
        eps = config.resolved_rms_norm_eps
        one_plus = fam["norm"] == "one_plus_weight"
        v2 = getattr(config, "diff_attn_variant", None) == "v2"
        attention_class = DifferentialAttentionV2 if v2 else DifferentialAttention
        self.self_attn = attention_class(config, layer_idx, *attention)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, eps, one_plus)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps, one_plus)
        self.sandwich = fam["sandwich"]
        if self.sandwich:
            self.pre_feedforward_layernorm = RMSNorm(config.hidden_size, eps, one_plus)
            self.post_feedforward_layernorm = RMSNorm(config.hidden_size, eps, one_plus)

    def forward(self, x, positions, masks, cache):
        h = self.self_attn(self.input_layernorm(x), positions, masks, cache)
        if self.sandwich:
            x = x + self.post_attention_layernorm(h)
            return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x))


class DifferentialPreTrainedModel(PreTrainedModel):
    config_class = DifferentialConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["DecoderLayer"]
    _supports_cache_class = True
    _keys_to_ignore_on_load_unexpected = [r"rotary_emb\.inv_freq", r"self_attn\.inv_freq"]

    def _init_weights(self, module):
        std = getattr(self.config, "initializer_range", 0.02)
        if isinstance(module, nn.Linear):
            module.weight.data.normal_(0.0, std)
            if module.bias is not None:
                module.bias.data.zero_()
        elif isinstance(module, nn.Embedding):
            module.weight.data.normal_(0.0, std)
        elif isinstance(module, RMSNorm):
            module.weight.data.fill_(0.0 if module.one_plus else 1.0)
        elif isinstance(module, (DifferentialAttention, DifferentialAttentionV2)):
            # The lambda vectors and lambda_init are always in the checkpoint (never re-drawn);
            # the RoPE table is not stored.
            module.inv_freq.copy_(rope_inv_freq(module.head_dim, *self._layer_rope(module.layer_idx)))

    def _layer_rope(self, layer_idx):
        _, theta, scaling = self.config.layer_attention()[layer_idx]
        return theta, scaling

    def save_pretrained(self, save_directory, *args, **kwargs):
        """As transformers', plus the two remote-code files and `auto_map`, so that the saved
        checkpoint loads with `trust_remote_code=True` wherever it goes."""
        import os
        import shutil

        model_type = self.config.model_type
        self.config.auto_map = {
            "AutoConfig": f"configuration_diff_transformer.{type(self.config).__name__}",
            "AutoModelForCausalLM": f"modeling_diff_transformer.{MODEL_CLASSES[model_type].__name__}",
        }
        super().save_pretrained(save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", True):
            here = os.path.dirname(os.path.abspath(__file__))
            for name in ("configuration_diff_transformer.py", "modeling_diff_transformer.py"):
                src, dst = os.path.join(here, name), os.path.join(save_directory, name)
                if os.path.abspath(src) != os.path.abspath(dst):
                    shutil.copyfile(src, dst)

    @classmethod
    def _supports_default_dynamic_cache(cls, *args, **kwargs):
        # generate() would otherwise build the cache from config.json's window keys, which
        # follow the source family's rules, not transformers' generic ones: the model creates
        # a plain DynamicCache itself and applies each layer's window in its mask.
        return False


class DifferentialModel(DifferentialPreTrainedModel):
    """Embedding, decoder layers, final norm: hidden states [batch, seq, hidden]."""

    def __init__(self, config):
        super().__init__(config)
        variant = getattr(config, "diff_attn_variant", None)
        if variant not in (None, "v1", "v2"):
            raise ValueError(f"diff_attn_variant {variant!r}: expected \"v1\" or \"v2\"")
        if variant == "v2" and (config.split_heads or config.sublayer_norm):
            raise ValueError('diff_attn_variant "v2" has no split heads and no sub-layer norm '
                             f"(config: split_heads {config.split_heads}, sublayer_norm {config.sublayer_norm})")
        fam = config.family_spec()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            DecoderLayer(config, i, attention) for i, attention in enumerate(config.layer_attention())
        )
        self.norm = RMSNorm(config.hidden_size, config.resolved_rms_norm_eps, fam["norm"] == "one_plus_weight")
        self.embed_scale = math.sqrt(config.hidden_size) if fam["embed_scale"] else None
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None,
                inputs_embeds=None, use_cache=False, cache_position=None):
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        if self.embed_scale is not None:  # Gemma 3: the scale rounded to the weights' dtype
            x = x * torch.tensor(self.embed_scale, dtype=x.dtype)
        b, s, _ = x.shape
        if use_cache and cache is None:
            cache = DynamicCache()
        if cache_position is not None:
            query_index = cache_position.to(x.device)
        else:
            past = cache.get_seq_length() if cache is not None else 0
            query_index = torch.arange(past, past + s, device=x.device)
        positions = position_ids if position_ids is not None else query_index[None].expand(b, s)
        if attention_mask is not None and attention_mask.dim() != 2:
            raise ValueError("attention_mask must be 2-D [batch, seq] (1 = token, 0 = padding)")
        masks = Masks(query_index, attention_mask)
        for layer in self.layers:
            if self.gradient_checkpointing and self.training:
                x = self._gradient_checkpointing_func(layer.__call__, x, positions, masks, None)
            else:
                x = layer(x, positions, masks, cache)
        return self.norm(x), cache


class DifferentialForCausalLM(DifferentialPreTrainedModel, GenerationMixin):
    """Causal LM head over `DifferentialModel`: logits [batch, seq, vocab] (f32 loss,
    Gemma 3's `final_logit_softcapping` applied). Tied embeddings have no `lm_head`."""

    def __init__(self, config):
        super().__init__(config)
        self.model = DifferentialModel(config)
        self.tied = bool(getattr(config, "tie_word_embeddings", False))
        self.lm_head = None if self.tied else nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_diff_attn_mix(self, mix):
        """Sets the warm-up factor every layer applies to lambda (saved as `diff_attn_mix`)."""
        self.config.diff_attn_mix = None if mix is None else float(mix)

    def attention_layers(self):
        return [layer.self_attn for layer in self.model.layers]

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, cache_position=None,
                logits_to_keep=0, num_logits_to_keep=None, cache=None, return_dict=None,
                num_items_in_batch=None, **kwargs):
        cache = cache if cache is not None else past_key_values
        if isinstance(cache, (tuple, list)):
            raise ValueError("tuple KV caches are not supported: pass a transformers Cache")
        if use_cache is None:
            use_cache = bool(getattr(self.config, "use_cache", True)) and not self.training
        hidden, cache = self.model(input_ids, attention_mask, position_ids, cache, inputs_embeds,
                                   use_cache, cache_position)
        keep = num_logits_to_keep if num_logits_to_keep is not None else logits_to_keep
        if isinstance(keep, int) and keep > 0:
            hidden = hidden[:, -keep:]
        weight = self.model.embed_tokens.weight if self.tied else self.lm_head.weight
        logits = F.linear(hidden, weight)
        cap = self.config.final_logit_softcap()
        if cap:
            logits = cap * torch.tanh(logits / cap)
        loss = None
        if labels is not None:
            shift_logits = logits[:, :-1].float().reshape(-1, logits.shape[-1])
            shift_labels = labels[:, 1:].reshape(-1).to(shift_logits.device)
            if num_items_in_batch is not None:
                loss = F.cross_entropy(shift_logits, shift_labels, ignore_index=-100, reduction="sum")
                loss = loss / num_items_in_batch
            else:
                loss = F.cross_entropy(shift_logits, shift_labels, ignore_index=-100)
        out = {"loss": loss, "logits": logits}
        if use_cache:
            out[_CACHE_FIELD] = cache
        return CausalLMOutputWithPast(**out)


def _model_class(config_class):
    name = config_class.__name__.replace("Config", "ForCausalLM")
    return type(name, (DifferentialForCausalLM,), {"config_class": config_class})


LlamaDifferentialForCausalLM = _model_class(LlamaDifferentialConfig)
MistralDifferentialForCausalLM = _model_class(MistralDifferentialConfig)
Qwen2DifferentialForCausalLM = _model_class(Qwen2DifferentialConfig)
Qwen3DifferentialForCausalLM = _model_class(Qwen3DifferentialConfig)
Gemma3TextDifferentialForCausalLM = _model_class(Gemma3TextDifferentialConfig)
# The architecture name the tool writes for Gemma 3 (`Gemma3DifferentialForCausalLM`).
Gemma3DifferentialForCausalLM = Gemma3TextDifferentialForCausalLM

MODEL_CLASSES = {
    c.config_class.model_type: c
    for c in (
        LlamaDifferentialForCausalLM,
        MistralDifferentialForCausalLM,
        Qwen2DifferentialForCausalLM,
        Qwen3DifferentialForCausalLM,
        Gemma3TextDifferentialForCausalLM,
    )
}
