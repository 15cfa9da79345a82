"""A Llama-architecture transformer in plain PyTorch (Llama 3.x, Qwen2, Qwen3), with HF checkpoint I/O,
LoRA, an optional value head, and batched KV-cache generation for RL rollouts.

Weight names mirror Hugging Face's (minus the "model." prefix), so loading is a loop with shape checks.
RoPE uses HF's rotate_half convention, so HF q/k weights load without permutation.
"""
from __future__ import annotations

import json
import math
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

SUPPORTED_MODEL_TYPES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
VALUE_HEAD_FILE = "value_head.safetensors"  # kept out of model.safetensors so HF loads the policy cleanly


# ----------------------------------------------------------------------------------------------------------------
# config


@dataclass
class ModelConfig:
    """Mirrors HF config.json field names where possible."""
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int | None = None          # None -> hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None     # None or {"rope_type": "llama3", factor, low/high_freq_factor, original_max_position_embeddings}
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False         # bias on q, k, v
    attention_out_bias: bool = False     # bias on o (Llama/Qwen3 tie it to attention_bias; Qwen2 has none)
    mlp_bias: bool = False
    qk_norm: bool = False                # Qwen3: RMSNorm over head_dim on q and k before RoPE
    model_type: str = "llama"
    dtype: str | None = None             # checkpoint dtype ("bfloat16", ...), from torch_dtype / dtype
    bos_token_id: int | list | None = None
    eos_token_id: int | list | None = None

    def __post_init__(self):
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads={self.num_key_value_heads}")

    @classmethod
    def from_hf(cls, d: dict, source: str = "config.json") -> "ModelConfig":
        """Parse a HF config.json dict (old layout: rope_theta/rope_scaling/torch_dtype; new: rope_parameters/dtype)."""
        def bad(key, why):
            return ValueError(f"{source}: unsupported config: {key!r} {why}")

        model_type = d.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise bad("model_type", f"is {model_type!r}; supported: {sorted(SUPPORTED_MODEL_TYPES)}")
        for arch in d.get("architectures") or []:
            if arch != SUPPORTED_MODEL_TYPES[model_type]:
                raise bad("architectures", f"contains {arch!r}; expected {SUPPORTED_MODEL_TYPES[model_type]!r}")
        if d.get("hidden_act", "silu") != "silu":
            raise bad("hidden_act", f"is {d['hidden_act']!r}; only 'silu' (SwiGLU) is supported")
        if d.get("use_sliding_window") or (model_type == "llama" and d.get("sliding_window")):
            raise bad("use_sliding_window" if "use_sliding_window" in d else "sliding_window",
                      "enables sliding-window attention, which is not supported")
        if any(t != "full_attention" for t in d.get("layer_types") or []):
            raise bad("layer_types", "contains non-'full_attention' layers (sliding window is not supported)")
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
            if not isinstance(d.get(key), int):
                raise ValueError(f"{source}: missing or non-integer required key {key!r}")

        rope_theta, rope_scaling = _parse_rope(d, bad)
        dtype = d.get("dtype", d.get("torch_dtype"))
        if dtype is not None and dtype not in DTYPES:
            raise bad("dtype" if "dtype" in d else "torch_dtype", f"is {dtype!r}; supported: {sorted(DTYPES)}")
        attention_bias = bool(d.get("attention_bias", False))
        if model_type == "qwen2":  # Qwen2 always has q/k/v bias and never an o bias
            attention_bias, attention_out_bias = True, False
        else:
            attention_out_bias = attention_bias
        head_dim = d.get("head_dim") or (128 if model_type == "qwen3" else None)  # HF Qwen3Config default is 128
        return cls(
            vocab_size=d["vocab_size"], hidden_size=d["hidden_size"], intermediate_size=d["intermediate_size"],
            num_hidden_layers=d["num_hidden_layers"], num_attention_heads=d["num_attention_heads"],
            num_key_value_heads=d.get("num_key_value_heads") or d["num_attention_heads"], head_dim=head_dim,
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)), rope_theta=rope_theta, rope_scaling=rope_scaling,
            max_position_embeddings=int(d.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)), attention_bias=attention_bias,
            attention_out_bias=attention_out_bias, mlp_bias=bool(d.get("mlp_bias", False)),
            qk_norm=model_type == "qwen3", model_type=model_type, dtype=dtype,
            bos_token_id=d.get("bos_token_id"), eos_token_id=d.get("eos_token_id"))

    def to_hf(self) -> dict:
        """A config.json dict in both layouts, so transformers 4.x (rope_theta) and 5.x (rope_parameters) load it."""
        rope_parameters = {"rope_type": "default", "rope_theta": self.rope_theta, **(self.rope_scaling or {})}
        d = {
            "architectures": [SUPPORTED_MODEL_TYPES[self.model_type]], "model_type": self.model_type,
            "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size, "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads, "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim, "hidden_act": "silu", "rms_norm_eps": self.rms_norm_eps,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings, "attention_bias": self.attention_bias,
            "mlp_bias": self.mlp_bias, "rope_theta": self.rope_theta, "rope_scaling": self.rope_scaling,
            "rope_parameters": rope_parameters, "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id, "use_cache": True,
        }
        if self.dtype is not None:
            d["dtype"] = d["torch_dtype"] = self.dtype
        if self.model_type == "qwen2":
            d.pop("attention_bias")  # implied by the architecture
        if self.model_type in ("qwen2", "qwen3"):
            d.update(use_sliding_window=False, sliding_window=None, max_window_layers=self.num_hidden_layers,
                     layer_types=["full_attention"] * self.num_hidden_layers)
        return d


def _parse_rope(d: dict, bad) -> tuple[float, dict | None]:
    """-> (rope_theta, rope_scaling or None). rope_scaling keeps only what llama3 scaling needs."""
    if isinstance(d.get("rope_parameters"), dict):
        key, params = "rope_parameters", dict(d["rope_parameters"])
        if "rope_theta" not in params and "rope_type" not in params:
            raise bad(key, "is nested per layer type, which is not supported")
    else:
        key, params = "rope_scaling", dict(d.get("rope_scaling") or {})
    theta = float(params.get("rope_theta", d.get("rope_theta", 10000.0)))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if float(params.get("partial_rotary_factor", d.get("partial_rotary_factor", 1.0))) != 1.0:
        raise bad("partial_rotary_factor", "is not 1.0 (partial rotary embeddings are not supported)")
    if rope_type == "default":
        return theta, None
    if rope_type != "llama3":
        raise bad(f"{key}.rope_type", f"is {rope_type!r}; supported: 'default', 'llama3'")
    scaling = {"rope_type": "llama3"}
    for k in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
        if k not in params:
            raise bad(f"{key}.{k}", "is missing (required by llama3 rope scaling)")
        scaling[k] = params[k]
    return theta, scaling


def rope_inv_freq(config: ModelConfig) -> Tensor:
    """(head_dim/2,) float32 inverse frequencies, with Llama 3.1 scaling (HF _compute_llama3_parameters)."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim))
    s = config.rope_scaling
    if s is None:
        return inv_freq
    factor, low, high, old_len = s["factor"], s["low_freq_factor"], s["high_freq_factor"], s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    # long wavelengths (low freq) are divided by factor, short ones kept, the band between interpolated smoothly
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(is_medium, smoothed, scaled)


# ----------------------------------------------------------------------------------------------------------------
# layers


class Linear(nn.Linear):
    """nn.Linear with an optional LoRA adapter (Hu et al. 2021, eq. 3): y = x W^T + b + (alpha/r) (x A^T) B^T."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__(in_features, out_features, bias=bias)
        self.register_parameter("lora_A", None)  # (r, in)
        self.register_parameter("lora_B", None)  # (out, r)
        self.lora_scale = 0.0
        self.lora_enabled = True

    def add_lora(self, rank: int, alpha: float):
        w = self.weight
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, dtype=w.dtype, device=w.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear / PEFT
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, dtype=w.dtype, device=w.device))  # B=0: output unchanged
        self.lora_scale = alpha / rank

    def forward(self, x: Tensor) -> Tensor:
        # weights are cast to the activations' dtype: fp32 master weights compute in bf16 (mixed_precision_)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        y = F.linear(x, self.weight.to(x.dtype), bias)
        if self.lora_A is not None and self.lora_enabled:
            y = y + F.linear(F.linear(x, self.lora_A.to(x.dtype)), self.lora_B.to(x.dtype)) * self.lora_scale
        return y

    def merged_weight(self) -> Tensor:
        if self.lora_A is None:
            return self.weight.detach()
        delta = (self.lora_B.float() @ self.lora_A.float()) * self.lora_scale  # (out, in), merged in fp32
        return (self.weight.float() + delta).to(self.weight.dtype).detach()


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        # normalise in fp32, cast back, then scale: the same op order as HF, so bf16 rounding matches
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight.to(x.dtype) * xf.to(x.dtype)


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    # x: (B, H, T, hd); cos, sin: (B, 1, T, hd)
    return x * cos + rotate_half(x) * sin


class KVCache(nn.Module):
    """Static per-layer cache (gpt-fast style): rows = batch, columns = sequence slots, written in place."""

    def __init__(self, batch: int, n_kv_heads: int, max_len: int, head_dim: int, dtype, device):
        super().__init__()
        shape = (batch, n_kv_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, start: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        # k, v: (B, KV, T, hd) for slots start..start+T; returns the filled prefix (B, KV, start+T, hd)
        end = start + k.shape[2]
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]

    def keep_rows(self, rows: Tensor):
        self.k, self.v = self.k[rows], self.v[rows]


class Attention(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.q_proj = Linear(c.hidden_size, c.num_attention_heads * c.head_dim, bias=c.attention_bias)
        self.k_proj = Linear(c.hidden_size, c.num_key_value_heads * c.head_dim, bias=c.attention_bias)
        self.v_proj = Linear(c.hidden_size, c.num_key_value_heads * c.head_dim, bias=c.attention_bias)
        self.o_proj = Linear(c.num_attention_heads * c.head_dim, c.hidden_size, bias=c.attention_out_bias)
        if c.qk_norm:
            self.q_norm = RMSNorm(c.head_dim, c.rms_norm_eps)
            self.k_norm = RMSNorm(c.head_dim, c.rms_norm_eps)
        self.kv_cache: KVCache | None = None

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None, cache_start: int | None) -> Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim)  # (B, T, H, hd)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim)  # (B, T, KV, hd)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache_start is not None:
            k, v = self.kv_cache.update(cache_start, k, v)  # (B, KV, S, hd), S = cache_start + T
        # with no mask and no cache prefix the plain causal kernel applies
        is_causal = mask is None and k.shape[2] == T and T > 1
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=True)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.gate_proj = Linear(c.hidden_size, c.intermediate_size, bias=c.mlp_bias)
        self.up_proj = Linear(c.hidden_size, c.intermediate_size, bias=c.mlp_bias)
        self.down_proj = Linear(c.intermediate_size, c.hidden_size, bias=c.mlp_bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # SwiGLU (Shazeer 2020)


class Block(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.self_attn = Attention(c)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.mlp = MLP(c)

    def forward(self, x, cos, sin, mask, cache_start):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache_start)
        return x + self.mlp(self.post_attention_layernorm(x))


def attention_mask(key_mask: Tensor | None, start: int, T: int) -> Tensor | None:
    """(B, 1, T, S) bool, True = attend, for queries at slots start..start+T over key slots 0..S=start+T.

    key_mask: (B, S) True = real token. None when no key is padding (the kernels' causal path is faster).
    A padding query may always see itself, so no softmax row is empty: some SDPA kernels return NaN for an
    empty row, and a NaN in a padded slot's value would leak into real rows through 0 * NaN."""
    if key_mask is None or bool(key_mask.all()):
        return None if (start == 0 or T == 1) else _causal(key_mask, start, T)
    return _causal(key_mask, start, T) & key_mask[:, None, None, :] | _self_mask(key_mask, start, T)


def _causal(key_mask: Tensor, start: int, T: int) -> Tensor:
    S = start + T
    q_slot = torch.arange(start, S, device=key_mask.device)
    return (torch.arange(S, device=key_mask.device)[None, :] <= q_slot[:, None])[None, None]  # (1, 1, T, S)


def _self_mask(key_mask: Tensor, start: int, T: int) -> Tensor:
    S = start + T
    q_slot = torch.arange(start, S, device=key_mask.device)
    return (torch.arange(S, device=key_mask.device)[None, :] == q_slot[:, None])[None, None]


# ----------------------------------------------------------------------------------------------------------------
# model


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig, value_head: bool = False):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight  # one Parameter, not a copy
        self.value_head = nn.Linear(config.hidden_size, 1) if value_head else None
        self._inv_freq = rope_inv_freq(config)  # plain fp32 tensor: module.to(bf16) must not round it
        self.compute_dtype: torch.dtype | None = None  # None: compute in the parameters' dtype
        self.apply(self._init_weights)

    def _init_weights(self, m: nn.Module):
        if isinstance(m, (nn.Linear, nn.Embedding)) and m.weight.device.type != "meta":
            nn.init.normal_(m.weight, std=0.02)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
        if m is getattr(self, "value_head", None) and m.weight.device.type != "meta":
            nn.init.zeros_(m.weight)  # the critic starts at V = 0 everywhere

    # -- forward ---------------------------------------------------------------------------------------------

    def rope(self, positions: Tensor, dtype) -> tuple[Tensor, Tensor]:
        """positions (B, T) -> cos, sin (B, 1, T, hd), computed in fp32 and cast like HF."""
        if self._inv_freq.device != positions.device:
            self._inv_freq = self._inv_freq.to(positions.device)
        freqs = positions[..., None].float() * self._inv_freq  # (B, T, hd/2)
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def _trunk(self, tokens: Tensor, positions: Tensor | None, key_mask: Tensor | None,
               cache_start: int | None = None) -> Tensor:
        """tokens (B, T) -> final-norm hidden states (B, T, D). With cache_start, reads/writes the KV cache and
        key_mask covers all slots 0..cache_start+T."""
        B, T = tokens.shape
        if positions is None:
            positions = default_positions(key_mask, B, T, tokens.device)
        x = self.embed_tokens(tokens)
        if self.compute_dtype is not None:
            x = x.to(self.compute_dtype)  # every layer casts its weights to the activations' dtype
        cos, sin = self.rope(positions, x.dtype)
        mask = attention_mask(key_mask, cache_start or 0, T)
        for layer in self.layers:
            x = layer(x, cos, sin, mask, cache_start)
        return self.norm(x)

    def hidden_states(self, tokens: Tensor, positions: Tensor | None = None, key_mask: Tensor | None = None) -> Tensor:
        return self._trunk(tokens, positions, key_mask)

    def forward(self, tokens: Tensor, positions: Tensor | None = None, key_mask: Tensor | None = None) -> Tensor:
        return self.lm_head(self.hidden_states(tokens, positions, key_mask))  # (B, T, V)

    def values(self, h: Tensor) -> Tensor:
        """h (B, T, D) final hidden states -> (B, T) float32 values."""
        if self.value_head is None:
            raise RuntimeError("this Transformer has no value head: construct it with value_head=True")
        return self.value_head(h.to(self.value_head.weight.dtype)).squeeze(-1).float()

    # -- KV cache for generation -----------------------------------------------------------------------------

    def setup_cache(self, batch: int, max_len: int):
        w = self.embed_tokens.weight
        for layer in self.layers:
            a = layer.self_attn
            a.kv_cache = KVCache(batch, a.n_kv_heads, max_len, a.head_dim, self.compute_dtype or w.dtype, w.device)

    def cache_keep_rows(self, rows: Tensor):
        for layer in self.layers:
            layer.self_attn.kv_cache.keep_rows(rows)

    def clear_cache(self):
        for layer in self.layers:
            layer.self_attn.kv_cache = None

    def decode(self, tokens: Tensor, positions: Tensor, key_mask: Tensor, cache_start: int) -> Tensor:
        """Cached step: tokens (B, T) at slots cache_start.. -> logits of the last position (B, V)."""
        h = self._trunk(tokens, positions, key_mask, cache_start)
        return self.lm_head(h[:, -1])

    # -- mixed precision -------------------------------------------------------------------------------------

    def mixed_precision_(self, compute_dtype: torch.dtype) -> "Transformer":
        """Mixed-precision training (Micikevicius et al. 2018): every trained parameter (requires_grad) becomes an
        fp32 master weight, so its gradient and Adam's state are fp32 too, while frozen weights keep their dtype
        and the forward computes in `compute_dtype`. An update of lr 1e-6 is far below half a bf16 spacing of a
        typical weight (2^-9 relative): applied to bf16 weights it rounds away, applied to fp32 ones it adds up.
        The forward is the same as the model's in compute_dtype: each weight is rounded to it where it is used."""
        for p in self.parameters():
            if p.requires_grad:
                p.data = p.data.float()
        self.compute_dtype = compute_dtype
        return self

    # -- LoRA ------------------------------------------------------------------------------------------------

    def add_lora(self, rank: int, alpha: float, target_modules=("q_proj", "k_proj", "v_proj", "o_proj")):
        """Adds LoRA adapters to the named projections of every layer and freezes all base weights
        (the value head, if any, stays trainable: it is new)."""
        unknown = set(target_modules) - set(LORA_TARGETS)
        if unknown or not target_modules:
            raise ValueError(f"LoRA target_modules {sorted(unknown) or target_modules} not supported; choose from {LORA_TARGETS}")
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        for p in self.parameters():
            p.requires_grad_(False)
        for name, m in self.layers.named_modules():
            if isinstance(m, Linear) and name.rsplit(".", 1)[-1] in target_modules:
                m.add_lora(rank, alpha)
        if self.value_head is not None:
            self.value_head.requires_grad_(True)

    @contextmanager
    def adapters_disabled(self):
        """The reference policy = the base model with adapters off; no second copy of the weights."""
        linears = [m for m in self.modules() if isinstance(m, Linear)]
        previous = [m.lora_enabled for m in linears]
        for m in linears:
            m.lora_enabled = False
        try:
            yield self
        finally:
            for m, p in zip(linears, previous):
                m.lora_enabled = p

    def merged_state_dict(self) -> dict[str, Tensor]:
        """HF-named weights with LoRA merged in; no value head; lm_head omitted when tied (as HF saves it)."""
        out = {}
        for name, m in self.named_modules():
            for pname, p in m.named_parameters(recurse=False):
                if pname.startswith("lora_") or name.startswith("value_head"):
                    continue
                if name == "lm_head" and self.config.tie_word_embeddings:
                    continue
                t = m.merged_weight() if (pname == "weight" and isinstance(m, Linear)) else p.detach()
                out[hf_name(f"{name}.{pname}")] = t
        return out

    # -- checkpoints -----------------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path, dtype=None, device=None, value_head: bool = False) -> "Transformer":
        """Loads a HF checkpoint directory (model.safetensors or a sharded index). dtype None -> the config's
        dtype (torch_dtype/dtype), else float32."""
        path = Path(path)
        if isinstance(dtype, str):
            if dtype not in DTYPES:
                raise ValueError(f"from_pretrained: dtype {dtype!r} not supported; choose from {sorted(DTYPES)}")
            dtype = DTYPES[dtype]
        config = ModelConfig.from_hf(read_json(path / "config.json"), str(path / "config.json"))
        if dtype is None:
            dtype = DTYPES[config.dtype] if config.dtype else torch.float32
        with torch.device("meta"):  # no random init of weights that are about to be overwritten
            model = cls(config, value_head=value_head)
        model = model.to(dtype).to_empty(device=device or "cpu")
        if config.tie_word_embeddings:  # to_empty re-creates parameters, breaking the tie
            model.lm_head.weight = model.embed_tokens.weight
        model._load_weights(path)
        if value_head:
            model._load_value_head(path)
        return model

    def _load_weights(self, path: Path):
        """Checks names and shapes from the safetensors headers first, then copies shard by shard (peak memory:
        the model plus one shard)."""
        files = checkpoint_files(path)
        headers = {file: read_header(file) for file in files}  # file -> {HF key: shape}
        where = {k: file for file, header in headers.items() for k in header}
        params = {hf_name(n): p for n, p in self.named_parameters() if not n.startswith("value_head")}
        ignored = {k for k in where if k.endswith("rotary_emb.inv_freq")}  # old checkpoints stored this buffer
        if self.config.tie_word_embeddings:
            params.pop("lm_head.weight", None)  # named_parameters() lists the shared tensor once, as embed_tokens
            ignored.add("lm_head.weight")  # some tied checkpoints carry a copy; the tie wins
        missing, unexpected = sorted(params.keys() - where.keys()), sorted(where.keys() - params.keys() - ignored)
        if missing:
            raise KeyError(f"{path}: checkpoint is missing {len(missing)} weight(s), e.g. {missing[:5]}")
        if unexpected:
            raise KeyError(f"{path}: checkpoint has {len(unexpected)} unexpected weight(s), e.g. "
                           f"{[f'{k} (in {where[k].name})' for k in unexpected[:5]]}")
        for k, p in params.items():
            if headers[where[k]][k] != p.shape:
                raise ValueError(f"{where[k]}: shape mismatch for {k!r}: checkpoint {tuple(headers[where[k]][k])}, "
                                 f"model {tuple(p.shape)} (from config.json)")
        with torch.no_grad():
            for file in files:
                for k, t in read_safetensors(file).items():
                    if k in params:
                        params[k].copy_(t)

    def _load_value_head(self, path: Path):
        file = path / VALUE_HEAD_FILE
        with torch.no_grad():
            if not file.exists():  # a fresh critic head on a policy checkpoint (as RLEF initialises its critic)
                nn.init.zeros_(self.value_head.weight), nn.init.zeros_(self.value_head.bias)
                return
            tensors = read_safetensors(file)
            for pname, p in self.value_head.named_parameters():
                t = tensors.get(f"value_head.{pname}")
                if t is None or t.shape != p.shape:
                    raise ValueError(f"{file}: missing or mis-shaped 'value_head.{pname}' (want {tuple(p.shape)})")
                p.copy_(t)

    def save_pretrained(self, path, tokenizer=None, sampling: dict | None = None):
        """Writes model.safetensors (LoRA merged) + config.json that HF transformers loads; the value head, if
        any, goes to value_head.safetensors. With a tokenizer (tokenizer.Tokenizer) the folder is complete for
        AutoTokenizer too: its files, and generation_config.json that stops on every end-of-turn id;
        `sampling` (e.g. temperature, top_p) adds the sampling defaults."""
        from safetensors.torch import save_file
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.contiguous().cpu() for k, v in self.merged_state_dict().items()}
        save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
        config = self.config.to_hf()
        config["dtype"] = config["torch_dtype"] = str(self.embed_tokens.weight.dtype).removeprefix("torch.")
        (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        if self.value_head is not None:
            vh = {f"value_head.{n}": p.detach().contiguous().cpu() for n, p in self.value_head.named_parameters()}
            save_file(vh, str(path / VALUE_HEAD_FILE), metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save_pretrained(path)
            generation = {"bos_token_id": tokenizer.bos_id, "eos_token_id": list(tokenizer.stop_ids),
                          "pad_token_id": tokenizer.pad_id}
            generation.update({"do_sample": True, **sampling} if sampling else {})
            (path / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")


def hf_name(name: str) -> str:
    return name if name.startswith("lm_head") else "model." + name


def default_positions(key_mask: Tensor | None, B: int, T: int, device) -> Tensor:
    """(B, T): cumsum(key_mask) - 1 (padding clamped to 0), or arange(T) with no mask."""
    if key_mask is None:
        return torch.arange(T, device=device).expand(B, T)
    return (key_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -T:]


# ----------------------------------------------------------------------------------------------------------------
# checkpoint files


def read_json(file: Path) -> dict:
    if not file.is_file():
        raise FileNotFoundError(f"{file}: not found")
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{file}: invalid JSON: {e}") from None


def _safetensors_error(file: Path, e: Exception) -> ValueError:
    return ValueError(f"{file}: truncated or corrupt safetensors file: {e}")


def read_header(file: Path) -> dict[str, torch.Size]:
    """{key: shape} from a safetensors header, without reading the tensors; validates the file's layout."""
    from safetensors import SafetensorError, safe_open
    if not file.is_file():
        raise FileNotFoundError(f"{file}: not found")
    try:
        with safe_open(str(file), framework="pt") as f:
            return {k: torch.Size(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise _safetensors_error(file, e) from None


def read_safetensors(file: Path) -> dict[str, Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    if not file.is_file():
        raise FileNotFoundError(f"{file}: not found")
    try:
        return load_file(str(file))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise _safetensors_error(file, e) from None


def checkpoint_files(path: Path) -> list[Path]:
    """model.safetensors, or the shards named by model.safetensors.index.json."""
    single, index = path / "model.safetensors", path / "model.safetensors.index.json"
    if single.is_file():
        return [single]
    if not index.is_file():
        raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json")
    weight_map = read_json(index).get("weight_map")
    if not isinstance(weight_map, dict):
        raise ValueError(f"{index}: missing 'weight_map'")
    return [path / shard for shard in sorted(set(weight_map.values()))]


# ----------------------------------------------------------------------------------------------------------------
# generation


@dataclass
class Generation:
    tokens: Tensor    # (B, N) long: new tokens only; positions after a row stopped hold pad_id
    mask: Tensor      # (B, N) bool: True where the policy sampled the token (incl. the stop token itself)
    logprobs: Tensor  # (B, N) float32: log_softmax(logits / T)[token] for sampled tokens, 0 elsewhere
    stopped: Tensor   # (B,) bool: row ended on a stop id (False = hit max_new_tokens)


def sample(logits: Tensor, temperature: float, top_p: float, generator=None) -> tuple[Tensor, Tensor]:
    """logits (B, V) -> tokens (B,), logprobs (B,) float32 under log_softmax(logits / T) (T=1 when greedy).

    top-p (nucleus, Holtzman et al. 2020) only restricts which tokens can be drawn; the returned logprob is
    under the full tempered distribution, which is what PPO recomputes."""
    logits = logits.float()
    if temperature == 0:
        tokens = logits.argmax(-1)
        return tokens, torch.log_softmax(logits, -1).gather(-1, tokens[:, None]).squeeze(-1)
    logp = torch.log_softmax(logits / temperature, -1)
    probs = logp.exp()
    if top_p < 1.0:
        probs = nucleus(probs, top_p)
    tokens = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    return tokens, logp.gather(-1, tokens[:, None]).squeeze(-1)


def nucleus(probs: Tensor, top_p: float) -> Tensor:
    """Zero every token outside the smallest set whose probability mass reaches top_p. (B, V) -> (B, V)."""
    sorted_p, order = probs.sort(-1, descending=True)
    mass_before = sorted_p.cumsum(-1) - sorted_p  # mass of strictly more likely tokens; the top token has 0
    sorted_p = sorted_p.masked_fill(mass_before >= top_p, 0.0)
    return torch.zeros_like(probs).scatter_(-1, order, sorted_p)


def left_pad(prompts: list[list[int]], pad_id: int, device) -> tuple[Tensor, Tensor]:
    """-> tokens (B, P) long, key_mask (B, P) bool (False on the left padding)."""
    P = max(len(p) for p in prompts)
    tokens = torch.full((len(prompts), P), pad_id, dtype=torch.long)
    key_mask = torch.zeros(len(prompts), P, dtype=torch.bool)
    for i, p in enumerate(prompts):
        tokens[i, P - len(p):] = torch.tensor(p, dtype=torch.long)
        key_mask[i, P - len(p):] = True
    return tokens.to(device), key_mask.to(device)


@torch.no_grad()
def generate(model: Transformer, prompts: list[list[int]], max_new_tokens: int, *, temperature: float = 1.0,
             top_p: float = 1.0, stop_ids=(), pad_id: int = 0, generator: torch.Generator | None = None) -> Generation:
    """Batched sampling with a static KV cache. Prompts are left-padded so every row writes the same cache slot
    each step; positions count real tokens only. Rows that emit a stop id leave the batch (their cache rows are
    dropped), so finished rows cost nothing."""
    _check_generate_args(model, prompts, max_new_tokens, temperature, top_p)
    device = model.embed_tokens.weight.device
    B, N = len(prompts), max_new_tokens
    prompt, prompt_mask = left_pad(prompts, 0, device)  # the pad value is masked out; 0 is always a valid id
    P = prompt.shape[1]
    key_mask = torch.cat([prompt_mask, torch.ones(B, N, dtype=torch.bool, device=device)], 1)  # (B, P+N)
    positions = default_positions(prompt_mask, B, P, device)
    out = Generation(tokens=torch.full((B, N), pad_id, dtype=torch.long, device=device),
                     mask=torch.zeros(B, N, dtype=torch.bool, device=device),
                     logprobs=torch.zeros(B, N, dtype=torch.float32, device=device),
                     stopped=torch.zeros(B, dtype=torch.bool, device=device))
    stop = torch.tensor(sorted(set(stop_ids)), dtype=torch.long, device=device)
    rows = torch.arange(B, device=device)  # original row index of each active row
    next_pos = positions[:, -1] + 1  # (B,)
    model.setup_cache(B, P + N)
    try:
        logits = model.decode(prompt, positions, key_mask[:, :P], cache_start=0)  # prefill
        for step in range(N):
            tok, logp = sample(logits, temperature, top_p, generator)
            out.tokens[rows, step], out.mask[rows, step], out.logprobs[rows, step] = tok, True, logp
            done = torch.isin(tok, stop)
            if step == N - 1:
                out.stopped[rows[done]] = True
                break
            if done.any():  # drop finished rows from the batch and from the cache
                out.stopped[rows[done]] = True
                keep = (~done).nonzero().squeeze(-1)
                if keep.numel() == 0:
                    break
                rows, tok, next_pos, key_mask = rows[keep], tok[keep], next_pos[keep], key_mask[keep]
                model.cache_keep_rows(keep)
            slot = P + step
            logits = model.decode(tok[:, None], next_pos[:, None], key_mask[:, :slot + 1], cache_start=slot)
            next_pos = next_pos + 1
    finally:
        model.clear_cache()
    return out


def _check_generate_args(model, prompts, max_new_tokens, temperature, top_p):
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate: prompts must be a non-empty list of non-empty token lists")
    if max_new_tokens < 1:
        raise ValueError(f"generate: max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"generate: need temperature >= 0 and 0 < top_p <= 1, got {temperature}, {top_p}")
    V = model.config.vocab_size
    bad = [t for p in prompts for t in p if not 0 <= t < V]
    if bad:
        raise ValueError(f"generate: prompt token ids out of range [0, {V}): {bad[:5]}")
