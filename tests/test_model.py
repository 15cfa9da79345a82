"""model.py against Hugging Face transformers (the independent reference) on tiny random checkpoints.

transformers runs in its own process (conftest.hf_reference): the repository's `kernels/` folder shadows
Hugging Face's `kernels` package, which transformers >= 5.24 imports. Each side sees only its own code; tensors cross
in safetensors files. The HF side runs twice per module (building + forward, then reloading our saves).
"""
import json
import shutil

import pytest
import torch
from conftest import hf_reference

from model import ModelConfig, Transformer

TINY = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64)
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
BF16_EPS = 2.0 ** -7  # spacing of bf16 numbers in [1, 2): 7 explicit mantissa bits
MODELS = {  # name -> (HF class, config, extra build fields)
    "llama3_untied": ("LlamaForCausalLM", {**TINY, "rope_parameters": LLAMA3_ROPE}, {}),
    "llama_tied": ("LlamaForCausalLM", {**TINY, "tie_word_embeddings": True}, {}),
    "qwen2_bias": ("Qwen2ForCausalLM", TINY, {"bias_std": 0.5}),
    "qwen3_qknorm": ("Qwen3ForCausalLM", {**TINY, "head_dim": 16}, {}),
    "llama3_sharded": ("LlamaForCausalLM", {**TINY, "rope_parameters": LLAMA3_ROPE}, {"max_shard_size": "40KB"}),
}
KINDS = list(MODELS)
PADDED = ["llama3_untied", "qwen2_bias", "qwen3_qknorm"]
BF16 = ["llama3_untied", "llama_tied", "qwen2_bias", "qwen3_qknorm"]


pytestmark = pytest.mark.usefixtures("one_thread")


def _tokens(B=3, T=19, seed=1):
    return torch.randint(0, TINY["vocab_size"], (B, T), generator=torch.Generator().manual_seed(seed))


def _padded_inputs():
    """Left-padded rows: key_mask (B, T) and the positions HF gets (cumsum - 1, clamped)."""
    x = _tokens(3, 12)
    key_mask = torch.ones_like(x, dtype=torch.bool)
    key_mask[0, :5] = False
    key_mask[2, :1] = False
    return x, key_mask, (key_mask.long().cumsum(-1) - 1).clamp(min=0)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """name -> directory of a random fp32 checkpoint written by transformers; "ref" -> HF's outputs on it."""
    root = tmp_path_factory.mktemp("ckpt")
    jobs = [{"op": "build", "name": f"build_{k}", "dir": str(root / k), "arch": arch, "config": config,
             "seed": i, **extra} for i, (k, (arch, config, extra)) in enumerate(MODELS.items())]
    x, key_mask, positions = _padded_inputs()
    inputs = {}
    for k in KINDS:
        jobs.append({"op": "forward", "name": f"fp32_{k}", "dir": str(root / k), "dtype": "float32"})
        inputs[f"fp32_{k}.input_ids"] = _tokens()
    for k in PADDED:
        jobs.append({"op": "forward", "name": f"pad_{k}", "dir": str(root / k), "dtype": "float32"})
        inputs.update({f"pad_{k}.input_ids": x, f"pad_{k}.attention_mask": key_mask.long(),
                       f"pad_{k}.position_ids": positions})
    for k in BF16:
        jobs.append({"op": "forward", "name": f"bf16_{k}", "dir": str(root / k), "dtype": "bfloat16"})
        inputs[f"bf16_{k}.input_ids"] = _tokens()
    ref, _ = hf_reference(jobs, inputs)
    assert (root / "llama3_sharded" / "model.safetensors.index.json").exists()
    return {**{k: root / k for k in KINDS}, "ref": ref}


# ---------------------------------------------------------------------------------------------------------------
# parity


@pytest.mark.parametrize("kind", KINDS)
def test_logits_match_hf_fp32(checkpoints, kind):
    ours = Transformer.from_pretrained(checkpoints[kind], dtype=torch.float32)
    with torch.no_grad():
        diff = (ours(_tokens()) - checkpoints["ref"][f"fp32_{kind}.logits"]).abs().max().item()
    assert diff < 1e-4, f"{kind}: max |logit diff| {diff}"


@pytest.mark.parametrize("kind", PADDED)
def test_left_padded_logits_match_hf(checkpoints, kind):
    """key_mask + default positions (cumsum - 1) agree with HF's attention_mask + position_ids on real tokens."""
    ours = Transformer.from_pretrained(checkpoints[kind], dtype=torch.float32)
    x, key_mask, _ = _padded_inputs()
    with torch.no_grad():
        a = ours.lm_head(ours.hidden_states(x, key_mask))
    b = checkpoints["ref"][f"pad_{kind}.logits"]
    assert torch.isfinite(a).all()
    assert (a - b)[key_mask].abs().max().item() < 1e-4
    # the real tokens of a padded row see exactly what the unpadded row would
    with torch.no_grad():
        alone = ours(x[0:1, 5:])
    assert (a[0, 5:] - alone[0]).abs().max().item() < 1e-4


@pytest.mark.parametrize("kind", BF16)
def test_logits_match_hf_bf16(checkpoints, kind):
    """bf16: our rounding error against the fp32 truth is no larger than HF's own bf16 error (plus one bf16 step
    at the logit scale), and the two bf16 results agree within two bf16 steps at that scale."""
    x = _tokens()
    truth, theirs = checkpoints["ref"][f"fp32_{kind}.logits"], checkpoints["ref"][f"bf16_{kind}.logits"]
    ours16 = Transformer.from_pretrained(checkpoints[kind], dtype=torch.bfloat16)
    assert ours16.lm_head.weight.dtype == torch.bfloat16
    with torch.no_grad():
        ours = ours16(x).float()
    step = BF16_EPS * truth.abs().max().item()
    our_err, hf_err = (ours - truth).abs().max().item(), (theirs - truth).abs().max().item()
    assert our_err <= hf_err + step, (our_err, hf_err, step)
    assert (ours - theirs).abs().max().item() <= 2 * step


def test_tied_embeddings_share_one_parameter(checkpoints):
    ours = Transformer.from_pretrained(checkpoints["llama_tied"])
    assert ours.lm_head.weight is ours.embed_tokens.weight
    n_unique = len({id(p) for p in ours.parameters()})
    assert n_unique == len(list(ours.parameters()))  # parameters() yields the shared one once
    untied = Transformer.from_pretrained(checkpoints["llama3_untied"])
    assert untied.lm_head.weight is not untied.embed_tokens.weight


def test_hidden_states_and_values(checkpoints):
    ours = Transformer.from_pretrained(checkpoints["llama3_untied"], value_head=True)
    x = _tokens()
    with torch.no_grad():
        h = ours.hidden_states(x)
        ref_h = checkpoints["ref"]["fp32_llama3_untied.hidden"]  # HF's last hidden state is after the final norm
        assert (h - ref_h).abs().max().item() < 1e-5
        assert torch.allclose(ours.lm_head(h), ours(x))
        v = ours.values(h)
    assert v.shape == x.shape and v.dtype == torch.float32
    assert torch.all(v == 0)  # fresh head starts at zero
    with torch.no_grad():
        ours.value_head.weight.normal_()
        ours.value_head.bias.fill_(0.25)
        expected = h @ ours.value_head.weight[0] + 0.25
        assert torch.allclose(ours.values(h), expected, atol=1e-5)
    with pytest.raises(RuntimeError, match="value head"):
        Transformer.from_pretrained(checkpoints["llama3_untied"]).values(h)


# ---------------------------------------------------------------------------------------------------------------
# save_pretrained round trip: our saves, loaded by transformers


def _lora_model(checkpoints, targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "down_proj")):
    torch.manual_seed(0)
    model = Transformer.from_pretrained(checkpoints["llama3_untied"], value_head=True)
    with torch.no_grad():
        before = model(_tokens())
    model.add_lora(rank=4, alpha=8.0, target_modules=targets)
    return model, before


def _train_lora(model, steps=2):
    """SGD on next-token loss; two steps: after the first, B != 0 so A also gets a gradient."""
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    x = _tokens()
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), x.roll(-1, 1).flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()


@pytest.fixture(scope="module")
def saved(checkpoints, tmp_path_factory):
    """Our save_pretrained of each kind (norm perturbed, so the original files cannot pass; qwen3 with a value
    head, whose extra file must not disturb HF) and of a trained LoRA model (merged): name -> (directory,
    our logits, HF's logits, HF's class name)."""
    root, out, jobs = tmp_path_factory.mktemp("saved"), {}, []
    for kind in BF16:
        ours = Transformer.from_pretrained(checkpoints[kind], value_head=kind == "qwen3_qknorm")
        with torch.no_grad():
            ours.norm.weight.mul_(1.5)
        out[kind] = ours
    out["lora"], _ = _lora_model(checkpoints)
    _train_lora(out["lora"])
    for name, ours in out.items():
        ours.save_pretrained(root / name)
        jobs.append({"op": "forward", "name": name, "dir": str(root / name), "dtype": "float32"})
    ref, results = hf_reference(jobs, {f"{name}.input_ids": _tokens() for name in out})
    with torch.no_grad():
        return {name: (root / name, ours(_tokens()), ref[f"{name}.logits"], results[name]["class"])
                for name, ours in out.items()}


@pytest.mark.parametrize("kind", BF16)
def test_save_pretrained_loads_in_hf(checkpoints, saved, kind):
    path, ours_logits, hf_logits, hf_class = saved[kind]
    assert hf_class == MODELS[kind][0]
    assert (ours_logits - hf_logits).abs().max().item() < 1e-5
    back = Transformer.from_pretrained(path)
    assert back.config == Transformer.from_pretrained(checkpoints[kind]).config
    with torch.no_grad():
        assert (back(_tokens()) - ours_logits).abs().max().item() < 1e-5


def test_save_load_value_head(checkpoints, tmp_path):
    ours = Transformer.from_pretrained(checkpoints["qwen3_qknorm"], value_head=True)
    with torch.no_grad():
        ours.value_head.weight.normal_()
        ours.value_head.bias.fill_(-0.5)
    ours.save_pretrained(tmp_path)
    back = Transformer.from_pretrained(tmp_path, value_head=True)
    assert torch.equal(back.value_head.weight, ours.value_head.weight)
    assert torch.equal(back.value_head.bias, ours.value_head.bias)


# ---------------------------------------------------------------------------------------------------------------
# config layouts


def test_old_and_new_config_layouts_agree(checkpoints, tmp_path):
    path = checkpoints["llama3_untied"]
    new = json.loads((path / "config.json").read_text())
    assert "rope_parameters" in new
    old = {k: v for k, v in new.items() if k not in ("rope_parameters", "dtype")}
    old.update(rope_theta=500000.0, torch_dtype="float32",
               rope_scaling={"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                             "original_max_position_embeddings": 16})
    assert ModelConfig.from_hf(old, "old") == ModelConfig.from_hf(new, "new")
    cfg = ModelConfig.from_hf(old, "old")
    assert cfg.rope_theta == 500000.0 and cfg.rope_scaling["factor"] == 8.0 and cfg.dtype == "float32"
    # a checkpoint whose config.json is in the old layout loads and matches HF
    shutil.copytree(path, tmp_path / "old")
    (tmp_path / "old" / "config.json").write_text(json.dumps(old))
    x = _tokens()
    with torch.no_grad():
        logits = Transformer.from_pretrained(tmp_path / "old")(x)
    assert (logits - checkpoints["ref"]["fp32_llama3_untied.logits"]).abs().max() < 1e-4


def test_config_defaults_follow_hf():
    base = {k: TINY[k] for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                 "num_attention_heads")}
    llama = ModelConfig.from_hf({**base, "model_type": "llama"}, "x")
    assert llama.num_key_value_heads == 4 and llama.head_dim == 16 and llama.rope_scaling is None
    qwen2 = ModelConfig.from_hf({**base, "model_type": "qwen2", "sliding_window": 4096,
                                 "use_sliding_window": False}, "x")
    assert qwen2.attention_bias and not qwen2.qk_norm
    assert Transformer(qwen2).layers[0].self_attn.o_proj.bias is None  # Qwen2: q/k/v bias, none on o
    qwen3 = ModelConfig.from_hf({**base, "model_type": "qwen3"}, "x")
    assert qwen3.qk_norm and qwen3.head_dim == 128 and not qwen3.attention_bias
    for cfg in (llama, qwen2, qwen3):  # to_hf -> from_hf is the identity
        assert ModelConfig.from_hf(cfg.to_hf(), "x") == cfg


# ---------------------------------------------------------------------------------------------------------------
# bad input: clear errors naming the file or key


def _good_config(checkpoints):
    return json.loads((checkpoints["llama3_untied"] / "config.json").read_text())


@pytest.mark.parametrize("change, key", [
    ({"model_type": "mistral"}, "model_type"),
    ({"architectures": ["LlamaForSequenceClassification"]}, "architectures"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"sliding_window": 4096}, "sliding_window"),
    ({"use_sliding_window": True}, "use_sliding_window"),
    ({"layer_types": ["full_attention", "sliding_attention"]}, "layer_types"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}}, "rope_parameters.rope_type"),
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0}}, "low_freq_factor"),
    ({"rope_parameters": {"full_attention": {"rope_type": "default"}}}, "rope_parameters"),
    ({"partial_rotary_factor": 0.5}, "partial_rotary_factor"),
    ({"dtype": "float8"}, "dtype"),
    ({"hidden_size": None}, "hidden_size"),
])
def test_unsupported_config_is_rejected(checkpoints, tmp_path, change, key):
    cfg = {**_good_config(checkpoints), **change}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=key) as e:
        Transformer.from_pretrained(tmp_path)
    assert str(tmp_path / "config.json") in str(e.value)


def test_old_layout_unknown_rope_type_names_key():
    d = {**{k: 8 for k in ("vocab_size", "hidden_size", "intermediate_size", "num_attention_heads")},
         "num_hidden_layers": 1, "model_type": "llama", "rope_scaling": {"type": "dynamic", "factor": 2.0}}
    with pytest.raises(ValueError, match=r"my/config.json.*rope_scaling.rope_type.*dynamic"):
        ModelConfig.from_hf(d, "my/config.json")


def test_missing_files(checkpoints, tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        Transformer.from_pretrained(tmp_path)
    shutil.copy(checkpoints["llama_tied"] / "config.json", tmp_path / "config.json")
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        Transformer.from_pretrained(tmp_path)
    sharded = tmp_path / "sharded"
    shutil.copytree(checkpoints["llama3_sharded"], sharded)
    (sharded / "model-00003-of-00012.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model-00003-of-00012.safetensors"):
        Transformer.from_pretrained(sharded)


def _copy(checkpoints, kind, dst):
    shutil.copytree(checkpoints[kind], dst)
    return dst / "model.safetensors"


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_safetensors(checkpoints, tmp_path, damage):
    file = _copy(checkpoints, "llama_tied", tmp_path / "c")
    data = file.read_bytes()
    file.write_bytes({"truncate": data[: len(data) // 2], "garbage": b"\xff" * 64 + data[64:],
                      "empty": b""}[damage])
    with pytest.raises(ValueError, match=r"model.safetensors.*(truncated|corrupt)"):
        Transformer.from_pretrained(tmp_path / "c")


def _rewrite(file, edit):
    from safetensors.torch import load_file, save_file
    tensors = load_file(str(file))
    edit(tensors)
    save_file(tensors, str(file), metadata={"format": "pt"})


def test_missing_unexpected_and_misshaped_keys(checkpoints, tmp_path):
    key = "model.layers.1.self_attn.k_proj.weight"
    file = _copy(checkpoints, "llama3_untied", tmp_path / "missing")
    _rewrite(file, lambda t: t.pop(key))
    with pytest.raises(KeyError, match=r"missing.*layers\.1\.self_attn\.k_proj\.weight"):
        Transformer.from_pretrained(tmp_path / "missing")

    file = _copy(checkpoints, "llama3_untied", tmp_path / "extra")
    _rewrite(file, lambda t: t.update({"model.layers.2.mlp.up_proj.weight": torch.zeros(3)}))
    with pytest.raises(KeyError, match=r"unexpected.*layers\.2\.mlp\.up_proj\.weight"):
        Transformer.from_pretrained(tmp_path / "extra")

    file = _copy(checkpoints, "llama3_untied", tmp_path / "shape")
    _rewrite(file, lambda t: t.update({key: torch.zeros(8, 64)}))
    with pytest.raises(ValueError, match=r"model.safetensors.*shape mismatch.*k_proj.*\(8, 64\).*\(32, 64\)"):
        Transformer.from_pretrained(tmp_path / "shape")

    # a tied checkpoint that also carries lm_head.weight loads (the tie wins)
    file = _copy(checkpoints, "llama_tied", tmp_path / "tied_copy")
    _rewrite(file, lambda t: t.update({"lm_head.weight": t["model.embed_tokens.weight"].clone()}))
    assert Transformer.from_pretrained(tmp_path / "tied_copy").lm_head.weight is not None


# ---------------------------------------------------------------------------------------------------------------
# LoRA


def test_lora_initial_output_unchanged_and_only_adapters_train(checkpoints):
    model, before = _lora_model(checkpoints)
    with torch.no_grad():
        assert torch.equal(model(_tokens()), before)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    n_lora = 2 * TINY["num_hidden_layers"] * 6
    assert len([n for n in trainable if "lora_" in n]) == n_lora
    assert trainable - {n for n in trainable if "lora_" in n} == {"value_head.weight", "value_head.bias"}
    assert "layers.0.mlp.up_proj.lora_A" not in dict(model.named_parameters())  # not targeted
    with pytest.raises(ValueError, match="lm_head"):
        model.add_lora(4, 8.0, target_modules=("lm_head",))


def test_lora_adapters_disabled_gives_base_and_merge_matches(checkpoints, saved):
    model, base_logits = _lora_model(checkpoints)
    frozen = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    _train_lora(model)
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    x = _tokens()
    with torch.no_grad():
        adapted = model(x)
        with model.adapters_disabled():
            assert torch.equal(model(x), base_logits)
        assert torch.equal(model(x), adapted)  # re-enabled on exit
    assert (adapted - base_logits).abs().max() > 1e-3  # the adapters did change the policy
    path, saved_logits, hf_logits, _ = saved["lora"]  # the same training, saved with the adapters merged
    assert torch.allclose(saved_logits, adapted)
    merged = Transformer.from_pretrained(path)
    assert not any("lora" in n for n, _ in merged.named_parameters())
    with torch.no_grad():
        assert (merged(x) - adapted).abs().max().item() < 1e-5
    assert (hf_logits - adapted).abs().max().item() < 1e-5
