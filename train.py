"""nanoRLEF: reinforcement learning from execution feedback, in one script.

    python train.py                                      # CPU demo: warm start, eval, multi-turn expert iteration, eval
    torchrun --standalone --nproc_per_node=8 train.py --preset llama-3.1-8b --model_dir /models/Llama-3.1-8B-Instruct

One iteration (DESIGN.md): sample tasks -> multi-turn episodes with public-test feedback (rollout.py) -> score the
final code on the private tests (reward.py) -> recompute old, reference logprobs and values with a training
forward -> KL penalty and advantages (ppo.py) -> several epochs of clipped PPO updates. `--algo grpo` drops the
critic for group-normalised advantages; `--algo expert_iteration` fine-tunes on the programs that passed.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import random
import shutil
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

import ppo
import data
from evaluate import fast_share_records, summarize, summarize_fast_share, task_results
from kernels import fused_linear_logprobs
from model import LORA_TARGETS, ModelConfig, Transformer, read_json
from plot import write_plot
from reward import RewardConfig, TimeReward, has_assert_tests
from rollout import INSTRUCTION, RolloutConfig, RolloutWorker, collate, model_sampler
from sandbox import Limits, SandboxPool
from sft import warm_start
from tokenizer import TOKENIZER_FILES, Tokenizer, check_vocab, tokenizer_for


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def arg(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass
class Config:
    # model and data
    preset: str = arg("tiny", "tiny | llama-3.2-1b | llama-3.1-8b | qwen3-0.6b: defaults that later flags override")
    model_dir: str = arg("", "HF checkpoint folder (config.json, *.safetensors, tokenizer); '' = tiny warm start")
    tokenizer: str = arg("", "tokenizer.model / tokenizer.json path; '' = look in model_dir; 'bytes' = tiny")
    dtype: str = arg("float32", "float32 | bfloat16: weights and activations")
    dataset: str = arg("synthetic", "synthetic | mbpp | humaneval | stdio | tasks")
    data_path: str = arg("", "jsonl file for mbpp / stdio / tasks (one Task.to_dict() record per line)")
    eval_split: str = arg("test", "split of held-out tasks for evaluation (synthetic: validation | test)")
    drop_broken_tasks: bool = arg(False, "drop the tasks whose reference solution does not compile or fails its "
                                         "own tests (checked in the sandbox at start; without it, reported)")
    # algorithm
    algo: str = arg("ppo", "ppo | grpo | dr_grpo | expert_iteration (dr_grpo: GRPO without the division by "
                          "the group's std, Liu et al. 2025)")
    critic: str = arg("separate", "separate (a copy of the policy with a fresh value head, as RLEF) | head (a "
                                  "value head on the policy trunk; its loss trains the trunk) | probe (the same head "
                                  "on the trunk's hidden states with the gradient stopped: its loss trains the head)")
    advantage: str = arg("turn", "turn (RLEF turn-level value) | token (token-level GAE)")
    gamma: float = arg(1.0, "discount")
    lam: float = arg(0.95, "GAE lambda")
    kl_placement: str = arg("reward", "reward (k1, RLEF) | loss (k3, GRPO); never both")
    kl_coef: float = arg(0.05, "initial KL coefficient beta")
    kl_target: float = arg(0.0, "> 0: adaptive KL controller towards this KL per episode, in nats: k1 summed over "
                                "an episode's sampled tokens (Ziegler et al. 2019; TRL's default target is 6)")
    kl_horizon: int = arg(10000, "adaptive KL controller horizon, in episodes")
    clip_eps: float = arg(0.2, "PPO ratio clip")
    value_clip: float = arg(0.2, "value clip range (0 = off)")
    vf_coef: float = arg(0.5, "value loss weight (critic=head or probe)")
    ent_coef: float = arg(0.0, "entropy bonus weight")
    truncation_penalty: float = arg(0.5, "subtracted from episodes in which any response hit max_new_tokens")
    max_grad_norm: float = arg(1.0, "gradient clipping, applied to the policy's and the critic's gradients apart")
    lr: float = arg(1e-6, "policy learning rate")
    critic_lr: float = arg(1e-5, "critic learning rate: the separate critic, or the value head on the policy trunk")
    warmup_steps: int = arg(0, "iterations of linear learning-rate warm-up: Adam's first updates are the size of "
                               "the lr whatever the gradient's noise, before its moment estimates settle")
    lr_decay: str = arg("constant", "constant | cosine (to a tenth of the lr at the last iteration, after the warm-up)")
    ppo_epochs: int = arg(2, "passes over each batch of episodes")
    minibatch_size: int = arg(32, "episodes per optimizer step (per rank)")
    micro_batch_size: int = arg(8, "episodes per forward/backward (gradient accumulation)")
    logprob_chunk: int = arg(1024, "tokens per chunk of the fused lm_head + logprob kernel (bounds memory)")
    # rollouts
    steps: int = arg(100, "training iterations")
    tasks_per_step: int = arg(16, "tasks per iteration (all ranks together)")
    samples_per_task: int = arg(4, "episodes per task per iteration (the GRPO group size)")
    max_turns: int = arg(3, "turns per episode (RLEF: 3)")
    max_new_tokens: int = arg(384, "tokens per turn")
    temperature: float = arg(1.0, "sampling temperature (the logprobs used in training are at the same T)")
    top_p: float = arg(1.0, "nucleus sampling")
    gen_batch_size: int = arg(32, "episodes per generate() call")
    instruction: str = arg(INSTRUCTION, "appended to every task prompt ('' = none)")
    # rewards and sandbox
    time_weight: float = arg(0.0, "weight of the time reward (CPU time against the reference solution)")
    partial_credit: bool = arg(False, "failing programs earn the fraction of tests passed")
    lint_weight: float = arg(0.0, "weight of the static-analysis penalty")
    sandbox_workers: int = arg(0, "sandbox processes (0 = one per core)")
    test_timeout: float = arg(5.0, "seconds per test")
    # LoRA and distribution
    lora_rank: int = arg(0, "> 0: train LoRA adapters (the reference is the base with adapters off)")
    lora_alpha: float = arg(32.0, "LoRA alpha")
    lora_targets: str = arg("q_proj,k_proj,v_proj,o_proj", "comma-separated module names")
    fsdp: bool = arg(False, "shard the model with FSDP2 fully_shard instead of DDP")
    # evaluation, logging, checkpoints
    eval_every: int = arg(0, "evaluate every k steps (0 = only before and after training)")
    eval_tasks: int = arg(0, "held-out tasks to evaluate on (0 = all)")
    eval_samples: int = arg(5, "single-turn samples per task for pass@k")
    eval_temperature: float = arg(0.2, "sampling temperature for evaluation")
    eval_episodes: int = arg(1, "multi-turn episodes per task for 1@3")
    fast_share_samples: int = arg(0, "samples per training slow/fast task for the fast share (0 = skip)")
    out_dir: str = arg("out", "metrics.jsonl, checkpoint/, samples.txt, plot.png")
    save_every: int = arg(1, "checkpoint every k iterations (0 = only at the end); written atomically")
    resume: bool = arg(False, "continue from out_dir/checkpoint exactly (same data order and metrics); the "
                              "run's saved config.json must match, but --steps may go up")
    overwrite: bool = arg(False, "replace an earlier run's outputs in out_dir (without it, a new run refuses a "
                                 "non-empty out_dir)")
    seed: int = arg(0, "seed for data order, sampling and initialisation")
    # tiny preset: warm start on reference solutions (issue 6)
    warmstart_steps: int = arg(0, "SFT steps of the tiny warm start (0 = no warm start)")
    tiny_layers: int = arg(4, "layers of the tiny model")
    tiny_hidden: int = arg(256, "hidden size of the tiny model")
    tiny_warmstart_lr: float = arg(3e-3, "peak learning rate of the tiny warm start (cosine decay)")
    tiny_warmstart_batch: int = arg(32, "demonstrations per step of the tiny warm start")
    tiny_repairs: int = arg(0, "up to N two-turn repair demos (wrong answer, feedback, fix) in the warm start")
    tiny_copies: int = arg(1, "demonstrations per training task in the warm start")
    tiny_bug_rate: float = arg(0.0, "chance that each classic bug (data.CLASSIC_BUGS) is in a demonstration")
    tiny_chat_share: float = arg(0.0, "share of the one-turn demonstrations paired into chats of two tasks")
    tiny_rl_share: float = arg(0.0, "share of the synthetic training compositions kept out of the warm start for "
                                    "RL alone (data.split_for_rl); 0 = RL and the warm start share all tasks")
    cache_dir: str = arg(".cache", "where the tiny warm-start checkpoint is cached between runs")


PRESETS = {
    # 0.8M parameters (hidden 128, 4 layers), byte-level tokens, synthetic tasks; timings in the README.
    # 1200 warm-start steps: at 600 the model had not learned to copy a constant from the prompt (docs/experiments.md,
    # "What the warm start gets wrong"; bench/warm_start_errors.py). Batches of 32: 16 halved the warm start's
    # time but trained weaker warm starts, one of which RL raised by only 6 points (docs/experiments.md).
    "tiny": dict(dataset="synthetic", instruction="",  # short prompts: bytes are tokens
                 tiny_hidden=128, tiny_layers=4, warmstart_steps=1200, tiny_warmstart_batch=32,
                 tiny_warmstart_lr=3e-3, tiny_repairs=128, tiny_bug_rate=0.3,
                 # lr 1e-4 for all three algorithms: at 3e-4 expert iteration gains more on some seeds and
                 # falls on others. 24 iterations: 12 more raised held-out pass@1 on five of six warm starts
                 # (by 1.3 to 3.6 points; the sixth lost 0.9) (docs/experiments.md)
                 # critic "probe" (for --algo ppo; expert iteration uses none): with "head", whose value loss
                 # trains the shared trunk, PPO drifted off the reference after 14-16 iterations and collapsed on
                 # one seed; with the probe, or --critic separate, it stayed near it (docs/experiments.md,
                 # "PPO's drift and the value head on the trunk"). The probe's head learns at critic_lr 1e-3: at
                 # the policy's 1e-4 it explained 5-13% of the returns' variance and PPO gained +5.5 on average
                 # with the time reward, at 1e-3 up to 31% and +12.1 (docs/experiments.md, "The probe's head at
                 # its own learning rate"). 8 episodes per task: with 4, expert iteration gained +14.8, +13.9 and
                 # +13.7 on the results table's warm starts, with 8 +19.7, +15.2 and +16.7, for about 2.5 times
                 # the iterations' time (docs/experiments.md, "Eight episodes per task")
                 algo="expert_iteration", lr=1e-4, warmup_steps=2, critic="probe", critic_lr=1e-3, kl_coef=0.05,
                 max_new_tokens=112, tasks_per_step=16, samples_per_task=8, minibatch_size=32, micro_batch_size=16,
                 ppo_epochs=2, steps=24, time_weight=1.0, gen_batch_size=64, eval_samples=4, eval_temperature=1.0,
                 # 4 evaluation episodes per task: 1@3 on as many samples as pass@1, and the first turns of the
                 # same episodes show what the repair turns add (1 episode left that comparison to chance)
                 eval_episodes=4, fast_share_samples=4, test_timeout=2.0, sandbox_workers=2),
    # Real checkpoints: put the HF folder at --model_dir. bf16 weights; see README for memory notes.
    "llama-3.2-1b": dict(dtype="bfloat16", dataset="mbpp", lr=1e-6, critic_lr=1e-5, micro_batch_size=4),
    "qwen3-0.6b": dict(dtype="bfloat16", dataset="mbpp", lr=1e-6, critic_lr=1e-5, micro_batch_size=4),
    "llama-3.1-8b": dict(dtype="bfloat16", dataset="mbpp", critic="head", lora_rank=64, lr=2e-5, fsdp=True,
                         micro_batch_size=2, logprob_chunk=512),
}


# Enforced by the parser (and again in Trainer.__init__, for a Config built in code).
CHOICES = {"preset": tuple(PRESETS), "dtype": tuple(DTYPES),
           "dataset": ("synthetic", "mbpp", "humaneval", "stdio", "tasks"), "eval_split": ("validation", "test"),
           "algo": ("ppo", "grpo", "dr_grpo", "expert_iteration"), "critic": ("separate", "head", "probe"),
           "advantage": ("turn", "token"), "kl_placement": ppo.KL_PLACEMENTS, "lr_decay": ("constant", "cosine")}
# The help's sections, as Config's comments read: the first flag of each.
GROUPS = {"preset": "model and data", "algo": "algorithm", "steps": "rollouts", "time_weight": "rewards and sandbox",
          "lora_rank": "LoRA and distribution", "eval_every": "evaluation, logging, checkpoints",
          "warmstart_steps": "tiny preset: warm start on reference solutions"}
# The domain of every numeric flag (--seed takes any int), as the error prints it: ">= a", "> a" or an interval.
RANGES = {
    **dict.fromkeys(("steps", "tasks_per_step", "samples_per_task", "gen_batch_size", "micro_batch_size",
                     "minibatch_size", "ppo_epochs", "max_turns", "max_new_tokens", "eval_samples", "eval_episodes",
                     "kl_horizon", "logprob_chunk", "tiny_layers", "tiny_hidden", "tiny_warmstart_batch",
                     "tiny_copies"), ">= 1"),
    **dict.fromkeys(("sandbox_workers", "warmstart_steps", "warmup_steps", "eval_tasks", "eval_every",
                     "save_every", "lora_rank", "fast_share_samples", "tiny_repairs", "kl_coef", "kl_target",
                     "value_clip", "vf_coef", "ent_coef", "truncation_penalty", "time_weight", "lint_weight"), ">= 0"),
    **dict.fromkeys(("lr", "critic_lr", "tiny_warmstart_lr", "clip_eps", "max_grad_norm", "temperature",
                     "eval_temperature", "test_timeout", "lora_alpha"), "> 0"),
    **dict.fromkeys(("gamma", "lam", "tiny_bug_rate", "tiny_chat_share"), "[0, 1]"),
    "top_p": "(0, 1]", "tiny_rl_share": "[0, 1)",  # data.split_for_rl keeps some compositions for the warm start
}


def in_range(x: float, rule: str) -> bool:
    """x within a RANGES rule; NaN never is (every comparison with it is False)."""
    if rule[0] == ">":
        op, bound = rule.split()
        return x >= float(bound) if op == ">=" else x > float(bound)
    lo, hi = map(float, rule[1:-1].split(","))
    return (lo <= x if rule[0] == "[" else lo < x) and (x <= hi if rule[-1] == "]" else x < hi)


def strict_bool(text: str) -> bool:
    if text.lower() in ("true", "1", "yes"):
        return True
    if text.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true | false | 1 | 0 | yes | no, got {text!r}")


def flag_help(f: dataclasses.Field, preset: dict, preset_name: str) -> str:
    """The field's help with its default and, when the preset sets it, the preset's value ('%' escaped for argparse)."""
    shown = lambda v: repr(v) if isinstance(v, str) else v  # noqa: E731 ('' must stay visible)
    text = f"{f.metadata['help']} (default: {shown(f.default)}"
    if f.name in preset:
        text += f"; {preset_name} preset: {shown(preset[f.name])}"
    return (text + ")").replace("%", "%%")


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, status 2: the usage of 70 flags would bury the message
        self.exit(2, f"{self.prog}: error: {message} (--help lists the flags)\n")


def parse_config(argv=None) -> Config:
    """Dataclass fields become flags, grouped as Config reads; a preset fills the defaults, explicit flags win;
    validate() checks every value before any work."""
    first = Parser(add_help=False, allow_abbrev=False)  # the preset whose values --help shows
    first.add_argument("--preset", default=Config.preset)
    preset_name = first.parse_known_args(argv)[0].preset
    preset = PRESETS.get(preset_name, {})  # an unknown one fails below, with the other flags' errors
    parser = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                    allow_abbrev=False,  # a prefix of a flag is an error, not a guess
                    usage="%(prog)s [--flag value ...]")
    group = parser
    for f in dataclasses.fields(Config):
        group = parser.add_argument_group(GROUPS[f.name]) if f.name in GROUPS else group
        kind = {"bool": strict_bool, "int": int, "float": float}.get(str(f.type), str)
        extra = dict(nargs="?", const=True, metavar="true|false") if kind is strict_bool else {}
        group.add_argument(f"--{f.name}", type=kind, default=None, choices=CHOICES.get(f.name),
                           help=flag_help(f, preset, preset_name), **extra)
    args = {k: v for k, v in vars(parser.parse_args(argv)).items() if v is not None}
    if args.get("algo") in ("grpo", "dr_grpo"):  # GRPO puts the KL in the loss (k3), never in the reward
        args.setdefault("kl_placement", "loss")
    cfg = Config(**{**preset, **args})
    validate(cfg, parser)
    return cfg


def validate(cfg: Config, parser: argparse.ArgumentParser) -> None:
    """Every flag's domain, before any work: a bad value exits (status 2) with one line naming the flag, its
    value and what is allowed."""
    def refuse(name, allowed):
        parser.error(f"--{name} {getattr(cfg, name)!r}: {allowed}")
    for f in dataclasses.fields(Config):
        value = getattr(cfg, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            refuse(f.name, "must be a finite number")
        if f.name in RANGES and not in_range(value, RANGES[f.name]):
            refuse(f.name, f"must be {RANGES[f.name]}")
    if cfg.tiny_hidden % 8:  # tiny_model_config: 4 heads, each with an even head_dim for RoPE's pairs
        refuse("tiny_hidden", "must be a multiple of 8 (4 heads of an even size, for RoPE)")
    if cfg.algo in ("grpo", "dr_grpo") and cfg.kl_placement == "reward" and cfg.kl_coef > 0:
        refuse("kl_placement", f"--algo {cfg.algo} puts the KL in the loss (k3): use loss, or --kl_coef 0")
    if not cfg.model_dir and not cfg.warmstart_steps:
        refuse("warmstart_steps", "without a --model_dir, the tiny warm start needs at least 1 step")
    if cfg.model_dir and not (Path(cfg.model_dir) / "config.json").is_file():
        refuse("model_dir", "must be a HF checkpoint folder with a config.json")
    if cfg.tokenizer not in ("", "bytes") and not Path(cfg.tokenizer).is_file():
        refuse("tokenizer", "must be '', 'bytes' or an existing tokenizer.json / tokenizer.model file")
    if cfg.model_dir and not cfg.tokenizer and not any((Path(cfg.model_dir) / name).is_file()
                                                       for name in TOKENIZER_FILES):  # tokenizer_for's rule 2
        refuse("tokenizer", f"--model_dir {cfg.model_dir} has no tokenizer of its own: pass --tokenizer")
    if cfg.dataset in ("stdio", "tasks") and not cfg.data_path:
        refuse("data_path", f"--dataset {cfg.dataset} needs a jsonl file")
    if cfg.data_path and not Path(cfg.data_path).is_file():
        refuse("data_path", "must be an existing jsonl file")
    targets = cfg.lora_targets.split(",")
    if not set(targets) <= set(LORA_TARGETS):
        refuse("lora_targets", f"must be comma-separated names from {', '.join(LORA_TARGETS)}")
    for name in ("out_dir", "cache_dir"):
        if not getattr(cfg, name):
            refuse(name, "must be a folder name, not empty")


# ----------------------------------------------------------------------------------------------------------------
# setup: distributed, tasks, models


def setup_distributed() -> tuple[int, int, torch.device]:
    """torchrun sets RANK/WORLD_SIZE; nccl on GPU, gloo on CPU (so tests can run two ranks)."""
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    use_cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if use_cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        return rank, world, torch.device("cuda", torch.cuda.current_device())
    return rank, world, torch.device("cpu")


def load_tokenizer(cfg: Config) -> Tokenizer:
    return tokenizer_for(cfg.model_dir, cfg.tokenizer)


def load_tasks(cfg: Config):
    """(training tasks, held-out evaluation tasks)."""
    if cfg.dataset == "synthetic":
        return data.synthetic_tasks("train", cfg.seed), data.synthetic_tasks(cfg.eval_split, cfg.seed)
    if cfg.dataset == "mbpp":  # the customary split: 601-1000 train (511-600 validation), 11-510 test
        path = cfg.data_path or data.MBPP_PATH
        return data.load_mbpp(path, split="train"), data.load_mbpp(path, split="test")
    if cfg.dataset == "humaneval":  # no training split exists: train and evaluate on disjoint halves
        tasks = data.load_humaneval()
        return tasks[: len(tasks) // 2], tasks[len(tasks) // 2:]
    if cfg.dataset == "stdio":
        tasks = data.load_stdio_jsonl(cfg.data_path)
        cut = max(1, len(tasks) // 10)
        return tasks[cut:], tasks[:cut]
    if cfg.dataset == "tasks":  # the project's own format; the same tasks train and evaluate
        tasks = data.load_tasks_jsonl(cfg.data_path)
        return tasks, tasks
    raise ValueError(f"--dataset must be synthetic | mbpp | humaneval | stdio | tasks, got {cfg.dataset!r}")


def tiny_model_config(cfg: Config, tokenizer: Tokenizer) -> ModelConfig:
    return ModelConfig(vocab_size=tokenizer.n_words, hidden_size=cfg.tiny_hidden, intermediate_size=cfg.tiny_hidden * 3,
                       num_hidden_layers=cfg.tiny_layers, num_attention_heads=4, num_key_value_heads=2,
                       rope_theta=10000.0, max_position_embeddings=2048, tie_word_embeddings=True,
                       bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eot_id)


def tiny_demonstrations(cfg: Config) -> dict:
    """The settings of the tiny warm start's demonstration mix (keyword arguments of sft.warm_start_examples)."""
    return dict(instruction=cfg.instruction, seed=cfg.seed, repairs=cfg.tiny_repairs, copies=cfg.tiny_copies,
                bug_rate=cfg.tiny_bug_rate, chat_share=cfg.tiny_chat_share)


def tiny_warm_start(cfg: Config, tokenizer: Tokenizer, train_tasks, log=print) -> Path:
    """The tiny preset's warm-start checkpoint for cfg.seed (sft.warm_start: trained once, then cached), trained
    on the training tasks that `--tiny_rl_share` leaves to it."""
    demonstrated, _ = data.split_for_rl(train_tasks, cfg.tiny_rl_share)
    return warm_start(Path(cfg.cache_dir), tokenizer, demonstrated, tiny_model_config(cfg, tokenizer),
                      steps=cfg.warmstart_steps, batch_size=cfg.tiny_warmstart_batch, lr=cfg.tiny_warmstart_lr,
                      log=log, **tiny_demonstrations(cfg))


class Scorer(nn.Module):
    """The training forward in one module (so DDP/FSDP see a single forward): per-token logprobs of `targets`
    at the sampling temperature, their entropy, and values from the value head when the model has one.
    The fused lm_head kernel means the (tokens, vocab) logits never exist in full."""

    def __init__(self, model: Transformer, temperature: float, chunk: int, probe: bool = False):
        super().__init__()
        self.model, self.temperature, self.chunk = model, temperature, chunk
        self.probe = probe  # critic "probe": the value loss reaches the value head, never the trunk

    def forward(self, inputs, targets, want_logprobs: bool = True):
        h = self.model.hidden_states(inputs)                                          # (B, T, D)
        values = None
        if self.model.value_head is not None:
            values = self.model.values(h.detach() if self.probe else h)               # (B, T)
        if not want_logprobs:
            return None, None, values
        lm_head = self.model.lm_head.weight.to(h.dtype)  # fp32 master weights compute in the activations' dtype
        logp, entropy = fused_linear_logprobs(h, lm_head, targets, self.temperature,
                                              with_entropy=True, chunk_size=self.chunk)  # (B, T) each
        return logp, entropy, values


@dataclass
class Models:
    policy: Transformer
    critic: Transformer | None       # separate critic, or None (value head on the policy, or GRPO/EI)
    reference: Transformer | None    # frozen copy, or None with LoRA (adapters off = reference)
    scorer: nn.Module                # Scorer(policy); wrapped for DDP/FSDP under torchrun
    critic_scorer: nn.Module | None


def build_models(cfg: Config, model_dir: Path, device) -> Models:
    """Policy (+ LoRA), frozen reference, critic. Unwrapped: checkpoint weights are loaded before wrapping.
    What is trained (the policy or its LoRA adapters, value heads, the critic) is held in fp32 master weights;
    what is frozen (the reference, a LoRA base) stays in --dtype, which is also the dtype of the activations."""
    dtype = DTYPES[cfg.dtype]
    uses_critic = cfg.algo == "ppo"
    policy = Transformer.from_pretrained(model_dir, dtype=dtype, device=device,
                                         value_head=uses_critic and cfg.critic in ("head", "probe"))
    if cfg.lora_rank:
        add_lora(policy, cfg)
    reference = None
    if cfg.kl_coef > 0 and not cfg.lora_rank:
        reference = copy.deepcopy(policy).requires_grad_(False).eval()
    policy.mixed_precision_(dtype)
    critic = None
    if uses_critic and cfg.critic == "separate":  # RLEF: the critic starts from the policy, with a fresh head
        critic = Transformer.from_pretrained(model_dir, dtype=dtype, device=device, value_head=True)
        if not critic.config.tie_word_embeddings:  # the critic never uses its lm_head: keep it out of DDP's way
            critic.lm_head.requires_grad_(False)
        critic.mixed_precision_(dtype)
    critic_scorer = Scorer(critic, cfg.temperature, cfg.logprob_chunk) if critic else None
    scorer = Scorer(policy, cfg.temperature, cfg.logprob_chunk, probe=cfg.critic == "probe")
    return Models(policy, critic, reference, scorer, critic_scorer)


def add_lora(model: Transformer, cfg: Config) -> None:
    model.add_lora(cfg.lora_rank, cfg.lora_alpha, tuple(cfg.lora_targets.split(",")))


def wrap(module: Scorer, cfg: Config, world: int) -> nn.Module:
    """Single process: as is. torchrun: DDP (gradients all-reduced in backward), or FSDP2 for big models
    (each block's parameters sharded across ranks and gathered just in time)."""
    if world == 1:
        return module
    if cfg.fsdp:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        # the shards keep the fp32 master weights; forwards gather them in --dtype, gradients reduce in fp32
        mixed = MixedPrecisionPolicy(param_dtype=DTYPES[cfg.dtype], reduce_dtype=torch.float32)
        for block in module.model.layers:
            fully_shard(block, mp_policy=mixed)
        fully_shard(module, mp_policy=mixed)
        # FSDP2 initialises on the first forward through the root; generation calls the blocks directly, so
        # run one token through the root first (a collective: every rank does it).
        device = module.model.embed_tokens.weight.device
        with torch.no_grad():
            module(torch.zeros(1, 1, dtype=torch.long, device=device), torch.zeros(1, 1, dtype=torch.long, device=device))
        return module
    return nn.parallel.DistributedDataParallel(module)


def unwrap(module: nn.Module) -> Scorer:
    return module.module if isinstance(module, nn.parallel.DistributedDataParallel) else module


@contextmanager
def full_params(scorer: nn.Module, fsdp: bool):
    """Generation calls the model step by step, and ranks stop at different steps. Under FSDP2 every forward
    would all-gather (a collective that all ranks must join), so instead gather every shard once, generate
    locally, then free the gathered copies. DDP and single process hold full weights already."""
    if not fsdp:
        yield
        return
    from torch.distributed.fsdp import FSDPModule
    modules = [m for m in scorer.modules() if isinstance(m, FSDPModule)]
    for m in modules:
        m.unshard()
        m.set_reshard_after_forward(False)
    try:
        yield
    finally:
        for m in modules:
            m.reshard()
            m.set_reshard_after_forward(True)


# ----------------------------------------------------------------------------------------------------------------
# one PPO / GRPO iteration


def shifted(batch: dict) -> dict:
    """Position t predicts token t+1: inputs drop the last token; targets and every per-token mask drop the
    first. A turn's value is read at its last prompt token, start - 1."""
    return {"inputs": batch["tokens"][:, :-1], "targets": batch["tokens"][:, 1:],
            "mask": batch["action_mask"][:, 1:], "turn_ids": batch["turn_ids"][:, 1:],
            "turn_value_index": batch["turn_starts"] - 1, "turn_mask": batch["turn_mask"],
            "turn_rewards": batch["turn_rewards"], "rewards": batch["rewards"], "truncated": batch["truncated"]}


def used_length(mask: torch.Tensor) -> int:
    """Columns up to the last action token of any row in `mask` (B, T): the rest is right padding shared by all
    rows, and a causal model's outputs before it do not depend on it."""
    return int(mask.any(0).nonzero().max()) + 1 if mask.any() else 1


def row_lengths(mask: torch.Tensor) -> torch.Tensor:
    """(B, T) action mask -> (B,) columns each row needs: up to its last action token (episodes end on one)."""
    return mask.shape[1] - mask.flip(1).int().argmax(1)


def regroup_by_length(micro_batches: list[torch.Tensor], lengths: torch.Tensor, micro: int) -> list[torch.Tensor]:
    """The same rows (one minibatch) in micro-batches of similar length, shortest first. The minibatch's
    gradient is the sum over its rows either way; each micro-batch is cut to its own longest row, so grouping
    one-turn episodes apart from three-turn ones (3x longer) saves most of the padding."""
    rows = torch.cat(micro_batches)
    return list(rows[lengths[rows].argsort()].split(micro))


@torch.no_grad()
def forward_in_chunks(scorer: nn.Module, b: dict, micro: int, want_logprobs=True):
    """Old logprobs and values with the training forward (DESIGN: not the sampler's numbers).

    Rows go through shortest first, each chunk cut to its own longest row: multi-turn episodes differ in length
    up to 3x, and padding every chunk to the batch's longest episode would spend most of the time on padding.
    The padding columns of the result hold arbitrary numbers, as in any padded forward: every use masks them."""
    B, T = b["inputs"].shape
    lengths = row_lengths(b["mask"])
    logps = values = None
    for rows in lengths.argsort().split(micro):
        t = used_length(b["mask"][rows])
        logp, _, v = unwrap(scorer)(b["inputs"][rows, :t], b["targets"][rows, :t], want_logprobs)
        if logp is not None:
            logps = logps if logps is not None else logp.new_zeros(B, T)
            logps[rows, :t] = logp
        if v is not None:
            values = values if values is not None else v.new_zeros(B, T)
            values[rows, :t] = v
    return logps, values


def advantages(cfg: Config, b: dict, kl_coef: float, group_ids: torch.Tensor):
    """Rewards -> (token advantages, value targets, value mask, old values) for the chosen estimator.

    PPO whitens its advantages over the batch's action tokens. GRPO's are normalised within each task's group
    already: re-normalising them over the batch would give a group of equal scores a non-zero advantage, and
    shift a group's advantages with its responses' lengths."""
    mask = b["mask"]
    reward_kl, _ = ppo.split_kl_coef(cfg.kl_placement, kl_coef)
    kl = ppo.kl_k1(b["old_logprobs"], b["ref_logprobs"]) if b["ref_logprobs"] is not None else None
    penalty = ppo.apply_truncation_penalty(torch.zeros_like(b["rewards"]), b["truncated"], cfg.truncation_penalty)
    if cfg.algo in ("grpo", "dr_grpo"):  # group-normalised outcome rewards, no critic (DeepSeekMath 4.1.2)
        scores = ppo.grpo_advantages(b["rewards"] + penalty, group_ids, scale_by_std=cfg.algo == "grpo")
        return ppo.scores_to_tokens(scores, mask), None, None, None
    if cfg.advantage == "turn":  # RLEF: GAE over turns, the turn's advantage on all its tokens
        K = b["turn_mask"].shape[1]
        turn_kl = ppo.per_turn_mean(kl, b["turn_ids"], K) if kl is not None else None
        r = ppo.turn_level_rewards(penalty, b["turn_mask"], turn_kl, reward_kl, b["turn_rewards"])
        v = ppo.gather_turn_values(b["values"], b["turn_value_index"], b["turn_mask"])
        adv, _, turn_returns = ppo.turn_level_advantages(r, v, b["turn_mask"], b["turn_ids"], cfg.gamma, cfg.lam)
        return ppo.masked_whiten(adv, mask), turn_returns, b["turn_mask"], v
    r = ppo.token_level_rewards(penalty, mask, kl, reward_kl, b["turn_ids"], b["turn_rewards"])
    adv, returns = ppo.gae(r, b["values"], mask, cfg.gamma, cfg.lam)
    return ppo.masked_whiten(adv, mask), returns, mask, b["values"]


def ppo_update(cfg: Config, models: Models, optimizers: list, b: dict, kl_coef: float, generator,
               world: int = 1) -> dict:
    """Several epochs of shuffled minibatches; micro-batches accumulate gradients; a NaN/inf loss or gradient
    skips the optimizer step (the weights are untouched)."""
    stats = {k: [] for k in ("pg_loss", "vf_loss", "clipfrac", "approx_kl", "entropy", "grad_norm_policy",
                             "grad_norm_critic")}
    skipped = 0
    _, loss_kl = ppo.split_kl_coef(cfg.kl_placement, kl_coef)
    n, lengths = b["inputs"].shape[0], row_lengths(b["mask"])
    for micro_batches in ppo.minibatches(n, cfg.minibatch_size, cfg.micro_batch_size, cfg.ppo_epochs, generator):
        micro_batches = regroup_by_length(micro_batches, lengths, cfg.micro_batch_size)
        tokens_in_step = sum(int(b["mask"][idx].sum()) for idx in micro_batches)
        turns_in_step = sum(int(b["value_mask"][idx].sum()) for idx in micro_batches) if b["returns"] is not None else 0
        finite = True
        for j, idx in enumerate(micro_batches):
            sync = j == len(micro_batches) - 1
            with maybe_no_sync(models.scorer, sync), maybe_no_sync(models.critic_scorer, sync):
                loss, mb = micro_batch_loss(cfg, models, b, idx, loss_kl, tokens_in_step, turns_in_step)
                finite &= finite_on_every_rank(loss, world)
                if finite:
                    loss.backward()
            for k, v in mb.items():
                stats[k].append(v)
        if not clip_and_step(optimizers, cfg.max_grad_norm, stats, finite):
            skipped += 1
    out = {k: sum(v) / len(v) for k, v in stats.items() if v}
    out["skipped_updates"] = skipped
    return out


def clip_and_step(optimizers: list, max_norm: float, stats: dict | None = None, loss_finite: bool = True) -> bool:
    """Clip each optimizer's gradient on its own, then step only if every gradient is finite.

    The policy's and the critic's gradients are clipped apart (optimizers[0] is the policy's, [1] the critic's):
    a fresh value head's gradient is far larger than the policy's, and one joint clip would shrink the policy's
    step by the critic's norm. A norm is NaN/inf when any of its gradients is, and under FSDP it is reduced
    across ranks, so every rank takes the same decision. Gradients are cleared either way, so a bad batch leaves
    the weights untouched."""
    norms = [torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], max_norm)
             for opt in optimizers]
    ok = loss_finite and all(ppo.is_finite(norm) for norm in norms)
    if ok:
        if stats is not None:
            for name, norm in zip(("grad_norm_policy", "grad_norm_critic"), norms):
                stats[name].append(float(norm))
        for opt in optimizers:
            opt.step()
    for opt in optimizers:
        opt.zero_grad(set_to_none=True)
    return ok


def micro_batch_loss(cfg, models, b, idx, loss_kl, tokens_in_step, turns_in_step):
    T = used_length(b["mask"][idx])  # trim right padding shared by the micro-batch
    mask = b["mask"][idx, :T]
    logp, entropy, values = models.scorer(b["inputs"][idx, :T], b["targets"][idx, :T])
    pg, clipfrac, approx_kl = ppo.policy_loss(logp, b["old_logprobs"][idx, :T], b["advantages"][idx, :T], mask,
                                              cfg.clip_eps, normalizer=tokens_in_step)
    ent = ppo.entropy_bonus(entropy, mask, normalizer=tokens_in_step)
    kl = ppo.kl_loss(logp, b["ref_logprobs"][idx, :T], mask, normalizer=tokens_in_step) if loss_kl else None
    vf = None
    if b["returns"] is not None:
        if models.critic_scorer is not None:
            _, _, values = models.critic_scorer(b["inputs"][idx, :T], b["targets"][idx, :T], False)
        new_v, old_v, returns, vmask = value_views(cfg, b, idx, values, T)
        vf, _ = ppo.value_loss(new_v, old_v, returns, vmask, cfg.value_clip or None,
                               normalizer=max(turns_in_step, 1) if cfg.advantage == "turn" else tokens_in_step)
    loss = ppo.total_loss(pg, vf, ent, kl, vf_coef=cfg.vf_coef if models.critic is None else 1.0,
                          ent_coef=cfg.ent_coef, kl_coef=loss_kl)
    stats = {"pg_loss": pg.item(), "clipfrac": clipfrac.item(), "approx_kl": approx_kl.item(),
             "entropy": ent.item() * tokens_in_step / max(int(mask.sum()), 1)}
    if vf is not None:
        stats["vf_loss"] = vf.item()
    return loss, stats


def value_views(cfg, b, idx, values, T):
    """(new values, old values, returns, mask) at the critic's steps: turns (RLEF) or action tokens."""
    if cfg.advantage == "turn":
        tm = b["turn_mask"][idx]
        new = ppo.gather_turn_values(values, b["turn_value_index"][idx], tm)
        return new, b["old_values"][idx], b["returns"][idx], tm
    return values, b["old_values"][idx, :T], b["returns"][idx, :T], b["mask"][idx, :T]


def finite_on_every_rank(loss: torch.Tensor, world: int) -> bool:
    """Whether the loss is finite on every rank. Each rank skips the backward of a non-finite loss; if one rank
    skipped alone, DDP's gradient all-reduce in the others' backward would be left unmatched."""
    ok = torch.tensor([1.0 if ppo.is_finite(loss) else 0.0], device=loss.device)
    if world > 1:
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return bool(ok.item())


def maybe_no_sync(module, sync: bool):
    if module is None or sync or not isinstance(module, nn.parallel.DistributedDataParallel):
        return nullcontext()
    return module.no_sync()


def expert_iteration_update(cfg: Config, models: Models, optimizers: list, b: dict, passed: torch.Tensor,
                            generator, world: int = 1) -> dict:
    """ReST-EM (Singh et al. 2023): maximise the likelihood of the final turn of every passing episode.

    Each kept turn is weighted by its reward (reward-weighted regression, Peters & Schaal 2007): 1 for a pass,
    so with no time reward this is ReST-EM's binary filter exactly; with one, a fast program weighs up to
    1 + time_weight and a slow one down to 1 - time_weight, which is how the time reward reaches this method.
    Only rows with weight go through the model (`kept_rows`)."""
    n_turns = b["turn_mask"].sum(1, keepdim=True)                                   # (B, 1)
    last_turn = b["turn_ids"] == (n_turns - 1)
    final_reward = b["turn_rewards"].gather(1, n_turns - 1).clamp(min=0)            # (B, 1)
    keep = (b["mask"] & last_turn & passed[:, None]) * final_reward                 # (B, T) weights
    rows = kept_rows(keep, world)
    if rows.numel() == 0:  # nothing passed on any rank: no step (Adam's momentum would still move the weights)
        return {"sft_loss": 0.0}
    losses, lengths = [], row_lengths(b["mask"])
    for micro_batches in ppo.minibatches(rows.numel(), cfg.minibatch_size, cfg.micro_batch_size, cfg.ppo_epochs,
                                         generator):
        micro_batches = regroup_by_length([rows[idx] for idx in micro_batches], lengths, cfg.micro_batch_size)
        kept = max(sum(int((keep[idx] > 0).sum()) for idx in micro_batches), 1)
        minibatch_loss = 0.0  # each micro-batch's part is already divided by the minibatch's count: sum them
        for j, idx in enumerate(micro_batches):
            T = used_length(b["mask"][idx])
            with maybe_no_sync(models.scorer, j == len(micro_batches) - 1):
                logp, _, _ = models.scorer(b["inputs"][idx, :T], b["targets"][idx, :T])
                loss = -(logp * keep[idx, :T]).sum() / kept
                loss.backward()
            minibatch_loss += loss.item()
        losses.append(minibatch_loss)
        clip_and_step(optimizers, cfg.max_grad_norm)
    return {"sft_loss": sum(losses) / len(losses)}


def kept_rows(keep: torch.Tensor, world: int) -> torch.Tensor:
    """Indices of the rows of `keep` (B, T) with any weight: the forward and backward passes of the others would
    only add zeros. DDP needs the same number of backward passes on every rank, so each rank pads its list with
    zero-weight rows up to the longest list on any rank."""
    has_weight = (keep > 0).any(1)
    rows = has_weight.nonzero().squeeze(1)
    count = torch.tensor([rows.numel()], device=keep.device)
    if world > 1:
        dist.all_reduce(count, op=dist.ReduceOp.MAX)
    padding = (~has_weight).nonzero().squeeze(1)[:int(count) - rows.numel()]
    return torch.cat([rows, padding])


class ConfigError(ValueError):
    """A configuration the run refuses before any work: main prints it as one line and exits with status 2."""


RUN_OUTPUTS = ("config.json", "metrics.jsonl", "checkpoint", "checkpoint.tmp", "plot.png", "samples-*.txt",
               "tensorboard")
# Flags a resumed run may change: they do not alter what it computes (only --steps may go up, checked at load).
RESUMABLE = {"resume", "overwrite", "steps", "sandbox_workers", "save_every", "eval_every", "out_dir", "cache_dir"}


def prepare_out_dir(cfg: Config, out: Path) -> None:
    """A new run never deletes an earlier one without --overwrite; --resume continues the run that config.json
    describes, and refuses a flag that would change it. Writes config.json, the resolved configuration."""
    saved_file = out / "config.json"
    if cfg.resume:
        if not saved_file.exists():
            raise ConfigError(f"--resume: {saved_file} not found: nothing to resume in --out_dir {out}")
        saved = json.loads(saved_file.read_text())
        for name, value in dataclasses.asdict(cfg).items():
            if name not in RESUMABLE and name in saved and saved[name] != value:
                raise ConfigError(f"--resume: --{name} {value!r} differs from the run's {saved[name]!r} "
                                  f"({saved_file}); only --steps may change")
    elif any(path for pattern in RUN_OUTPUTS for path in out.glob(pattern)):
        if not cfg.overwrite:
            raise ConfigError(f"--out_dir {out} holds an earlier run: pass --overwrite to replace it, --resume to "
                              "continue it, or another --out_dir")
        for pattern in RUN_OUTPUTS:
            for path in out.glob(pattern):
                shutil.rmtree(path) if path.is_dir() else path.unlink()
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "config.json.tmp"
    tmp.write_text(json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")
    tmp.replace(saved_file)


def tensorboard_writer(folder: Path):
    """torch.utils.tensorboard's SummaryWriter when tensorboard is installed, else None (metrics.jsonl only)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(folder))


def kl_stats(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor) -> dict:
    """The k1 KL to the reference per sampled token (kl_ref) and summed over each episode (kl_episode), both
    averaged over the batch. The adaptive controller steers kl_episode."""
    kl = ppo.kl_k1(logprobs, ref_logprobs)
    return {"kl_ref": float(ppo.masked_mean(kl, mask)), "kl_episode": float(ppo.masked_sum(kl, mask, dim=1).mean())}


def lr_scale(step: int, steps: int, warmup_steps: int, decay: str) -> float:
    """The learning-rate multiplier of iteration `step`: a linear warm-up to 1 over warmup_steps, then 1
    (constant) or a cosine from 1 down to 0.1 at the last iteration (cosine)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if decay == "constant":
        return 1.0
    if decay != "cosine":
        raise ValueError(f"--lr_decay must be constant or cosine, got {decay!r}")
    progress = (step - warmup_steps) / max(1, steps - 1 - warmup_steps)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


class Trainer:
    """Holds what lives across iterations: models, optimizers, sandbox pool, KL controller, metrics file."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.rank, self.world, self.device = setup_distributed()
        if cfg.tasks_per_step % self.world:
            raise ValueError(f"--tasks_per_step {cfg.tasks_per_step} must be a multiple of the {self.world} ranks")
        for name, allowed in CHOICES.items():  # a misspelt choice fails here, not deep inside the first update
            if getattr(cfg, name) not in allowed:
                raise ValueError(f"--{name} must be one of {' | '.join(allowed)}, got {getattr(cfg, name)!r}")
        ppo.split_kl_coef(cfg.kl_placement, cfg.kl_coef)  # an unknown placement fails here, not at step 0
        lr_scale(cfg.warmup_steps, cfg.steps, cfg.warmup_steps, cfg.lr_decay)  # so does an unknown --lr_decay
        if cfg.algo in ("grpo", "dr_grpo") and cfg.kl_placement == "reward" and cfg.kl_coef > 0:
            raise ValueError(f"--algo {cfg.algo} puts the KL in the loss (k3): use --kl_placement loss or --kl_coef 0")
        torch.manual_seed(cfg.seed)
        self.out = Path(cfg.out_dir)
        if self.rank == 0:
            prepare_out_dir(cfg, self.out)
        barrier(self.world)
        self.log("config: " + json.dumps(dataclasses.asdict(cfg)))
        self.tensorboard = tensorboard_writer(self.out / "tensorboard") if self.rank == 0 else None
        self.tokenizer = load_tokenizer(cfg)
        self.train_tasks, self.eval_tasks = load_tasks(cfg)
        _, rl_tasks = data.split_for_rl(self.train_tasks, cfg.tiny_rl_share)  # the tasks RL samples
        self.rl_tasks = [t for t in rl_tasks if not has_assert_tests(t)]  # RL would learn to forge their passes
        if len(self.rl_tasks) < len(rl_tasks):
            self.log(f"RL leaves out {len(rl_tasks) - len(self.rl_tasks)} tasks with assert tests, whose passes a "
                     "program can forge (the sandbox decides them in the child)")
        if not self.rl_tasks:
            raise ValueError("no training task is left for RL: every one has an assert test")
        if cfg.eval_tasks:
            self.eval_tasks = self.eval_tasks[:cfg.eval_tasks]
        self.pool = SandboxPool(cfg.sandbox_workers or None, Limits(timeout_s=cfg.test_timeout))
        try:
            self._setup_models()
        except BaseException:  # a refused configuration must not leave the sandbox's processes behind
            self.pool.close()
            raise

    def _setup_models(self):
        cfg = self.cfg
        self.check_references()  # before the warm start imitates them
        self.model_dir = Path(cfg.model_dir) if cfg.model_dir else self._tiny_warm_start()
        config_file = self.model_dir / "config.json"  # the tokenizer must fit the model before any work
        check_vocab(ModelConfig.from_hf(read_json(config_file), str(config_file)), self.tokenizer, config_file)
        self.models = build_models(cfg, self.model_dir, self.device)
        state = self._load_checkpoint_weights() if cfg.resume else None
        self.models.scorer = wrap(self.models.scorer, cfg, self.world)
        if self.models.critic_scorer is not None:
            self.models.critic_scorer = wrap(self.models.critic_scorer, cfg, self.world)
        self.ref_scorer = Scorer(self.models.reference, cfg.temperature, cfg.logprob_chunk) \
            if self.models.reference is not None else None
        self.optimizers = self._build_optimizers()
        self.kl_ctl = (ppo.AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon) if cfg.kl_target > 0
                       else ppo.FixedKLController(cfg.kl_coef))
        self.start_step = self._load_trainer_state(state) if state is not None else 0
        reward_cfg = RewardConfig(time_weight=cfg.time_weight, partial_credit=cfg.partial_credit,
                                  lint_weight=cfg.lint_weight)
        rollout_cfg = RolloutConfig(max_turns=cfg.max_turns, max_new_tokens=cfg.max_new_tokens,
                                    gen_batch_size=cfg.gen_batch_size, instruction=cfg.instruction,
                                    max_episode_tokens=self.models.policy.config.max_position_embeddings)
        self.worker = RolloutWorker(self.tokenizer, self.pool, rollout_cfg, reward_cfg)
        self.eval_timer = TimeReward.from_config(self.pool, reward_cfg)  # times programs for the fast share

    # -- setup helpers -------------------------------------------------------------------------------------------
    def _build_optimizers(self) -> list:
        """AdamW for the policy at lr, and for the critic's own parameters at critic_lr: the separate critic, or
        the value head on the policy trunk (critic head or probe). A fresh linear head needs a far larger step
        than the pretrained trunk under it: at the policy's lr the tiny preset's probe explained only 5-13% of the
        returns' variance after 24 iterations (docs/experiments.md)."""
        cfg, m = self.cfg, self.models
        head = unwrap(m.scorer).model.value_head
        head_params = [p for p in head.parameters() if p.requires_grad] if head is not None else []
        in_head = {id(p) for p in head_params}
        policy = [p for p in m.scorer.parameters() if p.requires_grad and id(p) not in in_head]
        optimizers = [torch.optim.AdamW(policy, lr=cfg.lr, weight_decay=0.0)]
        critic = [p for p in m.critic_scorer.parameters() if p.requires_grad] if m.critic_scorer is not None \
            else head_params
        if critic:
            optimizers.append(torch.optim.AdamW(critic, lr=cfg.critic_lr, weight_decay=0.0))
        return optimizers

    def check_references(self):
        """Tasks whose reference solution does not compile or fails its own tests teach the warm start the
        wrong program and time the time reward against it: reported, or dropped with --drop_broken_tasks."""
        problems = data.check_references(self.train_tasks, self.pool) if self.rank == 0 else None
        problems = broadcast_object(problems, self.world)
        if not problems:
            return
        for problem in problems[:5]:
            self.log(f"broken reference: {problem}")
        broken = {p.task_id for p in problems}
        if not self.cfg.drop_broken_tasks:
            self.log(f"{len(broken)} tasks have a broken reference (--drop_broken_tasks drops them)")
            return
        self.train_tasks = [t for t in self.train_tasks if t.task_id not in broken]
        self.rl_tasks = [t for t in self.rl_tasks if t.task_id not in broken]
        self.eval_tasks = [t for t in self.eval_tasks if t.task_id not in broken]
        self.log(f"dropped {len(broken)} tasks with a broken reference: {len(self.train_tasks)} training and "
                 f"{len(self.eval_tasks)} evaluation tasks left")
        if not self.rl_tasks or not self.eval_tasks:
            raise ConfigError("--drop_broken_tasks: no training or evaluation task is left")

    def _tiny_warm_start(self) -> Path:
        """The CPU demo has no checkpoint to start from: rank 0 trains one (cached), the others wait."""
        cfg = self.cfg
        if not cfg.warmstart_steps:
            raise ValueError("--model_dir is empty and --warmstart_steps is 0: nothing to start from")
        path = tiny_warm_start(cfg, self.tokenizer, self.train_tasks, log=self.log) if self.rank == 0 else None
        return Path(broadcast_object(path, self.world))

    def log(self, message: str):
        if self.rank == 0:
            print(message, flush=True)

    def write_metrics(self, record: dict):
        """One JSON line in metrics.jsonl, the run's record; the same scalars to TensorBoard when installed."""
        if self.rank != 0:
            return
        with open(self.out / "metrics.jsonl", "a") as f:
            # NaN (e.g. explained variance of constant returns) is written as null: strict JSON has no NaN
            clean = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
            f.write(json.dumps(clean) + "\n")
        if self.tensorboard is not None:
            for key, value in clean.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.tensorboard.add_scalar(f"{record['kind']}/{key}", value, record["step"])
            self.tensorboard.flush()

    # -- one iteration -------------------------------------------------------------------------------------------
    def step_tasks(self, step: int):
        """This rank's tasks for `step`, each repeated samples_per_task times, and their group ids. A function
        of (seed, step) only, so a resumed run sees exactly the same data."""
        cfg = self.cfg
        rng = random.Random(cfg.seed * 1_000_003 + step)
        k = cfg.tasks_per_step
        chosen = rng.sample(range(len(self.rl_tasks)), k) if k <= len(self.rl_tasks) else \
            [rng.randrange(len(self.rl_tasks)) for _ in range(k)]
        mine = list(range(self.rank, k, self.world))
        tasks = [self.rl_tasks[chosen[g]] for g in mine for _ in range(cfg.samples_per_task)]
        groups = torch.tensor([g for g in mine for _ in range(cfg.samples_per_task)])
        return tasks, groups

    def generator(self, step: int, salt: int) -> torch.Generator:
        return torch.Generator(self.device).manual_seed(hash((self.cfg.seed, step, self.rank, salt)) % 2**62)

    def set_learning_rates(self, step: int):
        """Linear warm-up over the first warmup_steps iterations, then constant or cosine decay; a function of
        the step, so resume is exact."""
        scale = lr_scale(step, self.cfg.steps, self.cfg.warmup_steps, self.cfg.lr_decay)
        for opt, base in zip(self.optimizers, (self.cfg.lr, self.cfg.critic_lr)):
            for group in opt.param_groups:
                group["lr"] = base * scale

    def train_step(self, step: int) -> dict:
        cfg, m = self.cfg, self.models
        self.set_learning_rates(step)
        tasks, groups = self.step_tasks(step)
        times = {}
        t0 = time.perf_counter()
        sampler = model_sampler(m.policy, self.tokenizer, cfg.max_new_tokens, cfg.temperature, cfg.top_p,
                                self.generator(step, 0))
        with full_params(m.scorer, cfg.fsdp):
            episodes = self.worker.run(sampler, tasks)
        times["rollout"] = time.perf_counter() - t0
        if cfg.algo == "expert_iteration":
            return self.expert_iteration_step(step, episodes, times)
        b = {k: v.to(self.device) for k, v in shifted(collate(episodes, self.tokenizer.pad_id)).items()}
        t0 = time.perf_counter()
        b["old_logprobs"], b["values"] = forward_in_chunks(m.scorer, b, cfg.micro_batch_size)
        b["ref_logprobs"] = self.reference_logprobs(b)
        if m.critic_scorer is not None:
            _, b["values"] = forward_in_chunks(m.critic_scorer, b, cfg.micro_batch_size, want_logprobs=False)
        b["advantages"], b["returns"], b["value_mask"], b["old_values"] = advantages(cfg, b, self.kl_ctl.value, groups)
        times["score"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        stats = ppo_update(cfg, m, self.optimizers, b, self.kl_ctl.value, self.generator(step, 1), self.world)
        times["update"] = time.perf_counter() - t0
        if b["returns"] is not None:
            stats["explained_variance"] = ppo.explained_variance(b["old_values"], b["returns"], b["value_mask"])
        return self.step_metrics(step, episodes, b, stats, times)

    def expert_iteration_step(self, step: int, episodes: list, times: dict) -> dict:
        """The update of --algo expert_iteration on this step's episodes."""
        cfg, m = self.cfg, self.models
        b = {k: v.to(self.device) for k, v in shifted(collate(episodes, self.tokenizer.pad_id)).items()}
        passed = torch.tensor([ep.passed for ep in episodes], device=self.device)
        t0 = time.perf_counter()
        b["ref_logprobs"] = self.reference_logprobs(b)  # no KL term in the loss; the KL is logged for the plot
        if b["ref_logprobs"] is not None:
            with torch.no_grad():
                b["old_logprobs"], _ = forward_in_chunks(m.scorer, b, cfg.micro_batch_size)
        stats = expert_iteration_update(cfg, m, self.optimizers, b, passed, self.generator(step, 1), self.world)
        times["update"] = time.perf_counter() - t0
        return self.step_metrics(step, episodes, b, stats, times)

    @torch.no_grad()
    def reference_logprobs(self, b: dict):
        if self.ref_scorer is not None:
            return forward_in_chunks(self.ref_scorer, b, self.cfg.micro_batch_size)[0]
        if self.cfg.lora_rank:  # the reference is the base model: the same weights with the adapters off
            with self.models.policy.adapters_disabled():
                return forward_in_chunks(self.models.scorer, b, self.cfg.micro_batch_size)[0]
        return None

    def step_metrics(self, step, episodes, b, stats, times) -> dict:
        mask = b["mask"]
        local = {"reward": float(b["rewards"].mean()), "pass_rate": sum(e.passed for e in episodes) / len(episodes),
                 "response_len": float(mask.sum(1).float().mean()),
                 "turns": sum(len(e.turns) for e in episodes) / len(episodes), **stats,
                 **{f"time_{k}": v for k, v in times.items()}}
        if b.get("ref_logprobs") is not None:
            local.update(kl_stats(b["old_logprobs"], b["ref_logprobs"], mask))
            kl_episode = all_reduce_mean({"kl": local["kl_episode"]}, self.world)["kl"]
            self.kl_ctl.update(kl_episode, len(episodes) * self.world)  # a per-episode target, as Ziegler and TRL
        metrics = {"kind": "train", "step": step, **all_reduce_mean(local, self.world), "kl_coef": self.kl_ctl.value}
        return metrics

    # -- evaluation ----------------------------------------------------------------------------------------------
    def eval_sampler(self, draw: int | None = None):
        """The evaluation's sampler. Its generator is seeded with --seed + 12345, so every run of a seed draws its
        evaluation from the same random numbers; `draw` seeds it instead (bench/eval_draws.py)."""
        cfg = self.cfg
        generator = torch.Generator(self.device).manual_seed(cfg.seed + 12345 if draw is None else draw)
        return model_sampler(self.models.policy, self.tokenizer, cfg.max_new_tokens, cfg.eval_temperature, 1.0,
                             generator)

    def held_out_results(self, sampler, log=None) -> tuple[list, list]:
        """(records, episodes) of this rank's share of the held-out tasks: pass@1 samples and 1@3 episodes."""
        cfg = self.cfg
        return task_results(self.worker, sampler, self.eval_tasks[self.rank::self.world], cfg.eval_samples,
                            cfg.max_turns, cfg.eval_episodes, log)

    def evaluate(self, step: int, label: str) -> dict:
        cfg = self.cfg
        sampler = self.eval_sampler()
        t0 = time.perf_counter()
        with full_params(self.models.scorer, cfg.fsdp):
            records, episodes = self.held_out_results(sampler, lambda line: self.log(f"eval[{label}] {line}"))
            # the training split's slow/fast tasks: the held-out ones are too few, and too rarely solved, to
            # give a share worth reading; the time reward's effect on the policy's choice shows on either
            slow_fast = [t for t in self.train_tasks[self.rank::self.world] if "slow_fast" in t.tags]
            fast = fast_share_records(self.worker, sampler, slow_fast, cfg.fast_share_samples, self.eval_timer) \
                if cfg.fast_share_samples and slow_fast else []
        records, fast = gather_objects(records, self.world), gather_objects(fast, self.world)
        metrics = {"kind": "eval", "label": label, "step": step, **summarize(records, (1, cfg.eval_samples)),
                   **(summarize_fast_share(fast) if fast else {}), "time_eval": time.perf_counter() - t0}
        if self.rank == 0:
            with open(self.out / f"samples-{label}.txt", "w") as f:
                # episodes with the most turns first: those show the sandbox's feedback to the model
                for ep in sorted(episodes, key=lambda e: -len(e.turns))[:4]:
                    f.write(f"=== task {ep.task.task_id}  reward {ep.reward:+.2f}  passed {ep.passed}\n")
                    f.write(ep.text(self.tokenizer) + "\n\n")
        return metrics

    # -- checkpoints ---------------------------------------------------------------------------------------------
    def save_checkpoint(self, next_step: int):
        """checkpoint/policy (HF layout: loads in transformers), checkpoint/critic, checkpoint/trainer.pt
        (optimizer, KL controller, RNG, step). Written to a temporary folder, then renamed: a run killed
        mid-save keeps the previous checkpoint."""
        m = self.models
        policy, critic = self.full_model(m.scorer), self.full_model(m.critic_scorer)  # collective under FSDP
        optimizers = [opt.state_dict() for opt in self.optimizers]
        if self.cfg.fsdp:  # each rank holds the optimizer state of its own shards: each saves its part
            (self.out / "checkpoint.tmp").mkdir(parents=True, exist_ok=True)
            barrier(self.world)
            torch.save(optimizers, self.out / "checkpoint.tmp" / f"optimizer-rank{self.rank}.pt")
            barrier(self.world)
        if self.rank == 0:
            final, tmp = self.out / "checkpoint", self.out / "checkpoint.tmp"
            if not self.cfg.fsdp:
                shutil.rmtree(tmp, ignore_errors=True)
            # a complete HF folder: weights, config, tokenizer files with the chat template, generation_config
            policy.save_pretrained(tmp / "policy", tokenizer=self.tokenizer,
                                   sampling={"temperature": self.cfg.temperature, "top_p": self.cfg.top_p})
            if critic is not None:
                critic.save_pretrained(tmp / "critic")
            trainable = {n: p.detach().cpu() for n, p in policy.named_parameters() if p.requires_grad}
            torch.save({"step": next_step, "optimizers": None if self.cfg.fsdp else optimizers, "kl_ctl": self.kl_ctl.state_dict(),
                        "lora_and_head": trainable if self.cfg.lora_rank else None,
                        "torch_rng": torch.get_rng_state(), "python_rng": random.getstate()}, tmp / "trainer.pt")
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
        barrier(self.world)

    def full_model(self, scorer: nn.Module | None) -> Transformer | None:
        """The whole model on this rank: as is, or gathered from the FSDP shards into a CPU copy."""
        if scorer is None or not self.cfg.fsdp:
            return None if scorer is None else unwrap(scorer).model
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        state = get_model_state_dict(scorer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.rank != 0:  # with cpu_offload the full state only lands on rank 0
            return None
        model = unwrap(scorer).model
        copy_ = Transformer(model.config, value_head=model.value_head is not None)
        if self.cfg.lora_rank:
            add_lora(copy_, self.cfg)
        copy_.load_state_dict({k.removeprefix("model."): v for k, v in state.items()})
        return copy_  # fp32, as the master weights: a resume continues from them exactly

    def _load_checkpoint_weights(self) -> dict:
        """Load the saved policy/critic weights into the unwrapped models; return the trainer state."""
        path = self.out / "checkpoint"
        if not (path / "trainer.pt").exists():  # killed before its first checkpoint (the warm start continued)
            self.log(f"--resume: no checkpoint in {path} yet: the iterations start at step 0")
            if self.rank == 0:
                (self.out / "metrics.jsonl").unlink(missing_ok=True)
            return None
        state = torch.load(path / "trainer.pt", weights_only=False)
        if self.cfg.steps < state["step"]:
            raise ConfigError(f"--resume: --steps {self.cfg.steps} is below the checkpoint's step {state['step']} "
                              f"({path / 'trainer.pt'}); --steps may only go up")
        m, dtype = self.models, self.models.policy.embed_tokens.weight.dtype
        if self.cfg.lora_rank:  # the base stays as loaded; the adapters (and value head) come from the state
            m.policy.load_state_dict(state["lora_and_head"], strict=False)
        else:
            saved = Transformer.from_pretrained(path / "policy", dtype=dtype, device=self.device,
                                                value_head=m.policy.value_head is not None)
            m.policy.load_state_dict(saved.state_dict())
        if m.critic is not None:
            dtype = m.critic.embed_tokens.weight.dtype
            m.critic.load_state_dict(Transformer.from_pretrained(path / "critic", dtype=dtype, device=self.device,
                                                                 value_head=True).state_dict())
        return state

    def _load_trainer_state(self, state: dict) -> int:
        """Optimizers, KL controller and RNG from trainer.pt; returns the step to continue from."""
        file = self.out / "checkpoint" / (f"optimizer-rank{self.rank}.pt" if self.cfg.fsdp else "trainer.pt")
        saved = torch.load(file, weights_only=False) if self.cfg.fsdp else state["optimizers"]
        load_optimizer_states(self.optimizers, saved, file)
        self.kl_ctl.load_state_dict(state["kl_ctl"])
        torch.set_rng_state(state["torch_rng"])
        random.setstate(state["python_rng"])
        metrics = self.out / "metrics.jsonl"
        if self.rank == 0 and metrics.exists():  # drop metrics written after the checkpoint, as if unbroken
            keep = [line for line in metrics.read_text().splitlines()
                    if json.loads(line)["step"] < state["step"] or json.loads(line).get("label") == "before"]
            metrics.write_text("".join(line + "\n" for line in keep))
        self.log(f"resumed from {self.out / 'checkpoint'} at step {state['step']}")
        return state["step"]

    def check_replicas_in_sync(self):
        """DDP keeps one replica per rank: after training they must hold the same weights. A cheap checksum
        per rank, compared on all ranks; a mismatch is a bug worth stopping for."""
        if self.world == 1 or self.cfg.fsdp:  # FSDP holds shards, not replicas
            return
        checksum = sum(float(p.detach().double().sum()) for p in self.models.policy.parameters())
        sums = gather_objects([checksum], self.world)
        self.write_metrics({"kind": "sync", "step": self.cfg.steps, "checksums": sums})
        if len(set(sums)) != 1:
            raise RuntimeError(f"ranks hold different weights after training: checksums {sums}")

    # -- the loop ------------------------------------------------------------------------------------------------
    def fit(self) -> tuple[dict | None, dict]:
        cfg = self.cfg
        before = None
        if self.start_step == 0:
            before = self.evaluate(0, "before")
            self.write_metrics(before)
            self.log(format_eval(before))
        started = time.perf_counter()
        for step in range(self.start_step, cfg.steps):
            metrics = self.train_step(step)
            self.write_metrics(metrics)
            elapsed = time.perf_counter() - started
            eta = elapsed / (step + 1 - self.start_step) * (cfg.steps - step - 1)
            self.log(f"{format_step(metrics, cfg.steps)} | {elapsed / 60:.1f} min, ETA {eta / 60:.1f} min")
            if cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 < cfg.steps:
                ev = self.evaluate(step + 1, f"step{step + 1}")
                self.write_metrics(ev)
                self.log(format_eval(ev))
            if cfg.save_every and (step + 1) % cfg.save_every == 0:
                self.save_checkpoint(step + 1)
        self.save_checkpoint(cfg.steps)
        self.check_replicas_in_sync()
        after = self.evaluate(cfg.steps, "after")
        self.write_metrics(after)
        self.log(format_eval(after))
        if self.rank == 0:
            write_plot(self.out / "metrics.jsonl", self.out / "plot.png")  # skipped with a message without matplotlib
        return before, after


def load_optimizer_states(optimizers: list, saved: list, file: Path):
    """Load each saved optimizer state into its optimizer, after checking that they match: the same number of
    optimizers (the policy's, then the critic's when the run has one) and of parameters in each group. torch's
    own load_state_dict checks only the group sizes, with a message that names neither the file nor the cause."""
    def layout(states):
        return [[len(group["params"]) for group in s["param_groups"]] for s in states]
    if saved is None:  # an --fsdp run keeps each rank's optimizer state in optimizer-rank{r}.pt instead
        raise ValueError(f"--resume: {file} holds no optimizer state: the checkpoint was written by an --fsdp run; "
                         "resume with --fsdp")
    have = layout(opt.state_dict() for opt in optimizers)
    if layout(saved) != have:
        raise ValueError(
            f"--resume: {file} holds {len(saved)} optimizer state(s) with parameter counts {layout(saved)}, but "
            f"this run's optimizers have {have} (the policy's first, then the critic's). Resume with the --algo, "
            f"--critic and --lora_rank the checkpoint was written with. A checkpoint from before the value head "
            f"had its own optimizer (--critic head or probe) cannot resume: its head shares the policy's state.")
    for opt, opt_state in zip(optimizers, saved):
        opt.load_state_dict(opt_state)


# ----------------------------------------------------------------------------------------------------------------
# small distributed and logging helpers


def all_reduce_mean(values: dict, world: int) -> dict:
    if world == 1:
        return values
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
    dist.all_reduce(t)
    return {k: v / world for k, v in zip(keys, t.tolist())}


def gather_objects(items: list, world: int) -> list:
    if world == 1:
        return items
    out = [None] * world
    dist.all_gather_object(out, items)
    return [x for part in out for x in part]


def broadcast_object(obj, world: int):
    if world == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(world: int):
    if world > 1:
        dist.barrier()


def format_step(m: dict, steps: int) -> str:
    parts = [f"step {m['step'] + 1:4d}/{steps}", f"reward {m['reward']:+.3f}", f"pass {m['pass_rate']:.2f}",
             f"len {m['response_len']:.0f}"]
    for key, label, spec in (("kl_ref", "kl", ".4f"), ("approx_kl", "akl", ".4f"), ("clipfrac", "clip", ".2f"),
                             ("entropy", "ent", ".2f"), ("explained_variance", "ev", ".2f"), ("sft_loss", "sft", ".3f"),
                             ("grad_norm_policy", "gn", ".2f"), ("grad_norm_critic", "gn_v", ".2f")):
        if key in m:
            parts.append(f"{label} {number(m[key], spec)}")
    parts.append(f"{sum(v for k, v in m.items() if k.startswith('time_')):.1f}s")
    if m.get("skipped_updates"):
        parts.append(f"SKIPPED {m['skipped_updates']} non-finite updates")
    return " | ".join(parts)


def format_eval(m: dict) -> str:
    scores = "  ".join(f"{k} {number(v)}" for k, v in m.items() if k.startswith(("pass@", "1@", "turn1"))
                       or k == "fast_share")
    return f"eval[{m['label']}] {m['tasks']} tasks  {scores}  ({m['time_eval']:.0f}s)"


def number(x, spec: str = ".3f") -> str:
    """A metric for the console: NaN or missing (e.g. the fast share of a run with no fast program) is n/a."""
    return "n/a" if x is None or not math.isfinite(x) else format(x, spec)


def main(argv=None):
    cfg = parse_config(argv)
    try:
        trainer = Trainer(cfg)
    except ConfigError as e:  # a configuration the run refuses: one line, no traceback
        print(f"train.py: error: {e}", file=sys.stderr)
        sys.exit(2)
    try:
        before, after = trainer.fit()
        if before is not None:
            trainer.log("\n" + "\n".join(f"{k:>12}: {number(before.get(k))} -> {number(after[k])}" for k in after
                                         if k.startswith(("pass@", "1@", "turn1")) or k == "fast_share"))
    finally:
        trainer.pool.close()
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
