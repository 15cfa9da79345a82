"""The Llama architecture (Llama 3.x, Qwen2, Qwen3) in plain PyTorch, LoRA, a value head, and sampling.

Weight names mirror Hugging Face's (minus "model."), so loading is a loop with shape checks (hf_io.py), and
RoPE follows HF's rotate_half layout, so HF's q/k weights load without permutation.
"""
from __future__ import annotations

import json
import math
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from hf_io import (DTYPES, checkpoint_files, config_fields, config_json, load_safetensors, read_json,
                   save_safetensors)

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
VALUE_HEAD_FILE = "value_head.safetensors"  # kept out of model.safetensors, so HF loads the policy cleanly


# -- config -----------------------------------------------------------------------------------------------

@dataclass
class ModelConfig:
    """The fields of HF's config.json that this model uses, under their names."""
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int | None = None          # None: hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None     # None, or llama3 scaling: {"rope_type": "llama3", "factor": ...}
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False         # bias on q, k, v, and on o except in Qwen2
    mlp_bias: bool = False
    qk_norm: bool = False                # Qwen3: RMSNorm over head_dim on q and k before RoPE
    model_type: str = "llama"
    dtype: str | None = None             # the checkpoint's dtype ("bfloat16", ...)
    bos_token_id: int | list | None = None
    eos_token_id: int | list | None = None

    def __post_init__(self):
        self.head_dim = self.head_dim or self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads={self.num_key_value_heads}")

    @classmethod
    def from_hf(cls, d: dict, source: str = "config.json") -> ModelConfig:
        """HF's config.json; what this model would compute differently is refused, naming source and key."""
        return cls(**config_fields(d, source))

    def to_hf(self) -> dict:
        return config_json(asdict(self))


# -- layers -----------------------------------------------------------------------------------------------

def rope_inv_freq(c: ModelConfig) -> Tensor:
    """(head_dim/2,) fp32 RoPE frequencies theta^(-2i/d) (Su et al. 2021, eq. 15), with Llama 3.1's scaling
    for long context (HF's _compute_llama3_parameters): wavelengths beyond the original context are divided
    by `factor`, short ones kept, and the band between interpolated smoothly."""
    exponents = torch.arange(0, c.head_dim, 2, dtype=torch.int64, device="cpu").float() / c.head_dim
    inv_freq = 1.0 / c.rope_theta ** exponents
    if c.rope_scaling is None:
        return inv_freq
    s = c.rope_scaling
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_len = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    is_medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(is_medium, (1 - smooth) * scaled / factor + smooth * scaled, scaled)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """RoPE (Su et al. 2021, eq. 34) on the pairs (x_i, x_{i+hd/2}), HF's rotate_half layout.
    x (B, H, T, hd); cos, sin (B, 1, T, hd)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight (Zhang & Sennrich 2019, eq. 4)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        # normalise in fp32, cast back, then scale: HF's order of operations, so bf16 rounds alike
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight.to(x.dtype) * xf.to(x.dtype)


class Linear(nn.Linear):
    """nn.Linear with an optional LoRA adapter (Hu et al. 2021, eq. 3): y = x W^T + b + (alpha/r) x A^T B^T"""

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__(in_features, out_features, bias=bias)
        self.lora_A: nn.Parameter | None = None  # (r, in)
        self.lora_B: nn.Parameter | None = None  # (out, r)
        self.lora_scale, self.lora_enabled = 0.0, True

    def add_lora(self, rank: int, alpha: float):
        w = self.weight
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, dtype=w.dtype, device=w.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear and PEFT do
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, dtype=w.dtype, device=w.device))
        self.lora_scale = alpha / rank  # B = 0: the adapted model starts as the base model

    def forward(self, x: Tensor) -> Tensor:
        # weights are cast to the activations' dtype: fp32 master weights compute in bf16 (mixed_precision_)
        y = F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
        if self.lora_A is not None and self.lora_enabled:
            y = y + F.linear(F.linear(x, self.lora_A.to(x.dtype)), self.lora_B.to(x.dtype)) * self.lora_scale
        return y

    def merged_weight(self) -> Tensor:
        if self.lora_A is None:
            return self.weight.detach()
        delta = (self.lora_B.float() @ self.lora_A.float()) * self.lora_scale  # (out, in), merged in fp32
        return (self.weight.float() + delta).to(self.weight.dtype).detach()


class KVCache:
    """A static cache for one layer, as gpt-fast's: rows are the batch, columns the sequence slots."""

    def __init__(self, batch: int, n_kv_heads: int, max_len: int, head_dim: int, dtype, device):
        self.k = torch.zeros(batch, n_kv_heads, max_len, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)

    def update(self, start: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Writes k, v (B, KV, T, hd) at slots start.. -> the filled prefix (B, KV, start+T, hd)."""
        end = start + k.shape[2]
        self.k[:, :, start:end], self.v[:, :, start:end] = k, v
        return self.k[:, :, :end], self.v[:, :, :end]

    def keep_rows(self, rows: Tensor):
        self.k, self.v = self.k[rows], self.v[rows]


class Attention(nn.Module):
    """softmax(q k^T / sqrt(hd)) v (Vaswani et al. 2017, eq. 1) with grouped-query attention (Ainslie et al.
    2023): each of the n_kv_heads key/value heads serves n_heads / n_kv_heads query heads."""

    def __init__(self, c: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads = c.num_attention_heads, c.num_key_value_heads
        self.head_dim = c.head_dim
        self.q_proj = Linear(c.hidden_size, c.num_attention_heads * c.head_dim, bias=c.attention_bias)
        self.k_proj = Linear(c.hidden_size, c.num_key_value_heads * c.head_dim, bias=c.attention_bias)
        self.v_proj = Linear(c.hidden_size, c.num_key_value_heads * c.head_dim, bias=c.attention_bias)
        out_bias = c.attention_bias and c.model_type != "qwen2"
        self.o_proj = Linear(c.num_attention_heads * c.head_dim, c.hidden_size, bias=out_bias)
        if c.qk_norm:
            self.q_norm = RMSNorm(c.head_dim, c.rms_norm_eps)
            self.k_norm = RMSNorm(c.head_dim, c.rms_norm_eps)
        self.kv_cache: KVCache | None = None

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None, cache_start: int | None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim)     # (B, T, H, hd)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim)  # (B, T, KV, hd)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache_start is not None:
            k, v = self.kv_cache.update(cache_start, k, v)  # (B, KV, cache_start + T, hd)
        is_causal = mask is None and k.shape[2] == T and T > 1  # no padding and no cached prefix
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=True)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


class MLP(nn.Module):
    """SwiGLU (Shazeer 2020, eq. 6): down(silu(gate(x)) * up(x))."""

    def __init__(self, c: ModelConfig):
        super().__init__()
        self.gate_proj = Linear(c.hidden_size, c.intermediate_size, bias=c.mlp_bias)
        self.up_proj = Linear(c.hidden_size, c.intermediate_size, bias=c.mlp_bias)
        self.down_proj = Linear(c.intermediate_size, c.hidden_size, bias=c.mlp_bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then + mlp(norm(x))."""

    def __init__(self, c: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.self_attn = Attention(c)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.mlp = MLP(c)

    def forward(self, x, cos, sin, mask, cache_start):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache_start)
        return x + self.mlp(self.post_attention_layernorm(x))


def attention_mask(key_mask: Tensor, start: int) -> Tensor | None:
    """(B, 1, T, S) bool, True = attend, for queries at slots start..S-1 over keys at 0..S-1; key_mask (B, S)
    is True on real tokens. None where SDPA's causal kernel does (no padding; no cached prefix or one query).
    A padding query sees itself, so no softmax row is empty: some SDPA kernels give NaN there, and a NaN value
    in a padded slot would leak into real rows through 0 * NaN."""
    S = key_mask.shape[1]
    if bool(key_mask.all()) and (start == 0 or start == S - 1):
        return None
    slots = torch.arange(S, device=key_mask.device)
    query = slots[start:, None]  # (T, 1)
    return (slots <= query) & key_mask[:, None, None, :] | (slots == query)


# -- the model --------------------------------------------------------------------------------------------

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
        self.inv_freq = rope_inv_freq(config)  # a plain tensor: module.to(bf16) must not round it
        self.compute_dtype: torch.dtype | None = None  # None: compute in the parameters' dtype
        if self.embed_tokens.weight.device.type == "meta":
            return  # from_pretrained: every weight is about to be loaded
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
        if value_head:
            nn.init.zeros_(self.value_head.weight)  # the critic starts at V = 0 everywhere

    def hidden_states(self, tokens: Tensor, key_mask: Tensor | None = None, cache_start: int | None = None):
        """tokens (B, T) -> final-norm hidden states (B, T, D). key_mask (B, S) marks the real tokens over all
        slots 0..S-1 (None: no padding); positions count real tokens only, so left padding shifts nothing.
        With cache_start the tokens sit at slots cache_start.. of the KV cache and attend to what it holds."""
        B, T = tokens.shape
        if key_mask is None and cache_start:  # the cached prefix's slots are real tokens too
            key_mask = torch.ones(B, cache_start + T, dtype=torch.bool, device=tokens.device)
        if key_mask is None:
            positions = torch.arange(T, device=tokens.device).expand(B, T)
        else:
            positions = (key_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -T:]
        x = self.embed_tokens(tokens)
        if self.compute_dtype is not None:
            x = x.to(self.compute_dtype)  # every layer casts its weights to the activations' dtype
        self.inv_freq = self.inv_freq.to(tokens.device)
        freqs = positions[..., None].float() * self.inv_freq  # (B, T, hd/2) in fp32, as HF
        angles = torch.cat((freqs, freqs), dim=-1)[:, None]    # (B, 1, T, hd)
        cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
        mask = None if key_mask is None else attention_mask(key_mask, cache_start or 0)
        for layer in self.layers:
            x = layer(x, cos, sin, mask, cache_start)
        return self.norm(x)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.lm_head(self.hidden_states(tokens))  # (B, T, V)

    def values(self, h: Tensor) -> Tensor:
        """h (B, T, D) final hidden states -> (B, T) fp32 values."""
        if self.value_head is None:
            raise RuntimeError("this Transformer has no value head: construct it with value_head=True")
        return self.value_head(h.to(self.value_head.weight.dtype)).squeeze(-1).float()

    def decode(self, tokens: Tensor, key_mask: Tensor, cache_start: int) -> Tensor:
        """A cached step: tokens (B, T) at slots cache_start.. -> the logits after the last one (B, V)."""
        return self.lm_head(self.hidden_states(tokens, key_mask, cache_start)[:, -1])

    def setup_cache(self, batch: int | None, max_len: int = 0):
        """A fresh KV cache in every layer; batch None frees them."""
        w = self.embed_tokens.weight
        dtype = self.compute_dtype or w.dtype
        for layer in self.layers:
            a = layer.self_attn
            a.kv_cache = batch and KVCache(batch, a.n_kv_heads, max_len, a.head_dim, dtype, w.device)

    def mixed_precision_(self, compute_dtype: torch.dtype) -> Transformer:
        """Mixed precision (Micikevicius et al. 2018): trained parameters become fp32 master weights (and so
        their gradients and Adam's state), frozen ones keep their dtype, the forward computes in
        compute_dtype. Why: bf16 weights round an update of 1e-6 away (half a spacing is 2^-9 relative)."""
        for p in self.parameters():
            if p.requires_grad:
                p.data = p.data.float()
        self.compute_dtype = compute_dtype
        return self

    def add_lora(self, rank: int, alpha: float, target_modules=("q_proj", "k_proj", "v_proj", "o_proj")):
        """LoRA adapters on the named projections of every layer; the base is frozen, a value head is not."""
        if rank < 1 or not target_modules or not set(target_modules) <= set(LORA_TARGETS):
            raise ValueError(f"LoRA: need rank >= 1 (got {rank}) and target_modules from {LORA_TARGETS} "
                             f"(got {target_modules})")
        self.requires_grad_(False)
        for name, m in self.layers.named_modules():
            if isinstance(m, Linear) and name.rsplit(".", 1)[-1] in target_modules:
                m.add_lora(rank, alpha)
        if self.value_head is not None:
            self.value_head.requires_grad_(True)

    @contextmanager
    def adapters_disabled(self):
        """The reference policy is the base model with its adapters off: no second copy of the weights."""
        linears = [m for m in self.modules() if isinstance(m, Linear)]
        for m in linears:
            m.lora_enabled = False
        try:
            yield self
        finally:
            for m in linears:
                m.lora_enabled = True

    @classmethod
    def from_pretrained(cls, path, dtype=None, device=None, value_head: bool = False) -> Transformer:
        """A HF checkpoint folder in `dtype` (a torch dtype or its name; None: the config's, else fp32). The
        value head comes from value_head.safetensors, or starts at 0: RLEF's critic starts from the policy."""
        path = Path(path)
        config = ModelConfig.from_hf(read_json(path / "config.json"), str(path / "config.json"))
        with torch.device("meta"):  # no random init of weights about to be overwritten
            model = cls(config, value_head=value_head)
        dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype or DTYPES.get(config.dtype, torch.float32)
        model = model.to(dtype).to_empty(device=device or "cpu")
        if config.tie_word_embeddings:  # to_empty re-creates the parameters, which breaks the tie
            model.lm_head.weight = model.embed_tokens.weight
        params = {hf_name(n): p for n, p in model.named_parameters() if not n.startswith("value_head")}
        load_safetensors(params, checkpoint_files(path), ignore={"lm_head.weight"})  # a tied lm_head's copy
        if value_head and (path / VALUE_HEAD_FILE).exists():
            load_safetensors(dict(model.value_head.named_parameters("value_head")), [path / VALUE_HEAD_FILE])
        elif value_head:
            with torch.no_grad():
                model.value_head.weight.zero_(), model.value_head.bias.zero_()
        return model

    def save_pretrained(self, path, tokenizer=None, sampling: dict | None = None):
        """model.safetensors (LoRA merged), config.json and value_head.safetensors. With a tokenizer the
        folder is complete for AutoTokenizer too, with a generation_config.json that stops on every
        end-of-turn id and samples as `sampling` (its temperature) says."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_safetensors(self.merged_state_dict(), path / "model.safetensors")
        config = self.config.to_hf()
        config["dtype"] = config["torch_dtype"] = str(self.embed_tokens.weight.dtype).removeprefix("torch.")
        (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        if self.value_head is not None:
            save_safetensors(dict(self.value_head.named_parameters("value_head")), path / VALUE_HEAD_FILE)
        if tokenizer is not None:
            tokenizer.save_pretrained(path)
            generation = {"bos_token_id": tokenizer.bos_id, "eos_token_id": list(tokenizer.stop_ids),
                          "pad_token_id": tokenizer.pad_id}
            generation.update({"do_sample": True, **sampling} if sampling else {})
            (path / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")

    def merged_state_dict(self) -> dict[str, Tensor]:
        """HF-named weights with LoRA merged in; no value head, and no lm_head when tied (as HF saves)."""
        out = {}
        for name, m in self.named_modules():
            for pname, p in m.named_parameters(recurse=False):
                if pname.startswith("lora_") or name == "value_head" or (
                        name == "lm_head" and self.config.tie_word_embeddings):
                    continue
                t = m.merged_weight() if isinstance(m, Linear) and pname == "weight" else p.detach()
                out[hf_name(f"{name}.{pname}")] = t
        return out


def hf_name(name: str) -> str:
    return name if name.startswith("lm_head") else "model." + name


# -- sampling ---------------------------------------------------------------------------------------------

@dataclass
class Generation:
    tokens: Tensor    # (B, N) long: the new tokens; pad_id after a row stopped
    mask: Tensor      # (B, N) bool: True where the policy sampled the token (the stop token included)
    logprobs: Tensor  # (B, N) fp32: log_softmax(logits / T)[token] where sampled, 0 elsewhere
    stopped: Tensor   # (B,) bool: the row ended on a stop id (False: it reached max_new_tokens)


@torch.no_grad()
def generate(model: Transformer, prompts: list[list[int]], max_new_tokens: int, *, temperature: float = 1.0,
             stop_ids=(), pad_id: int = 0, generator: torch.Generator | None = None):
    """Batched sampling with a static KV cache. Prompts are left-padded, so every row writes the same cache
    slot at each step; positions count real tokens only. A row that samples a stop id leaves the batch, cache
    rows included, so finished rows cost nothing."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate: prompts must be a non-empty list of non-empty token lists")
    if max_new_tokens < 1 or temperature < 0:
        raise ValueError(f"generate: need max_new_tokens >= 1 and temperature >= 0, got {max_new_tokens}, "
                         f"{temperature}")
    bad = [t for p in prompts for t in p if not 0 <= t < model.config.vocab_size]
    if bad:
        raise ValueError(f"generate: prompt token ids out of range [0, {model.config.vocab_size}): {bad[:5]}")
    device = model.embed_tokens.weight.device
    B, N = len(prompts), max_new_tokens
    prompt, prompt_mask = left_pad(prompts, 0, device)  # the pad value is masked out; 0 is always a valid id
    P = prompt.shape[1]
    key_mask = torch.cat([prompt_mask, torch.ones(B, N, dtype=torch.bool, device=device)], 1)  # (B, P + N)
    out = Generation(torch.full((B, N), pad_id, dtype=torch.long, device=device),
                     torch.zeros(B, N, dtype=torch.bool, device=device),
                     torch.zeros(B, N, dtype=torch.float32, device=device),
                     torch.zeros(B, dtype=torch.bool, device=device))
    stop = torch.tensor(sorted(set(stop_ids)), dtype=torch.long, device=device)
    rows = torch.arange(B, device=device)  # the original index of each row still sampling
    model.setup_cache(B, P + N)
    try:
        logits = model.decode(prompt, key_mask[:, :P], cache_start=0)  # prefill
        for step in range(N):
            tok, logp = sample(logits, temperature, generator)
            out.tokens[rows, step], out.mask[rows, step], out.logprobs[rows, step] = tok, True, logp
            done = torch.isin(tok, stop)
            out.stopped[rows[done]] = True
            if step == N - 1 or bool(done.all()):
                break
            if bool(done.any()):
                keep = (~done).nonzero().squeeze(-1)
                rows, tok, key_mask = rows[keep], tok[keep], key_mask[keep]
                for layer in model.layers:
                    layer.self_attn.kv_cache.keep_rows(keep)
            logits = model.decode(tok[:, None], key_mask[:, :P + step + 1], cache_start=P + step)
    finally:
        model.setup_cache(None)
    return out


def sample(logits: Tensor, temperature: float, generator=None) -> tuple[Tensor, Tensor]:
    """logits (B, V) -> tokens (B,) and their fp32 logprobs under log_softmax(logits / T) (T = 1 if greedy).
    RL samples from the whole tempered distribution (no top-p or top-k): the logprobs PPO recomputes are of
    that distribution, and a truncated one would make the ratio off-policy."""
    logits = logits.float()
    if temperature == 0:
        tokens = logits.argmax(-1)
        return tokens, torch.log_softmax(logits, -1).gather(-1, tokens[:, None]).squeeze(-1)
    logp = torch.log_softmax(logits / temperature, -1)
    tokens = torch.multinomial(logp.exp(), 1, generator=generator).squeeze(-1)
    return tokens, logp.gather(-1, tokens[:, None]).squeeze(-1)


def left_pad(prompts: list[list[int]], pad_id: int, device) -> tuple[Tensor, Tensor]:
    """-> tokens (B, P) long, key_mask (B, P) bool (False on the left padding)."""
    P = max(len(p) for p in prompts)
    tokens = torch.tensor([[pad_id] * (P - len(p)) + list(p) for p in prompts], device=device)
    key_mask = torch.tensor([[False] * (P - len(p)) + [True] * len(p) for p in prompts], device=device)
    return tokens, key_mask

