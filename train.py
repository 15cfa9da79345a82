"""nanoRLEF: reinforcement learning from execution feedback (RLEF, Gehring et al. 2024), in one script.

    python train.py                                     # the CPU demo (the tiny preset)
    torchrun --standalone --nproc_per_node=8 train.py --preset llama-3.1-8b --model_dir /models/Llama-3.1-8B

`python train.py` runs the tiny preset: it loads the repository's warm start (weights/, a 0.8M-parameter
Llama that sft.py trained on reference solutions), evaluates it, runs 24 iterations of multi-turn expert
iteration (ReST-EM) with execution feedback, evaluates again and prints a before/after table. Expert iteration
is the demo's algorithm because on the tiny model it gained the most held-out pass@1 in every comparison with
PPO and GRPO (docs/experiments.md). The presets for real checkpoints run RLEF's own algorithm, PPO with a
turn-level critic (--algo ppo).

One iteration (Trainer.train_step): sample tasks -> multi-turn episodes with public-test feedback (rollout.py)
-> score the final code on the private tests (reward.py) -> recompute old and reference logprobs and values
with a training forward -> KL penalty and advantages (ppo.py) -> several epochs of clipped PPO updates.
`--algo grpo` drops the critic for group-normalised advantages; `--algo expert_iteration` fine-tunes on the
programs that passed.
"""
from __future__ import annotations

import dataclasses
import json
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

import cli
import data
import ppo
import sft
from actor_critic import (Scorer, build_models, build_optimizers, expert_iteration_update, forward_in_chunks,
                          ppo_update)
from checkpoint import (MetricsLog, format_eval, format_step, load_trainer_state, load_weights, number,
                        prepare_out_dir, save_checkpoint, write_samples)
from cli import ConfigError, arg
from distributed import (all_reduce_mean, barrier, broadcast_object, check_replicas_in_sync, full_params,
                         gather_objects, setup_distributed, wrap)
from evaluate import fast_share_records, summarize, summarize_fast_share, task_results
from model import ModelConfig, read_json
from plot import write_plot
from reward import RewardConfig, has_assert_tests
from rollout import INSTRUCTION, RolloutConfig, RolloutWorker, collate, model_sampler
from sandbox import Limits, SandboxPool
from synthetic import synthetic_tasks
from tokenizer import TOKENIZER_FILES, Tokenizer, check_vocab, tokenizer_for

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass
class Config:
    # model and data
    preset: str = arg("tiny", "defaults that later flags override", ("tiny", "llama-3.2-1b", "llama-3.1-8b",
                                                                       "qwen3-0.6b"))
    model_dir: str = arg("", "HF checkpoint folder (config.json, *.safetensors, tokenizer); '' = warm start")
    tokenizer: str = arg("", "tokenizer.model / .json / .tiktoken path; '' = model_dir's (none: the tiny "
                         "BPE); 'bytes' = byte-level")
    dtype: str = arg("float32", "weights and activations", tuple(DTYPES))
    dataset: str = arg("synthetic", "the tasks (README: datasets)",
                       ("synthetic", "mbpp", "humaneval", "stdio", "tasks"))
    data_path: str = arg("", "jsonl file for mbpp / stdio / tasks (one Task.to_dict() record per line)")
    drop_broken_tasks: bool = arg(False, "drop tasks whose reference does not compile or fails its own tests "
                                         "(checked in the sandbox at start; without it, reported)")
    # algorithm
    algo: str = arg("ppo", "dr_grpo: GRPO without the division by the group's std (Liu et al. 2025)",
                    ("ppo", "grpo", "dr_grpo", "expert_iteration"))
    critic: str = arg("separate", "separate: a copy of the policy with a fresh value head (RLEF); head: a "
                      "value head on the policy trunk, whose loss trains the trunk; probe: that head on the "
                      "trunk's hidden states with the gradient stopped", ("separate", "head", "probe"))
    advantage: str = arg("turn", "turn: RLEF's turn-level value; token: token-level GAE", ("turn", "token"))
    kl_placement: str = arg("reward", "reward: k1 in the reward (RLEF); loss: k3 in the loss (GRPO)",
                            ppo.KL_PLACEMENTS)
    kl_coef: float = arg(0.05, "initial KL coefficient beta", ">= 0")
    kl_target: float = arg(0.0, "> 0: adaptive KL controller towards this KL per episode in nats, k1 summed "
                           "over its sampled tokens (Ziegler et al. 2019; TRL's default target is 6)", ">= 0")
    clip_eps: float = arg(0.2, "PPO ratio clip", "> 0")
    lr: float = arg(1e-6, "policy learning rate", "> 0")
    critic_lr: float = arg(1e-5, "learning rate of the separate critic, or of the value head", "> 0")
    warmup_steps: int = arg(0, "iterations of linear learning-rate warm-up: Adam's first updates are the "
                            "size of the lr whatever the gradient's noise, until its moments settle", ">= 0")
    ppo_epochs: int = arg(2, "passes over each batch of episodes", ">= 1")
    minibatch_size: int = arg(32, "episodes per optimizer step (per rank)", ">= 1")
    micro_batch_size: int = arg(8, "episodes per forward/backward (gradient accumulation)", ">= 1")
    logprob_chunk: int = arg(1024, "tokens per chunk of the fused lm_head + logprob kernel", ">= 1")
    # rollouts
    steps: int = arg(100, "training iterations", ">= 1")
    tasks_per_step: int = arg(16, "tasks per iteration (all ranks together)", ">= 1")
    samples_per_task: int = arg(4, "episodes per task per iteration (the GRPO group size)", ">= 1")
    max_turns: int = arg(3, "turns per episode (RLEF: 3)", ">= 1")
    max_new_tokens: int = arg(384, "tokens per turn", ">= 1")
    temperature: float = arg(1.0, "sampling temperature (the logprobs of training are at the same T)", "> 0")
    gen_batch_size: int = arg(32, "episodes per generate() call", ">= 1")
    instruction: str = arg(INSTRUCTION, "appended to every task prompt ('' = none)")
    # rewards and sandbox
    time_weight: float = arg(0.0, "weight of the time reward (CPU time against the reference's)", ">= 0")
    sandbox_workers: int = arg(0, "sandbox processes (0 = one per core)", ">= 0")
    test_timeout: float = arg(5.0, "seconds per test", "> 0")
    # LoRA and distribution
    lora_rank: int = arg(0, "> 0: train LoRA adapters (the reference is the base, adapters off)", ">= 0")
    fsdp: bool = arg(False, "shard the model with FSDP2 fully_shard instead of DDP")
    # evaluation, logging, checkpoints
    eval_tasks: int = arg(0, "held-out tasks to evaluate on (0 = all)", ">= 0")
    eval_samples: int = arg(5, "single-turn samples per task for pass@k (and per slow/fast training task "
                            "for the fast share)", ">= 1")
    eval_temperature: float = arg(0.2, "sampling temperature for evaluation", "> 0")
    eval_episodes: int = arg(1, "multi-turn episodes per task for 1@3", ">= 1")
    out_dir: str = arg("out", "metrics.jsonl, checkpoint/, samples-*.txt, plot.png, config.json")
    save_every: int = arg(1, "checkpoint every k iterations (0 = only at the end)", ">= 0")
    resume: bool = arg(False, "continue from out_dir/checkpoint exactly (same data order and metrics); the "
                       "run's config.json must match, but --steps may go up")
    overwrite: bool = arg(False, "replace an earlier run's outputs in out_dir (else a new run refuses them)")
    seed: int = arg(0, "seed for data order, sampling and initialisation")
    # tiny preset: the warm start (sft.py)
    warmstart_steps: int = arg(0, "SFT steps of the tiny warm start (0 = no warm start)", ">= 0")
    cache_dir: str = arg(".cache", "where the tiny warm-start checkpoint is cached between runs")


PRESETS = {
    # 0.8M parameters, the tiny BPE (tokenizer.TINY_BPE), synthetic tasks, short prompts. The choices and
    # their evidence are in docs/experiments.md: 1200 warm-start steps, expert iteration at lr 1e-4 for 24
    # iterations of 12 tasks x 8 episodes, and the "probe" critic at critic_lr 1e-3 for --algo ppo.
    "tiny": dict(dataset="synthetic", instruction="", warmstart_steps=sft.TINY["steps"],
                 algo="expert_iteration", lr=1e-4, warmup_steps=2, critic="probe", critic_lr=1e-3,
                 kl_coef=0.05, max_new_tokens=48,
                 tasks_per_step=12, samples_per_task=8, minibatch_size=32, micro_batch_size=16, ppo_epochs=2,
                 steps=24, time_weight=1.0, gen_batch_size=64, eval_samples=4, eval_temperature=1.0,
                 eval_episodes=4, test_timeout=2.0, sandbox_workers=2),
    # Real checkpoints: put the HF folder at --model_dir. bf16 weights; see README for memory notes.
    "llama-3.2-1b": dict(dtype="bfloat16", dataset="mbpp", lr=1e-6, critic_lr=1e-5, micro_batch_size=4),
    "qwen3-0.6b": dict(dtype="bfloat16", dataset="mbpp", lr=1e-6, critic_lr=1e-5, micro_batch_size=4),
    "llama-3.1-8b": dict(dtype="bfloat16", dataset="mbpp", critic="head", lora_rank=64, lr=2e-5, fsdp=True,
                         micro_batch_size=2, logprob_chunk=512),
}
# Fixed hyperparameters: the values of PPO (CleanRL's), RLEF (gamma 1 over an episode's turns) and TRL.
GAMMA, LAM, VALUE_CLIP, VF_COEF, MAX_GRAD_NORM = 1.0, 0.95, 0.2, 0.5, 1.0
TRUNCATION_PENALTY = 0.5  # subtracted from an episode in which a response hit max_new_tokens
KL_HORIZON = 10000        # the adaptive KL controller's horizon, in episodes (Ziegler et al. 2019)
LORA_ALPHA, LORA_TARGETS = 32.0, ("q_proj", "k_proj", "v_proj", "o_proj")
# The help's sections, as Config's comments read: the first flag of each.
GROUPS = {"preset": "model and data", "algo": "algorithm", "steps": "rollouts",
          "time_weight": "rewards and sandbox", "lora_rank": "LoRA and distribution",
          "eval_tasks": "evaluation, logging, checkpoints", "warmstart_steps": "tiny preset: the warm start"}
# Flags a resumed run may change: they do not alter what it computes (--steps may only go up).
RESUMABLE = {"resume", "overwrite", "steps", "sandbox_workers", "save_every", "out_dir", "cache_dir"}


def parse_config(argv=None) -> Config:
    """Config's fields as flags (cli.py); every value is checked before any work."""
    cfg, parser, given = cli.parse(Config, PRESETS, GROUPS, argv, __doc__)
    if cfg.algo in ("grpo", "dr_grpo") and "kl_placement" not in given:
        cfg.kl_placement = "loss"  # GRPO puts the KL in the loss (k3), never in the reward
    try:
        validate(cfg)
    except ConfigError as e:
        parser.error(str(e))
    return cfg


def validate(cfg: Config) -> None:
    """Every flag's domain and the rules between flags; ConfigError names the flag, its value and what is
    allowed. parse_config runs it, and so does Trainer for a Config built in code."""
    def refuse(name, allowed):
        raise ConfigError(f"--{name} {getattr(cfg, name)!r}: {allowed}")
    cli.check_domains(cfg)
    if cfg.algo in ("grpo", "dr_grpo") and cfg.kl_placement == "reward" and cfg.kl_coef > 0:
        refuse("kl_placement", f"--algo {cfg.algo} puts the KL in the loss (k3): use loss, or --kl_coef 0")
    if not cfg.model_dir and not cfg.warmstart_steps:
        refuse("warmstart_steps", "without a --model_dir, the tiny warm start needs at least 1 step")
    if cfg.model_dir and not (Path(cfg.model_dir) / "config.json").is_file():
        refuse("model_dir", "must be a HF checkpoint folder with a config.json")
    if cfg.tokenizer not in ("", "bytes") and not Path(cfg.tokenizer).is_file():
        refuse("tokenizer", "must be '', 'bytes' or an existing tokenizer.json / .model / .tiktoken file")
    own = any((Path(cfg.model_dir) / name).is_file() for name in TOKENIZER_FILES)  # tokenizer_for's rule 2
    if cfg.model_dir and not cfg.tokenizer and not own:
        refuse("tokenizer", f"--model_dir {cfg.model_dir} has no tokenizer of its own: pass --tokenizer")
    if cfg.dataset in ("stdio", "tasks") and not cfg.data_path:
        refuse("data_path", f"--dataset {cfg.dataset} needs a jsonl file")
    if cfg.data_path and not Path(cfg.data_path).is_file():
        refuse("data_path", "must be an existing jsonl file")
    for name in ("out_dir", "cache_dir"):
        if not getattr(cfg, name):
            refuse(name, "must be a folder name, not empty")


class Trainer:
    """What lives across iterations: models, optimizers, sandbox pool, KL controller, metrics."""

    def __init__(self, cfg: Config):
        validate(cfg)
        self.cfg = cfg
        self.rank, self.world, self.device = setup_distributed()
        if cfg.tasks_per_step % self.world:
            raise ConfigError(f"--tasks_per_step {cfg.tasks_per_step}: must be a multiple of the "
                              f"{self.world} ranks")
        torch.manual_seed(cfg.seed)
        self.out = Path(cfg.out_dir)
        if self.rank == 0:
            prepare_out_dir(self.out, dataclasses.asdict(cfg), cfg.resume, cfg.overwrite, RESUMABLE)
        barrier(self.world)
        self.log("config: " + json.dumps(dataclasses.asdict(cfg)))
        self.metrics = MetricsLog(self.out) if self.rank == 0 else None
        self.tokenizer = load_tokenizer(cfg)
        self.train_tasks, self.eval_tasks = load_tasks(cfg)
        self.eval_tasks = self.eval_tasks[:cfg.eval_tasks or None]
        self.rl_tasks = [t for t in self.train_tasks if not has_assert_tests(t)]
        if len(self.rl_tasks) < len(self.train_tasks):  # RL would learn to forge their passes
            self.log(f"RL leaves out {len(self.train_tasks) - len(self.rl_tasks)} tasks with assert tests, "
                     "whose passes a program can forge (the sandbox decides them in the child)")
        if not self.rl_tasks:
            raise ValueError("no training task is left for RL: every one has an assert test")
        self.pool = SandboxPool(cfg.sandbox_workers or None, Limits(timeout_s=cfg.test_timeout))
        try:
            self.setup_models()
        except BaseException:  # a refused configuration must not leave the sandbox's processes behind
            self.pool.close()
            raise

    def setup_models(self):
        cfg = self.cfg
        if cfg.dataset != "synthetic":  # synthetic.py computes each expected value by running the reference
            self.check_references()  # before the warm start imitates them
        self.model_dir = Path(cfg.model_dir) if cfg.model_dir else self.tiny_warm_start()
        config_file = self.model_dir / "config.json"  # the tokenizer must fit the model before any work
        model_config = ModelConfig.from_hf(read_json(config_file), str(config_file))
        check_vocab(model_config, self.tokenizer, config_file)
        self.models = build_models(self.model_dir, self.device, DTYPES[cfg.dtype],
                                   critic=cfg.critic if cfg.algo == "ppo" else None,
                                   reference=cfg.kl_coef > 0, lora=self.lora(),
                                   temperature=cfg.temperature, chunk=cfg.logprob_chunk)
        state = load_weights(self.out / "checkpoint", cfg.steps, self.models.policy, self.models.critic,
                             cfg.lora_rank > 0, self.device, self.log) if cfg.resume else None
        self.models.scorer = wrap(self.models.scorer, self.world, cfg.fsdp, DTYPES[cfg.dtype])
        if self.models.critic_scorer is not None:
            self.models.critic_scorer = wrap(self.models.critic_scorer, self.world, cfg.fsdp,
                                             DTYPES[cfg.dtype])
        self.ref_scorer = Scorer(self.models.reference, cfg.temperature, cfg.logprob_chunk) \
            if self.models.reference is not None else None
        self.optimizers = build_optimizers(self.models, cfg.lr, cfg.critic_lr)
        self.kl_ctl = (ppo.AdaptiveKLController(cfg.kl_coef, cfg.kl_target, KL_HORIZON) if cfg.kl_target > 0
                       else ppo.FixedKLController(cfg.kl_coef))
        self.start_step = 0
        if state is not None:
            self.start_step = load_trainer_state(self.out / "checkpoint", state, self.optimizers, self.kl_ctl,
                                                 self.rank, cfg.fsdp)
            self.log(f"resumed from {self.out / 'checkpoint'} at step {self.start_step}")
        if self.metrics is not None and cfg.resume:  # drop what was written after the checkpoint
            self.metrics.keep_before(self.start_step)
        reward_cfg = RewardConfig(time_weight=cfg.time_weight)
        rollout_cfg = RolloutConfig(max_turns=cfg.max_turns, max_new_tokens=cfg.max_new_tokens,
                                    gen_batch_size=cfg.gen_batch_size, instruction=cfg.instruction,
                                    max_episode_tokens=self.models.policy.config.max_position_embeddings)
        self.worker = RolloutWorker(self.tokenizer, self.pool, rollout_cfg, reward_cfg)
        self.eval_worker = RolloutWorker(self.tokenizer, self.pool, rollout_cfg, RewardConfig())  # no timing
        self.timed_worker = RolloutWorker(self.tokenizer, self.pool, rollout_cfg, RewardConfig(time_weight=1.0))

    # -- the loop --------------------------------------------------------------------------------------------
    def fit(self) -> tuple[dict | None, dict]:
        cfg = self.cfg
        before = self.evaluate(0, "before") if self.start_step == 0 else None
        started = time.perf_counter()
        for step in range(self.start_step, cfg.steps):
            metrics = self.train_step(step)
            self.write_metrics(metrics)
            elapsed = time.perf_counter() - started
            eta = elapsed / (step + 1 - self.start_step) * (cfg.steps - step - 1)
            self.log(f"{format_step(metrics, cfg.steps)} | {elapsed / 60:.1f} min, ETA {eta / 60:.1f} min")
            if cfg.save_every and (step + 1) % cfg.save_every == 0:
                self.save_checkpoint(step + 1)
        self.save_checkpoint(cfg.steps)
        if self.world > 1 and not cfg.fsdp:  # DDP's replicas must agree (FSDP holds shards, not replicas)
            self.write_metrics({"kind": "sync", "step": cfg.steps,
                                "checksums": check_replicas_in_sync(self.models.policy, self.world)})
        after = self.evaluate(cfg.steps, "after")
        if self.rank == 0:
            write_plot(self.out / "metrics.jsonl", self.out / "plot.png")  # says why when it cannot
        return before, after

    def train_step(self, step: int) -> dict:
        """One RLEF iteration."""
        cfg, m, times = self.cfg, self.models, {}
        self.set_learning_rates(step)                                                   # plumbing
        tasks, groups = self.step_tasks(step)
        # algorithm: multi-turn episodes with execution feedback, scored on the private tests
        t0 = time.perf_counter()
        sampler = model_sampler(m.policy, self.tokenizer, cfg.max_new_tokens, cfg.temperature,
                                self.generator(step, 0))
        with full_params(m.scorer, cfg.fsdp):
            episodes = self.worker.run(sampler, tasks)
        times["rollout"], t0 = time.perf_counter() - t0, time.perf_counter()
        passed = torch.tensor([ep.passed for ep in episodes])
        b = ppo.Batch.from_collated(collate(episodes, self.tokenizer.pad_id), passed, groups, self.device)
        # algorithm: old and reference logprobs and old values, recomputed by a training forward
        b.ref_logprobs = self.reference_logprobs(b)
        if cfg.algo != "expert_iteration" or b.ref_logprobs is not None:  # EI: only for the KL's log
            b.old_logprobs, b.values = forward_in_chunks(m.scorer, b, cfg.micro_batch_size)
        if m.critic_scorer is not None:
            _, b.values = forward_in_chunks(m.critic_scorer, b, cfg.micro_batch_size, want_logprobs=False)
        sizes = dict(minibatch_size=cfg.minibatch_size, micro_batch_size=cfg.micro_batch_size,
                     epochs=cfg.ppo_epochs, max_grad_norm=MAX_GRAD_NORM)
        if cfg.algo == "expert_iteration":  # algorithm: ReST-EM on the passing programs
            stats = expert_iteration_update(m, self.optimizers, b, self.generator(step, 1), self.world,
                                            **sizes)
        else:  # algorithm: KL penalty and advantages, then PPO's clipped epochs
            b.advantages, b.returns, b.value_mask, b.old_values = ppo.advantages(
                b, cfg.algo, cfg.advantage, cfg.kl_placement, self.kl_ctl.value, GAMMA, LAM,
                TRUNCATION_PENALTY)
            b.turn_level = cfg.advantage == "turn"
            times["score"], t0 = time.perf_counter() - t0, time.perf_counter()
            _, loss_kl = ppo.split_kl_coef(cfg.kl_placement, self.kl_ctl.value)
            stats = ppo_update(m, self.optimizers, b, self.generator(step, 1), self.world, **sizes,
                               clip_eps=cfg.clip_eps, loss_kl=loss_kl, value_clip=VALUE_CLIP,
                               vf_coef=VF_COEF if m.critic is None else 1.0)  # a separate critic: 1
            if b.returns is not None:
                stats["explained_variance"] = ppo.explained_variance(b.old_values, b.returns, b.value_mask)
        times["update"] = time.perf_counter() - t0
        return self.step_metrics(step, episodes, b, stats, times)                       # plumbing

    def step_metrics(self, step: int, episodes: list, b: ppo.Batch, stats: dict, times: dict) -> dict:
        n = len(episodes)
        local = {"reward": float(b.rewards.mean()), "pass_rate": sum(e.passed for e in episodes) / n,
                 "response_len": float(b.mask.sum(1).float().mean()),
                 "turns": sum(len(e.turns) for e in episodes) / n, **stats,
                 **{f"time_{k}": v for k, v in times.items()}}
        if b.ref_logprobs is not None:
            local.update(ppo.kl_stats(b.old_logprobs, b.ref_logprobs, b.mask))
            kl_episode = all_reduce_mean({"kl": local["kl_episode"]}, self.world)["kl"]
            self.kl_ctl.update(kl_episode, n * self.world)  # a per-episode target, as Ziegler and TRL
        return {"kind": "train", "step": step, **all_reduce_mean(local, self.world),
                "kl_coef": self.kl_ctl.value}

    def step_tasks(self, step: int):
        """This rank's tasks for `step`, each repeated samples_per_task times, and their group ids. A function
        of (seed, step) only, so a resumed run sees exactly the same data."""
        cfg, n = self.cfg, len(self.rl_tasks)
        rng = random.Random(cfg.seed * 1_000_003 + step)
        k = cfg.tasks_per_step
        chosen = rng.sample(range(n), k) if k <= n else [rng.randrange(n) for _ in range(k)]
        mine = list(range(self.rank, k, self.world))
        tasks = [self.rl_tasks[chosen[g]] for g in mine for _ in range(cfg.samples_per_task)]
        return tasks, torch.tensor([g for g in mine for _ in range(cfg.samples_per_task)])

    def generator(self, step: int, salt: int) -> torch.Generator:
        return torch.Generator(self.device).manual_seed(hash((self.cfg.seed, step, self.rank, salt)) % 2**62)

    def set_learning_rates(self, step: int):
        """A linear warm-up over warmup_steps iterations; a function of the step, so resume is exact."""
        scale = min(1.0, (step + 1) / self.cfg.warmup_steps) if self.cfg.warmup_steps else 1.0
        for opt, base in zip(self.optimizers, (self.cfg.lr, self.cfg.critic_lr)):
            for group in opt.param_groups:
                group["lr"] = base * scale

    @torch.no_grad()
    def reference_logprobs(self, b: ppo.Batch):
        if self.ref_scorer is not None:
            return forward_in_chunks(self.ref_scorer, b, self.cfg.micro_batch_size)[0]
        if self.cfg.lora_rank:  # the reference is the base model: the same weights with the adapters off
            with self.models.policy.adapters_disabled():
                return forward_in_chunks(self.models.scorer, b, self.cfg.micro_batch_size)[0]
        return None

    # -- evaluation ------------------------------------------------------------------------------------------
    def evaluate(self, step: int, label: str) -> dict:
        """pass@k and 1@3 on this rank's share of the held-out tasks; the fast share on the slow/fast training
        tasks (the held-out ones are too few, and too rarely solved, to give a share worth reading). The
        sampler is seeded with --seed + 12345: every run of a seed evaluates on the same random numbers."""
        cfg, t0 = self.cfg, time.perf_counter()
        generator = torch.Generator(self.device).manual_seed(cfg.seed + 12345)
        sampler = model_sampler(self.models.policy, self.tokenizer, cfg.max_new_tokens, cfg.eval_temperature,
                                generator)
        slow_fast = [t for t in self.train_tasks[self.rank::self.world] if "slow_fast" in t.tags]
        with full_params(self.models.scorer, cfg.fsdp):
            records, episodes = task_results(self.eval_worker, sampler, self.eval_tasks[self.rank::self.world],
                                             cfg.eval_samples, cfg.max_turns, cfg.eval_episodes,
                                             lambda line: self.log(f"eval[{label}] {line}"))
            fast = fast_share_records(self.timed_worker, sampler, slow_fast, cfg.eval_samples)
        records, fast = gather_objects(records, self.world), gather_objects(fast, self.world)
        metrics = {"kind": "eval", "label": label, "step": step, **summarize(records, (1, cfg.eval_samples)),
                   **(summarize_fast_share(fast) if fast else {}), "time_eval": time.perf_counter() - t0}
        if self.rank == 0:
            write_samples(self.out / f"samples-{label}.txt", episodes, self.tokenizer)
        self.write_metrics(metrics)
        self.log(format_eval(metrics))
        return metrics

    # -- plumbing: checkpoints, logging, set-up --------------------------------------------------------------
    def save_checkpoint(self, next_step: int):
        cfg, m = self.cfg, self.models
        save_checkpoint(self.out, self.rank, self.world, m.scorer, m.critic_scorer, self.optimizers,
                        self.lora(), cfg.fsdp, {"step": next_step, "kl_ctl": self.kl_ctl.state_dict()},
                        self.tokenizer, {"temperature": cfg.temperature, "top_p": 1.0})

    def check_references(self):
        """Tasks whose reference solution does not compile or fails its own tests teach the warm start the
        wrong program and time the time reward against it: reported, or dropped with --drop_broken_tasks."""
        problems = data.check_references(self.train_tasks, self.pool) if self.rank == 0 else None
        problems = broadcast_object(problems, self.world)
        for problem in problems[:5]:
            self.log(f"broken reference: {problem}")
        broken = {p.task_id for p in problems}
        if broken and not self.cfg.drop_broken_tasks:
            self.log(f"{len(broken)} tasks have a broken reference (--drop_broken_tasks drops them)")
        elif broken:
            self.train_tasks, self.rl_tasks, self.eval_tasks = ([t for t in tasks if t.task_id not in broken]
                for tasks in (self.train_tasks, self.rl_tasks, self.eval_tasks))
            self.log(f"dropped {len(broken)} tasks with a broken reference: {len(self.train_tasks)} training "
                     f"and {len(self.eval_tasks)} evaluation tasks left")
            if not self.rl_tasks or not self.eval_tasks:
                raise ConfigError("--drop_broken_tasks: no training or evaluation task is left")

    def tiny_warm_start(self) -> Path:
        """The CPU demo has no checkpoint to start from: rank 0 trains one (cached), the others wait."""
        path = tiny_warm_start(self.cfg, self.tokenizer, self.train_tasks, self.log) if self.rank == 0 \
            else None
        return Path(broadcast_object(path, self.world))

    def lora(self) -> tuple | None:
        return (self.cfg.lora_rank, LORA_ALPHA, LORA_TARGETS) if self.cfg.lora_rank else None

    def log(self, message: str):
        if self.rank == 0:
            print(message, flush=True)

    def write_metrics(self, record: dict):
        if self.metrics is not None:
            self.metrics.write(record)


# ----------------------------------------------------------------------------------------------------------
# set-up: models, optimizers, tasks, the tiny warm start


def load_tokenizer(cfg: Config) -> Tokenizer:
    return tokenizer_for(cfg.model_dir, cfg.tokenizer)


def load_tasks(cfg: Config):
    """(training tasks, held-out evaluation tasks)."""
    if cfg.dataset == "synthetic":  # one fixed draw: the shipped warm start learned its training split
        return synthetic_tasks("train"), synthetic_tasks("test")
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
    tasks = data.load_tasks_jsonl(cfg.data_path)  # "tasks": the project's format; they train and evaluate
    return tasks, tasks


def tiny_warm_start(cfg: Config, tokenizer: Tokenizer, train_tasks, log=print) -> Path:
    """The tiny preset's warm-start checkpoint: the repository's, or trained once and cached (sft.py)."""
    return sft.tiny_warm_start(Path(cfg.cache_dir), tokenizer, train_tasks, steps=cfg.warmstart_steps,
                               instruction=cfg.instruction, log=log)


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
            table = [k for k in after
                     if k.startswith(("pass@", "1@", "turn1", "repair")) or k == "fast_share"]
            trainer.log("\n" + "\n".join(f"{k:>12}: {number(before.get(k))} -> {number(after[k])}"
                                         for k in table))
    finally:
        trainer.pool.close()
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
