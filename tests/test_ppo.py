"""ppo.py against hand-computed values (arithmetic in the comments), exact expectations and python loops."""
import math

import pytest
import torch

import ppo

T_, F_ = True, False
GARBAGE = 9.0  # values at non-action positions: must never influence a result


def close(actual, expected, atol=1e-6):
    torch.testing.assert_close(torch.as_tensor(actual, dtype=torch.float32),
                               torch.as_tensor(expected, dtype=torch.float32), atol=atol, rtol=0)


# ------------------------------------------------------------------------------------------------ GAE

def test_gae_three_tokens_hand_computed():
    # prompt token, 3 actions, padding. gamma = 0.9, lam = 0.8 -> gamma * lam = 0.72
    mask = torch.tensor([[F_, T_, T_, T_, F_]])
    rewards = torch.tensor([[0.0, 0.0, 0.0, 1.0, 0.0]])
    values = torch.tensor([[GARBAGE, 0.5, 0.6, 0.7, GARBAGE]])
    adv, ret = ppo.gae(rewards, values, mask, gamma=0.9, lam=0.8)
    # t=3: delta = 1 + 0.9*0 - 0.7 = 0.3                    A = 0.3
    # t=2: delta = 0 + 0.9*0.7 - 0.6 = 0.03                 A = 0.03 + 0.72*0.3   = 0.246
    # t=1: delta = 0 + 0.9*0.6 - 0.5 = 0.04                 A = 0.04 + 0.72*0.246 = 0.21712
    close(adv, [[0.0, 0.21712, 0.246, 0.3, 0.0]])
    # returns = A + V
    close(ret, [[0.0, 0.71712, 0.846, 1.0, 0.0]])


def test_gae_skips_feedback_gap_between_turns():
    # [prompt, a, a, feedback, feedback, a, a, pad]; gamma = 0.9, lam = 0.5 -> gamma * lam = 0.45
    mask = torch.tensor([[F_, T_, T_, F_, F_, T_, T_, F_]])
    rewards = torch.tensor([[0.0, 0.0, -0.1, 0.0, 0.0, 0.0, 1.0, 0.0]])
    values = torch.tensor([[GARBAGE, 0.2, 0.4, GARBAGE, GARBAGE, 0.1, 0.3, GARBAGE]])
    adv, ret = ppo.gae(rewards, values, mask, gamma=0.9, lam=0.5)
    # t=6: delta = 1 - 0.3 = 0.7                                    A = 0.7
    # t=5: delta = 0.9*0.3 - 0.1 = 0.17                             A = 0.17 + 0.45*0.7 = 0.485
    # t=2: next action is t=5 (feedback skipped): delta = -0.1 + 0.9*0.1 - 0.4 = -0.41
    #                                                              A = -0.41 + 0.45*0.485 = -0.19175
    # t=1: delta = 0.9*0.4 - 0.2 = 0.16                             A = 0.16 + 0.45*(-0.19175) = 0.0737125
    close(adv, [[0.0, 0.0737125, -0.19175, 0.0, 0.0, 0.485, 0.7, 0.0]])
    close(ret, [[0.0, 0.2737125, 0.20825, 0.0, 0.0, 0.585, 1.0, 0.0]])


def gae_reference(rewards, values, mask, gamma, lam):
    """Straightforward loop: pull out each row's masked steps, run textbook GAE, scatter back."""
    adv = torch.zeros_like(rewards)
    for b in range(rewards.shape[0]):
        steps = [t for t in range(rewards.shape[1]) if mask[b, t]]
        running = 0.0
        for i in reversed(range(len(steps))):
            t = steps[i]
            next_v = values[b, steps[i + 1]].item() if i + 1 < len(steps) else 0.0
            delta = rewards[b, t].item() + gamma * next_v - values[b, t].item()
            running = delta + gamma * lam * running
            adv[b, t] = running
    return adv, torch.where(mask, adv + values, 0.0)


def test_gae_matches_python_loop_on_random_inputs():
    g = torch.Generator().manual_seed(0)
    B, L = 6, 37
    mask = torch.rand(B, L, generator=g) < 0.6
    mask[3] = False
    mask[3, 5] = True  # a row with a single action
    rewards = torch.where(mask, torch.randn(B, L, generator=g), 0.0)
    values = torch.randn(B, L, generator=g)  # random garbage outside the mask as well
    for gamma, lam in [(0.97, 0.9), (1.0, 1.0), (0.5, 0.0)]:
        adv, ret = ppo.gae(rewards, values, mask, gamma, lam)
        ref_adv, ref_ret = gae_reference(rewards, values, mask, gamma, lam)
        close(adv, ref_adv, atol=1e-5)
        close(ret, ref_ret, atol=1e-5)


def test_gae_rejects_reward_outside_mask():
    mask = torch.tensor([[T_, F_]])
    with pytest.raises(ValueError, match="outside the mask"):
        ppo.gae(torch.tensor([[0.0, 1.0]]), torch.zeros(1, 2), mask, 1.0, 1.0)


# ------------------------------------------------------------------------------------- turn level (RLEF)

def test_per_turn_mean_is_log_geometric_mean_of_ratios():
    turn_ids = torch.tensor([[-1, 0, 0, -1, 1, -1, 2, 2],
                             [-1, 0, 0, 0, -1, -1, -1, -1]])
    k1 = torch.tensor([[GARBAGE, 0.3, 0.1, GARBAGE, 0.1, GARBAGE, 0.5, 0.3],
                       [GARBAGE, 0.2, 0.4, 0.3, GARBAGE, GARBAGE, GARBAGE, GARBAGE]])
    ref = torch.full_like(k1, -1.5)
    logprobs = ref + k1
    turn_kl = ppo.per_turn_mean(ppo.kl_k1(logprobs, ref), turn_ids, num_turns=3)
    # row 0: (0.3+0.1)/2 = 0.2, 0.1, (0.5+0.3)/2 = 0.4 ; row 1: (0.2+0.4+0.3)/3 = 0.3, no turn 1 or 2 -> 0
    close(turn_kl, [[0.2, 0.1, 0.4], [0.3, 0.0, 0.0]])
    # exp(mean log ratio) = geometric mean of the per-token ratios p/q
    ratios = torch.exp(logprobs[0, [6, 7]] - ref[0, [6, 7]])
    close(torch.exp(turn_kl[0, 2]), ratios.prod() ** 0.5)


def test_turn_level_advantages_hand_computed():
    turn_mask = torch.tensor([[T_, T_, T_], [T_, F_, F_]])
    turn_kl = torch.tensor([[0.2, 0.1, 0.4], [0.3, GARBAGE, GARBAGE]])
    scores = torch.tensor([-1.0, 1.0])  # row 0 failed after 3 turns, row 1 passed at turn 1
    rewards = ppo.turn_level_rewards(scores, turn_mask, turn_kl, kl_coef=0.05)
    # row 0: -0.05*0.2 = -0.01, -0.05*0.1 = -0.005, -1 - 0.05*0.4 = -1.02 ; row 1: 1 - 0.05*0.3 = 0.985
    close(rewards, [[-0.01, -0.005, -1.02], [0.985, 0.0, 0.0]])

    # critic output per token; the turn value is read at the last prompt token of each turn
    values = torch.tensor([[0.1, GARBAGE, GARBAGE, -0.2, GARBAGE, -0.5, GARBAGE, GARBAGE],
                           [0.6, GARBAGE, GARBAGE, GARBAGE, GARBAGE, GARBAGE, GARBAGE, GARBAGE]])
    turn_value_index = torch.tensor([[0, 3, 5], [0, 0, 0]])
    turn_values = ppo.gather_turn_values(values, turn_value_index, turn_mask)
    close(turn_values, [[0.1, -0.2, -0.5], [0.6, 0.0, 0.0]])

    turn_ids = torch.tensor([[-1, 0, 0, -1, 1, -1, 2, 2],
                             [-1, 0, 0, 0, -1, -1, -1, -1]])
    tok_adv, turn_adv, turn_ret = ppo.turn_level_advantages(rewards, turn_values, turn_mask, turn_ids,
                                                            gamma=0.95, lam=0.9)
    # gamma * lam = 0.855. Row 0:
    # k=2: delta = -1.02 - (-0.5) = -0.52                                   A = -0.52
    # k=1: delta = -0.005 + 0.95*(-0.5) + 0.2 = -0.28                       A = -0.28 + 0.855*(-0.52) = -0.7246
    # k=0: delta = -0.01 + 0.95*(-0.2) - 0.1 = -0.3                         A = -0.3 + 0.855*(-0.7246) = -0.919533
    # Row 1: k=0: delta = 0.985 - 0.6 = 0.385
    close(turn_adv, [[-0.919533, -0.7246, -0.52], [0.385, 0.0, 0.0]])
    close(turn_ret, [[-0.819533, -0.9246, -1.02], [0.985, 0.0, 0.0]])
    a0, a1, a2 = -0.919533, -0.7246, -0.52
    close(tok_adv, [[0, a0, a0, 0, a1, 0, a2, a2], [0, 0.385, 0.385, 0.385, 0, 0, 0, 0]])


def test_turn_mask_must_be_prefix():
    with pytest.raises(ValueError, match="prefix"):
        ppo.turn_level_rewards(torch.zeros(1), torch.tensor([[T_, F_, T_]]))


def test_per_turn_mean_rejects_turn_id_beyond_num_turns():
    with pytest.raises(ValueError, match="num_turns"):
        ppo.per_turn_mean(torch.zeros(1, 2), torch.tensor([[0, 3]]), num_turns=2)


# ------------------------------------------------------------------------------------------- losses

def test_clipped_policy_loss_hand_computed():
    # eps = 0.2. Five actions and one padding token with an absurd ratio.
    ratios = torch.tensor([[1.1, 1.5, 0.5, 1.5, 0.5, 1e30]])
    adv = torch.tensor([[1.0, 2.0, -1.0, -1.0, 1.0, 5.0]])
    mask = torch.tensor([[T_, T_, T_, T_, T_, F_]])
    old = torch.full((1, 6), -2.0)
    logprobs = (old + torch.log(ratios)).requires_grad_(True)
    loss, clipfrac, approx_kl = ppo.policy_loss(logprobs, old, adv, mask, clip_eps=0.2)
    # per token max(-A r, -A clip(r, 0.8, 1.2)):
    # a: r=1.1 A=+1: max(-1.1, -1.1) = -1.1   inside the range
    # b: r=1.5 A=+2: max(-3.0, -2.4) = -2.4   clipped (gain capped)
    # c: r=0.5 A=-1: max( 0.5,  0.8) =  0.8   clipped
    # d: r=1.5 A=-1: max( 1.5,  1.2) =  1.5   not clipped: a bad move is never capped
    # e: r=0.5 A=+1: max(-0.5, -0.8) = -0.5   not clipped
    # mean = (-1.1 - 2.4 + 0.8 + 1.5 - 0.5) / 5 = -1.7 / 5 = -0.34
    close(loss, -0.34)
    close(clipfrac, 2 / 5)  # b and c
    # approx_kl = mean(r - 1 - ln r): a: 0.1 - ln 1.1 = 0.0046898; b, d: 0.5 - ln 1.5 = 0.0945349;
    # c, e: -0.5 + ln 2 = 0.1931472 -> (0.0046898 + 2*0.0945349 + 2*0.1931472) / 5 = 0.1160108
    close(approx_kl, 0.1160108)
    loss.backward()
    # d loss / d logp = -A r / 5 where unclipped, 0 where clipped: a -1.1/5, d 1.5/5, e -0.5/5
    close(logprobs.grad, [[-0.22, 0.0, 0.0, 0.3, -0.1, 0.0]])


def test_clipped_value_loss_hand_computed():
    old = torch.tensor([[0.5, 0.5, 0.5, 0.0, GARBAGE]])
    new = torch.tensor([[0.6, 1.0, 0.0, -0.5, GARBAGE]], requires_grad=True)
    ret = torch.tensor([[1.0, 1.0, 1.0, -1.0, GARBAGE]])
    mask = torch.tensor([[T_, T_, T_, T_, F_]])
    loss, clipfrac = ppo.value_loss(new, old, ret, mask, clip_range=0.2)
    # clipped V = old + clip(new - old, -0.2, 0.2); loss = 0.5 max((new - R)^2, (clipped V - R)^2)
    # a: (0.6-1)^2 = 0.16, clipped V 0.6 -> 0.16         -> 0.08
    # b: (1.0-1)^2 = 0,    clipped V 0.7 -> 0.09         -> 0.045 (clipped term wins)
    # c: (0.0-1)^2 = 1,    clipped V 0.3 -> 0.49         -> 0.5
    # d: (-0.5+1)^2 = 0.25, clipped V -0.2 -> 0.64       -> 0.32  (clipped term wins)
    # mean = (0.08 + 0.045 + 0.5 + 0.32) / 4 = 0.23625
    close(loss, 0.23625)
    close(clipfrac, 0.5)
    loss.backward()
    # grads / 4: a (0.6 - 1)/4 = -0.1; b, d clipped -> 0; c (0 - 1)/4 = -0.25; padding 0
    close(new.grad, [[-0.1, 0.0, -0.25, 0.0, 0.0]])
    unclipped_loss, _ = ppo.value_loss(new, old, ret, mask, clip_range=None)
    close(unclipped_loss, 0.5 * (0.16 + 0.0 + 1.0 + 0.25) / 4)  # 0.17625


def test_k1_k3_hand_computed_and_unbiased():
    logp = torch.log(torch.tensor([0.5, 0.2]))
    logq = torch.log(torch.tensor([0.25, 0.6]))
    # k1 = ln(p/q): ln 2 = 0.693147, ln(1/3) = -1.098612
    close(ppo.kl_k1(logp, logq), [0.693147, -1.098612])
    # k3 = r - 1 - ln r, r = q/p: r=0.5 -> -0.5 + ln 2 = 0.193147; r=3 -> 2 - ln 3 = 0.901388
    close(ppo.kl_k3(logp, logq), [0.193147, 0.901388])
    # both are unbiased: E_{x~p}[k] = KL(p || q) exactly (expectation by enumeration, not sampling)
    g = torch.Generator().manual_seed(1)
    p = torch.softmax(torch.randn(7, generator=g), 0)
    q = torch.softmax(torch.randn(7, generator=g), 0)
    exact = torch.distributions.kl_divergence(torch.distributions.Categorical(probs=p),
                                              torch.distributions.Categorical(probs=q))
    close((p * ppo.kl_k1(p.log(), q.log())).sum(), exact, atol=1e-5)
    close((p * ppo.kl_k3(p.log(), q.log())).sum(), exact, atol=1e-5)
    # k3 is clamped: an extreme ratio gives max_value, finite
    assert ppo.kl_k3(torch.tensor([-60.0]), torch.tensor([-1.0])).item() == 10.0
    assert (ppo.kl_k3(torch.randn(100, generator=g), torch.randn(100, generator=g)) >= 0).all()


def test_adaptive_kl_controller_steps():
    ctl = ppo.AdaptiveKLController(init_kl_coef=0.1, target=6.0, horizon=10000)
    # kl 9: e = 9/6 - 1 = 0.5 -> clipped 0.2; beta = 0.1 * (1 + 0.2*256/10000) = 0.1 * 1.00512 = 0.100512
    ctl.update(9.0, n_steps=256)
    assert ctl.value == pytest.approx(0.100512, rel=1e-12)
    # kl 3: e = -0.5 -> -0.2; beta = 0.100512 * 0.99488 = 0.09999737856
    ctl.update(3.0, n_steps=256)
    assert ctl.value == pytest.approx(0.09999737856, rel=1e-12)
    # kl 6.6: e = 0.1 (inside the clip); beta = 0.09999737856 * 1.00256 = 0.1002533718491136
    ctl.update(6.6, n_steps=256)
    assert ctl.value == pytest.approx(0.1002533718491136, rel=1e-12)
    restored = ppo.AdaptiveKLController(1.0, 1.0, 1)
    restored.load_state_dict(ctl.state_dict())
    assert (restored.value, restored.target, restored.horizon) == (ctl.value, 6.0, 10000)

    fixed = ppo.FixedKLController(0.05)
    fixed.update(100.0, n_steps=256)
    assert fixed.value == 0.05


def test_kl_placement_is_never_both():
    assert ppo.split_kl_coef("reward", 0.05) == (0.05, 0.0)
    assert ppo.split_kl_coef("loss", 0.05) == (0.0, 0.05)
    with pytest.raises(ValueError, match="kl_placement"):
        ppo.split_kl_coef("both", 0.05)


def test_kl_loss_is_masked_k3_mean():
    logp = torch.log(torch.tensor([[0.5, 0.2, 0.9]]))
    logq = torch.log(torch.tensor([[0.25, 0.6, 0.1]]))
    mask = torch.tensor([[T_, T_, F_]])
    close(ppo.kl_loss(logp, logq, mask), (0.193147 + 0.901388) / 2)


# ------------------------------------------------------------------------------------------- GRPO

def test_grpo_advantages_hand_computed():
    # group 0 (interleaved with group 1): scores 2, 4, 4, 6: mean 4, unbiased var (4+0+0+4)/3 = 8/3,
    # std 1.6329932 -> advantages -2/1.6329932 = -1.2247449, 0, 0, +1.2247449
    # group 1: all equal -> 0, no NaN; group 7: a single sample -> 0
    scores = torch.tensor([2.0, 1.0, 4.0, 1.0, 4.0, 6.0, 1.0, 3.0])
    groups = torch.tensor([0, 1, 0, 1, 0, 0, 1, 7])
    adv = ppo.grpo_advantages(scores, groups, eps=0.0)
    close(adv, [-1.2247449, 0, 0, 0, 0, 1.2247449, 0, 0])
    adv_eps = ppo.grpo_advantages(scores, groups)
    assert torch.isfinite(adv_eps).all() and (adv_eps[[1, 3, 6, 7]] == 0).all()
    # 0.1 is inexact in binary: the group mean is not exactly 0.1, yet the advantages must be exactly 0
    assert (ppo.grpo_advantages(torch.full((3,), 0.1), torch.zeros(3, dtype=torch.long)) == 0).all()
    # Dr. GRPO: no std division
    close(ppo.grpo_advantages(scores, groups, scale_by_std=False), [-2, 0, 0, 0, 0, 2, 0, 0])
    # independent reference: torch.std on the group
    g0 = scores[groups == 0]
    close(adv[groups == 0], (g0 - g0.mean()) / g0.std())


def test_grpo_advantages_of_a_batch_with_the_truncation_penalty_on_its_action_tokens():
    b = two_turn_batch(torch.Generator().manual_seed(0))
    b.rewards, b.groups = torch.tensor([1.0, -1.0, 1.0, 1.0]), torch.tensor([0, 0, 1, 1])
    b.truncated = torch.tensor([F_, F_, T_, F_])
    adv, returns, _, _ = ppo.advantages(b, "grpo", "turn", "loss", 0.0, 1.0, 1.0, truncation_penalty=0.5)
    # group 0: 1, -1 -> mean 0, std sqrt(2): +-0.7071068; group 1: 1 - 0.5, 1 -> mean 0.75, std 0.3535534
    a = torch.tensor([0.7071068, -0.7071068, -0.7071068, 0.7071068])
    close(adv, torch.where(b.mask, a[:, None], 0.0), atol=1e-5)
    assert returns is None


# ------------------------------------------------------------------------------------- statistics

def test_masked_whiten_uses_masked_entries_only():
    x = torch.tensor([[1.0, 3.0, 99.0], [5.0, -99.0, 99.0]])
    mask = torch.tensor([[T_, T_, F_], [T_, F_, F_]])
    # masked entries 1, 3, 5: mean 3, population var (4+0+4)/3 = 8/3, std 1.6329932
    close(ppo.masked_whiten(x, mask, eps=0.0), [[-1.2247449, 0.0, 0.0], [1.2247449, 0.0, 0.0]])
    close(ppo.masked_mean(x, mask), 3.0)
    close(ppo.masked_mean(x, torch.zeros_like(mask)), 0.0)  # empty mask: 0, not NaN


def test_token_mean():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, GARBAGE, GARBAGE]])
    mask = torch.tensor([[T_, T_, T_], [T_, F_, F_]])
    close(ppo.token_mean(x, mask), 10 / 4)        # (1+2+3+4)/4
    close(ppo.token_mean(x, mask, normalizer=8), 10 / 8)


def test_micro_batches_with_normalizer_equal_the_minibatch_gradient():
    g = torch.Generator().manual_seed(2)
    B, T = 6, 9
    mask = torch.rand(B, T, generator=g) < 0.7
    mask[:, 0] = True
    old = -torch.rand(B, T, generator=g)
    adv = torch.randn(B, T, generator=g)
    logprobs = (old + 0.1 * torch.randn(B, T, generator=g)).requires_grad_(True)
    full, _, _ = ppo.policy_loss(logprobs, old, adv, mask)
    full_grad, = torch.autograd.grad(full, logprobs)
    n_tokens = mask.sum()
    for idx in (torch.tensor([0, 4]), torch.tensor([1, 2, 3, 5])):  # accumulate into logprobs.grad
        micro, _, _ = ppo.policy_loss(logprobs[idx], old[idx], adv[idx], mask[idx], normalizer=n_tokens)
        micro.backward()
    close(logprobs.grad, full_grad)


def test_explained_variance():
    mask = torch.tensor([T_, T_, T_, T_, F_])
    returns = torch.tensor([1.0, 2.0, 3.0, 4.0, GARBAGE])
    values = torch.tensor([1.0, 2.0, 3.0, 5.0, -GARBAGE])
    # residual 0, 0, 0, -1: mean -0.25, var (3*0.0625 + 0.5625)/4 = 0.1875; var(returns) = 1.25
    # 1 - 0.1875/1.25 = 0.85
    assert ppo.explained_variance(values, returns, mask) == pytest.approx(0.85, abs=1e-6)
    assert ppo.explained_variance(returns, returns, mask) == pytest.approx(1.0)
    assert math.isnan(ppo.explained_variance(values, torch.ones(5), mask))


def two_turn_batch(g: torch.Generator) -> ppo.Batch:
    """Four episodes: [prompt, a, a, feedback, a, a] or one turn [prompt, a, a, pad, ...], with old/reference
    logprobs, advantages and turn-level value targets filled in."""
    mask = torch.tensor([[F_, T_, T_, F_, T_, T_], [F_, T_, T_, F_, F_, F_]] * 2)
    turn_ids = torch.tensor([[-1, 0, 0, -1, 1, 1], [-1, 0, 0, -1, -1, -1]] * 2)
    turn_mask = torch.tensor([[T_, T_], [T_, F_]] * 2)
    B, T = mask.shape
    return ppo.Batch(inputs=torch.zeros(B, T, dtype=torch.long), targets=torch.zeros(B, T, dtype=torch.long),
                     mask=mask, turn_ids=turn_ids, turn_mask=turn_mask,
                     turn_value_index=torch.tensor([[0, 3], [0, 0]] * 2), turn_rewards=torch.zeros(B, 2),
                     rewards=torch.zeros(B), truncated=torch.zeros(B, dtype=torch.bool),
                     passed=torch.zeros(B, dtype=torch.bool), groups=torch.arange(B),
                     old_logprobs=-torch.rand(B, T, generator=g), ref_logprobs=-torch.rand(B, T, generator=g),
                     advantages=torch.randn(B, T, generator=g), returns=torch.randn(B, 2, generator=g),
                     value_mask=turn_mask, old_values=torch.randn(B, 2, generator=g), turn_level=True)


def test_ppo_loss_is_eq_9_and_its_micro_batches_add_up_to_the_minibatch():
    """ppo_loss against the terms assembled by hand (policy loss + vf_coef * value loss at the turns' values
    + kl_coef * k3), and two micro-batches (Batch.select) whose losses sum to the whole batch's."""
    g = torch.Generator().manual_seed(0)
    b = two_turn_batch(g)
    logp = (b.old_logprobs + 0.1 * torch.randn(b.mask.shape, generator=g)).requires_grad_(True)
    values = torch.randn(b.mask.shape, generator=g, requires_grad=True)
    entropy = torch.rand(b.mask.shape, generator=g)
    kw = dict(clip_eps=0.2, value_clip=0.2, vf_coef=0.5, loss_kl=0.1, n_tokens=12, n_value_steps=6)
    loss, stats = ppo.ppo_loss(b, logp, entropy, values, **kw)
    pg, _, _ = ppo.policy_loss(logp, b.old_logprobs, b.advantages, b.mask, 0.2)
    turn_values = torch.stack([values[:, 0], torch.where(b.turn_mask[:, 1], values[:, 3], 0.0)], 1)
    vf, _ = ppo.value_loss(turn_values, b.old_values, b.returns, b.turn_mask, 0.2)
    close(loss, pg + 0.5 * vf + 0.1 * ppo.kl_loss(logp, b.ref_logprobs, b.mask))
    assert stats["entropy"] == pytest.approx(float(entropy[b.mask].mean()))
    parts = [ppo.ppo_loss(b.select(rows, 6), logp[rows], entropy[rows], values[rows], **kw)[0]
             for rows in (torch.tensor([0, 3]), torch.tensor([1, 2]))]
    close(sum(parts), loss)
    short = b.select(torch.tensor([1, 3]), 3)  # one-turn rows, cut to their last action column
    assert short.inputs.shape == (2, 3) and short.returns.shape == (2, 2) and short.rewards.shape == (2,)


# ------------------------------------------------------------------------------------------- masking

def test_padding_and_feedback_tokens_get_exactly_zero_gradient():
    # [prompt, a, a, feedback, a, pad, pad], with NaN/inf at non-action positions
    mask = torch.tensor([[F_, T_, T_, F_, T_, F_, F_],
                         [F_, F_, T_, T_, T_, T_, F_]])
    nan, inf = float("nan"), float("inf")
    logprobs = torch.tensor([[nan, -1.0, -2.0, inf, -0.5, nan, -inf],
                             [inf, nan, -0.3, -1.2, -0.7, -2.2, nan]], requires_grad=True)
    entropy = torch.tensor([[nan, 1.0, 2.0, inf, 0.5, nan, 3.0],
                            [1.0, nan, 0.3, 1.2, 0.7, 2.2, inf]])
    values = torch.tensor([[nan, 0.1, 0.2, inf, 0.3, nan, 1.0],
                           [1.0, nan, 0.3, 0.2, 0.7, 0.2, inf]], requires_grad=True)
    old = torch.where(mask, logprobs.detach() + 0.05, 0.0)  # ratio exp(-0.05) = 0.95: inside the clip range
    ref = torch.where(mask, logprobs.detach() - 0.3, 0.0)
    adv = torch.where(mask, torch.tensor([[1.0, 2.0, -1.0, 0.5, 1.5, -2.0, 1.0]] * 2), 0.0)
    returns = torch.where(mask, 1.0, 0.0)
    pg, _, _ = ppo.policy_loss(logprobs, old, adv, mask)
    old_values = torch.where(mask, values.detach() + 0.01, 0.0)
    vf, _ = ppo.value_loss(values, old_values, returns, mask)
    loss = pg + 0.5 * vf + 0.1 * ppo.kl_loss(logprobs, ref, mask)
    assert torch.isfinite(loss) and torch.isfinite(ppo.masked_mean(entropy, mask))
    loss.backward()
    for leaf in (logprobs, values):
        assert (leaf.grad[~mask] == 0).all(), leaf.grad
        assert (leaf.grad[mask] != 0).all(), leaf.grad


# ------------------------------------------------------------------------------------------- rewards

def test_token_level_rewards():
    scores = torch.tensor([1.0, -1.5, 0.0])
    # [prompt, a, a, feedback, a, pad]
    mask = torch.tensor([[F_, T_, T_, F_, T_, F_]] * 3)
    kl = torch.tensor([[GARBAGE, 0.1, -0.2, GARBAGE, 0.3, GARBAGE]] * 3)
    turn_ids = torch.tensor([[-1, 0, 0, -1, 1, -1]] * 3)
    rewards = ppo.token_level_rewards(scores, mask, kl, kl_coef=0.1, turn_ids=turn_ids,
                                      turn_rewards=torch.tensor([[0.2, 0.0]] * 3))
    # -0.1*kl on actions: -0.01, +0.02, -0.03; the score on the last action (t=4); turn 0's reward 0.2 at t=2
    close(rewards, [[0, -0.01, 0.22, 0, -0.03 + 1.0, 0],
                    [0, -0.01, 0.22, 0, -0.03 - 1.5, 0],
                    [0, -0.01, 0.22, 0, -0.03 + 0.0, 0]])
    with pytest.raises(ValueError, match="no True"):
        ppo.token_level_rewards(torch.zeros(1), torch.zeros(1, 3, dtype=torch.bool))


# ------------------------------------------------------------------------------ minibatches, guards

def test_minibatches_cover_every_episode_each_epoch_deterministically():
    steps = list(ppo.minibatches(10, minibatch_size=4, micro_batch_size=3, epochs=2,
                                 generator=torch.Generator().manual_seed(3)))
    assert [[len(m) for m in step] for step in steps] == [[3, 1], [3, 1], [2]] * 2
    for epoch in (steps[:3], steps[3:]):
        assert sorted(torch.cat([m for step in epoch for m in step]).tolist()) == list(range(10))
    again = list(ppo.minibatches(10, 4, 3, 2, generator=torch.Generator().manual_seed(3)))
    assert all(torch.equal(a, b) for s, t in zip(steps, again) for a, b in zip(s, t))
    assert not torch.equal(torch.cat(steps[0] + steps[1] + steps[2]), torch.cat(steps[3] + steps[4] + steps[5]))
    with pytest.raises(ValueError, match="positive"):
        next(ppo.minibatches(10, 0, 1, 1))
