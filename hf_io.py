"""Hugging Face's checkpoint format, for model.py: config.json to and from ModelConfig's fields, and
safetensors weights (one file, or shards and their index) with every name and shape checked first. Errors
name the file and the key at fault.
"""
import json
from contextlib import contextmanager
from pathlib import Path

import torch

ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
LLAMA3_ROPE_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


def config_fields(d: dict, source: str) -> dict:
    """config.json, in transformers 4.x's layout (rope_theta, rope_scaling, torch_dtype) or 5.x's
    (rope_parameters, dtype) -> ModelConfig's fields. What the model would compute differently is refused."""
    def refuse(key, why):
        raise ValueError(f"{source}: unsupported config: {key!r} {why}")

    model_type = d.get("model_type")
    if model_type not in ARCHITECTURES:
        refuse("model_type", f"is {model_type!r}; supported: {sorted(ARCHITECTURES)}")
    if any(arch != ARCHITECTURES[model_type] for arch in d.get("architectures") or []):
        refuse("architectures", f"is {d['architectures']}; expected {ARCHITECTURES[model_type]!r}")
    if d.get("hidden_act", "silu") != "silu":
        refuse("hidden_act", f"is {d['hidden_act']!r}; only 'silu' (SwiGLU) is supported")
    if d.get("use_sliding_window") or (model_type == "llama" and d.get("sliding_window")):
        refuse("use_sliding_window" if "use_sliding_window" in d else "sliding_window",
               "enables sliding-window attention, which is not supported")
    if any(t != "full_attention" for t in d.get("layer_types") or []):
        refuse("layer_types", "contains non-'full_attention' layers (sliding window is not supported)")
    for key in REQUIRED:
        if not isinstance(d.get(key), int):
            raise ValueError(f"{source}: missing or non-integer required key {key!r}")
    dtype = d.get("dtype", d.get("torch_dtype"))
    if dtype is not None and dtype not in DTYPES:
        refuse("dtype" if "dtype" in d else "torch_dtype", f"is {dtype!r}; supported: {sorted(DTYPES)}")
    rope_theta, rope_scaling = parse_rope(d, refuse)
    return dict(
        **{key: d[key] for key in REQUIRED},
        num_key_value_heads=d.get("num_key_value_heads") or d["num_attention_heads"],
        head_dim=d.get("head_dim") or (128 if model_type == "qwen3" else None),  # Qwen3Config's default
        rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)), rope_theta=rope_theta, rope_scaling=rope_scaling,
        max_position_embeddings=int(d.get("max_position_embeddings", 2048)),
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        attention_bias=model_type == "qwen2" or bool(d.get("attention_bias")),  # Qwen2: q/k/v bias always
        mlp_bias=bool(d.get("mlp_bias", False)), qk_norm=model_type == "qwen3", model_type=model_type,
        dtype=dtype, bos_token_id=d.get("bos_token_id"), eos_token_id=d.get("eos_token_id"))


def parse_rope(d: dict, refuse) -> tuple[float, dict | None]:
    """-> (rope_theta, rope_scaling): None for plain RoPE, else llama3 scaling's four numbers."""
    key, params = "rope_scaling", d.get("rope_scaling") or {}
    if isinstance(d.get("rope_parameters"), dict):
        key, params = "rope_parameters", d["rope_parameters"]
        if "rope_theta" not in params and "rope_type" not in params:
            refuse(key, "is nested per layer type, which is not supported")
    if float(params.get("partial_rotary_factor", d.get("partial_rotary_factor", 1.0))) != 1.0:
        refuse("partial_rotary_factor", "is not 1.0 (partial rotary embeddings are not supported)")
    theta = float(params.get("rope_theta", d.get("rope_theta", 10000.0)))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        return theta, None
    if rope_type != "llama3":
        refuse(f"{key}.rope_type", f"is {rope_type!r}; supported: 'default', 'llama3'")
    for k in LLAMA3_ROPE_KEYS:
        if k not in params:
            refuse(f"{key}.{k}", "is missing (required by llama3 rope scaling)")
    return theta, {"rope_type": "llama3", **{k: params[k] for k in LLAMA3_ROPE_KEYS}}


def config_json(fields: dict) -> dict:
    """ModelConfig's fields -> config.json in both layouts, so that transformers 4.x and 5.x load it."""
    d = {k: v for k, v in fields.items() if k not in ("qk_norm", "dtype")}
    rope = {"rope_type": "default", "rope_theta": d["rope_theta"], **(d["rope_scaling"] or {})}
    d.update(architectures=[ARCHITECTURES[d["model_type"]]], hidden_act="silu", use_cache=True,
             rope_parameters=rope)
    if fields["dtype"] is not None:
        d["dtype"] = d["torch_dtype"] = fields["dtype"]
    if d["model_type"] != "llama":
        d.update(use_sliding_window=False, sliding_window=None, max_window_layers=d["num_hidden_layers"],
                 layer_types=["full_attention"] * d["num_hidden_layers"])
    if d["model_type"] == "qwen2":
        del d["attention_bias"]  # implied by the architecture
    return d


def read_json(file: Path) -> dict:
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{file}: invalid JSON: {e}") from None


def checkpoint_files(path: Path) -> list[Path]:
    """model.safetensors, or the shards that model.safetensors.index.json names."""
    single, index = path / "model.safetensors", path / "model.safetensors.index.json"
    if single.is_file():
        return [single]
    if not index.is_file():
        raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json")
    weight_map = read_json(index).get("weight_map")
    if not isinstance(weight_map, dict):
        raise ValueError(f"{index}: missing 'weight_map'")
    return [path / shard for shard in sorted(set(weight_map.values()))]


def load_safetensors(params: dict[str, torch.Tensor], files: list[Path], ignore: set[str] = frozenset()):
    """Copies the tensors of `files` into `params` (name -> parameter). Every name and shape is checked from
    the files' headers before any tensor is read; then tensor by tensor, so the peak is the model plus one
    tensor. `ignore`: names a file may hold that the model does not use, as old files' rotary_emb.inv_freq."""
    where, shapes = {}, {}
    for file in files:
        with open_safetensors(file) as f:
            for k in f.keys():
                where[k], shapes[k] = file, tuple(f.get_slice(k).get_shape())
    ignore = {*ignore, *(k for k in where if k.endswith("rotary_emb.inv_freq"))}
    missing, unexpected = sorted(params.keys() - where.keys()), sorted(where.keys() - params.keys() - ignore)
    folder = files[0].parent
    if missing:
        raise KeyError(f"{folder}: checkpoint is missing {len(missing)} weight(s), e.g. {missing[:5]}")
    if unexpected:
        raise KeyError(f"{folder}: checkpoint has {len(unexpected)} unexpected weight(s), e.g. "
                       f"{[f'{k} (in {where[k].name})' for k in unexpected[:5]]}")
    for k, p in params.items():
        if shapes[k] != tuple(p.shape):
            raise ValueError(f"{where[k]}: shape mismatch for {k!r}: checkpoint {shapes[k]}, model "
                             f"{tuple(p.shape)} (from config.json)")
    with torch.no_grad():
        for file in files:
            with open_safetensors(file) as f:
                for k in f.keys():
                    if k in params:
                        params[k].copy_(f.get_tensor(k))


def save_safetensors(tensors: dict[str, torch.Tensor], file: Path):
    from safetensors.torch import save_file
    tensors = {k: t.detach().contiguous().cpu() for k, t in tensors.items()}
    save_file(tensors, str(file), metadata={"format": "pt"})


@contextmanager
def open_safetensors(file: Path):
    """safe_open, reporting a missing or damaged file by its name."""
    from safetensors import SafetensorError, safe_open
    if not file.is_file():
        raise FileNotFoundError(f"{file}: not found")
    try:
        with safe_open(str(file), framework="pt") as f:
            yield f
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise ValueError(f"{file}: truncated or corrupt safetensors file: {e}") from None
