"""Per-token logprob and entropy at temperature T, forward and backward, without (N, V) fp32 copies; and the
sampled KL estimators k1 and k3.

Two implementations of the same two primitives (logprobs_forward, logprobs_backward) behind one interface:
  backend="auto"   -> Triton for CUDA tensors, the chunked PyTorch path otherwise
  backend="triton" -> kernels/triton_kernels.py (on CPU tensors only under TRITON_INTERPRET=1)
  backend="torch"  -> kernels/torch_ref.py
Outputs are fp32 (fp64 for fp64 logits, for gradcheck), accumulated in fp32 whatever the input dtype.
"""
import os

import torch

from . import torch_ref
from .fused_linear import FusedLinearLogprobs

__all__ = ["token_logprobs", "fused_linear_logprobs", "kl_k1", "kl_k3"]


def token_logprobs(logits, targets, temperature=1.0, *, with_entropy=False, backend="auto"):
    """log_softmax(logits / T)[targets] -> (...) fp32; with_entropy also returns H(softmax(logits / T)).
    logits (..., V), targets (...). Backward recomputes the softmax from the saved log-sum-exp: no (N, V) fp32
    tensor is kept between forward and backward."""
    check_float("logits", logits)
    batch_shape = logits.shape[:-1]
    check_targets(targets, batch_shape, logits.shape[-1], logits.device)
    rows = logits.reshape(-1, logits.shape[-1])
    rows = rows if rows.stride(-1) == 1 else rows.contiguous()
    out = TokenLogprobs.apply(rows, targets.reshape(-1).contiguous(), check_temperature(temperature),
                              bool(with_entropy), pick_backend(backend, logits))
    return shaped(out, batch_shape)


def fused_linear_logprobs(hidden, weight, targets, temperature=1.0, *, with_entropy=False, chunk_size=1024,
                          backend="auto"):
    """token_logprobs(hidden @ weight.T, targets, T) without ever making the (N, V) logits: they are made
    chunk_size tokens at a time, in forward and again in backward. hidden (..., D), weight (V, D)."""
    check_float("hidden", hidden)
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"kernels: weight must be (V, D) with D = hidden.shape[-1] = {hidden.shape[-1]}, "
                         f"got {tuple(weight.shape)}")
    if weight.dtype != hidden.dtype or weight.device != hidden.device:
        raise TypeError(f"kernels: hidden ({hidden.dtype}, {hidden.device}) and weight ({weight.dtype}, "
                        f"{weight.device}) must share dtype and device")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"kernels: chunk_size must be a positive int, got {chunk_size!r}")
    batch_shape = hidden.shape[:-1]
    check_targets(targets, batch_shape, weight.shape[0], hidden.device)
    out = FusedLinearLogprobs.apply(hidden.reshape(-1, hidden.shape[-1]).contiguous(), weight,
                                    targets.reshape(-1).contiguous(), check_temperature(temperature),
                                    bool(with_entropy), chunk_size, pick_backend(backend, hidden))
    return shaped(out, batch_shape)


def kl_k1(logp, logq):
    """k1 = log p - log q: the unbiased sampled estimator of KL(p || q) for x ~ p (Schulman 2020,
    "Approximating KL divergence"). logp: the policy's logprobs, logq: the reference's, same shape."""
    check_same_shape(logp, logq)
    return logp - logq


def kl_k3(logp, logq):
    """k3 = exp(log q - log p) - (log q - log p) - 1 >= 0: unbiased, with lower variance (Schulman 2020).
    Clamped as verl (kl_penalty "low_var_kl") and OpenRLHF (compute_approx_kl "k3") do: the log-ratio to
    [-20, 20] so exp cannot overflow, the estimate to [-10, 10] so one far off-policy token cannot dominate.
    """
    check_same_shape(logp, logq)
    log_ratio = (logq - logp).clamp(-20.0, 20.0)
    return (log_ratio.exp() - log_ratio - 1.0).clamp(-10.0, 10.0)


class TokenLogprobs(torch.autograd.Function):
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


# -- checks and dispatch ----------------------------------------------------------------------------------

def shaped(out, batch_shape):
    """(N,) results, or (logprobs, entropy), viewed as batch_shape."""
    return tuple(x.view(batch_shape) for x in out) if isinstance(out, tuple) else out.view(batch_shape)


def check_float(name: str, x: torch.Tensor):
    if x.dtype not in (torch.bfloat16, torch.float16, torch.float32, torch.float64):
        raise TypeError(f"kernels: {name} must be bf16/fp16/fp32/fp64, got {x.dtype}")
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"kernels: {name} must have a non-empty last dim, got {tuple(x.shape)}")


def check_targets(targets: torch.Tensor, batch_shape, vocab: int, device):
    if targets.dtype != torch.int64:
        raise TypeError(f"kernels: targets must be an int64 (long) tensor, got {targets.dtype}")
    if targets.shape != batch_shape:
        raise ValueError(f"kernels: targets shape {tuple(targets.shape)} must equal the leading dims "
                         f"{tuple(batch_shape)} of the logits/hidden states")
    if targets.device != device:
        raise ValueError(f"kernels: targets on {targets.device} but logits on {device}")
    if targets.numel():
        lo, hi = int(targets.min()), int(targets.max())  # a host sync; the kernels would read out of bounds
        if lo < 0 or hi >= vocab:
            raise IndexError(f"kernels: target ids must lie in [0, {vocab}), got min {lo}, max {hi}")


def check_same_shape(logp: torch.Tensor, logq: torch.Tensor):
    if logp.shape != logq.shape:
        raise ValueError(f"kernels: logp {tuple(logp.shape)} and logq {tuple(logq.shape)} differ in shape")


def check_temperature(temperature) -> float:
    t = float(temperature)
    if not 0 < t < float("inf"):
        raise ValueError(f"kernels: temperature must be a finite number > 0, got {temperature!r}")
    return t


def pick_backend(name: str, tensor: torch.Tensor):
    if name not in ("auto", "triton", "torch"):
        raise ValueError(f"kernels: backend must be 'auto', 'triton' or 'torch', got {name!r}")
    if name == "torch" or (name == "auto" and not tensor.is_cuda):
        return torch_ref
    if not tensor.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("kernels: backend='triton' on CPU tensors needs TRITON_INTERPRET=1 in the "
                           "environment before triton is imported; use backend='torch' or 'auto' on CPU")
    from . import triton_kernels
    return triton_kernels
