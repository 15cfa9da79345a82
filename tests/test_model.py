"""model.py against Hugging Face transformers (the independent reference) on tiny random checkpoints."""
import json
import shutil

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import (AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, Qwen2Config,  # noqa: E402
                          Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM)

from model import ModelConfig, Transformer  # noqa: E402

transformers.logging.set_verbosity_error()
TINY = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64)
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
BF16_EPS = 2.0 ** -7  # spacing of bf16 numbers in [1, 2): 7 explicit mantissa bits


pytestmark = pytest.mark.usefixtures("one_thread")


def _hf_models():
    def biased(m):  # HF zero-inits biases; random ones make the bias test meaningful
        for name, p in m.named_parameters():
            if name.endswith("bias"):
                torch.nn.init.normal_(p, std=0.5)
        return m
    return {
        "llama3_untied": lambda: LlamaForCausalLM(LlamaConfig(**TINY, rope_parameters=LLAMA3_ROPE)),
        "llama_tied": lambda: LlamaForCausalLM(LlamaConfig(**TINY, tie_word_embeddings=True)),
        "qwen2_bias": lambda: biased(Qwen2ForCausalLM(Qwen2Config(**TINY))),
        "qwen3_qknorm": lambda: Qwen3ForCausalLM(Qwen3Config(**TINY, head_dim=16)),
    }


KINDS = list(_hf_models()) + ["llama3_sharded"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """name -> (directory, HF model in fp32 eval mode)."""
    torch.manual_seed(0)
    root, out = tmp_path_factory.mktemp("ckpt"), {}
    for name, make in _hf_models().items():
        m = make().eval()
        m.save_pretrained(root / name)
        out[name] = (root / name, m)
    m = LlamaForCausalLM(LlamaConfig(**TINY, rope_parameters=LLAMA3_ROPE)).eval()
    m.save_pretrained(root / "llama3_sharded", max_shard_size="40KB")
    assert (root / "llama3_sharded" / "model.safetensors.index.json").exists()
    out["llama3_sharded"] = (root / "llama3_sharded", m)
    return out


def _tokens(B=3, T=19, seed=1):
    return torch.randint(0, TINY["vocab_size"], (B, T), generator=torch.Generator().manual_seed(seed))


def _hf_logits(hf, tokens, attention_mask=None, position_ids=None):
    with torch.no_grad():
        return hf(input_ids=tokens, attention_mask=attention_mask, position_ids=position_ids).logits.float()


# ---------------------------------------------------------------------------------------------------------------
# parity


@pytest.mark.parametrize("kind", KINDS)
def test_logits_match_hf_fp32(checkpoints, kind):
    path, hf = checkpoints[kind]
    ours = Transformer.from_pretrained(path, dtype=torch.float32)
    x = _tokens()
    with torch.no_grad():
        diff = (ours(x) - _hf_logits(hf, x)).abs().max().item()
    assert diff < 1e-4, f"{kind}: max |logit diff| {diff}"


@pytest.mark.parametrize("kind", ["llama3_untied", "qwen2_bias", "qwen3_qknorm"])
def test_left_padded_logits_match_hf(checkpoints, kind):
    """key_mask + default positions (cumsum - 1) agree with HF's attention_mask + position_ids on real tokens."""
    path, hf = checkpoints[kind]
    ours = Transformer.from_pretrained(path, dtype=torch.float32)
    x = _tokens(3, 12)
    key_mask = torch.ones_like(x, dtype=torch.bool)
    key_mask[0, :5] = False
    key_mask[2, :1] = False
    positions = (key_mask.long().cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        a = ours(x, key_mask=key_mask)
    b = _hf_logits(hf, x, attention_mask=key_mask.long(), position_ids=positions)
    assert torch.isfinite(a).all()
    assert (a - b)[key_mask].abs().max().item() < 1e-4
    # the real tokens of a padded row see exactly what the unpadded row would
    with torch.no_grad():
        alone = ours(x[0:1, 5:])
    assert (a[0, 5:] - alone[0]).abs().max().item() < 1e-4


@pytest.mark.parametrize("kind", ["llama3_untied", "llama_tied", "qwen2_bias", "qwen3_qknorm"])
def test_logits_match_hf_bf16(checkpoints, kind):
    """bf16: our rounding error against the fp32 truth is no larger than HF's own bf16 error (plus one bf16 step
    at the logit scale), and the two bf16 results agree within two bf16 steps at that scale."""
    path, hf = checkpoints[kind]
    x = _tokens()
    truth = _hf_logits(hf, x)
    hf16 = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    ours16 = Transformer.from_pretrained(path, dtype=torch.bfloat16)
    assert ours16.lm_head.weight.dtype == torch.bfloat16
    with torch.no_grad():
        ours = ours16(x).float()
    theirs = _hf_logits(hf16, x)
    step = BF16_EPS * truth.abs().max().item()
    our_err, hf_err = (ours - truth).abs().max().item(), (theirs - truth).abs().max().item()
    assert our_err <= hf_err + step, (our_err, hf_err, step)
    assert (ours - theirs).abs().max().item() <= 2 * step


def test_tied_embeddings_share_one_parameter(checkpoints):
    ours = Transformer.from_pretrained(checkpoints["llama_tied"][0])
    assert ours.lm_head.weight is ours.embed_tokens.weight
    n_unique = len({id(p) for p in ours.parameters()})
    assert n_unique == len(list(ours.parameters()))  # parameters() yields the shared one once
    untied = Transformer.from_pretrained(checkpoints["llama3_untied"][0])
    assert untied.lm_head.weight is not untied.embed_tokens.weight


def test_hidden_states_and_values(checkpoints):
    path, hf = checkpoints["llama3_untied"]
    ours = Transformer.from_pretrained(path, value_head=True)
    x = _tokens()
    with torch.no_grad():
        h = ours.hidden_states(x)
        ref_h = hf(input_ids=x, output_hidden_states=True).hidden_states[-1]  # after the final norm
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
        Transformer.from_pretrained(path).values(h)


# ---------------------------------------------------------------------------------------------------------------
# save_pretrained round trip


@pytest.mark.parametrize("kind", ["llama3_untied", "llama_tied", "qwen2_bias", "qwen3_qknorm"])
def test_save_pretrained_loads_in_hf(checkpoints, tmp_path, kind):
    path, hf = checkpoints[kind]
    ours = Transformer.from_pretrained(path)
    with torch.no_grad():  # perturb so the check is not satisfied by the original files
        ours.norm.weight.mul_(1.5)
    ours.save_pretrained(tmp_path)
    back = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert type(back) is type(hf)
    x = _tokens()
    with torch.no_grad():
        diff = (ours(x) - _hf_logits(back, x)).abs().max().item()
    assert diff < 1e-5
    assert Transformer.from_pretrained(tmp_path).config == ours.config


def test_save_load_value_head(checkpoints, tmp_path):
    ours = Transformer.from_pretrained(checkpoints["qwen3_qknorm"][0], value_head=True)
    with torch.no_grad():
        ours.value_head.weight.normal_()
        ours.value_head.bias.fill_(-0.5)
    ours.save_pretrained(tmp_path)
    back = Transformer.from_pretrained(tmp_path, value_head=True)
    assert torch.equal(back.value_head.weight, ours.value_head.weight)
    assert torch.equal(back.value_head.bias, ours.value_head.bias)
    AutoModelForCausalLM.from_pretrained(tmp_path)  # the value head file does not disturb HF


# ---------------------------------------------------------------------------------------------------------------
# config layouts


def test_old_and_new_config_layouts_agree(checkpoints, tmp_path):
    path, hf = checkpoints["llama3_untied"]
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
        assert (Transformer.from_pretrained(tmp_path / "old")(x) - _hf_logits(hf, x)).abs().max() < 1e-4


def test_config_defaults_follow_hf():
    base = {k: TINY[k] for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                 "num_attention_heads")}
    llama = ModelConfig.from_hf({**base, "model_type": "llama"}, "x")
    assert llama.num_key_value_heads == 4 and llama.head_dim == 16 and llama.rope_scaling is None
    qwen2 = ModelConfig.from_hf({**base, "model_type": "qwen2", "sliding_window": 4096,
                                 "use_sliding_window": False}, "x")
    assert qwen2.attention_bias and not qwen2.attention_out_bias and not qwen2.qk_norm
    qwen3 = ModelConfig.from_hf({**base, "model_type": "qwen3"}, "x")
    assert qwen3.qk_norm and qwen3.head_dim == 128 and not qwen3.attention_bias
    for cfg in (llama, qwen2, qwen3):  # to_hf -> from_hf is the identity
        assert ModelConfig.from_hf(cfg.to_hf(), "x") == cfg


# ---------------------------------------------------------------------------------------------------------------
# bad input: clear errors naming the file or key


def _good_config(checkpoints):
    return json.loads((checkpoints["llama3_untied"][0] / "config.json").read_text())


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
    shutil.copy(checkpoints["llama_tied"][0] / "config.json", tmp_path / "config.json")
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        Transformer.from_pretrained(tmp_path)
    sharded = tmp_path / "sharded"
    shutil.copytree(checkpoints["llama3_sharded"][0], sharded)
    (sharded / "model-00003-of-00012.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model-00003-of-00012.safetensors"):
        Transformer.from_pretrained(sharded)


def _copy(checkpoints, kind, dst):
    shutil.copytree(checkpoints[kind][0], dst)
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


def _lora_model(checkpoints, targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "down_proj")):
    torch.manual_seed(0)
    model = Transformer.from_pretrained(checkpoints["llama3_untied"][0], value_head=True)
    with torch.no_grad():
        before = model(_tokens())
    model.add_lora(rank=4, alpha=8.0, target_modules=targets)
    return model, before


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


def test_lora_adapters_disabled_gives_base_and_merge_matches(checkpoints, tmp_path):
    model, base_logits = _lora_model(checkpoints)
    frozen = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    x = _tokens()
    for _ in range(2):  # two steps: after the first, B != 0 so A also gets a gradient
        loss = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), x.roll(-1, 1).flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    with torch.no_grad():
        adapted = model(x)
        with model.adapters_disabled():
            assert torch.equal(model(x), base_logits)
        assert torch.equal(model(x), adapted)  # re-enabled on exit
    assert (adapted - base_logits).abs().max() > 1e-3  # the adapters did change the policy
    model.save_pretrained(tmp_path)
    merged = Transformer.from_pretrained(tmp_path)
    assert not any("lora" in n for n, _ in merged.named_parameters())
    with torch.no_grad():
        assert (merged(x) - adapted).abs().max().item() < 1e-5
    hf = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert (_hf_logits(hf, x) - adapted).abs().max().item() < 1e-5
