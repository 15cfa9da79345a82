"""A run's outputs: out_dir, config.json, metrics (file, TensorBoard, console lines), checkpoints, resume.

out_dir/config.json     the resolved configuration; --resume refuses any change that would alter the run
out_dir/metrics.jsonl   one JSON record per iteration and per evaluation: the run's record
out_dir/tensorboard/    the same scalars, when tensorboard is installed
out_dir/checkpoint/     policy/ and critic/ (HF folders: they load in transformers) and trainer.pt
                        (optimizers, KL controller, RNG, step; under FSDP, each rank's optimizer state apart)

Every file is written beside its final name, then renamed: a run killed mid-write keeps the previous one.
"""
from __future__ import annotations

import json
import math
import random
import shutil
from pathlib import Path

import torch
from torch import nn

from cli import ConfigError
from distributed import barrier, full_state_dict, unwrap
from model import Transformer

RUN_OUTPUTS = ("config.json", "metrics.jsonl", "checkpoint", "checkpoint.tmp", "plot.png", "samples-*.txt",
               "tensorboard")


def prepare_out_dir(out: Path, config: dict, resume: bool, overwrite: bool, resumable: set[str]) -> None:
    """A new run never deletes an earlier one without `overwrite`; `resume` continues the run that config.json
    describes and refuses a flag outside `resumable` that differs from it. Writes config.json."""
    saved_file = out / "config.json"
    if resume:
        if not saved_file.exists():
            raise ConfigError(f"--resume: {saved_file} not found: nothing to resume in --out_dir {out}")
        saved = json.loads(saved_file.read_text())
        for name, value in config.items():
            if name not in resumable and name in saved and saved[name] != value:
                raise ConfigError(f"--resume: --{name} {value!r} differs from the run's {saved[name]!r} "
                                  f"({saved_file}); only --steps may change")
    elif earlier := [path for pattern in RUN_OUTPUTS for path in out.glob(pattern)]:
        if not overwrite:
            raise ConfigError(f"--out_dir {out} holds an earlier run: pass --overwrite to replace it, "
                              "--resume to continue it, or another --out_dir")
        for path in earlier:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "config.json.tmp"
    tmp.write_text(json.dumps(config, indent=2) + "\n")
    tmp.replace(saved_file)


class MetricsLog:
    """metrics.jsonl, the run's record, and the same scalars in TensorBoard when it is installed."""

    def __init__(self, out: Path):
        self.path = out / "metrics.jsonl"
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.tensorboard = SummaryWriter(str(out / "tensorboard"))
        except ImportError:
            self.tensorboard = None

    def write(self, record: dict) -> None:
        # NaN (e.g. explained variance of constant returns) is written as null: strict JSON has no NaN
        clean = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps(clean) + "\n")
        if self.tensorboard is not None:
            for key, value in clean.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.tensorboard.add_scalar(f"{record['kind']}/{key}", value, record["step"])
            self.tensorboard.flush()

    def keep_before(self, step: int) -> None:
        """Drop the records written after a checkpoint of `step`, as if the run had never broken."""
        if self.path.exists() and not step:
            self.path.unlink()
        elif self.path.exists():
            records = [json.loads(line) for line in self.path.read_text().splitlines()]
            keep = [r for r in records if r["step"] < step or r.get("label") == "before"]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in keep))


def write_samples(path: Path, episodes: list, tokenizer) -> None:
    """A few evaluation episodes as text, those with the most turns (the sandbox's feedback) first."""
    with open(path, "w") as f:
        for ep in sorted(episodes, key=lambda e: -len(e.turns))[:4]:
            f.write(f"=== task {ep.task.task_id}  reward {ep.reward:+.2f}  passed {ep.passed}\n")
            f.write(ep.text(tokenizer) + "\n\n")


def save_checkpoint(out: Path, rank: int, world: int, scorer: nn.Module, critic_scorer: nn.Module | None,
                    optimizers: list, lora: tuple | None, fsdp: bool, trainer_state: dict, tokenizer,
                    sampling: dict) -> None:
    """checkpoint/policy (a complete HF folder), checkpoint/critic and checkpoint/trainer.pt (trainer_state,
    optimizers, LoRA and head weights, RNG), written into checkpoint.tmp, then renamed. Every rank calls it:
    under FSDP the models are gathered from the shards, and each rank saves its shards' optimizer state."""
    policy = whole_model(scorer, rank, fsdp, lora)  # collectives under FSDP
    critic = whole_model(critic_scorer, rank, fsdp, lora)
    final, tmp = out / "checkpoint", out / "checkpoint.tmp"
    if fsdp:
        barrier(world)
        tmp.mkdir(parents=True, exist_ok=True)
        torch.save([opt.state_dict() for opt in optimizers], tmp / f"optimizer-rank{rank}.pt")
        barrier(world)
    if rank == 0:
        if not fsdp:
            shutil.rmtree(tmp, ignore_errors=True)
        policy.save_pretrained(tmp / "policy", tokenizer=tokenizer, sampling=sampling)
        if critic is not None:
            critic.save_pretrained(tmp / "critic")
        trained = {n: p.detach().cpu() for n, p in policy.named_parameters() if p.requires_grad}
        torch.save({**trainer_state, "optimizers": None if fsdp else [opt.state_dict() for opt in optimizers],
                    "lora_and_head": trained if lora else None, "torch_rng": torch.get_rng_state(),
                    "python_rng": random.getstate()}, tmp / "trainer.pt")
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
    barrier(world)


def whole_model(module: nn.Module | None, rank: int, fsdp: bool, lora: tuple | None) -> Transformer | None:
    """The whole model of a (wrapped) Scorer: as is, or gathered from the FSDP2 shards into an fp32 CPU copy
    on rank 0 (None on the others)."""
    if module is None or not fsdp:
        return None if module is None else unwrap(module).model
    state, model = full_state_dict(module, rank), unwrap(module).model
    if state is None:
        return None
    whole = Transformer(model.config, value_head=model.value_head is not None)
    if lora:
        whole.add_lora(*lora)
    whole.load_state_dict({k.removeprefix("model."): v for k, v in state.items()})
    return whole


def load_weights(path: Path, steps: int, policy: Transformer, critic: Transformer | None, lora: bool,
                 device, log=print) -> dict | None:
    """Load checkpoint/policy and checkpoint/critic into the (unwrapped) models; return trainer.pt's state.
    With LoRA the base stays as loaded, and the adapters and value head come from trainer.pt. None when the
    run was killed before its first checkpoint (the warm start continues from its own)."""
    if not (path / "trainer.pt").exists():
        log(f"--resume: no checkpoint in {path} yet: the iterations start at step 0")
        return None
    state = torch.load(path / "trainer.pt", weights_only=False)
    if steps < state["step"]:
        raise ConfigError(f"--resume: --steps {steps} is below the checkpoint's step {state['step']} "
                          f"({path / 'trainer.pt'}); --steps may only go up")
    if lora:
        policy.load_state_dict(state["lora_and_head"], strict=False)
    for model, folder in ((None if lora else policy, "policy"), (critic, "critic")):
        if model is not None:
            saved = Transformer.from_pretrained(path / folder, dtype=model.embed_tokens.weight.dtype,
                                                device=device, value_head=model.value_head is not None)
            model.load_state_dict(saved.state_dict())
    return state


def load_trainer_state(path: Path, state: dict, optimizers: list, kl_ctl, rank: int, fsdp: bool) -> int:
    """Optimizers, KL controller and RNG from the checkpoint; returns the step to continue from."""
    file = path / (f"optimizer-rank{rank}.pt" if fsdp else "trainer.pt")
    saved = torch.load(file, weights_only=False) if fsdp else state["optimizers"]
    load_optimizer_states(optimizers, saved, file)
    kl_ctl.load_state_dict(state["kl_ctl"])
    torch.set_rng_state(state["torch_rng"])
    random.setstate(state["python_rng"])
    return state["step"]


def load_optimizer_states(optimizers: list, saved: list | None, file: Path) -> None:
    """Load each saved optimizer state into its optimizer, after checking that their numbers of parameters
    match: torch's own check names neither the file nor the cause."""
    def layout(states):
        return [[len(group["params"]) for group in s["param_groups"]] for s in states]

    if saved is None:  # an --fsdp run keeps each rank's optimizer state in optimizer-rank{r}.pt instead
        raise ValueError(f"--resume: {file} holds no optimizer state: the checkpoint was written by an "
                         "--fsdp run; resume with --fsdp")
    have = layout(opt.state_dict() for opt in optimizers)
    if layout(saved) != have:
        raise ValueError(
            f"--resume: {file} holds {len(saved)} optimizer state(s) with parameter counts {layout(saved)}, "
            f"but this run's optimizers have {have} (the policy's first, then the critic's). Resume with the "
            "--algo, --critic and --lora_rank the checkpoint was written with.")
    for opt, opt_state in zip(optimizers, saved):
        opt.load_state_dict(opt_state)


# -- the console ------------------------------------------------------------------------------------------

def format_step(m: dict, steps: int) -> str:
    parts = [f"step {m['step'] + 1:4d}/{steps}", f"reward {m['reward']:+.3f}", f"pass {m['pass_rate']:.2f}",
             f"len {m['response_len']:.0f}"]
    for key, label, spec in (("kl_ref", "kl", ".4f"), ("approx_kl", "akl", ".4f"),
                             ("clipfrac", "clip", ".2f"), ("entropy", "ent", ".2f"),
                             ("explained_variance", "ev", ".2f"), ("sft_loss", "sft", ".3f"),
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
