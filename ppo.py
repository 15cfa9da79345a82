"""The method: PPO, GRPO and ReST-EM for RLEF as pure tensor functions (rewards, KL, advantages, losses).

Nothing here touches the sandbox, the model or the data: every function takes tensors and returns tensors,
so each one is tested by hand in tests/test_ppo.py. train.py runs them in this order: `advantages` once per
iteration, then `ppo_loss` (or `rest_em_loss`) on every micro-batch.

Tensor layout. A batch of B episodes is right-padded to (B, T) token tensors (`Batch` lists its fields):
  action_mask      (B, T) bool   True on tokens the policy sampled; prompt, feedback and padding are False
  logprobs, old_logprobs, ref_logprobs
                   (B, T) float32 per-token logprobs at the sampling temperature (0 where not an action)
  values           (B, T) float32 token-level critic outputs
  turn_ids         (B, T) long   turn index of each action token, -1 for non-actions
  turn_value_index (B, K) long   position of the last prompt token of each turn (turn-level critic, RLEF)
  turn_mask        (B, K) bool   True for turns that exist; turns are a prefix: turn k exists => k-1 exists
  scores           (B,)   float32 the episode's scalar reward, credited on its last action token (last turn)
  turn_rewards     (B, K) float32 optional extra per-turn rewards, credited on each turn's last action token

Averaging. Losses and statistics only ever see action tokens (or existing turns). A loss is the mean over
all action tokens of the minibatch, so long responses weigh more (as in CleanRL, TRL and DAPO). With gradient
accumulation, pass the minibatch's token count as `normalizer` to every micro-batch loss: the summed
micro-batch gradients then equal the gradient of the minibatch mean.

References.
  PPO:   Schulman et al. 2017, "Proximal Policy Optimization Algorithms", eq. 7 (clip) and eq. 9 (total loss).
  GAE:   Schulman et al. 2016, "High-Dimensional Continuous Control Using Generalized Advantage Estimation",
         eq. 16: A_t = sum_l (gamma lambda)^l delta_{t+l}, delta_t = r_t + gamma V(s_{t+1}) - V(s_t).
  RLEF:  Gehring et al. 2024, "RLEF: Grounding Code LLMs in Execution Feedback with Reinforcement Learning":
         a turn (a whole response) is one action; the value is predicted at the last prompt token of the
         turn; the KL penalty is the per-turn mean log ratio (the log of the geometric mean of the token
         ratios) times beta; every token of a turn shares the turn's advantage.
  GRPO:  Shao et al. 2024, "DeepSeekMath", section 4.1.2: A_i = (r_i - mean(r)) / std(r) over a task's group.
  Dr. GRPO: Liu et al. 2025, "Understanding R1-Zero-Like Training": do not divide by the group std.
  KL:    Schulman 2020, "Approximating KL Divergence" (k1, k3); Ziegler et al. 2019, "Fine-Tuning Language
         Models from Human Preferences", section 2.2 (adaptive KL coefficient).
  ReST-EM: Singh et al. 2023, "Beyond Human Data: Scaling Self-Training for Problem-Solving with Language
         Models", section 3: the M-step maximises the reward-weighted log-likelihood of the policy's samples.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import Tensor

from kernels import kl_k1, kl_k3

KL_PLACEMENTS = ("reward", "loss")
TOKEN_FIELDS = ("inputs", "targets", "mask", "turn_ids", "old_logprobs", "ref_logprobs", "values",
                "advantages")
VALUE_FIELDS = ("returns", "value_mask", "old_values")


@dataclass
class Batch:
    """One iteration's episodes, right-padded and shifted: position t predicts token t + 1."""
    inputs: Tensor            # (B, T) long   the episode's tokens but the last
    targets: Tensor           # (B, T) long   the episode's tokens but the first: what each position predicts
    mask: Tensor              # (B, T) bool   the target is an action (a token the policy sampled)
    turn_ids: Tensor          # (B, T) long   the turn of each action target, -1 elsewhere
    turn_mask: Tensor         # (B, K) bool   the turns that exist (a prefix of each row)
    turn_value_index: Tensor  # (B, K) long   each turn's last prompt position: where RLEF reads its value
    turn_rewards: Tensor      # (B, K) float  each turn's reward (the last turn's holds the final reward)
    rewards: Tensor           # (B,)   float  the episode's reward (the sum of its turns')
    truncated: Tensor         # (B,)   bool   a response was cut off by the length limit
    passed: Tensor            # (B,)   bool   the final code passed the private tests
    groups: Tensor            # (B,)   long   the task of each episode: GRPO's groups
    # filled in each iteration: the training forward passes, then `advantages`
    old_logprobs: Tensor | None = None  # (B, T) the policy's, before the update
    ref_logprobs: Tensor | None = None  # (B, T) the frozen reference's
    values: Tensor | None = None        # (B, T) the critic's, before the update
    advantages: Tensor | None = None    # (B, T)
    returns: Tensor | None = None       # (B, K) turn-level or (B, T) token-level value targets
    value_mask: Tensor | None = None    # where the returns apply: turn_mask or mask
    old_values: Tensor | None = None    # the values at the critic's steps, for the value clip
    turn_level: bool = True             # returns, value_mask and old_values are per turn (else per token)

    @classmethod
    def from_collated(cls, c: dict, passed: Tensor, groups: Tensor, device=None) -> Batch:
        """From rollout.collate's padded tensors: inputs drop the last token, targets and every per-token
        field the first; a turn's value is read at its last prompt token, start - 1."""
        fields = dict(inputs=c["tokens"][:, :-1], targets=c["tokens"][:, 1:], mask=c["action_mask"][:, 1:],
                      turn_ids=c["turn_ids"][:, 1:], turn_mask=c["turn_mask"],
                      turn_value_index=c["turn_starts"] - 1,
                      turn_rewards=c["turn_rewards"], rewards=c["rewards"], truncated=c["truncated"],
                      passed=passed, groups=groups)
        return cls(**{k: v.to(device) for k, v in fields.items()})

    def select(self, rows: Tensor, T: int) -> Batch:
        """The micro-batch of `rows`, its per-token fields cut to their first T columns."""
        def cut(name: str, x):
            if not isinstance(x, Tensor):
                return x
            per_token = name in TOKEN_FIELDS or (name in VALUE_FIELDS and not self.turn_level)
            return x[rows, :T] if per_token else x[rows]
        return Batch(**{f.name: cut(f.name, getattr(self, f.name)) for f in dataclasses.fields(self)})


# -- masked statistics ------------------------------------------------------------------------------------

def _check_mask(mask: Tensor, like: Tensor) -> None:
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor, got {mask.dtype}")
    if mask.shape != like.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match {tuple(like.shape)}")


def masked_sum(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    # torch.where, not x * mask: a NaN/inf at a padding position must not leak into the sum (0 * inf = nan)
    _check_mask(mask, x)
    masked = torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))
    return masked.sum() if dim is None else masked.sum(dim)


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of x over mask (all of it, or along dim). An empty mask gives 0, not NaN."""
    count = mask.sum() if dim is None else mask.sum(dim)
    return masked_sum(x, mask, dim) / count.clamp(min=1)


def masked_var(x: Tensor, mask: Tensor) -> Tensor:
    """Population variance of x over mask (no Bessel correction: a single element has variance 0)."""
    mean = masked_mean(x, mask)
    return masked_mean((x - mean) ** 2, mask)


def masked_whiten(x: Tensor, mask: Tensor, eps: float = 1e-8) -> Tensor:
    """(x - mean) / std with the statistics of the masked entries; zero outside the mask."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    return torch.where(mask, (x - mean) * torch.rsqrt(var + eps), 0.0)


def token_mean(x: Tensor, mask: Tensor, normalizer: float | Tensor | None = None) -> Tensor:
    """Sum of a (B, T) loss over the mask / normalizer (default: the mask's token count)."""
    return masked_sum(x, mask) / (mask.sum().clamp(min=1) if normalizer is None else normalizer)


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> float:
    """1 - Var(returns - values) / Var(returns) over the mask (CleanRL's diagnostic). 1 is a perfect critic,
    0 is no better than a constant; NaN when the returns have zero variance (undefined, as in CleanRL)."""
    values, returns = values.detach().float(), returns.detach().float()
    var_returns = masked_var(returns, mask)
    if var_returns.item() == 0.0:
        return float("nan")
    return (1.0 - masked_var(returns - values, mask) / var_returns).item()


# -- KL (k1 and k3 are in kernels/) and its coefficient -------------------------------------------------

def kl_stats(logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor) -> dict:
    """k1 to the reference per sampled token (kl_ref) and summed per episode (kl_episode, which the adaptive
    controller steers), averaged over the batch."""
    kl = kl_k1(logprobs, ref_logprobs)
    return {"kl_ref": float(masked_mean(kl, mask)), "kl_episode": float(masked_sum(kl, mask, dim=1).mean())}


def per_turn_mean(x: Tensor, turn_ids: Tensor, num_turns: int) -> Tensor:
    """(B, T) per-token values -> (B, K) mean over the tokens of each turn (0 for turns without tokens).
    Of k1, this is RLEF's per-turn KL: the log of the geometric mean of the turn's token ratios."""
    if turn_ids.numel() and turn_ids.max().item() >= num_turns:
        raise ValueError(f"turn_ids holds turn {turn_ids.max().item()} but num_turns is {num_turns}")
    is_action = turn_ids >= 0
    index = turn_ids.clamp(min=0)
    zeros = torch.zeros(x.shape[0], num_turns, dtype=torch.float32, device=x.device)
    sums = zeros.scatter_add(1, index, torch.where(is_action, x.float(), 0.0))
    counts = zeros.scatter_add(1, index, is_action.float())
    return sums / counts.clamp(min=1)


def split_kl_coef(placement: str, kl_coef: float) -> tuple[float, float]:
    """(coefficient in the reward, coefficient in the loss): the KL goes in exactly one place, "reward" (k1
    subtracted from the reward, PPO-RLHF) or "loss" (k3 added to the loss, GRPO)."""
    if placement not in KL_PLACEMENTS:
        raise ValueError(f"kl_placement must be one of {KL_PLACEMENTS}, got {placement!r}")
    return (kl_coef, 0.0) if placement == "reward" else (0.0, kl_coef)


class FixedKLController:
    """A constant KL coefficient."""

    def __init__(self, kl_coef: float):
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        pass

    def state_dict(self) -> dict:
        return dict(vars(self))

    def load_state_dict(self, state: dict) -> None:
        vars(self).update(state)


class AdaptiveKLController(FixedKLController):
    """Ziegler et al. 2019, section 2.2: steer the observed KL towards a target.
        e = clip(KL / target - 1, -0.2, 0.2);  beta <- beta * (1 + e * n_steps / horizon)
    KL is per sequence (k1 summed over an episode's sampled tokens, averaged over episodes), as in Ziegler et
    al. and TRL (whose default target is 6 nats); n_steps is the episodes seen since the last update."""

    def __init__(self, init_kl_coef: float, target: float, horizon: int):
        if target <= 0 or horizon <= 0:
            raise ValueError(f"AdaptiveKLController: need target, horizon > 0, got {target}, {horizon}")
        self.value, self.target, self.horizon = float(init_kl_coef), float(target), int(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        proportional_error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + proportional_error * n_steps / self.horizon


# -- rewards ----------------------------------------------------------------------------------------------

def last_true_index(mask: Tensor) -> Tensor:
    """(B, L) bool -> (B,) long: position of the last True of each row. Every row must have one."""
    if not bool(mask.any(-1).all()):
        rows = (~mask.any(-1)).nonzero().flatten().tolist()
        raise ValueError(f"rows {rows} have no True entry in the mask (no action token / no turn)")
    positions = torch.arange(mask.shape[-1], device=mask.device).expand_as(mask)
    return torch.where(mask, positions, -1).max(-1).values


def token_level_rewards(scores: Tensor, action_mask: Tensor, kl: Tensor | None = None, kl_coef: float = 0.0,
                        turn_ids: Tensor | None = None, turn_rewards: Tensor | None = None) -> Tensor:
    """(B, T) per-token rewards for token-level GAE (Ziegler et al. 2019; InstructGPT): r_t = -kl_coef * kl_t
    (kl: per-token k1) on every action token, plus scores[b] on the episode's last action token, plus
    turn_rewards[b, k] on the last action token of turn k (needs turn_ids). Zero outside the action mask."""
    B, T = action_mask.shape
    if scores.shape != (B,):
        raise ValueError(f"scores must have shape ({B},), got {tuple(scores.shape)}")
    rewards = torch.zeros(B, T, dtype=torch.float32, device=action_mask.device)
    if kl is not None and kl_coef != 0.0:
        rewards -= kl_coef * torch.where(action_mask, kl.float(), 0.0)
    rows = torch.arange(B, device=action_mask.device)
    rewards[rows, last_true_index(action_mask)] += scores.float()
    for k in range(0 if turn_rewards is None else turn_rewards.shape[1]):  # a few turns: a loop reads best
        in_turn = turn_ids == k
        has = in_turn.any(-1)
        rewards[rows[has], last_true_index(in_turn[has])] += turn_rewards[has, k].float()
    return rewards


def turn_level_rewards(scores: Tensor, turn_mask: Tensor, turn_kl: Tensor | None = None, kl_coef: float = 0.0,
                       turn_rewards: Tensor | None = None) -> Tensor:
    """(B, K) per-turn rewards for RLEF's turn-level GAE: the episode score on the last existing turn,
    minus kl_coef * turn_kl (per_turn_mean of k1) on every turn, plus optional turn_rewards. Zero on
    missing turns."""
    if bool((turn_mask[:, 1:] & ~turn_mask[:, :-1]).any()):
        raise ValueError("turn_mask must be a prefix per row: turn k exists only if turn k-1 exists")
    B, K = turn_mask.shape
    if scores.shape != (B,):
        raise ValueError(f"scores must have shape ({B},), got {tuple(scores.shape)}")
    rewards = torch.zeros(B, K, dtype=torch.float32, device=turn_mask.device)
    rewards[torch.arange(B, device=turn_mask.device), last_true_index(turn_mask)] += scores.float()
    if turn_kl is not None and kl_coef != 0.0:
        rewards -= kl_coef * turn_kl.float()
    if turn_rewards is not None:
        rewards += turn_rewards.float()
    return torch.where(turn_mask, rewards, 0.0)


# -- advantages -------------------------------------------------------------------------------------------

def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """Generalized Advantage Estimation (Schulman et al. 2016, eq. 16) over the masked steps of each row:
      delta_t = r_t + gamma * V_next - V_t;  A_t = delta_t + gamma * lam * A_next;  return_t = A_t + V_t
    rewards, values, mask (B, L); the steps are action tokens, or turns. Unmasked positions are skipped, so
    the first action token after feedback bootstraps the last one before it; after the last step V = 0.
    Returns (advantages, returns), (B, L) float32, zero outside the mask. Values are detached."""
    _check_mask(mask, rewards)
    if values.shape != rewards.shape:
        raise ValueError(f"values shape {tuple(values.shape)} does not match rewards {tuple(rewards.shape)}")
    if bool((torch.where(mask, 0.0, rewards.float()) != 0).any()):
        raise ValueError("rewards are non-zero outside the mask: they would be silently dropped")
    rewards, values = rewards.float(), values.detach().float()
    B, L = rewards.shape
    advantages = torch.zeros(B, L, dtype=torch.float32, device=rewards.device)
    next_value = torch.zeros(B, dtype=torch.float32, device=rewards.device)  # V of the next masked step
    next_adv = torch.zeros(B, dtype=torch.float32, device=rewards.device)    # A of the next masked step
    for t in reversed(range(L)):
        m = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        adv = delta + gamma * lam * next_adv
        advantages[:, t] = torch.where(m, adv, 0.0)
        next_value = torch.where(m, values[:, t], next_value)  # unmasked steps carry the bootstrap through
        next_adv = torch.where(m, adv, next_adv)
    return advantages, torch.where(mask, advantages + values, 0.0)


def gather_turn_values(values: Tensor, turn_value_index: Tensor, turn_mask: Tensor) -> Tensor:
    """(B, T) critic outputs -> (B, K) turn values read at the last prompt token of each turn (RLEF)."""
    bad = turn_mask & ((turn_value_index < 0) | (turn_value_index >= values.shape[1]))
    if bool(bad.any()):
        raise ValueError(f"turn_value_index out of range [0, {values.shape[1]}) on existing turns")
    picked = values.gather(1, turn_value_index.clamp(0, values.shape[1] - 1))
    return torch.where(turn_mask, picked, torch.zeros((), dtype=values.dtype, device=values.device))


def turn_to_tokens(x: Tensor, turn_ids: Tensor) -> Tensor:
    """(B, K) per-turn values -> (B, T): each action token gets its turn's value, non-actions get 0."""
    if turn_ids.numel() and turn_ids.max().item() >= x.shape[1]:
        raise ValueError(f"turn_ids holds turn {turn_ids.max().item()}, but there are {x.shape[1]} turns")
    picked = x.gather(1, turn_ids.clamp(min=0))
    return torch.where(turn_ids >= 0, picked, torch.zeros((), dtype=x.dtype, device=x.device))


def turn_level_advantages(turn_rewards: Tensor, turn_values: Tensor, turn_mask: Tensor, turn_ids: Tensor,
                          gamma: float, lam: float) -> tuple[Tensor, Tensor, Tensor]:
    """RLEF: GAE over turns (a turn is one action), then every token of a turn shares the turn's advantage.
    turn_*: (B, K), turn_ids (B, T) -> (token advantages (B, T), turn advantages, turn returns (B, K): the
    turn-level value loss's targets)."""
    turn_adv, turn_ret = gae(turn_rewards, turn_values, turn_mask, gamma, lam)
    return turn_to_tokens(turn_adv, turn_ids), turn_adv, turn_ret


def grpo_advantages(scores: Tensor, group_ids: Tensor, scale_by_std: bool = True,
                    eps: float = 1e-6) -> Tensor:
    """GRPO outcome advantages (Shao et al. 2024, section 4.1.2): (r - mean_group) / (std_group + eps), std
    unbiased as torch.std (TRL, verl); scale_by_std=False is Dr. GRPO (Liu et al. 2025): r - mean_group.
    scores (B,); group_ids (B,) long: the samples of one task share an id (any order)."""
    if scores.dim() != 1 or group_ids.shape != scores.shape:
        raise ValueError(f"scores and group_ids must both be (B,), got {tuple(scores.shape)}, "
                         f"{tuple(group_ids.shape)}")
    advantages = torch.zeros(scores.shape, dtype=torch.float32, device=scores.device)
    for g in group_ids.unique():  # a few groups (tasks): a loop reads better than scatters
        members = group_ids == g
        r = scores[members].float()
        if (r != r[0]).any():  # equal scores (or one sample) carry no signal: exactly 0, not noise / eps
            centred = r - r.mean()
            advantages[members] = centred / (r.std() + eps) if scale_by_std else centred
    return advantages


def advantages(b: Batch, algo: str, advantage: str, kl_placement: str, kl_coef: float, gamma: float,
               lam: float, truncation_penalty: float) -> tuple[Tensor, Tensor | None, Tensor | None,
                                                               Tensor | None]:
    """Rewards -> (token advantages, value targets, their mask, old values at the critic's steps).

    GRPO / Dr. GRPO: the group-normalised outcome rewards on every token, no critic (DeepSeekMath 4.1.2). PPO,
    advantage "turn": RLEF's GAE over turns, the turn's advantage on all its tokens; "token": GAE over action
    tokens. PPO whitens its advantages over the batch's action tokens; GRPO's are normalised within each
    task's group already: re-normalising them over the batch would give a group of equal scores a non-zero
    advantage, and shift a group's advantages with its responses' lengths."""
    mask = b.mask
    reward_kl, _ = split_kl_coef(kl_placement, kl_coef)
    kl = kl_k1(b.old_logprobs, b.ref_logprobs) if b.ref_logprobs is not None else None
    penalty = -truncation_penalty * b.truncated.float()  # (B,) on episodes that hit the length limit
    if algo in ("grpo", "dr_grpo"):
        scores = grpo_advantages(b.rewards + penalty, b.groups, scale_by_std=algo == "grpo")
        return torch.where(mask, scores[:, None], 0.0), None, None, None
    if advantage == "turn":
        turn_kl = per_turn_mean(kl, b.turn_ids, b.turn_mask.shape[1]) if kl is not None else None
        r = turn_level_rewards(penalty, b.turn_mask, turn_kl, reward_kl, b.turn_rewards)
        v = gather_turn_values(b.values, b.turn_value_index, b.turn_mask)
        adv, _, turn_returns = turn_level_advantages(r, v, b.turn_mask, b.turn_ids, gamma, lam)
        return masked_whiten(adv, mask), turn_returns, b.turn_mask, v
    r = token_level_rewards(penalty, mask, kl, reward_kl, b.turn_ids, b.turn_rewards)
    adv, returns = gae(r, b.values, mask, gamma, lam)
    return masked_whiten(adv, mask), returns, mask, b.values


# -- losses -----------------------------------------------------------------------------------------------

def policy_loss(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor,
                clip_eps: float = 0.2, normalizer: float | Tensor | None = None
                ) -> tuple[Tensor, Tensor, Tensor]:
    """PPO clipped surrogate (Schulman et al. 2017, eq. 7), as a loss to minimise:
    ratio = exp(logp - old_logp);  loss_t = max(-A_t * ratio, -A_t * clip(ratio, 1 - eps, 1 + eps))
    Returns (loss, clipfrac, approx_kl), detached statistics: the fraction of tokens where the clipped term
    is the active one, and mean((ratio - 1) - log ratio), the k3 estimate of KL(old || new) (CleanRL)."""
    # where before exp: garbage at padding must neither overflow nor send NaN gradients through exp.
    log_ratio = torch.where(mask, logprobs - old_logprobs.detach(), 0.0)
    ratio = torch.exp(log_ratio)
    advantages = advantages.detach()
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    loss = token_mean(torch.maximum(unclipped, clipped), mask, normalizer)
    with torch.no_grad():
        clipfrac = masked_mean((clipped > unclipped).float(), mask)
        approx_kl = masked_mean((ratio - 1.0) - log_ratio, mask)
    return loss, clipfrac, approx_kl


def value_loss(values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor,
               clip_range: float | None = 0.2, normalizer: float | Tensor | None = None
               ) -> tuple[Tensor, Tensor]:
    """Clipped value loss (OpenAI baselines' PPO2, CleanRL), over tokens or turns; clip_range None: no clip.
    0.5 * max((V - R)^2, (V_old + clip(V - V_old, -c, c) - R)^2)
    Returns (loss, clipfrac): the fraction where the clipped error is the larger one (detached)."""
    zero = torch.zeros((), dtype=values.dtype, device=values.device)
    values = torch.where(mask, values, zero)  # padding garbage must not reach the squares or their gradients
    old_values = torch.where(mask, old_values.detach(), zero)
    returns = torch.where(mask, returns.detach(), zero)
    unclipped = (values - returns) ** 2
    if clip_range is None:
        return token_mean(0.5 * unclipped, mask, normalizer), torch.zeros((), device=values.device)
    clipped_values = old_values + torch.clamp(values - old_values, -clip_range, clip_range)
    clipped = (clipped_values - returns) ** 2
    loss = token_mean(0.5 * torch.maximum(unclipped, clipped), mask, normalizer)
    with torch.no_grad():
        clipfrac = masked_mean((clipped > unclipped).float(), mask)
    return loss, clipfrac


def kl_loss(logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor,
            normalizer: float | Tensor | None = None) -> Tensor:
    """KL in the loss (GRPO, Shao et al. 2024 eq. 4): k3 of KL(pi || pi_ref) over the action tokens."""
    # mask the inputs, not only the output: exp() of garbage at padding would send NaN gradients back.
    logp = torch.where(mask, logprobs, 0.0)
    logq = torch.where(mask, ref_logprobs.detach(), 0.0)
    return token_mean(kl_k3(logp, logq), mask, normalizer)


def ppo_loss(b: Batch, logprobs: Tensor, entropy: Tensor, values: Tensor | None, *, clip_eps: float,
             value_clip: float, vf_coef: float, loss_kl: float, n_tokens: int, n_value_steps: int
             ) -> tuple[Tensor, dict]:
    """One micro-batch's share of the minibatch loss, PPO eq. 9 without the entropy bonus: the clipped policy
    loss, + vf_coef * the clipped value loss when the batch has value targets, + loss_kl * GRPO's k3 KL
    (eq. 3) when the KL is in the loss. `b` is the micro-batch (Batch.select), logprobs, entropy and values
    the model's new outputs on it. The sums are divided by the minibatch's action tokens (n_tokens) and value
    steps (turns or tokens): the micro-batches' gradients add up to the minibatch mean's."""
    pg, clipfrac, approx_kl = policy_loss(logprobs, b.old_logprobs, b.advantages, b.mask, clip_eps, n_tokens)
    stats = {"pg_loss": pg.item(), "clipfrac": clipfrac.item(), "approx_kl": approx_kl.item(),
             "entropy": masked_mean(entropy.detach(), b.mask).item()}
    loss = pg
    if b.returns is not None:
        new = gather_turn_values(values, b.turn_value_index, b.turn_mask) if b.turn_level else values
        vf, _ = value_loss(new, b.old_values, b.returns, b.value_mask, value_clip or None,
                           max(n_value_steps, 1))
        loss = loss + vf_coef * vf
        stats["vf_loss"] = vf.item()
    if loss_kl:
        loss = loss + loss_kl * kl_loss(logprobs, b.ref_logprobs, b.mask, n_tokens)
    return loss, stats


def rest_em_weights(b: Batch) -> Tensor:
    """(B, T) weights of ReST-EM's likelihood (Singh et al. 2023, section 3): the final turn of every passing
    episode, weighted by its reward (reward-weighted regression, Peters & Schaal 2007). With no time reward
    the reward of a pass is 1, ReST-EM's binary filter exactly; with one, a fast program weighs up to 1 +
    time_weight and a slow one down to 1 - time_weight, which is how the time reward reaches this method."""
    n_turns = b.turn_mask.sum(1, keepdim=True)                                      # (B, 1)
    last_turn = b.turn_ids == (n_turns - 1)
    final_reward = b.turn_rewards.gather(1, n_turns - 1).clamp(min=0)               # (B, 1)
    return (b.mask & last_turn & b.passed[:, None]) * final_reward


def rest_em_loss(logprobs: Tensor, weights: Tensor, n_kept: int) -> Tensor:
    """-sum(w * logp) / n_kept, n_kept the minibatch's tokens with weight (their mean NLL when w is 1)."""
    return -(logprobs * weights).sum() / n_kept


# -- minibatches ------------------------------------------------------------------------------------------

def minibatches(n: int, minibatch_size: int, micro_batch_size: int, epochs: int,
                generator: torch.Generator | None = None) -> Iterator[list[Tensor]]:
    """`epochs` shuffled passes over n episodes (PPO's optimisation phase): yields, per optimizer step, the
    micro-batches' index tensors whose gradients accumulate. The last minibatch of an epoch and the last
    micro-batch of a minibatch may be smaller: no episode is dropped."""
    if n <= 0 or minibatch_size <= 0 or micro_batch_size <= 0 or epochs <= 0:
        raise ValueError(f"minibatches needs positive n, minibatch_size, micro_batch_size, epochs; got "
                         f"{n}, {minibatch_size}, {micro_batch_size}, {epochs}")
    for _ in range(epochs):
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, minibatch_size):
            minibatch = order[start:start + minibatch_size]
            yield list(minibatch.split(micro_batch_size))
