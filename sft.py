"""Supervised fine-tuning on demonstrations: the warm start.

RL for code starts from a model that already writes code in the expected format (CodeRL and RLEF start from
fine-tuned models). For the CPU demo, `warm_start` trains a small Llama from scratch on reference solutions of
training tasks and writes a real HF checkpoint that train.py loads like any other. Expert iteration (ReST-EM,
Singh et al. 2023) minimises the same loss on the policy's own passing programs
(train.expert_iteration_update).

A demonstration is a chat, laid out as rollout.py lays out an episode (the model family's chat template):
the task message, then the assistant's answer "```python\\n<code>```" and its end-of-turn token, which are
trained, then the rest of the template's closing (ChatML's newline), which is context as in an episode. The
loss is the mean negative log-likelihood of the trained assistant tokens only.

The warm start's demonstrations (`warm_start_examples`):
- every task's reference solution, carrying each applicable classic bug of synthetic.CLASSIC_BUGS (a
  missing `default=0`, `>=` for `>`, ...) with probability `bug_rate`. A real model learns
  from a corpus with bugs in it; so does this one, and it writes them on held-out tasks too. Execution
  feedback is what removes them, which is the part of RL for code the demo shows;
- for slow/fast tasks also the slow solution, so the warm-started policy writes both and the time reward has a
  choice to act on (RL then shifts the mix; without the time reward nothing favours either);
- repair demonstrations, the multi-turn format of RLEF: a wrong first answer (the reference with one classic
  bug, or another task's reference), the real sandbox feedback on the public tests, then the right answer.
  Only the right answer is trained, so the model learns to read feedback, never to write the wrong program;
- a tests-say task with a reference (synthetic.py) appears only as repairs: a first answer that returns 0 or
  another wrong digit for no numbers, the feedback that shows the value expected, then the reference. A
  one-turn demonstration would teach guessing the value.

The tiny preset's tokenizer is a BPE of TINY["merges"] merges trained on the text of these demonstrations
(`tiny_bpe_ranks`, shipped as weights/tiny-bpe.tiktoken): held-out task text takes a third of the tokens that
bytes would, and generation and training cost about in proportion.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import random
import re
import shutil
import time
from pathlib import Path

import psutil
import torch

from kernels import fused_linear_logprobs
from model import ModelConfig
from synthetic import bug_sites, with_bugs
from reward import feedback_text
from rollout import task_message


def format_answer(code: str) -> str:
    """The assistant's answer for a program: one fenced python block, as rollout.INSTRUCTION asks."""
    return f"```python\n{code.rstrip()}\n```"


def answer_tokens(tokenizer, code: str) -> tuple[list[int], list[int]]:
    """(trained, context): the assistant's answer for `code` and its end-of-turn token, which a demonstration
    trains, then the rest of the template's closing, as rollout.py closes a sampled answer."""
    return tokenizer.close_turn(tokenizer.encode(format_answer(code)) + [tokenizer.eot_id], stopped=True)


def with_answer(tokenizer, tokens: list[int], mask: list[bool], code: str) -> tuple[list[int], list[bool]]:
    """(tokens, loss_mask) after a prompt that ends in the assistant header, continued by a trained answer."""
    answer, closing = answer_tokens(tokenizer, code)
    return tokens + answer + closing, mask + [True] * len(answer) + [False] * len(closing)


def demonstration(tokenizer, user_message: str, code: str) -> tuple[list[int], list[bool]]:
    """(tokens, loss_mask): the prompt is context (False); the answer and its end-of-turn token are trained
    (True), the rest of the template's closing is context."""
    prompt = tokenizer.encode_dialog_prompt([{"role": "user", "content": user_message}])
    return with_answer(tokenizer, prompt, [False] * len(prompt), code)


def next_turn(tokenizer, tokens: list[int], mask: list[bool], user_message: str,
              code: str) -> tuple[list[int], list[bool]]:
    """(tokens, loss_mask) continued by one more user turn (context) and a trained answer to it, laid out as
    rollout.py appends a turn: the user message, the assistant header, the answer."""
    context = tokenizer.encode_message("user", user_message) + tokenizer.encode_header("assistant")
    return with_answer(tokenizer, tokens + context, mask + [False] * len(context), code)


def repair_demonstration(tokenizer, user_message: str, wrong_code: str, feedback: str,
                         code: str) -> tuple[list[int], list[bool]]:
    """(tokens, loss_mask) of a two-turn episode laid out exactly as rollout.py builds it: task, wrong answer,
    feedback as the next user turn, right answer. Only the right answer and its end-of-turn are trained."""
    first, _ = demonstration(tokenizer, user_message, wrong_code)
    return next_turn(tokenizer, first, [False] * len(first), feedback, code)


def repair_pairs(tasks, count: int, seed: int) -> list[tuple[object, str]]:
    """Up to `count` (task, wrong program) pairs. The wrong program is the task's reference with one classic
    bug in it, or, for a task without one, the reference of another task with the same signature (same first
    line). Either must still be checked against the public tests, which may not tell it apart."""
    rng = random.Random(seed)
    by_signature: dict[str, list] = {}
    for t in tasks:
        if t.reference_solution:
            by_signature.setdefault(t.reference_solution.splitlines()[0], []).append(t)
    pairs = []
    candidates = [t for t in tasks if t.reference_solution and t.public_tests]
    for task in rng.sample(candidates, min(count, len(candidates))):
        sites = bug_sites(task.reference_solution)
        if sites:
            pairs.append((task, with_bugs(task.reference_solution, [rng.choice(sites)])))
            continue
        others = [o for o in by_signature[task.reference_solution.splitlines()[0]] if o is not task
                  and o.reference_solution != task.reference_solution]
        if others:
            pairs.append((task, rng.choice(others).reference_solution))
    return pairs


def corpus_copy(code: str, bug_rate: float, rng: random.Random) -> str:
    """One demonstration of `code`: each classic bug that applies goes in with probability `bug_rate`."""
    return with_bugs(code, [site for site in bug_sites(code) if rng.random() < bug_rate])


def warm_start_examples(tokenizer, tasks, instruction: str, *, slow_solutions: bool = True, repairs: int = 0,
                        bug_rate: float = 0.0, pool=None, seed: int = 0) -> list[tuple[list, list]]:
    """The warm start's demonstrations (module docstring). `repairs` > 0 needs a SandboxPool for the
    feedback."""
    rng = random.Random(seed)
    examples = []
    for t in tasks:
        if t.reference_solution and "tests_say" not in t.tags:
            code = corpus_copy(t.reference_solution, bug_rate, rng)
            examples.append(demonstration(tokenizer, task_message(t, instruction), code))
        if slow_solutions and t.slow_solution:
            examples.append(demonstration(tokenizer, task_message(t, instruction), t.slow_solution))
    if repairs:
        if pool is None:
            raise ValueError("warm_start_examples: repairs > 0 needs a sandbox pool to produce the feedback")
        pairs = repair_pairs([t for t in tasks if "tests_say" not in t.tags], repairs, seed) + \
            tests_say_pairs(tasks, rng)
        for t, wrong, feedback in with_feedback(pairs, pool):
            examples.append(repair_demonstration(tokenizer, task_message(t, instruction), wrong, feedback,
                                                 t.reference_solution))
    return examples


TESTS_SAY_REPAIRS = 3   # first answers per tests-say task: returning 0 for no numbers, and two wrong digits


def tests_say_pairs(tasks, rng: random.Random) -> list[tuple[object, str]]:
    """(task, wrong first answer) for each tests-say task with a reference: its reference returning 0 for no
    numbers, as the other tasks' prompts ask, or another wrong digit, so the value must be read from the
    feedback's expected output rather than guessed from what the first answer got."""
    pairs = []
    for t in tasks:
        if "tests_say" in t.tags and t.reference_solution:
            right = int(re.search(r"default=(\d+)\)", t.reference_solution).group(1))
            wrong = [0] + rng.sample([d for d in range(1, 10) if d != right], TESTS_SAY_REPAIRS - 1)
            pairs += [(t, t.reference_solution.replace(f"default={right})", f"default={w})")) for w in wrong]
    return pairs


def with_feedback(pairs, pool) -> list[tuple[object, str, str]]:
    """(task, wrong program, the sandbox's feedback on its public tests) of the warm start's repair
    demonstrations, less those whose wrong program passes the public tests (no feedback to learn from)."""
    results = pool.map([(wrong, t.public_tests, t.setup_code) for t, wrong in pairs])
    return [(t, wrong, feedback_text(result, t.public_tests))
            for (t, wrong), result in zip(pairs, results) if not result.passed]


def bpe_corpus(tasks, seed: int = 0, pool=None) -> list[str]:
    """The texts of the tiny warm start's demonstrations (prompts, programs, and with a pool the repairs'
    feedback), without the chat template's special tokens: what the tiny preset's BPE is trained on."""
    from tokenizer import Tokenizer
    tokenizer = Tokenizer.byte_level()
    examples = warm_start_examples(tokenizer, tasks, "", repairs=TINY["repairs"] if pool else 0,
                                   bug_rate=TINY["bug_rate"], pool=pool, seed=seed)
    texts = []
    for tokens, _ in examples:   # split at the specials (ids 256 and up): each run of bytes is one text
        run = []
        for t in tokens + [256]:
            if t < 256:
                run.append(t)
            elif run:
                texts.append(bytes(run).decode())
                run = []
    return texts


def pad_batch(examples: list[tuple[list[int], list[bool]]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to (B, T) tokens and a (B, T) bool loss mask (False on padding)."""
    T = max(len(tokens) for tokens, _ in examples)
    tokens = torch.full((len(examples), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(examples), T, dtype=torch.bool)
    for b, (ids, m) in enumerate(examples):
        tokens[b, :len(ids)] = torch.tensor(ids)
        mask[b, :len(m)] = torch.tensor(m)
    return tokens, mask


def sft_loss(model, tokens: torch.Tensor, loss_mask: torch.Tensor, chunk_size: int = 1024,
             n_tokens: int | None = None) -> torch.Tensor:
    """Mean NLL of the masked tokens (divided by `n_tokens` instead when given). Position t predicts token
    t+1, so inputs drop the last token and the targets and mask drop the first."""
    inputs, targets, mask = tokens[:, :-1], tokens[:, 1:], loss_mask[:, 1:]
    h = model.hidden_states(inputs)                                   # (B, T-1, D)
    logp = fused_linear_logprobs(h, model.lm_head.weight, targets, chunk_size=chunk_size)  # (B, T-1)
    return -(logp * mask).sum() / (n_tokens or mask.sum().clamp(min=1))


def backward_by_length(model, batch: list[tuple[list[int], list[bool]]], pad_id: int,
                       micro_batch_size: int) -> float:
    """Backward of the batch's mean NLL (`sft_loss` on the whole padded batch) in micro-batches of similar
    length, shortest first, each padded only to its own longest demonstration; returns the loss.

    The gradient is the same: the model is causal, so right padding changes nothing before it, and every
    micro-batch's sum is divided by the token count of the whole batch. Repair demonstrations run from about
    370 to 840 tokens, and padding 32 of them to the longest spent nearly a third of their compute on
    padding."""
    n_tokens = max(sum(sum(mask[1:]) for _, mask in batch), 1)   # the trained (shifted) tokens of the batch
    ordered = sorted(batch, key=lambda example: len(example[0]))
    total = 0.0
    for start in range(0, len(ordered), micro_batch_size):
        tokens, mask = pad_batch(ordered[start:start + micro_batch_size], pad_id)
        loss = sft_loss(model, tokens, mask, n_tokens=n_tokens)
        loss.backward()
        total += loss.item()
    return total


def lr_factor(step: int, steps: int, warmup_frac: float = 0.05) -> float:
    """Linear warm-up over the first 5% of steps, then cosine decay to 0."""
    warmup = max(1, int(steps * warmup_frac))
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def batches_by_turns(examples: list, batch_size: int, rng: random.Random):
    """Endless random batches, each drawn from examples with the same number of turns (a bucket chosen with
    probability proportional to its size). Padding to the longest row costs compute, and the two-turn repair
    demonstrations are about twice as long as single-turn ones; batches stay diverse in tasks otherwise."""
    buckets: dict[int, list] = {}
    for tokens, mask in examples:  # the last trained token ends a message: its count is the message count
        end_of_turn = tokens[len(mask) - 1 - mask[::-1].index(True)]
        buckets.setdefault(tokens.count(end_of_turn), []).append((tokens, mask))
    groups = [buckets[k] for k in sorted(buckets)]
    while True:
        group = rng.choices(groups, weights=[len(g) for g in groups])[0]
        yield rng.sample(group, min(batch_size, len(group)))


def train_sft(model, examples: list[tuple[list[int], list[bool]]], *, steps: int, batch_size: int, lr: float,
              pad_id: int, seed: int = 0, micro_batch_size: int = 8, log=None, checkpoint: Path | None = None,
              save_every_s: float = 120.0) -> list[float]:
    """AdamW on the demonstration NLL with a linear warm-up and cosine decay, each batch of `batch_size` put
    through in micro-batches of `micro_batch_size` (`backward_by_length`). Returns the per-step losses.

    With `checkpoint`, the state (weights, optimizer, schedule, step, the batch order's RNG, losses) is
    written there atomically every `save_every_s` seconds, and a run that finds it continues from it: a killed
    warm start loses minutes, not the hours before them. The file is removed when training ends."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, betas=(0.9, 0.95))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, steps))
    rng, losses, start = random.Random(seed), [], 0
    if checkpoint is not None and checkpoint.exists():
        state = torch.load(checkpoint, weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        rng.setstate(state["rng"])
        torch.set_rng_state(state["torch_rng"])
        losses, start = state["losses"], state["step"]
        if log is not None:
            log(f"sft: continuing from step {start} ({checkpoint})")
    model.train()
    started = saved = time.perf_counter()
    for step, batch in zip(range(start, steps), batches_by_turns(examples, batch_size, rng)):
        optimizer.zero_grad(set_to_none=True)
        loss = backward_by_length(model, batch, pad_id, micro_batch_size)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss)
        if log is not None and (step % 50 == 0 or step == steps - 1):
            elapsed = time.perf_counter() - started
            eta = elapsed / (step + 1 - start) * (steps - step - 1)
            log(f"sft step {step:4d}/{steps}  loss {loss:.4f} | {elapsed / 60:.1f} min, "
                f"ETA {eta / 60:.1f} min")
        if checkpoint is not None and time.perf_counter() - saved >= save_every_s and step + 1 < steps:
            # the RNG after this step's batch draws the next one: a resumed run sees the same batches
            save_atomically({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                             "schedule": schedule.state_dict(), "rng": rng.getstate(),
                             "torch_rng": torch.get_rng_state(), "losses": losses, "step": step + 1},
                            checkpoint)
            saved = time.perf_counter()
    model.eval()
    if checkpoint is not None:
        checkpoint.unlink(missing_ok=True)
    return losses


def save_atomically(state: dict, path: Path) -> None:
    """torch.save beside, then rename: a run killed mid-write keeps the previous file."""
    tmp = path.with_name(path.name + ".tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, tmp)
    os.replace(tmp, path)


def warm_start(out_dir: Path, tokenizer, tasks, model_config, *, steps: int, batch_size: int, lr: float,
               seed: int, instruction: str, log=print, slow_solutions: bool = True, repairs: int = 0,
               bug_rate: float = 0.0, shipped: Path | None = None) -> Path:
    """Train a fresh model on demonstrations (`warm_start_examples`) and save it as an HF checkpoint.

    Cached: the folder name holds a hash of everything that determines the weights (model config, optimiser
    settings, the tasks, the instruction, the demonstration mix), so a second run with the same settings loads
    the checkpoint without training, or running the sandbox for the repair feedback, again. A folder of that
    name in `shipped` (the repository's own, made by `python sft.py`) counts as cached.
    """
    from model import Transformer
    from sandbox import Limits, SandboxPool

    if not any(t.reference_solution for t in tasks):
        raise ValueError("warm_start: none of the tasks has a reference_solution to learn from")
    tasks_hash = hashlib.sha256(json.dumps([t.to_dict() for t in tasks]).encode()).hexdigest()
    vocab = sorted(tokenizer.ranks.items(), key=lambda kv: kv[1])
    settings = {"config": model_config.to_hf(), "steps": steps, "batch": batch_size, "lr": lr, "seed": seed,
                "instruction": instruction, "slow": slow_solutions, "repairs": repairs, "bug_rate": bug_rate,
                "tasks": tasks_hash, "vocab": hashlib.sha256(repr(vocab).encode()).hexdigest()}
    key = json.dumps(settings, sort_keys=True)
    name = f"warmstart-{hashlib.sha256(key.encode()).hexdigest()[:12]}"
    if shipped is not None and (shipped / name / "config.json").exists():
        log(f"warm start: the repository's {shipped / name}")
        return shipped / name
    path = Path(out_dir) / name
    if (path / "config.json").exists():
        log(f"warm start: cached checkpoint {path}")
        return path
    pool = SandboxPool(2, Limits(timeout_s=2.0)) if repairs else None
    try:
        examples = warm_start_examples(tokenizer, tasks, instruction, slow_solutions=slow_solutions,
                                       repairs=repairs, bug_rate=bug_rate, pool=pool, seed=seed)
    finally:
        if pool is not None:
            pool.close()
    log(f"warm start: training a {model_config.num_hidden_layers}-layer model on {len(examples)} "
        f"demonstrations for {steps} steps (cached in {path})")
    torch.manual_seed(seed)
    model = Transformer(model_config)
    train_sft(model, examples, steps=steps, batch_size=batch_size, lr=lr, pad_id=tokenizer.pad_id, seed=seed,
              log=log, checkpoint=path.with_name(path.name + ".partial.pt"))
    publish_checkpoint(model, path, log, tokenizer)
    return path


def publish_checkpoint(model, path: Path, log=print, tokenizer=None) -> None:
    """Save into a folder of this process's own, then rename it to `path` in one step: a killed run never
    leaves a half-written cache entry, and two runs training the same warm start at once (two table cells of
    one seed, two shells) never write into one folder. When the other run renamed first, its checkpoint,
    trained from the same settings, is kept and ours dropped. Temporary folders of runs that died are removed
    here."""
    for stale in path.parent.glob(path.name + ".tmp-*"):
        pid = stale.name.rsplit("-", 1)[1]
        if not (pid.isdigit() and psutil.pid_exists(int(pid))):
            shutil.rmtree(stale, ignore_errors=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, tokenizer=tokenizer)  # a complete HF folder: --model_dir finds its tokenizer
    try:
        tmp.rename(path)
    except OSError:
        if not (path / "config.json").exists():
            raise
        log(f"warm start: another run saved {path} first; using it")
        shutil.rmtree(tmp, ignore_errors=True)


# The tiny preset's warm start: a 4-layer model of hidden size 128 trained on every training task's reference,
# with each classic bug in 30% of the places it fits, plus 128 repair demonstrations and the tests-say tasks'
# repairs (TESTS_SAY_REPAIRS for each one with a reference). One warm start serves
# every run seed (its own seed is fixed), so the repository ships it: `python sft.py` trains it into SHIPPED.
TINY = dict(layers=4, hidden=128, lr=3e-3, batch=32, repairs=128, bug_rate=0.3, steps=1200, seed=0,
            merges=256)
SHIPPED = Path(__file__).resolve().parent / "weights"


def tiny_model_config(tokenizer) -> ModelConfig:
    return ModelConfig(vocab_size=tokenizer.n_words, hidden_size=TINY["hidden"],
                       intermediate_size=TINY["hidden"] * 3, num_hidden_layers=TINY["layers"],
                       num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0,
                       max_position_embeddings=2048, tie_word_embeddings=True, bos_token_id=tokenizer.bos_id,
                       eos_token_id=tokenizer.eot_id)


def tiny_warm_start(cache_dir: Path, tokenizer, tasks, *, steps: int, instruction: str, log=print) -> Path:
    """The tiny preset's warm-start checkpoint (`warm_start` with the TINY recipe): the shipped one when it
    has the same recipe, else trained once and cached."""
    return warm_start(cache_dir, tokenizer, tasks, tiny_model_config(tokenizer), steps=steps,
                      batch_size=TINY["batch"], lr=TINY["lr"], seed=TINY["seed"], instruction=instruction,
                      log=log, repairs=TINY["repairs"], bug_rate=TINY["bug_rate"], shipped=SHIPPED)


def tiny_bpe_ranks(pool) -> dict[bytes, int]:
    """The tiny preset's BPE (tokenizer.TINY_BPE): TINY["merges"] merges on the warm start's corpus."""
    from synthetic import synthetic_tasks
    from tokenizer import train_bpe
    return train_bpe(bpe_corpus(synthetic_tasks("train"), TINY["seed"], pool), TINY["merges"])


def ship_tiny_warm_start() -> Path:
    """Build the tiny preset's BPE into tokenizer.TINY_BPE, then train its warm start (the synthetic training
    tasks, no instruction) into SHIPPED, where every `python train.py` finds both. recipe.json beside the
    warm start says what made it: CPU kernels sum floats in their own order, so only the same torch and
    kernels retrain it bit for bit. The BPE is plain counting: it is the same everywhere."""
    from sandbox import Limits, SandboxPool
    from synthetic import synthetic_tasks
    from tokenizer import TINY_BPE, Tokenizer, save_tiktoken_ranks
    with SandboxPool(2, Limits(timeout_s=2.0)) as pool:
        save_tiktoken_ranks(tiny_bpe_ranks(pool), TINY_BPE)
    path = tiny_warm_start(SHIPPED, Tokenizer.byte_level(TINY_BPE), synthetic_tasks("train"),
                           steps=TINY["steps"], instruction="")
    if not (path / "recipe.json").exists():   # found, not trained here: its record stays as it was
        recipe = {"command": "python sft.py", "recipe": TINY, "torch": torch.__version__,
                  "cpu_capability": torch.backends.cpu.get_cpu_capability()}
        (path / "recipe.json").write_text(json.dumps(recipe, indent=1) + "\n")
    return path


if __name__ == "__main__":
    print(f"shipped: {ship_tiny_warm_start()}")
