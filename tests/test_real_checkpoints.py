"""The presets' code path on real checkpoint folders, two steps of each algorithm.

Tiny random bf16 Llama 3 and Qwen3 checkpoints are written by transformers (in its own process), with the real
Llama 3 tokenizer.model and a trained ChatML tokenizer.json beside them. A short SFT teaches each to answer
"Print a number." with print(7) half of the time and print(3) or print(5) otherwise, so rewards vary, and the
folder is saved back in bf16. Then train.py's Trainer runs the presets (llama-3.2-1b, qwen3-0.6b, and
llama-3.1-8b's LoRA) for two iterations at the presets' learning rates: on Qwen3, PPO with the separate and the
probe critic, GRPO, expert iteration and LoRA; on Llama 3, whose 128k vocabulary makes every bf16 forward slow on
a CPU, full fine-tuning with PPO's separate critic (three models: policy, critic, reference) and LoRA. Checked: the trained weights and Adam's state are fp32 and the frozen
ones bf16, the weights moved, every episode is the family's chat template of its messages (rendered by
transformers from the checkpoint's own tokenizer_config.json), and the saved checkpoint loads in
AutoModelForCausalLM and AutoTokenizer and computes the logits our model does.
"""
import json
import os

import pytest
import torch
from conftest import hf_reference
from test_checkpoint_folder import chatml_tokenizer_json

import train
from data import Task, Test
from model import Transformer
from reward import NO_CODE_FEEDBACK, feedback_text
from rollout import task_message
from sft import demonstration, train_sft
from tokenizer import Tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")
INSTRUCTION = "Answer in a python block."
TASK = Task(task_id="seven", prompt="Print a number.", public_tests=[Test(kind="stdio", stdin="", expected="7")],
            private_tests=[Test(kind="stdio", stdin="", expected="7")])
SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=512)
ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
PRESETS = {"llama3": "llama-3.2-1b", "qwen3": "qwen3-0.6b"}
RUNS = {"ppo_separate": ["--algo", "ppo", "--critic", "separate"],
        "ppo_probe": ["--algo", "ppo", "--critic", "probe"],
        "grpo": ["--algo", "grpo"],
        "expert_iteration": ["--algo", "expert_iteration"],
        "lora": ["--preset", "llama-3.1-8b", "--lora_rank", "4"]}  # head critic, FSDP off
FAMILY_RUNS = {"qwen3": list(RUNS), "llama3": ["ppo_separate", "lora"]}


@pytest.fixture(scope="module")
def checkpoints(shared_data, tmp_path_factory):
    """family -> (folder, tokenizer, tasks.jsonl): warm-started bf16 HF folders with their tokenizers."""
    root = tmp_path_factory.mktemp("real")
    toks = {"llama3": Tokenizer.llama3(shared_data / "llama3-tokenizer" / "tokenizer.model"),
            "qwen3": Tokenizer.from_tokenizer_json(chatml_tokenizer_json(root / "chatml.json"))}
    builds = [{"op": "build", "name": "llama3", "dir": str(root / "hf_llama3"), "arch": "LlamaForCausalLM",
               "dtype": "bfloat16", "config": {**SMALL, "vocab_size": toks["llama3"].n_words,
                                               "rope_parameters": ROPE, "tie_word_embeddings": True}},
              {"op": "build", "name": "qwen3", "dir": str(root / "hf_qwen3"), "arch": "Qwen3ForCausalLM",
               "dtype": "bfloat16", "config": {**SMALL, "vocab_size": 640, "head_dim": 16}}]
    if os.environ.get("NANORLEF_FULL") != "1":  # see LLAMA3 below
        builds, toks = builds[1:], {"qwen3": toks["qwen3"]}
    hf_reference(builds)
    (root / "tasks.jsonl").write_text(json.dumps(TASK.to_dict()) + "\n")
    out = {}
    for family, tok in toks.items():
        model = Transformer.from_pretrained(root / f"hf_{family}", dtype=torch.float32)
        examples = [demonstration(tok, task_message(TASK, INSTRUCTION), f"print({d})") for d in (7, 7, 3, 5)]
        torch.manual_seed(0)
        train_sft(model, examples, steps=80, batch_size=4, lr=1e-2, pad_id=tok.pad_id)
        model.to(torch.bfloat16).save_pretrained(root / family, tokenizer=tok)
        out[family] = (root / family, tok, root / "tasks.jsonl")
    return out


def episode_messages(ep, tok: Tokenizer) -> tuple[list[dict], list[int]]:
    """The messages of an episode (task, each answer's text, each feedback) and the episode's ids with each
    sampled content replaced by the encoding of its text, trimmed for Llama 3 as its template trims: a policy
    may sample another segmentation of the same text, which the template cannot reproduce."""
    messages = [{"role": "user", "content": task_message(ep.task, INSTRUCTION)}]
    canonical, last = [], 0
    for k, turn in enumerate(ep.turns):
        response = ep.tokens[turn.start:turn.end]
        content = response[:-1] if turn.stopped else response   # a stop is written as the end-of-turn token
        text = tok.decode(content)
        canonical += ep.tokens[last:turn.start] + tok.encode(text.strip() if tok.chat_format == "llama3" else text)
        last = turn.start + len(content)
        messages.append({"role": "assistant", "content": text})
        if k + 1 < len(ep.turns):
            feedback = NO_CODE_FEEDBACK if turn.code is None else feedback_text(turn.public, ep.task.public_tests)
            messages.append({"role": "user", "content": feedback})
    return messages, canonical + ep.tokens[last:]


def run_two_steps(family, checkpoints, name, tmp_path):
    folder, tok, tasks = checkpoints[family]
    argv = ["--preset", PRESETS[family], "--model_dir", str(folder), "--dataset", "tasks", "--data_path", str(tasks),
            "--out_dir", str(tmp_path / name), "--steps", "2", "--samples_per_task", "8",
            "--tasks_per_step", "1" if family == "llama3" else "2",  # 8 or 16 episodes a step
            "--max_turns", "2", "--max_new_tokens", "12", "--temperature", "0.7", "--gen_batch_size", "16", "--minibatch_size", "8",
            "--micro_batch_size", "8", "--ppo_epochs", "1", "--sandbox_workers", "2", "--instruction", INSTRUCTION,
            *RUNS[name]]
    trainer = train.Trainer(train.parse_config(argv))
    episodes, run = [], trainer.worker.run
    trainer.worker.run = lambda *a, **kw: episodes.extend(run(*a, **kw)) or episodes[-len(a[1]):]
    trained = {n: p.detach().clone() for n, p in trainer.models.policy.named_parameters() if p.requires_grad}
    try:
        for step in range(2):
            trainer.train_step(step)
        trainer.save_checkpoint(2)
    finally:
        trainer.pool.close()
    return trainer, trained, episodes


# Llama 3's runs take about 4 minutes on 2 cores (its 128k-vocabulary bf16 forwards), beyond the default
# suite's budget: they run with NANORLEF_FULL=1 (conftest.FULL; README, "Tests"). Qwen3 runs every algorithm by default.
LLAMA3 = pytest.mark.skipif(os.environ.get("NANORLEF_FULL") != "1", reason="opt-in: NANORLEF_FULL=1")


@pytest.mark.slow
@pytest.mark.parametrize("family", [pytest.param("llama3", marks=LLAMA3), "qwen3"])
def test_each_algorithm_trains_a_real_bf16_checkpoint(family, checkpoints, tmp_path):
    jobs, inputs, ours = [], {}, {}
    for name in FAMILY_RUNS[family]:
        trainer, start, episodes = run_two_steps(family, checkpoints, name, tmp_path)
        policy = trainer.models.policy
        for n, p in policy.named_parameters():  # fp32 master weights for what trains, bf16 for what is frozen
            assert p.dtype == (torch.float32 if p.requires_grad else torch.bfloat16), (name, n, p.dtype)
        for opt in trainer.optimizers:
            states = [t for s in opt.state.values() for t in s.values() if torch.is_tensor(t) and t.dim()]
            assert states and {t.dtype for t in states} == {torch.float32}, name
        if trainer.models.reference is not None:
            assert {p.dtype for p in trainer.models.reference.parameters()} == {torch.bfloat16}
        moved = {n for n, p in policy.named_parameters() if n in start and not torch.equal(p.detach(), start[n])}
        expected = {n for n in start if not n.startswith("value_head")}  # the policy's own weights
        assert moved >= expected and expected, (name, sorted(expected - moved)[:5])
        assert {ep.passed for ep in episodes} == {True, False}, name  # rewards varied: a signal to learn from
        assert any(len(ep.turns) == 2 for ep in episodes), name
        for i, ep in enumerate(episodes[:6]):
            messages, canonical = episode_messages(ep, checkpoints[family][1])
            jobs.append({"op": "tokenizer", "name": f"{name}_{i}", "dir": str(tmp_path / name / "checkpoint" /
                         "policy"), "dialogs": [messages], "generation_prompt": False})
            ours[f"{name}_{i}"] = canonical
        x = torch.tensor([episodes[0].tokens])
        inputs[f"fwd_{name}.input_ids"] = x
        with torch.no_grad():
            ours[f"fwd_{name}"] = Transformer.from_pretrained(tmp_path / name / "checkpoint" / "policy")(x).float()
        jobs.append({"op": "forward", "name": f"fwd_{name}", "dir": str(tmp_path / name / "checkpoint" / "policy"),
                     "dtype": "float32"})
    tensors, results = hf_reference(jobs, inputs)
    for key, canonical in ours.items():
        if key.startswith("fwd_"):
            assert results[key]["class"].endswith("ForCausalLM")
            torch.testing.assert_close(tensors[f"{key}.logits"], canonical, atol=1e-4, rtol=1e-4)
        else:
            [hf_ids] = results[key]["chats"]
            assert hf_ids == canonical, (key, checkpoints[family][1].decode(hf_ids))
