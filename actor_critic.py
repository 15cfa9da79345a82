"""The models as train.py trains them: the policy, its critic and the frozen reference, their training forward
(`Scorer`: per-token logprobs at the sampling temperature, entropy and values, in chunks of similar length),
and the update loops that put ppo.py's losses through them: PPO's clipped epochs and expert iteration, with
gradient accumulation, DDP's gradient sync once per optimizer step, and clipping.
"""
from __future__ import annotations

import copy
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

import ppo
from distributed import finite_on_every_rank, kept_rows, no_sync_unless, unwrap
from kernels import fused_linear_logprobs
from model import Transformer


def ppo_update(models: Models, optimizers: list, b, generator, world: int = 1, *, minibatch_size: int,
               micro_batch_size: int, epochs: int, clip_eps: float, loss_kl: float, max_grad_norm: float,
               value_clip: float, vf_coef: float) -> dict:
    """PPO's optimisation phase: `epochs` passes of shuffled minibatches over the batch (a ppo.Batch with its
    advantages), micro-batches accumulating gradients of ppo.ppo_loss; a NaN/inf loss or gradient skips the
    optimizer step (the weights are untouched)."""
    stats = defaultdict(list)
    skipped, lengths = 0, row_lengths(b.mask)
    for micro_batches in ppo.minibatches(len(b.mask), minibatch_size, micro_batch_size, epochs, generator):
        micro_batches = regroup_by_length(micro_batches, lengths, micro_batch_size)
        n_tokens = sum(int(b.mask[rows].sum()) for rows in micro_batches)
        n_values = 0 if b.returns is None else sum(int(b.value_mask[rows].sum()) for rows in micro_batches)
        finite = True
        for j, rows in enumerate(micro_batches):
            mb = b.select(rows, used_length(b.mask[rows]))  # cut the right padding the rows share
            sync = j == len(micro_batches) - 1
            with no_sync_unless(models.scorer, sync), no_sync_unless(models.critic_scorer, sync):
                logp, entropy, values = models.scorer(mb.inputs, mb.targets)
                if models.critic_scorer is not None:
                    values = models.critic_scorer(mb.inputs, mb.targets, False)[2]
                loss, mb_stats = ppo.ppo_loss(mb, logp, entropy, values, clip_eps=clip_eps, vf_coef=vf_coef,
                                              value_clip=value_clip, loss_kl=loss_kl, n_tokens=n_tokens,
                                              n_value_steps=n_values)
                finite &= finite_on_every_rank(loss, world)
                if finite:
                    loss.backward()
            for k, v in mb_stats.items():
                stats[k].append(v)
        skipped += not clip_and_step(optimizers, max_grad_norm, stats, finite)
    return {**{k: sum(v) / len(v) for k, v in stats.items() if v}, "skipped_updates": skipped}


def expert_iteration_update(models: Models, optimizers: list, b, generator, world: int = 1, *,
                            minibatch_size: int, micro_batch_size: int, epochs: int,
                            max_grad_norm: float) -> dict:
    """ReST-EM's M-step (ppo.rest_em_weights, ppo.rest_em_loss): maximise the reward-weighted likelihood of
    the final turn of every passing episode. Only rows with weight go through the model (`kept_rows`)."""
    keep = ppo.rest_em_weights(b)                                                   # (B, T)
    rows = kept_rows(keep, world)
    if rows.numel() == 0:  # nothing passed on any rank: no step (Adam's momentum would still move weights)
        return {"sft_loss": 0.0}
    losses, lengths = [], row_lengths(b.mask)
    for micro_batches in ppo.minibatches(rows.numel(), minibatch_size, micro_batch_size, epochs, generator):
        micro_batches = regroup_by_length([rows[idx] for idx in micro_batches], lengths, micro_batch_size)
        n_kept = max(sum(int((keep[idx] > 0).sum()) for idx in micro_batches), 1)
        minibatch_loss = 0.0  # each micro-batch's part is already divided by the minibatch's count: sum them
        for j, idx in enumerate(micro_batches):
            T = used_length(b.mask[idx])
            with no_sync_unless(models.scorer, j == len(micro_batches) - 1):
                logp, _, _ = models.scorer(b.inputs[idx, :T], b.targets[idx, :T])
                loss = ppo.rest_em_loss(logp, keep[idx, :T], n_kept)
                loss.backward()
            minibatch_loss += loss.item()
        losses.append(minibatch_loss)
        clip_and_step(optimizers, max_grad_norm)
    return {"sft_loss": sum(losses) / len(losses)}


class Scorer(nn.Module):
    """The training forward as one module, for DDP/FSDP: logprobs of `targets` at the sampling temperature
    (the (tokens, vocab) logits never exist in full), their entropy, and the value head's values."""

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
        lm_head = self.model.lm_head.weight.to(h.dtype)  # fp32 master weights, activations' dtype
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


def build_models(model_dir: Path, device, dtype: torch.dtype, *, critic: str | None, lora: tuple | None,
                 reference: bool, temperature: float, chunk: int) -> Models:
    """Policy (+ LoRA adapters: lora = (rank, alpha, targets)), frozen reference, critic ("separate", "head",
    "probe", or None). What is trained keeps fp32 master weights; what is frozen (the reference, a LoRA base)
    stays in `dtype`, the activations' dtype."""
    policy = Transformer.from_pretrained(model_dir, dtype=dtype, device=device,
                                         value_head=critic in ("head", "probe"))
    if lora:
        policy.add_lora(*lora)
    frozen = copy.deepcopy(policy).requires_grad_(False).eval() if reference and not lora else None
    policy.mixed_precision_(dtype)
    separate = None
    if critic == "separate":  # RLEF: the critic starts from the policy, with a fresh head
        separate = Transformer.from_pretrained(model_dir, dtype=dtype, device=device, value_head=True)
        if not separate.config.tie_word_embeddings:  # the critic never uses its lm_head: out of DDP's way
            separate.lm_head.requires_grad_(False)
        separate.mixed_precision_(dtype)
    critic_scorer = Scorer(separate, temperature, chunk) if separate else None
    scorer = Scorer(policy, temperature, chunk, probe=critic == "probe")
    return Models(policy, separate, frozen, scorer, critic_scorer)


def build_optimizers(m: Models, lr: float, critic_lr: float) -> list:
    """AdamW for the policy at lr, and for the critic's own parameters at critic_lr: the separate critic, or
    the value head on the policy trunk. A fresh linear head needs far larger steps than a pretrained trunk."""
    head = unwrap(m.scorer).model.value_head
    head_params = [p for p in head.parameters() if p.requires_grad] if head is not None else []
    in_head = {id(p) for p in head_params}
    policy = [p for p in m.scorer.parameters() if p.requires_grad and id(p) not in in_head]
    optimizers = [torch.optim.AdamW(policy, lr=lr, weight_decay=0.0)]
    critic = [p for p in m.critic_scorer.parameters() if p.requires_grad] if m.critic_scorer is not None \
        else head_params
    if critic:
        optimizers.append(torch.optim.AdamW(critic, lr=critic_lr, weight_decay=0.0))
    return optimizers


@torch.no_grad()
def forward_in_chunks(scorer: nn.Module, b, micro: int, want_logprobs=True):
    """Old logprobs and values with the training forward, not the sampler's numbers. Rows go shortest first,
    each chunk cut to its longest row: episodes differ in length up to 3x. Padding columns hold arbitrary
    numbers, as in any padded forward: every use masks them."""
    B, T = b.inputs.shape
    logps = values = None
    for rows in row_lengths(b.mask).argsort().split(micro):
        t = used_length(b.mask[rows])
        logp, _, v = unwrap(scorer)(b.inputs[rows, :t], b.targets[rows, :t], want_logprobs)
        if logp is not None:
            logps = logps if logps is not None else logp.new_zeros(B, T)
            logps[rows, :t] = logp
        if v is not None:
            values = values if values is not None else v.new_zeros(B, T)
            values[rows, :t] = v
    return logps, values


def used_length(mask: torch.Tensor) -> int:
    """Columns up to the last action token of any row in `mask` (B, T): the rest is right padding shared by
    all rows, and a causal model's outputs before it do not depend on it."""
    return int(mask.any(0).nonzero().max()) + 1 if mask.any() else 1


def row_lengths(mask: torch.Tensor) -> torch.Tensor:
    """(B, T) action mask -> (B,) columns each row needs: up to its last action token."""
    return mask.shape[1] - mask.flip(1).int().argmax(1)


def regroup_by_length(micro_batches: list[torch.Tensor], lengths: torch.Tensor, micro: int) -> list:
    """One minibatch's rows in micro-batches of similar length, shortest first: the gradient is the same sum,
    with far less padding."""
    rows = torch.cat(micro_batches)
    return list(rows[lengths[rows].argsort()].split(micro))


def clip_and_step(optimizers: list, max_norm: float, stats: dict | None = None,
                  loss_finite: bool = True) -> bool:
    """Clip the policy's (optimizers[0]) and the critic's gradients apart, as a fresh value head's gradient
    would shrink the policy's step in one joint clip; step only if every norm is finite (under FSDP a norm is
    reduced across ranks, so all ranks agree). Gradients are cleared either way."""
    norms = [torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], max_norm)
             for opt in optimizers]
    ok = loss_finite and all(bool(torch.isfinite(norm)) for norm in norms)
    if ok:
        if stats is not None:
            for name, norm in zip(("grad_norm_policy", "grad_norm_critic"), norms):
                stats[name].append(float(norm))
        for opt in optimizers:
            opt.step()
    for opt in optimizers:
        opt.zero_grad(set_to_none=True)
    return ok
