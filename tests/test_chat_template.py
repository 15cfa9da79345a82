"""Episodes and demonstrations against the model families' real chat templates, rendered by Hugging Face.

The reference is transformers' `apply_chat_template` with Meta's Llama 3 Instruct template (the Jinja string of
Meta-Llama-3-8B-Instruct's tokenizer_config.json) and the ChatML template of SmolLM2/Qwen2.5 (without their
default system message), on the real Llama 3 tokenizer.model (converted by transformers) and on a byte-level
BPE trained here. HF renders the messages' TEXT and parses the special tokens out of the string, so our
id-level layout (headers, end tokens, ChatML's newlines) is checked against an independent rendering.
transformers runs in its own `python -I` process away from the repository (its `kernels/` shadows HF's).

Episodes keep the sampled ids (rollout.py's docstring). Where a scripted policy samples the tokenizer's own
encoding of its text, the episode's ids must equal the template's exactly, however each turn ended. Where it
samples arbitrary ids (other BPE segmentations, leading/trailing whitespace that Llama 3's template trims),
the episode must equal the template once each sampled content is replaced by the encoding of its text.
"""
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from tokenizers import Regex
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

from data import Task, Test
from reward import NO_CODE_FEEDBACK, RewardConfig, feedback_text
from rollout import RolloutConfig, RolloutWorker, task_message
from sandbox import SandboxPool
from sft import demonstration, format_answer, repair_demonstration
from tokenizer import LLAMA3_PATTERN, LLAMA3_SPECIALS, Tokenizer

# Meta-Llama-3-8B-Instruct's chat_template, verbatim. (3.1/3.2 add a system header with tool and date lines
# before the messages; the message layout is this one.)
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' "
    "+ message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 "
    "== 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt "
    "%}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' "
    "+ '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

# Run by `python -I -c` with a JSON request on stdin: HF's ids for each conversation.
REFERENCE = """
import json, sys
import transformers
from transformers import PreTrainedTokenizerFast
req = json.load(sys.stdin)
if "tiktoken_model" in req:
    from transformers.convert_slow_tokenizer import TikTokenConverter
    backend = TikTokenConverter(vocab_file=req["tiktoken_model"], pattern=req["pattern"],
                                extra_special_tokens=req["specials"]).converted()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=req["bos"], chat_template=req["template"])
else:
    tok = PreTrainedTokenizerFast(tokenizer_file=req["tokenizer_json"], chat_template=req["template"])
out = [list(tok.apply_chat_template(c["messages"], tokenize=True, return_dict=True,
                                    add_generation_prompt=c["generation_prompt"])["input_ids"])
       for c in req["conversations"]]
json.dump({"ids": out, "transformers": transformers.__version__}, sys.stdout)
"""

TASK = Task(task_id="add", prompt="Write add(a, b) that returns a + b.",
            public_tests=[Test(kind="call", call="add(1, 2)", expected="3")],
            private_tests=[Test(kind="call", call="add(1, 2)", expected="3")], entry_point="add")
WRONG = "```python\ndef add(a, b):\n    return a - b\n```"
NO_CODE = "I am not sure."
RIGHT = "Here:\n```python\ndef add(a, b):\n    return a + b\n```"
# How each turn of a scripted episode ends: the special token sampled last, or None (cut off by the limit).
ENDINGS = {"llama3": ["<|eot_id|>", "<|eom_id|>", "<|end_of_text|>", None],
           "chatml": ["<|im_end|>", "<|endoftext|>", None]}


def hf_ids(tmp_path: Path, request: dict) -> list[list[int]]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-I", "-c", REFERENCE], input=json.dumps(request), cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)["ids"]


def train_chatml(path: Path) -> Path:
    """A Qwen2-style byte-level BPE (Split regex, NFC) with ChatML's specials, trained on a little code."""
    hf = HFTokenizer(models.BPE())
    pattern = LLAMA3_PATTERN.replace(r"\p{N}{1,3}", r"\p{N}")  # Qwen2's regex: single digits
    hf.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(pattern), "isolated"),
                                                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    hf.normalizer, hf.decoder = normalizers.NFC(), decoders.ByteLevel()
    corpus = [Path(m.__file__).read_text() for m in (json.decoder, random, subprocess)] * 2
    corpus += [WRONG, RIGHT, NO_CODE, NO_CODE_FEEDBACK, task_message(TASK)] * 20
    hf.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=1200, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    hf.save(str(path))
    return path


def scripted(tok: Tokenizer, turns, seen: list):
    """A Sampler whose k-th call answers every prompt with turns[k] = (ids, stopped); records the prompts."""
    def sample(prompts):
        seen.append([list(prompt) for prompt in prompts])  # the episode's list grows afterwards
        return [turns[len(seen) - 1]] * len(prompts)
    return sample


def ending_ids(tok: Tokenizer, ending: str | None) -> tuple[list[int], bool]:
    return ([tok.special_tokens[ending]], True) if ending else ([], False)


class Case:
    """One episode (or demonstration) and the messages and prompts the template must reproduce."""

    def __init__(self, kind, name, tokens, messages, prompts=()):
        self.kind, self.name, self.tokens, self.messages = kind, name, tokens, messages
        self.prompts = list(prompts)           # (prompt ids the sampler saw, the messages before it)


def rollout_cases(tok: Tokenizer, family: str, pool) -> list[Case]:
    """Three-turn episodes (wrong, no code, right) whose turns end in every way the family allows: the first
    ending of ENDINGS on turn 1, the next on turn 2, ... so each ending meets each turn position."""
    cases = []
    endings = ENDINGS[family]
    worker = RolloutWorker(tok, pool, RolloutConfig(max_turns=3, max_new_tokens=64), RewardConfig())
    texts = [WRONG, NO_CODE, RIGHT]
    for shift in range(len(endings)):
        chosen = [endings[(shift + k) % len(endings)] for k in range(3)]
        turns = [(tok.encode(text) + ending_ids(tok, end)[0], ending_ids(tok, end)[1])
                 for text, end in zip(texts, chosen)]
        seen = []
        [ep] = worker.run(scripted(tok, turns, seen), [TASK])
        assert len(ep.turns) == 3
        feedback = feedback_text(ep.turns[0].public, TASK.public_tests)
        messages = [{"role": "user", "content": task_message(TASK)}]
        prompts = []
        for k, (text, user_next) in enumerate(zip(texts, [feedback, NO_CODE_FEEDBACK, None])):
            prompts.append((seen[k][0], list(messages)))
            messages.append({"role": "assistant", "content": text})
            if user_next:
                messages.append({"role": "user", "content": user_next})
        # The actions: each text's ids, and the template's end-of-turn token where the turn stopped.
        actions = [tok.encode(text) + ([tok.eot_id] if end else []) for text, end in zip(texts, chosen)]
        assert [ep.tokens[t.start:t.end] for t in ep.turns] == actions
        assert ep.action_mask == [any(t.start <= i < t.end for t in ep.turns) for i in range(len(ep.tokens))]
        assert ep.truncated == (None in chosen)  # a cut-off turn anywhere
        cases.append(Case("rollout", " / ".join(map(str, chosen)), ep.tokens, messages, prompts))
    return cases


def random_episode(tok: Tokenizer, family: str, pool, seed: int) -> Case:
    """Arbitrary sampled ids, as an untrained policy writes them: any ordinary token, any ending. The
    comparison replaces each content by the encoding of its text (trimmed for Llama 3, as the template is)."""
    rng = random.Random(seed)
    specials = set(tok.special_tokens.values())
    ordinary = [i for i in range(tok.n_words) if i not in specials]
    turns = []
    for k in range(3):
        ending = ENDINGS[family][k % len(ENDINGS[family])]
        content = [rng.choice(ordinary) for _ in range(rng.randint(1, 30))]
        ids, stopped = ending_ids(tok, ending)
        turns.append((content + ids, stopped))
    worker = RolloutWorker(tok, pool, RolloutConfig(max_turns=3, max_new_tokens=64), RewardConfig())
    [ep] = worker.run(scripted(tok, turns, []), [TASK])
    assert len(ep.turns) == 3  # random text has no code block: two NO_CODE feedback turns
    canonical, texts, last = [], [], 0
    for turn, (response, stopped) in zip(ep.turns, turns):
        content = response[:-1] if stopped else response
        assert ep.tokens[turn.start:turn.start + len(content)] == content  # kept as sampled
        text = tok.decode(content)
        texts.append(text)
        canonical += ep.tokens[last:turn.start] + tok.encode(text.strip() if family == "llama3" else text)
        last = turn.start + len(content)
    canonical += ep.tokens[last:]
    messages = [{"role": "user", "content": task_message(TASK)}]
    for k, text in enumerate(texts):
        messages.append({"role": "assistant", "content": text})
        if k < 2:
            messages.append({"role": "user", "content": NO_CODE_FEEDBACK})
    return Case("random", f"random ids, seed {seed}", canonical, messages)


def demonstration_cases(tok: Tokenizer) -> list[Case]:
    code, wrong = "def add(a, b):\n    return a + b\n", "def add(a, b):\n    return a - b\n"
    feedback = "Your code failed the following tests:\n\n- input 'add(1, 2)' failed\n\nGive it another try."
    user, answer, bad = task_message(TASK), format_answer(code), format_answer(wrong)
    trained = tok.encode(answer) + [tok.eot_id]
    cases = []
    tokens, mask = demonstration(tok, user, code)
    cases.append(Case("demonstration", "demonstration", tokens, [{"role": "user", "content": user},
                                                                 {"role": "assistant", "content": answer}]))
    assert [t for t, m in zip(tokens, mask) if m] == trained
    tokens, mask = repair_demonstration(tok, user, wrong, feedback, code)
    cases.append(Case("demonstration", "repair_demonstration", tokens, [
        {"role": "user", "content": user}, {"role": "assistant", "content": bad},
        {"role": "user", "content": feedback}, {"role": "assistant", "content": answer}]))
    assert [t for t, m in zip(tokens, mask) if m] == trained  # only the right answer
    return cases


@pytest.fixture(scope="module")
def pool():
    with SandboxPool(workers=2) as p:
        yield p


@pytest.fixture(scope="module", params=["llama3", "chatml"])
def family(request, shared_data, tmp_path_factory, pool):
    """(tokenizer, cases, HF's ids of every case's conversation and of every prompt a sampler saw)."""
    tmp = tmp_path_factory.mktemp(request.param)
    if request.param == "llama3":
        path = shared_data / "llama3-tokenizer" / "tokenizer.model"
        tok = Tokenizer.llama3(path)
        request_ = {"tiktoken_model": str(path), "pattern": LLAMA3_PATTERN, "specials": LLAMA3_SPECIALS,
                    "bos": "<|begin_of_text|>", "template": LLAMA3_TEMPLATE}
    else:
        path = train_chatml(tmp / "tokenizer.json")
        tok = Tokenizer.from_tokenizer_json(path)
        request_ = {"tokenizer_json": str(path), "template": CHATML_TEMPLATE}
    assert tok.chat_format == request.param
    cases = rollout_cases(tok, request.param, pool) + [random_episode(tok, request.param, pool, seed)
                                                       for seed in range(3)] + demonstration_cases(tok)
    conversations = [{"messages": c.messages, "generation_prompt": False} for c in cases]
    conversations += [{"messages": m, "generation_prompt": True} for c in cases for _, m in c.prompts]
    ids = hf_ids(tmp, {**request_, "conversations": conversations})
    return request.param, tok, cases, ids


def compare(family, kinds):
    name, tok, cases, ids = family
    whole, prompts = ids[:len(cases)], iter(ids[len(cases):])
    checked = 0
    for case, expected in zip(cases, whole):
        for prompt, _ in case.prompts:  # what the policy saw before each turn
            hf_prompt = next(prompts)
            if case.kind in kinds:
                assert prompt == hf_prompt, (name, case.name, tok.decode(prompt), tok.decode(hf_prompt))
        if case.kind in kinds:
            assert case.tokens == expected, (name, case.name, tok.decode(case.tokens), tok.decode(expected))
            checked += 1
    return checked


@pytest.mark.slow
def test_episodes_are_the_chat_template_however_turns_end(family):
    """Exact ids for the tokenizer's own encodings, with every ending at every turn; the prompts the policy
    saw before turns 2 and 3 too."""
    assert compare(family, ("rollout",)) == len(ENDINGS[family[0]])


@pytest.mark.slow
def test_episodes_of_arbitrary_sampled_ids_are_the_template_up_to_the_contents_encoding(family):
    assert compare(family, ("random",)) == 3


@pytest.mark.slow
def test_demonstrations_are_the_chat_template(family):
    assert compare(family, ("demonstration",)) == 2
