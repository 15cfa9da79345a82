"""Mixed precision: what is trained keeps fp32 master weights and fp32 Adam state, what is frozen stays bf16, and
the forward computes in bf16 exactly as the bf16 model does. Also the trainer's advantage, clipping and KL rules
that only show on real checkpoints (issue: runs that really train)."""
import types

import pytest
import torch

import ppo
import train
from actor_critic import build_models, clip_and_step
from distributed import finite_on_every_rank
from model import ModelConfig, Transformer

pytestmark = pytest.mark.usefixtures("one_thread")
TINY = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)


def bf16_model(value_head=False) -> Transformer:
    torch.manual_seed(0)
    return Transformer(TINY, value_head=value_head).to(torch.bfloat16)


def tokens(B=2, T=12):
    return torch.randint(0, TINY.vocab_size, (B, T), generator=torch.Generator().manual_seed(1))


def test_master_weights_compute_exactly_as_the_bf16_model():
    frozen = bf16_model()
    policy = bf16_model().mixed_precision_(torch.bfloat16)
    assert {p.dtype for p in policy.parameters()} == {torch.float32}
    x = tokens()
    with torch.no_grad():
        assert torch.equal(policy(x), frozen(x))  # so the KL to a bf16 reference starts at exactly 0
        assert policy(x).dtype == torch.bfloat16


def test_lora_keeps_the_base_frozen_in_bf16_and_trains_fp32_adapters_and_head():
    model = bf16_model(value_head=True)
    model.add_lora(4, 8.0)
    model.mixed_precision_(torch.bfloat16)
    for name, p in model.named_parameters():
        trained = "lora_" in name or name.startswith("value_head")
        assert p.requires_grad == trained, name
        assert p.dtype == (torch.float32 if trained else torch.bfloat16), name
    loss = model(tokens()).float().logsumexp(-1).sum() + model.values(model.hidden_states(tokens())).sum()
    loss.backward()
    for name, p in model.named_parameters():
        if p.requires_grad and "lora_A" not in name:  # lora_A's gradient is 0 while lora_B is 0
            assert p.grad is not None and p.grad.dtype == torch.float32 and p.grad.abs().sum() > 0, name


def _changed_share(model: Transformer, lr: float, steps: int) -> float:
    """AdamW steps on a fixed loss; the share of trained elements whose value differs from the start."""
    params = [p for p in model.parameters() if p.requires_grad]
    start = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    x = torch.arange(TINY.vocab_size).view(2, -1)  # every embedding row gets a gradient
    for _ in range(steps):
        model(x).float().logsumexp(-1).mean().backward()
        opt.step()
        opt.zero_grad()
    changed = sum(int((p.detach() != s).sum()) for p, s in zip(params, start))
    return changed / sum(s.numel() for s in start)


def test_an_update_of_lr_1e6_rounds_away_in_bf16_and_adds_up_in_fp32_master_weights():
    """Adam's step is about lr per element; bf16's spacing near a weight w is |w| * 2^-7, so an update of 1e-6
    leaves every weight above 2.6e-4 in magnitude unchanged in bf16 (round to nearest), that is nearly all."""
    bf16 = _changed_share(bf16_model(), lr=1e-6, steps=20)
    master = _changed_share(bf16_model().mixed_precision_(torch.bfloat16), lr=1e-6, steps=20)
    assert bf16 < 0.05, bf16
    assert master > 0.99, master


def test_build_models_trains_fp32_and_keeps_a_bf16_reference(tmp_path):
    bf16_model().save_pretrained(tmp_path / "ckpt")
    models = build_models(tmp_path / "ckpt", torch.device("cpu"), torch.bfloat16, critic="separate", lora=None,
                          reference=True, temperature=1.0, chunk=1024)
    assert {p.dtype for p in models.policy.parameters()} == {torch.float32}
    for name, p in models.critic.named_parameters():  # the critic never uses its (untied) lm_head: frozen
        assert p.dtype == (torch.float32 if p.requires_grad else torch.bfloat16), name
    assert {p.dtype for p in models.reference.parameters()} == {torch.bfloat16}
    assert models.policy.compute_dtype == models.critic.compute_dtype == torch.bfloat16


# ---------------------------------------------------------------------------------------------- advantages


def _batch(rewards, lengths):
    """A shifted batch of one-turn episodes with the given rewards and response lengths (action tokens), tasks
    0, 0, 1, 1. The reward sits on the episode (GRPO reads it there) and on its one turn (PPO's turn-level path)."""
    B, T = len(rewards), max(lengths) + 2
    mask = torch.zeros(B, T, dtype=torch.bool)
    for i, n in enumerate(lengths):
        mask[i, 1:1 + n] = True
    tokens = torch.zeros(B, T, dtype=torch.long)
    return ppo.Batch(inputs=tokens, targets=tokens, mask=mask, turn_ids=torch.where(mask, 0, -1),
                     turn_mask=torch.ones(B, 1, dtype=torch.bool), turn_value_index=torch.zeros(B, 1, dtype=torch.long),
                     turn_rewards=torch.tensor(rewards)[:, None], rewards=torch.tensor(rewards),
                     truncated=torch.zeros(B, dtype=torch.bool), passed=torch.zeros(B, dtype=torch.bool),
                     groups=torch.tensor([0, 0, 1, 1]))


def _advantages(algo, b):
    return ppo.advantages(b, algo, "turn", "loss" if algo != "ppo" else "reward", 0.0, train.GAMMA, train.LAM,
                          train.TRUNCATION_PENALTY)


@pytest.mark.parametrize("algo", ["grpo", "dr_grpo"])
def test_grpo_advantages_are_the_group_normalised_rewards_whatever_the_lengths(algo):
    """DeepSeekMath 4.1.2: A_i = (r_i - mean) / std over the task's group, on every token of the response. Group
    0 scored alike (advantage 0); group 1 has rewards 1, -1 (mean 0, std sqrt(2)); its long and short responses
    keep the same advantage. Dr. GRPO does not divide by the std."""
    b = _batch([1.0, 1.0, 1.0, -1.0], lengths=[3, 9, 2, 9])
    adv, returns, _, _ = _advantages(algo, b)
    scale = 2 ** 0.5 if algo == "grpo" else 1.0
    want = torch.tensor([0.0, 0.0, 1 / scale, -1 / scale])
    for i in range(4):
        torch.testing.assert_close(adv[i][b.mask[i]], want[i].expand(int(b.mask[i].sum())), atol=1e-5, rtol=0)
    assert returns is None and (adv[~b.mask] == 0).all()


def test_ppo_still_whitens_its_advantages():
    b = _batch([1.0, 0.0, -1.0, -1.0], lengths=[2, 2, 2, 2])
    b.values = torch.zeros(4, b.mask.shape[1])
    adv, _, _, _ = _advantages("ppo", b)
    # one turn, V = 0: the raw advantage of each token is its episode's reward, 1, 0, -1, -1 on 2 tokens each
    raw = torch.tensor([1.0, 1.0, 0.0, 0.0, -1.0, -1.0, -1.0, -1.0])
    want = (raw - raw.mean()) / raw.std(unbiased=False)
    torch.testing.assert_close(adv[b.mask], want, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------- clipping, KL


def test_the_policy_and_the_critic_are_clipped_apart():
    """Gradient norms 0.5 (policy) and 7.5 (critic) with max_norm 1: the policy's step is untouched, the
    critic's gradient is scaled to norm 1, and both norms are logged. One joint clip would have scaled the
    policy's gradient by 1 / sqrt(0.5^2 + 7.5^2) = 0.133."""
    policy, critic = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(3))
    policy.grad, critic.grad = torch.tensor([0.3, 0.4]), torch.tensor([4.5, 6.0, 0.0])
    opts = [torch.optim.SGD([policy], lr=1.0), torch.optim.SGD([critic], lr=1.0)]
    stats = {"grad_norm_policy": [], "grad_norm_critic": []}
    assert clip_and_step(opts, 1.0, stats)
    torch.testing.assert_close(policy.detach(), torch.tensor([-0.3, -0.4]))
    torch.testing.assert_close(critic.detach(), torch.tensor([-0.6, -0.8, 0.0]), atol=1e-5, rtol=0)
    assert stats == {"grad_norm_policy": [pytest.approx(0.5)], "grad_norm_critic": [pytest.approx(7.5)]}


def test_the_adaptive_controller_steers_the_kl_per_episode():
    """Ziegler et al. and TRL set the target per sequence. Two episodes of 100 tokens at k1 = 0.1 per token have
    a KL of 10 nats each: above a target of 6, so beta rises (a per-token 0.1 would have lowered it)."""
    logp = torch.zeros(2, 102)
    ref = torch.full((2, 102), -0.1)
    mask = torch.zeros(2, 102, dtype=torch.bool)
    mask[:, 1:101] = True
    stats = ppo.kl_stats(logp, ref, mask)
    assert stats["kl_ref"] == pytest.approx(0.1) and stats["kl_episode"] == pytest.approx(10.0)
    ctl = ppo.AdaptiveKLController(0.05, target=6.0, horizon=100)
    ctl.update(stats["kl_episode"], n_steps=2)
    assert ctl.value == pytest.approx(0.05 * (1 + 0.2 * 2 / 100))


def _finite_rank(rank: int, port: int, results):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        finite = torch.tensor(0.5)
        results[rank] = (finite_on_every_rank(finite, 2),
                         finite_on_every_rank(torch.tensor(float("nan")) if rank == 1 else finite, 2))
    finally:
        dist.destroy_process_group()


def test_a_nan_loss_on_one_rank_skips_the_backward_on_every_rank():
    """Under DDP a rank that skipped its backward alone would leave the others' gradient all-reduce unmatched:
    the decision is taken on every rank together."""
    import socket
    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.Manager().dict()
    mp.spawn(_finite_rank, args=(port, results), nprocs=2)
    assert dict(results) == {0: (True, False), 1: (True, False)}
