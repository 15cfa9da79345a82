"""kernels/: the fused lm_head + logprob path, and the two primitives it calls on each chunk of logits in
both backends, against a float64 autograd reference (Triton runs under TRITON_INTERPRET=1, set by conftest.py
before triton is imported, so shapes for the Triton path stay small)."""
import math

import pytest
import torch

import kernels
from kernels import torch_ref

BACKENDS = ["torch", "triton"]
# (rtol, atol) for values and gradients stored in each dtype; fp32 accumulation everywhere.
TOL = {torch.float32: (1e-4, 1e-6), torch.float16: (2e-3, 1e-5), torch.bfloat16: (1.6e-2, 1e-5)}


def reference(logits, targets, temperature, grad_lp, grad_ent):
    """float64 autograd: logprobs, entropy and d(sum g_lp lp + g_ent H)/d logits of the (rounded) logits."""
    x = logits.detach().double().requires_grad_()
    logp = torch.log_softmax(x / temperature, dim=-1)
    lp = logp.gather(-1, targets[..., None]).squeeze(-1)
    ent = -(logp.exp() * logp).sum(-1)
    (grad,) = torch.autograd.grad((lp * grad_lp.double()).sum() + (ent * grad_ent.double()).sum(), x)
    return lp, ent, grad


def run(logits, targets, temperature, grad_lp, grad_ent, backend):
    """The backend's primitives as fused_linear.py calls them on a chunk: logprobs, entropy, then the gradient
    of sum g_lp lp + g_ent H written over the logits (here a copy)."""
    primitives = kernels.pick_backend(backend, logits)
    lp, ent, lse = primitives.logprobs_forward(logits, targets, temperature, True)
    x = logits.clone()
    grad = primitives.logprobs_backward(x, targets, temperature, lse, ent, grad_lp, grad_ent, out=x)
    assert grad.data_ptr() == x.data_ptr()
    return lp, ent, grad


def random_case(n, vocab, dtype, seed, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n, vocab, generator=g) * scale).to(dtype)
    targets = torch.randint(0, vocab, (n,), generator=g)
    return logits, targets, torch.randn(n, generator=g), torch.randn(n, generator=g)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("vocab,temperature", [(1000, 1.0), (5003, 0.6), (4096, 1.7), (17, 1.3)])
def test_logprobs_entropy_and_grad_match_fp64_reference(backend, dtype, vocab, temperature):
    # 1000, 5003 and 17 are not multiples of the 4096 block (or of their power-of-2 block): the masked tail
    # runs.
    logits, targets, g_lp, g_ent = random_case(6, vocab, dtype, seed=vocab)
    lp, ent, grad = run(logits, targets, temperature, g_lp, g_ent, backend)
    lp_ref, ent_ref, grad_ref = reference(logits, targets, temperature, g_lp, g_ent)
    assert lp.dtype == torch.float32 and ent.dtype == torch.float32 and grad.dtype == dtype
    torch.testing.assert_close(lp.double(), lp_ref, rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(ent.double(), ent_ref, rtol=1e-5, atol=2e-5)
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(grad.double(), grad_ref, rtol=rtol, atol=atol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_confident_target_keeps_one_minus_p(backend, dtype):
    # p(target) ~ 0.999: in bf16, 1 - p rounds to 0 if formed after rounding p (bf16 spacing at 1 is 2^-8).
    vocab, temperature = 3001, 0.8
    logits, targets, _, _ = random_case(4, vocab, torch.float32, seed=7, scale=1.0)
    rest = torch.logsumexp(logits / temperature, -1) * temperature       # put log p_t = log 0.999 exactly
    logits[torch.arange(4), targets] = rest + temperature * math.log(999.0)
    logits = logits.to(dtype)
    ones, zeros = torch.ones(4), torch.zeros(4)
    lp, _, grad = run(logits, targets, temperature, ones, zeros, backend)
    lp_ref, _, grad_ref = reference(logits, targets, temperature, ones, zeros)
    assert (lp_ref.exp() > 0.998).all()
    torch.testing.assert_close(lp.double(), lp_ref, rtol=0, atol=1e-6)
    at_target = grad[torch.arange(4), targets].double()
    ref_target = grad_ref[torch.arange(4), targets]                      # (1 - p_t) / T ~ 1.25e-3
    rel = 1e-3 if dtype == torch.float32 else 8e-3
    assert ((at_target - ref_target).abs() / ref_target).max() < rel


@pytest.mark.parametrize("backend,n", [("torch", 4), ("triton", 2)])
def test_full_llama3_vocab(backend, n):
    logits, targets, g_lp, g_ent = random_case(n, 128256, torch.bfloat16, seed=3, scale=4.0)
    lp, ent, grad = run(logits, targets, 0.9, g_lp, g_ent, backend)
    lp_ref, ent_ref, grad_ref = reference(logits, targets, 0.9, g_lp, g_ent)
    torch.testing.assert_close(lp.double(), lp_ref, rtol=1e-5, atol=5e-5)
    torch.testing.assert_close(ent.double(), ent_ref, rtol=1e-5, atol=5e-5)
    torch.testing.assert_close(grad.double(), grad_ref, rtol=1.6e-2, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_vocab_entries_give_no_nan(backend):
    # -inf logits (e.g. banned tokens) must contribute exactly 0 to sums and gradients, not 0 * inf = nan.
    logits, targets, g_lp, g_ent = random_case(3, 300, torch.float32, seed=11)
    banned = torch.zeros(3, 300, dtype=torch.bool)
    banned[:, ::7] = True
    banned[torch.arange(3), targets] = False
    logits[banned] = -float("inf")
    lp, ent, grad = run(logits, targets, 1.2, g_lp, g_ent, backend)
    lp_ref, ent_ref, _ = reference(logits.masked_fill(banned, -1e4), targets, 1.2, g_lp, g_ent)
    assert torch.isfinite(lp).all() and torch.isfinite(ent).all() and torch.isfinite(grad).all()
    assert (grad[banned] == 0).all()
    torch.testing.assert_close(lp.double(), lp_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent.double(), ent_ref, rtol=1e-5, atol=1e-5)


def test_torch_path_really_chunks(monkeypatch):
    monkeypatch.setattr(torch_ref, "CHUNK_ELEMENTS", 3 * 257)          # 3 rows per chunk, 10 rows -> 4 chunks
    logits, targets, g_lp, g_ent = random_case(10, 257, torch.float32, seed=5)
    lp, ent, grad = run(logits, targets, 1.1, g_lp, g_ent, "torch")
    lp_ref, ent_ref, grad_ref = reference(logits, targets, 1.1, g_lp, g_ent)
    torch.testing.assert_close(lp.double(), lp_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad.double(), grad_ref, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_noncontiguous_and_batched_hidden(backend):
    # hidden[:, :-1] of a (B, T, D) tensor is the usual slice before the lm_head: not contiguous.
    full = torch.randn(2, 5, 6, requires_grad=True)
    weight = torch.randn(40, 6)
    targets = torch.randint(0, 40, (2, 4))
    lp = kernels.fused_linear_logprobs(full[:, :-1], weight, targets, 0.7, chunk_size=3, backend=backend)
    assert lp.shape == (2, 4)
    lp.sum().backward()
    logits = full.detach()[:, :-1].double() @ weight.double().T
    ref = torch.log_softmax(logits / 0.7, -1).gather(-1, targets[..., None])[..., 0]
    torch.testing.assert_close(lp.double(), ref, rtol=1e-5, atol=1e-6)
    assert (full.grad[:, -1] == 0).all() and full.grad[:, :-1].abs().sum() > 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_fused_linear_fp64(backend):
    # The Triton kernels accumulate in fp64 for fp64 inputs (ACC_DTYPE constexpr), so gradcheck runs on both.
    # Each interpreted Triton launch costs ~10 ms: its shape is smaller.
    n, d, vocab = (5, 4, 11) if backend == "torch" else (3, 2, 9)
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(n, d, dtype=torch.float64, generator=g, requires_grad=True)
    weight = torch.randn(vocab, d, dtype=torch.float64, generator=g, requires_grad=True)
    targets = torch.randint(0, vocab, (n,), generator=g)

    def fused(h, w):
        return kernels.fused_linear_logprobs(h, w, targets, 0.9, with_entropy=True, chunk_size=2,
                                             backend=backend)

    assert torch.autograd.gradcheck(fused, (hidden, weight))


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_linear_equals_unfused(backend):
    g = torch.Generator().manual_seed(2)
    n, d, vocab, temperature = 37, 16, 1000, 0.7
    hidden = torch.randn(n, d, generator=g)
    weight = torch.randn(vocab, d, generator=g) * 0.5
    targets = torch.randint(0, vocab, (n,), generator=g)
    g_lp, g_ent = torch.randn(n, generator=g), torch.randn(n, generator=g)

    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    lp, ent = kernels.fused_linear_logprobs(h, w, targets, temperature, with_entropy=True, chunk_size=8,
                                            backend=backend)            # 37 = 4 full chunks + a ragged one
    ((lp * g_lp).sum() + (ent * g_ent).sum()).backward()

    h64, w64 = hidden.double().requires_grad_(), weight.double().requires_grad_()
    logp = torch.log_softmax(h64 @ w64.T / temperature, -1)
    lp_ref = logp.gather(-1, targets[:, None])[:, 0]
    ent_ref = -(logp.exp() * logp).sum(-1)
    ((lp_ref * g_lp.double()).sum() + (ent_ref * g_ent.double()).sum()).backward()

    torch.testing.assert_close(lp.double(), lp_ref.detach(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(ent.double(), ent_ref.detach(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(h.grad.double(), h64.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(w.grad.double(), w64.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("frozen_weight", [False, True])
def test_fused_linear_under_bf16_autocast_keeps_fp32(frozen_weight):
    """Autocast must not reach inside the fused kernel: under a bf16 autocast region, forward and backward
    (backward inside the region too) give exactly the fp32 results computed without autocast."""
    g = torch.Generator().manual_seed(6)
    hidden, weight = torch.randn(23, 16, generator=g), torch.randn(500, 16, generator=g) * 0.5
    targets = torch.randint(0, 500, (23,), generator=g)

    def logprobs_and_grads(autocast: bool):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_(not frozen_weight)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            lp = kernels.fused_linear_logprobs(h, w, targets, chunk_size=8)
            (lp * torch.linspace(-1, 1, 23)).sum().backward()
        return lp, h.grad, w.grad

    lp, h_grad, w_grad = logprobs_and_grads(autocast=True)
    lp_ref, h_grad_ref, w_grad_ref = logprobs_and_grads(autocast=False)
    assert lp.dtype == torch.float32 and torch.equal(lp, lp_ref)
    assert torch.equal(h_grad, h_grad_ref)
    assert (w_grad is None) if frozen_weight else torch.equal(w_grad, w_grad_ref)


def test_fused_linear_frozen_weight_and_bf16():
    g = torch.Generator().manual_seed(4)
    hidden = torch.randn(2, 9, 32, generator=g).bfloat16().requires_grad_()     # (B, T, D) also accepted
    weight = (torch.randn(300, 32, generator=g) * 0.3).bfloat16()               # frozen lm_head (LoRA)
    targets = torch.randint(0, 300, (2, 9), generator=g)
    lp = kernels.fused_linear_logprobs(hidden, weight, targets, chunk_size=5)
    lp.sum().backward()
    ref = torch.log_softmax((hidden.detach() @ weight.T).float(), -1).gather(-1, targets[..., None])[..., 0]
    torch.testing.assert_close(lp, ref, rtol=1e-5, atol=1e-5)
    h64 = hidden.detach().double().requires_grad_()
    torch.log_softmax(h64 @ weight.double().T, -1).gather(-1, targets[..., None]).sum().backward()
    torch.testing.assert_close(hidden.grad.double(), h64.grad, rtol=1.6e-2, atol=1e-3)
    assert weight.grad is None


def test_sampled_kl_estimators():
    # Hand values: p = 0.5, q = 0.25 -> k1 = log 2, k3 = q/p - log(q/p) - 1 = 0.5 + log 2 - 1.
    logp, logq = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)])
    assert torch.allclose(kernels.kl_k1(logp, logq), torch.tensor([math.log(2.0)]))
    assert torch.allclose(kernels.kl_k3(logp, logq), torch.tensor([0.5 + math.log(2.0) - 1.0]))
    # Clamps: log ratio 50 -> 20, then exp(20) - 21 -> 10; log ratio -50 -> -20 -> exp(-20) + 19 -> 10.
    assert kernels.kl_k3(torch.tensor([0.0, 0.0]), torch.tensor([50.0, -50.0])).tolist() == [10.0, 10.0]
    # Both are unbiased for KL(p || q) when x ~ p (Schulman 2020): Monte Carlo against the exact sum.
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(6, generator=g), 0)
    q = torch.softmax(torch.randn(6, generator=g), 0)
    x = torch.multinomial(p, 200_000, replacement=True, generator=g)
    exact = (p * (p.log() - q.log())).sum()
    for est in (kernels.kl_k1, kernels.kl_k3):
        samples = est(p.log()[x], q.log()[x])
        assert abs(samples.mean() - exact) < 4 * samples.std() / math.sqrt(len(x))


def test_bad_inputs_raise_clear_errors(monkeypatch):
    hidden, weight = torch.randn(4, 8), torch.randn(10, 8)
    targets = torch.randint(0, 10, (4,))
    with pytest.raises(ValueError, match="targets shape"):
        kernels.fused_linear_logprobs(hidden, weight, targets[:3])
    with pytest.raises(IndexError, match=r"\[0, 10\)"):
        kernels.fused_linear_logprobs(hidden, weight, torch.tensor([0, 1, 2, 10]))
    with pytest.raises(IndexError, match="min -1"):
        kernels.fused_linear_logprobs(hidden, weight, torch.tensor([0, -1, 2, 3]))
    for bad_t in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="temperature"):
            kernels.fused_linear_logprobs(hidden, weight, targets, bad_t)
    with pytest.raises(TypeError, match="int64"):
        kernels.fused_linear_logprobs(hidden, weight, targets.int())
    with pytest.raises(TypeError, match="bf16/fp16/fp32"):
        kernels.fused_linear_logprobs(torch.ones(4, 8, dtype=torch.int64), weight.long(), targets)
    with pytest.raises(TypeError, match="must share dtype"):
        kernels.fused_linear_logprobs(hidden, weight.double(), targets)
    with pytest.raises(ValueError, match="backend"):
        kernels.fused_linear_logprobs(hidden, weight, targets, backend="cuda")
    with pytest.raises(ValueError, match="weight must be"):
        kernels.fused_linear_logprobs(hidden, torch.randn(10, 7), targets)
    with pytest.raises(ValueError, match="chunk_size"):
        kernels.fused_linear_logprobs(hidden, weight, targets, chunk_size=0)
    with pytest.raises(ValueError, match="differ in shape"):
        kernels.kl_k3(torch.zeros(3), torch.zeros(4))
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        kernels.fused_linear_logprobs(hidden, weight, targets, backend="triton")


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_linear_frozen_weight_grad(backend):
    # A frozen weight (LoRA's lm_head) with no entropy term: only grad_hidden is made.
    g = torch.Generator().manual_seed(6)
    hidden = torch.randn(13, 8, generator=g, requires_grad=True)
    weight = torch.randn(500, 8, generator=g)
    targets = torch.randint(0, 500, (13,), generator=g)
    g_lp = torch.randn(13, generator=g)
    lp = kernels.fused_linear_logprobs(hidden, weight, targets, 1.4, chunk_size=4, backend=backend)
    (lp * g_lp).sum().backward()
    h64 = hidden.detach().double().requires_grad_()
    lp_ref = torch.log_softmax(h64 @ weight.double().T / 1.4, -1).gather(-1, targets[:, None])[:, 0]
    (lp_ref * g_lp.double()).sum().backward()
    torch.testing.assert_close(lp.double(), lp_ref.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(hidden.grad.double(), h64.grad, rtol=1e-4, atol=1e-5)
