"""Per-token logprob, entropy and KL at temperature T, forward and backward, without (N, V) fp32 copies.

Two implementations behind one interface (DESIGN.md, kernels/):
  backend="auto"   -> Triton for CUDA tensors, the chunked PyTorch path otherwise
  backend="triton" -> Triton kernels (on CPU tensors only under TRITON_INTERPRET=1, set before importing triton)
  backend="torch"  -> chunked PyTorch (kernels/torch_ref.py)
triton is imported only when the Triton backend is used, so a CPU user never needs it.

Conventions: logits (..., V) in bf16/fp16/fp32 (fp64 allowed, for gradcheck); targets (...) int64.
Outputs are float32 (float64 for float64 logits), accumulated in fp32 whatever the input dtype.
Logits whose rows are not contiguous in memory are copied once (reshape) before the kernels run;
pass contiguous logits to avoid that (N, V) copy.
"""
import os

import torch

from . import torch_ref
from .fused_linear import FusedLinearLogprobs

__all__ = ["token_logprobs", "fused_linear_logprobs", "kl_k1", "kl_k3", "full_kl"]

_FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)


# ----------------------------------------------------------------------------- validation and dispatch
def _check_temperature(temperature) -> float:
    t = float(temperature)
    if not t > 0 or t == float("inf"):
        raise ValueError(f"kernels: temperature must be a finite number > 0, got {temperature!r}")
    return t


def _check_logits(name: str, logits: torch.Tensor) -> None:
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"kernels: {name} must be a torch.Tensor, got {type(logits).__name__}")
    if logits.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"kernels: {name} must be bf16/fp16/fp32/fp64, got {logits.dtype}")
    if logits.dim() < 1 or logits.shape[-1] == 0:
        raise ValueError(f"kernels: {name} must have a non-empty last (vocabulary) dim, got {tuple(logits.shape)}")


def _check_targets(targets: torch.Tensor, batch_shape, vocab: int, device) -> None:
    if not isinstance(targets, torch.Tensor) or targets.dtype != torch.int64:
        got = targets.dtype if isinstance(targets, torch.Tensor) else type(targets).__name__
        raise TypeError(f"kernels: targets must be an int64 (long) tensor, got {got}")
    if tuple(targets.shape) != tuple(batch_shape):
        raise ValueError(f"kernels: targets shape {tuple(targets.shape)} must equal the leading dims "
                         f"{tuple(batch_shape)} of the logits/hidden states")
    if targets.device != device:
        raise ValueError(f"kernels: targets on {targets.device} but logits on {device}")
    if targets.numel():
        lo, hi = int(targets.min()), int(targets.max())   # one host sync; kernels would read out of bounds
        if lo < 0 or hi >= vocab:
            raise IndexError(f"kernels: target ids must lie in [0, {vocab}), got min {lo}, max {hi}")


def _backend(name: str, tensor: torch.Tensor):
    if name not in ("auto", "triton", "torch"):
        raise ValueError(f"kernels: backend must be 'auto', 'triton' or 'torch', got {name!r}")
    if name == "torch" or (name == "auto" and not tensor.is_cuda):
        return torch_ref
    if not tensor.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("kernels: backend='triton' on CPU tensors needs TRITON_INTERPRET=1 in the environment "
                           "before triton is imported; use backend='torch' or 'auto' on CPU")
    from . import triton_kernels
    return triton_kernels


def _rows(x: torch.Tensor) -> torch.Tensor:
    """(..., V) -> (N, V) with unit stride along V and rows addressable with one stride (copies if needed)."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


# ----------------------------------------------------------------------------- selected-token logprobs
class _TokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, temperature, with_entropy, backend):
        # logits (N, V), targets (N,)
        logprobs, entropy, lse = backend.logprobs_forward(logits, targets, temperature, with_entropy)
        ctx.save_for_backward(logits, targets, lse, entropy)
        ctx.temperature, ctx.backend = temperature, backend
        return (logprobs, entropy) if with_entropy else logprobs

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_logprobs, grad_entropy=None):
        logits, targets, lse, entropy = ctx.saved_tensors
        grad = ctx.backend.logprobs_backward(
            logits, targets, ctx.temperature, lse, entropy, grad_logprobs.contiguous(),
            None if entropy is None else grad_entropy.contiguous())
        return grad, None, None, None, None


def token_logprobs(logits, targets, temperature=1.0, *, with_entropy=False, backend="auto"):
    """log_softmax(logits / T)[targets] -> (...) float32; with_entropy also returns H(softmax(logits / T)).

    logits (..., V) bf16/fp16/fp32, targets (...) int64. Differentiable w.r.t. logits; backward recomputes
    the softmax from the saved log-sum-exp (no (N, V) fp32 tensor is kept between forward and backward).
    """
    _check_logits("logits", logits)
    batch_shape, vocab = logits.shape[:-1], logits.shape[-1]
    _check_targets(targets, batch_shape, vocab, logits.device)
    t = _check_temperature(temperature)
    impl = _backend(backend, logits)
    out = _TokenLogprobs.apply(_rows(logits), targets.reshape(-1).contiguous(), t, bool(with_entropy), impl)
    if with_entropy:
        return out[0].view(batch_shape), out[1].view(batch_shape)
    return out.view(batch_shape)


# ----------------------------------------------------------------------------- fused lm_head + logprobs
def fused_linear_logprobs(hidden, weight, targets, temperature=1.0, *, with_entropy=False, chunk_size=1024,
                          backend="auto"):
    """token_logprobs(hidden @ weight.T, targets, T) without ever materialising the (N, V) logits.

    hidden (N, D) (or (..., D)), weight (V, D) (the lm_head weight), targets (N,) int64. Logits are made
    chunk_size tokens at a time, forward and (recomputed) backward; differentiable w.r.t. hidden and weight.
    """
    _check_logits("hidden", hidden)
    _check_logits("weight", weight)
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"kernels: weight must be (V, D) with D = hidden.shape[-1] = {hidden.shape[-1]}, "
                         f"got {tuple(weight.shape)}")
    if weight.dtype != hidden.dtype or weight.device != hidden.device:
        raise TypeError(f"kernels: hidden ({hidden.dtype}, {hidden.device}) and weight ({weight.dtype}, "
                        f"{weight.device}) must share dtype and device")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"kernels: chunk_size must be a positive int, got {chunk_size!r}")
    batch_shape = hidden.shape[:-1]
    _check_targets(targets, batch_shape, weight.shape[0], hidden.device)
    t = _check_temperature(temperature)
    impl = _backend(backend, hidden)
    # Frozen lm_head, no entropy: precompute d lp / d hidden in forward instead of recomputing logits later.
    precompute = torch.is_grad_enabled() and hidden.requires_grad and not weight.requires_grad and not with_entropy
    out = FusedLinearLogprobs.apply(hidden.reshape(-1, hidden.shape[-1]).contiguous(), weight,
                                    targets.reshape(-1).contiguous(), t, bool(with_entropy), chunk_size, impl,
                                    precompute)
    if with_entropy:
        return out[0].view(batch_shape), out[1].view(batch_shape)
    return out.view(batch_shape)


# ----------------------------------------------------------------------------- KL estimators
def kl_k1(logp, logq):
    """k1 = log p - log q: the unbiased sampled estimator of KL(p || q) for x ~ p (Schulman 2020,
    "Approximating KL divergence"). logp: policy logprobs, logq: reference logprobs, same shape."""
    if logp.shape != logq.shape:
        raise ValueError(f"kernels.kl_k1: logp {tuple(logp.shape)} and logq {tuple(logq.shape)} differ in shape")
    return logp - logq


def kl_k3(logp, logq):
    """k3 = exp(log q - log p) - (log q - log p) - 1 >= 0: unbiased, lower variance (Schulman 2020).
    Clamped as verl (trainer/ppo/core_algos.py, kl_penalty "low_var_kl") and OpenRLHF
    (models/utils.py, compute_approx_kl "k3") do: the log-ratio to [-20, 20] so exp cannot overflow, and the
    estimate to [-10, 10] so one badly off-policy token cannot dominate the loss."""
    if logp.shape != logq.shape:
        raise ValueError(f"kernels.kl_k3: logp {tuple(logp.shape)} and logq {tuple(logq.shape)} differ in shape")
    log_ratio = (logq - logp).clamp(-20.0, 20.0)
    return (log_ratio.exp() - log_ratio - 1.0).clamp(-10.0, 10.0)


class _FullKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, policy_logits, ref_logits, temperature, backend):
        kl, lse_p, lse_q = backend.full_kl_forward(policy_logits, ref_logits, temperature)
        ctx.save_for_backward(policy_logits, ref_logits, lse_p, lse_q, kl)
        ctx.temperature, ctx.backend = temperature, backend
        return kl

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_kl):
        policy_logits, ref_logits, lse_p, lse_q, kl = ctx.saved_tensors
        grad = ctx.backend.full_kl_backward(policy_logits, ref_logits, ctx.temperature, lse_p, lse_q, kl,
                                            grad_kl.contiguous())
        return grad, None, None, None   # the reference is a constant: no gradient flows into it


def full_kl(policy_logits, ref_logits, temperature=1.0, backend="auto"):
    """Exact KL(pi || pi_ref) = sum_v pi_v (log pi_v - log pi_ref_v) per row, both softmax(logits / T).

    policy_logits, ref_logits (..., V), any float dtypes (each accumulated in fp32) -> (...) float32.
    Differentiable w.r.t. policy_logits only; ref_logits is treated as a constant (detached).
    """
    _check_logits("policy_logits", policy_logits)
    _check_logits("ref_logits", ref_logits)
    if policy_logits.shape != ref_logits.shape:
        raise ValueError(f"kernels.full_kl: policy_logits {tuple(policy_logits.shape)} and ref_logits "
                         f"{tuple(ref_logits.shape)} differ in shape")
    if policy_logits.device != ref_logits.device:
        raise ValueError(f"kernels.full_kl: policy_logits on {policy_logits.device}, ref_logits on "
                         f"{ref_logits.device}")
    t = _check_temperature(temperature)
    impl = _backend(backend, policy_logits)
    kl = _FullKL.apply(_rows(policy_logits), _rows(ref_logits.detach()), t, impl)
    return kl.view(policy_logits.shape[:-1])
