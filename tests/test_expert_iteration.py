"""actor_critic.expert_iteration_update (reward-weighted ReST-EM, ppo.rest_em_*) against an independent
reference.

The update under test: w = max(final reward, 0) on the action tokens of the FINAL turn of PASSING episodes, 0
elsewhere; loss = -sum(logp * w) / #(tokens with w > 0) over a minibatch, accumulated over micro-batches, then
one optimizer step. With SGD(lr=1) and no clipping, the parameter change is exactly minus the gradient of that
loss, so we compare it to minus the autograd gradient of a loss written here by hand: log_softmax over the
model's full logits (model.forward, not the fused kernel the Scorer uses), on each UNPADDED episode, at the
positions of the final turn picked from Turn.start/Turn.end (position p predicts token p + 1, so the turn's
tokens start..end-1 are predicted at positions start-1..end-2).
"""
import copy

import pytest
import torch

import ppo
from actor_critic import (Models, Scorer, expert_iteration_update, forward_in_chunks, regroup_by_length,
                          row_lengths)
from distributed import kept_rows
from data import Task, Test
from model import ModelConfig, Transformer
from rollout import Episode, Turn, collate
import sandbox
from tokenizer import Tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

TOK = Tokenizer.byte_level()
TASK = Task(task_id="seven", prompt="Print 7.", public_tests=[Test(kind="stdio", stdin="", expected="7")],
            private_tests=[Test(kind="stdio", stdin="", expected="7")])


def tiny_model(seed=0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelConfig(vocab_size=TOK.n_words, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                                   tie_word_embeddings=True))


def episode(prompt: str, segments, passed: bool) -> Episode:
    """segments: ("act", text, reward) for a sampled response (ends with <|eot_id|>), ("obs", text) for feedback."""
    ep = Episode(TASK, [TOK.bos_id] + TOK.encode(prompt), [])
    ep.action_mask = [False] * len(ep.tokens)
    for seg in segments:
        if seg[0] == "act":
            ids = TOK.encode(seg[1]) + [TOK.eot_id]
            start = len(ep.tokens)
            ep.tokens += ids
            ep.action_mask += [True] * len(ids)
            ep.turns.append(Turn(start, len(ep.tokens), True, seg[1], reward=seg[2]))
        else:
            ids = TOK.encode(seg[1])
            ep.tokens += ids
            ep.action_mask += [False] * len(ids)
    ep.private = sandbox.RunResult(tests=[sandbox.TestResult("pass" if passed else "wrong_answer")], cpu_time=0.01, wall_time=0.01)
    ep.done = True
    return ep


def three_episodes(final_b=1.4, fail_text="print(8)", fail_reward=-1.0, final_a=1.0):
    a = episode("Print 7.\n", [("act", "print(7)", final_a)], passed=True)              # passes in one turn
    b = episode("Print seven.\n", [("act", "print(6)", 0.0), ("obs", "\nFailed: got 6. Again.\n"),
                                   ("act", "print(3+4)", final_b)], passed=True)      # fails, then passes fast
    c = episode("Print 7!\n", [("act", fail_text, fail_reward)], passed=False)          # fails
    assert (a.passed, b.passed, c.passed) == (True, True, False)
    return [a, b, c]


def reference_loss(model, episodes, weight_of_turn, denominator):
    """-sum over chosen turns of w * log p(token) / denominator, with plain log_softmax on unpadded episodes.
    weight_of_turn(ep, k) -> weight of turn k of ep (0 to skip)."""
    total = 0.0
    for ep in episodes:
        tokens = torch.tensor([ep.tokens])
        logp = torch.log_softmax(model(tokens)[0].float(), dim=-1)               # (n, V)
        for k, turn in enumerate(ep.turns):
            w = weight_of_turn(ep, k)
            if w == 0:
                continue
            for p in range(turn.start - 1, turn.end - 1):
                total = total - w * logp[p, ep.tokens[p + 1]]
    return total / denominator


def reference_grads(model0, episodes, weight_of_turn, denominator):
    model = copy.deepcopy(model0)
    loss = reference_loss(model, episodes, weight_of_turn, denominator)
    loss.backward()
    return float(loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters()}


def run_update(model0, episodes, micro_batch_size, seed=0):
    """One expert_iteration_update with SGD(lr=1), no clipping. Returns (stats, {name: param change})."""
    model = copy.deepcopy(model0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    models = Models(policy=model, critic=None, reference=None, scorer=Scorer(model, 1.0, 1024), critic_scorer=None)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    stats = expert_iteration_update(models, [opt], batch(episodes), torch.Generator().manual_seed(seed),
                                    minibatch_size=len(episodes), micro_batch_size=micro_batch_size, epochs=1,
                                    max_grad_norm=1e9)  # no clipping
    return stats, {n: p.detach() - before[n] for n, p in model.named_parameters()}


def batch(episodes) -> ppo.Batch:
    passed = torch.tensor([ep.passed for ep in episodes])
    return ppo.Batch.from_collated(collate(episodes, TOK.pad_id), passed, torch.arange(len(episodes)))


def final_turn_of_passing(ep, k):
    """The behaviour specified: the final reward (clamped at 0) on the final turn of a passing episode."""
    return max(ep.turns[-1].reward, 0.0) if ep.passed and k == len(ep.turns) - 1 else 0.0


def kept_tokens(episodes):
    return sum(ep.turns[-1].end - ep.turns[-1].start for ep in episodes
               if ep.passed and ep.turns[-1].reward > 0)


def max_gap(delta, grads):
    return max(float((delta[n] + grads[n]).abs().max()) for n in grads)


def assert_update_is_minus_grad(delta, grads):
    assert delta.keys() == grads.keys()
    for n in grads:
        torch.testing.assert_close(delta[n], -grads[n], rtol=1e-4, atol=2e-6, msg=lambda m: f"{n}: {m}")


@pytest.fixture(scope="module")
def model0():
    return tiny_model()


# --------------------------------------------------------------------------- 1. reward-weighted ReST-EM

@pytest.mark.parametrize("micro_batch_size", [3, 2, 1])
def test_update_is_minus_gradient_of_reward_weighted_final_turn_nll(model0, micro_batch_size):
    episodes = three_episodes(final_b=1.4)
    a, b, c = episodes
    # hand count of the denominator: final turns of a and b, "print(7)" and "print(3+4)" plus <|eot_id|> each
    n_kept = (len("print(7)") + 1) + (len("print(3+4)") + 1)
    assert n_kept == kept_tokens(episodes) == 20
    ref_loss, grads = reference_grads(model0, episodes, final_turn_of_passing, n_kept)
    assert sum(float(g.norm()) for g in grads.values()) > 1e-2  # a real, non-trivial gradient

    stats, delta = run_update(model0, episodes, micro_batch_size)
    assert_update_is_minus_grad(delta, grads)
    if micro_batch_size == 3:  # one micro-batch: the reported loss is the minibatch loss
        assert stats["sft_loss"] == pytest.approx(ref_loss, rel=1e-5)

    # The comparison discriminates: plausible wrong variants give updates far outside the tolerance.
    wrong = {
        "unweighted": (lambda ep, k: 1.0 if final_turn_of_passing(ep, k) else 0.0, n_kept),
        "every turn of passing episodes": (lambda ep, k: max(ep.turns[k].reward, 0.0) if ep.passed else 0.0,
                                           n_kept),
        "divided by the sum of weights": (final_turn_of_passing, 9 * 1.0 + 11 * 1.4),
        "failing episode too (|reward|)": (lambda ep, k: abs(ep.turns[-1].reward) if k == len(ep.turns) - 1
                                           else 0.0, n_kept + len("print(8)") + 1),
    }
    # "every turn" differs only when a non-final turn has a positive reward: give b's first turn one to check
    for name, (weight, denominator) in wrong.items():
        if name == "every turn of passing episodes":
            b.turns[0].reward = 0.3
            _, g = reference_grads(model0, episodes, weight, denominator)
            b.turns[0].reward = 0.0
        else:
            _, g = reference_grads(model0, episodes, weight, denominator)
        assert max_gap(delta, g) > 1e-3, name


def test_nonfinal_turn_reward_is_ignored(model0):
    """A positive reward on a non-final turn of a passing episode adds nothing: only the final turn is kept."""
    episodes = three_episodes(final_b=1.4)
    _, base = run_update(model0, episodes, 3)
    episodes[1].turns[0].reward = 0.3
    _, delta = run_update(model0, episodes, 3)
    for n in base:
        torch.testing.assert_close(delta[n], base[n], rtol=0, atol=1e-7)


def test_passing_episode_with_clamped_reward_is_not_counted(model0):
    """A passing episode whose final reward is <= 0 (e.g. a large lint penalty) gets weight 0 and is left out of
    the denominator: the update equals the one over episode b alone, divided by b's 11 tokens."""
    episodes = three_episodes(final_b=1.4, final_a=-0.25)
    assert kept_tokens(episodes) == 11
    _, grads = reference_grads(model0, episodes, final_turn_of_passing, 11)
    _, delta = run_update(model0, episodes, 2)
    assert_update_is_minus_grad(delta, grads)


# --------------------------------------------------------------------------- 2. plain ReST-EM

@pytest.mark.parametrize("micro_batch_size", [3, 2])
def test_unit_rewards_give_plain_rest_em(model0, micro_batch_size):
    """All final rewards 1.0: the update is minus the gradient of the unweighted mean NLL over kept tokens."""
    episodes = three_episodes(final_b=1.0)
    model = copy.deepcopy(model0)
    nll = []
    for ep in episodes[:2]:  # the passing ones
        logp = torch.log_softmax(model(torch.tensor([ep.tokens]))[0], dim=-1)
        last = ep.turns[-1]
        positions = torch.arange(last.start - 1, last.end - 1)
        nll.append(-logp[positions, torch.tensor(ep.tokens[last.start:last.end])])
    loss = torch.cat(nll).mean()
    assert torch.cat(nll).numel() == 20
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    stats, delta = run_update(model0, episodes, micro_batch_size)
    assert_update_is_minus_grad(delta, grads)
    if micro_batch_size == 3:
        assert stats["sft_loss"] == pytest.approx(float(loss.detach()), rel=1e-5)


@pytest.mark.parametrize("micro_batch_size", [3, 2])
def test_failing_episode_contributes_nothing(model0, micro_batch_size):
    """Changing the failing episode's tokens (content and length) and reward, even to a positive reward as
    partial credit gives, leaves the update unchanged."""
    _, base = run_update(model0, three_episodes(final_b=1.0), micro_batch_size)
    changed = three_episodes(final_b=1.0, fail_text="while True: pass  # a much longer wrong answer", fail_reward=0.5)
    assert changed[2].tokens != three_episodes()[2].tokens
    _, delta = run_update(model0, changed, micro_batch_size)
    for n in base:
        torch.testing.assert_close(delta[n], base[n], rtol=1e-5, atol=1e-7, msg=lambda m: f"{n}: {m}")
    # and the failing episode's tokens do matter to a loss that (wrongly) keeps them: the check can fail
    _, g_changed = reference_grads(model0, changed, lambda ep, k: 1.0 if k == len(ep.turns) - 1 else 0.0,
                                   kept_tokens(changed) + len(changed[2].turns[-1].code) + 1)
    assert max_gap(base, g_changed) > 1e-3


def test_no_passing_episode_leaves_the_weights_untouched(model0):
    """Nothing to imitate: no optimizer step at all (Adam's momentum would otherwise still move the weights)."""
    episodes = three_episodes()
    for ep in episodes:
        ep.private = sandbox.RunResult(tests=[sandbox.TestResult("wrong_answer")], cpu_time=0.01, wall_time=0.01)
    stats, delta = run_update(model0, episodes, 2)
    assert stats["sft_loss"] == 0.0
    assert all(float(d.abs().max()) == 0.0 for d in delta.values())


# --------------------------------------------------------------------------- 3. the batching behind the update

@pytest.mark.parametrize("micro", [1, 2, 4])
def test_forward_in_chunks_matches_log_softmax_on_each_unpadded_episode(model0, micro):
    """Rows go through shortest first, each chunk cut to its longest row; the result must still be every
    episode's own log-probabilities in its own row."""
    episodes = three_episodes() + [episode("Print 7.\n", [("act", "print(1)", -1.0), ("obs", "wrong: 1 != 7\n"),
                                                          ("act", "print(7)", 1.0)], passed=True)]
    b = batch(episodes)
    logps, _ = forward_in_chunks(Scorer(model0, 1.0, 1024), b, micro)
    assert logps.shape == b.inputs.shape
    for row, ep in enumerate(episodes):
        with torch.no_grad():
            logp = torch.log_softmax(model0(torch.tensor([ep.tokens[:-1]]))[0].float(), dim=-1)   # (n-1, V)
        expected = logp.gather(1, torch.tensor(ep.tokens[1:])[:, None]).squeeze(1)
        n = len(ep.tokens) - 1
        torch.testing.assert_close(logps[row, :n], expected, rtol=1e-4, atol=1e-5)


def test_kept_rows_single_rank_keeps_only_weighted_rows():
    keep = torch.tensor([[0.0, 0.0], [0.0, 1.0], [0.0, 0.0], [0.5, 0.5]])
    assert kept_rows(keep, 1).tolist() == [1, 3]


def _kept_rows_rank(rank: int, port: int, results):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        weighted = {0: [2], 1: [0, 1, 3]}[rank]   # rank 0 keeps 1 row of 4, rank 1 keeps 3
        keep = torch.zeros(4, 3)
        keep[weighted, 1] = 1.0
        results[rank] = kept_rows(keep, 2).tolist()
    finally:
        dist.destroy_process_group()


def test_kept_rows_pads_every_rank_to_the_same_count():
    """DDP needs one backward pass per micro-batch on every rank: the rank with fewer weighted rows pads with
    zero-weight rows, its weighted rows first."""
    import socket
    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.Manager().dict()
    mp.spawn(_kept_rows_rank, args=(port, results), nprocs=2)
    assert results[1] == [0, 1, 3]
    assert results[0][0] == 2 and len(results[0]) == 3 and set(results[0][1:]) <= {0, 1, 3}


def test_regroup_by_length_keeps_the_rows_and_sorts_them():
    lengths = torch.tensor([5, 1, 9, 3, 7])
    groups = regroup_by_length([torch.tensor([0, 2]), torch.tensor([3, 4])], lengths, 3)
    assert [g.tolist() for g in groups] == [[3, 0, 4], [2]]   # lengths 3, 5, 7 | 9; row 1 was never in it
    mask = torch.tensor([[1, 1, 0, 0], [1, 0, 1, 0]], dtype=torch.bool)   # (B, T) action tokens
    assert row_lengths(mask).tolist() == [2, 3]
