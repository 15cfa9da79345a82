"""Checkpoint folders are complete Hugging Face folders, and the tokenizer of a run follows one rule.

Tiny random bf16 Llama 3 and Qwen3 checkpoints are written by transformers (in its own process, see
conftest.hf_reference), loaded and saved by model.py with the real Llama 3 tokenizer.model and a trained
ChatML tokenizer.json (and a tiny model with the byte-level tokenizer), then loaded back by
AutoModelForCausalLM and AutoTokenizer: the logits, the chat rendering and generate's stop tokens are compared
with ours.
"""
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from conftest import hf_reference
from tokenizers import Regex
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

from model import ModelConfig, Transformer
from tokenizer import TINY_BPE, Tokenizer, check_vocab, tokenizer_for

pytestmark = pytest.mark.usefixtures("one_thread")

QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256)
DIALOGS = [
    [{"role": "user", "content": "Write f(x) = x + 1 in Python."}],
    [{"role": "system", "content": "  You write code.\n"},
     {"role": "user", "content": "def add(a, b):\n    return a - b\n\nFix it: ünïcödé 中文 12345 🙂"},
     {"role": "assistant", "content": "```python\ndef add(a, b):\n    return a + b\n```"},
     {"role": "user", "content": "Test failed:\n  assert add(2, 2) == 4\nAssertionError\n"}],
]
TEXTS = ["def f(x):\n\treturn x ** 2  # it's 'fine'\r\n", "  spaces   and 1234567 digits ½ 中文\n\n\n",
         "e\u0301 vs é, emoji 👨‍👩‍👧 🇫🇷, Ελληνικά русский العربية ٣٤٥ हिन्दी, \u00a0nbsp\u3000 tab\t\x0bvt  end   ",
         (Path(__file__).parent.parent / "model.py").read_text()]  # real code: 30k characters
SAMPLING = {"temperature": 0.7, "top_p": 0.95}


def chatml_tokenizer_json(path):
    """A small Qwen2/3-style byte-level BPE: Split(Qwen2 regex) + ByteLevel, NFC, ChatML specials."""
    tok = HFTokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PATTERN), "isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = [json.dumps(DIALOGS)] * 20 + TEXTS[:3] * 20 + [open(__file__).read()]
    tok.train_from_iterator(corpus, trainer=trainer)
    tok.save(str(path))
    return path


def chains(tok: Tokenizer) -> dict[int, list[int]]:
    """start token -> the greedy continuation the doctored model writes: a text token then each stop id, and a
    text token that repeats itself (no stop). Start and middle tokens are single letters."""
    letter = lambda c: tok.encode(c)[0]  # noqa: E731
    out = {letter("abc"[i]): [letter("ABC"[i]), stop] for i, stop in enumerate(tok.stop_ids)}
    out[letter("z")] = [letter("z")]
    return out


def doctor(model: Transformer, tok: Tokenizer):
    """Make the next token a function of the last one: attention and MLP outputs are zeroed, so the residual
    is the embedding; each chain token's embedding is one axis, and lm_head maps that axis to the chain's next
    token with a margin no rounding can flip."""
    assert not model.config.tie_word_embeddings
    axes = iter(range(model.config.hidden_size))
    with torch.no_grad():
        for layer in model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.lm_head.weight.zero_()
        model.norm.weight.fill_(1.0)
        for start, following in chains(tok).items():
            previous = start
            for nxt in following:
                axis = next(axes)
                model.embed_tokens.weight[previous].zero_()[axis] = 4.0
                model.lm_head.weight[nxt, axis] = 8.0
                previous = nxt


@pytest.fixture(scope="module")
def folders(shared_data, tmp_path_factory):
    """family -> (our tokenizer, our saved folder, our logits, HF's results for that folder)."""
    root = tmp_path_factory.mktemp("folders")
    llama3 = Tokenizer.llama3(shared_data / "llama3-tokenizer" / "tokenizer.model")
    chatml = Tokenizer.from_tokenizer_json(chatml_tokenizer_json(root / "chatml.json"))
    tokenizers = {"llama3": llama3, "qwen3": chatml, "bytes": Tokenizer.byte_level()}
    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    llama_config = {**SMALL, "vocab_size": llama3.n_words, "bos_token_id": llama3.bos_id,
                    "eos_token_id": llama3.eot_id, "rope_parameters": rope}
    qwen_config = {**SMALL, "vocab_size": 640, "head_dim": 16, "eos_token_id": chatml.eot_id}  # vocab padded
    builds = [{"op": "build", "name": "llama3", "dir": str(root / "hf_llama3"), "arch": "LlamaForCausalLM",
               "dtype": "bfloat16", "config": llama_config},
              {"op": "build", "name": "qwen3", "dir": str(root / "hf_qwen3"), "arch": "Qwen3ForCausalLM",
               "dtype": "bfloat16", "config": qwen_config}]
    hf_reference([b for b in builds if b["name"] in FAMILIES])
    torch.manual_seed(0)
    models_ = {family: Transformer.from_pretrained(root / f"hf_{family}") for family in ("llama3", "qwen3")
               if family in FAMILIES}
    models_["bytes"] = Transformer(ModelConfig(vocab_size=264, **SMALL)).to(torch.bfloat16)
    jobs, inputs, logits = [], {}, {}
    for family, model in models_.items():
        tok, path = tokenizers[family], root / family
        assert model.embed_tokens.weight.dtype == torch.bfloat16
        model.save_pretrained(path, tokenizer=tok, sampling=SAMPLING)
        x = torch.tensor([tok.encode_dialog_prompt(DIALOGS[1])])
        with torch.no_grad():
            logits[family] = model.float()(x)
        inputs[f"fwd_{family}.input_ids"] = x
        doctor(model, tok)
        model.save_pretrained(root / f"{family}_doctored", tokenizer=tok, sampling=SAMPLING)
        prompts = [tok.encode_dialog_prompt(DIALOGS[0]) + [start] for start in chains(tok)]
        jobs += [{"op": "forward", "name": f"fwd_{family}", "dir": str(path), "dtype": "float32"},
                 {"op": "tokenizer", "name": f"tok_{family}", "dir": str(path), "dialogs": DIALOGS,
                  "texts": TEXTS},
                 {"op": "generate", "name": f"gen_{family}", "dir": str(root / f"{family}_doctored"),
                  "max_new_tokens": 6, "prompts": prompts}]
    ref, results = hf_reference(jobs, inputs)
    hf = {family: {"logits": ref[f"fwd_{family}.logits"],
                   **{op: results[f"{op}_{family}"] for op in ("fwd", "tok", "gen")}} for family in models_}
    return {family: (tokenizers[family], root / family, logits[family], hf[family]) for family in models_}


# Llama 3's folder (the real 128k tokenizer.model, ~30 s) is opt-in to keep the suite within its 15-minute
# budget (NANORLEF_FULL=1); its tokenizer and model parity run by default in test_tokenizer.py and test_model.py.
FAMILIES = (["llama3"] if os.environ.get("NANORLEF_FULL") == "1" else []) + ["qwen3", "bytes"]


@pytest.mark.parametrize("family", FAMILIES)
def test_folder_has_tokenizer_and_generation_config(folders, family):
    tok, path, _, _ = folders[family]
    generation = json.loads((path / "generation_config.json").read_text())
    assert generation == {"bos_token_id": tok.bos_id, "eos_token_id": list(tok.stop_ids),
                          "pad_token_id": tok.pad_id, "do_sample": True, **SAMPLING}
    config = json.loads((path / "tokenizer_config.json").read_text())
    assert config["chat_template"] and config["eos_token"] == {"llama3": "<|eot_id|>", "qwen3": "<|im_end|>",
                                                               "bytes": "<|eot_id|>"}[family]
    back = tokenizer_for(path)  # the folder's own tokenizer, read back by our loader, is the same tokenizer
    assert back.special_tokens == tok.special_tokens and back.stop_ids == tok.stop_ids
    assert back.pad_id == tok.pad_id and back.bos_id == tok.bos_id
    for text in TEXTS + [json.dumps(DIALOGS, ensure_ascii=False)]:
        assert back.encode(text) == tok.encode(text)


@pytest.mark.parametrize("family", FAMILIES)
def test_auto_model_loads_and_matches(folders, family):
    _, _, ours, hf = folders[family]
    assert hf["fwd"]["class"] == {"llama3": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM",
                                  "bytes": "LlamaForCausalLM"}[family]
    assert (ours - hf["logits"]).abs().max().item() < 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_auto_tokenizer_encodes_chats_as_ours(folders, family):
    tok, _, _, hf = folders[family]
    assert hf["tok"]["chats"] == [tok.encode_dialog_prompt(d) for d in DIALOGS]
    assert hf["tok"]["texts"] == [tok.encode(t) for t in TEXTS]
    assert hf["tok"]["specials"] == {"bos_token_id": tok.bos_id, "eos_token_id": tok.eot_id,
                                     "pad_token_id": tok.pad_id}
    assert hf["tok"]["vocab"] == tok.n_words


@pytest.mark.parametrize("family", FAMILIES)
def test_hf_generate_stops_on_every_stop_id_and_only_there(folders, family):
    tok, _, _, hf = folders[family]
    assert hf["gen"]["eos_token_id"] == list(tok.stop_ids) and hf["gen"]["pad_token_id"] == tok.pad_id
    assert (hf["gen"]["do_sample"], hf["gen"]["temperature"], hf["gen"]["top_p"]) == (True, 0.7, 0.95)
    expected = [following if following[-1] in tok.stop_ids else following * 6  # the loop runs to the limit
                for following in chains(tok).values()]
    assert hf["gen"]["new_tokens"] == expected
    assert len(tok.stop_ids) == {"llama3": 3, "qwen3": 2, "bytes": 2}[family]


# ---------------------------------------------------------------------------------------------------------------
# the vocabulary check and the tokenizer rule


def test_check_vocab_names_both_files(shared_data, tmp_path):
    llama3 = Tokenizer.llama3(shared_data / "llama3-tokenizer" / "tokenizer.model")
    small = ModelConfig(vocab_size=128000, **SMALL)  # the text ranks fit, the 256 specials do not
    with pytest.raises(ValueError, match=r"tokenizer\.model has ids up to 128255 \(special tokens "
                                         r".*begin_of_text.*m/config\.json has vocab_size=128000"):
        check_vocab(small, llama3, "m/config.json")
    bytes_ = Tokenizer.byte_level()
    with pytest.raises(ValueError, match=r"byte_level has ids up to 263 \(special tokens \[\(260, .*c\.json"):
        check_vocab(ModelConfig(vocab_size=260, **SMALL), bytes_, "c.json")
    check_vocab(ModelConfig(vocab_size=128256, **SMALL), llama3, "m/config.json")
    check_vocab(ModelConfig(vocab_size=300, **SMALL), bytes_, "c.json")  # a padded embedding is fine


def test_tokenizer_rule(shared_data, tmp_path):
    model_path = shared_data / "llama3-tokenizer" / "tokenizer.model"
    assert tokenizer_for("", "").file == TINY_BPE  # no model_dir: the tiny demo's BPE
    assert tokenizer_for(tmp_path, "bytes").name == "byte_level"  # explicit wins
    assert tokenizer_for(tmp_path, str(TINY_BPE)).ranks == tokenizer_for("", "").ranks  # a .tiktoken file
    with pytest.raises(FileNotFoundError, match=f"no tokenizer.json or tokenizer.model in {tmp_path}"):
        tokenizer_for(tmp_path)  # a model_dir without a tokenizer never falls back to bytes
    shutil.copy(model_path, tmp_path / "tokenizer.model")
    assert tokenizer_for(tmp_path).file == tmp_path / "tokenizer.model"
    Tokenizer.byte_level().save_pretrained(tmp_path)  # now tokenizer.json too: it comes first
    assert tokenizer_for(tmp_path).n_words == 264
    assert tokenizer_for(tmp_path, str(model_path)).file == model_path  # explicit wins over the folder's
