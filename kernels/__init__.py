"""Per-token logprob and entropy at temperature T of hidden @ weight.T, forward and backward, without ever
making the (N, V) logits; and the sampled KL estimators k1 and k3.

fused_linear_logprobs (fused_linear.py) makes the logits a chunk of tokens at a time and hands each chunk to
one of two implementations of the same two primitives (logprobs_forward, logprobs_backward):
  backend="auto"   -> Triton for CUDA tensors, the chunked PyTorch path otherwise
  backend="triton" -> kernels/triton_kernels.py (on CPU tensors only under TRITON_INTERPRET=1)
  backend="torch"  -> kernels/torch_ref.py
Outputs are fp32 (fp64 for fp64 inputs, for gradcheck), accumulated in fp32 whatever the input dtype.
"""
import os

import torch

from . import torch_ref
from .fused_linear import FusedLinearLogprobs

__all__ = ["fused_linear_logprobs", "kl_k1", "kl_k3"]


def fused_linear_logprobs(hidden, weight, targets, temperature=1.0, *, with_entropy=False, chunk_size=1024,
                          backend="auto"):
    """log_softmax(hidden @ weight.T / T)[targets] -> (...) fp32; with_entropy also returns the entropy of
    softmax(hidden @ weight.T / T). hidden (..., D), weight (V, D), targets (...). The logits are made
    chunk_size tokens at a time, in forward and again in backward, and never exist in full."""
    check_inputs(hidden, weight, targets, chunk_size)
    batch_shape = hidden.shape[:-1]
    out = FusedLinearLogprobs.apply(hidden.reshape(-1, hidden.shape[-1]).contiguous(), weight,
                                    targets.reshape(-1).contiguous(), check_temperature(temperature),
                                    bool(with_entropy), chunk_size, pick_backend(backend, hidden))
    return tuple(x.view(batch_shape) for x in out) if with_entropy else out.view(batch_shape)


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


# -- checks and dispatch ----------------------------------------------------------------------------------

def check_inputs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_size):
    if hidden.dtype not in (torch.bfloat16, torch.float16, torch.float32, torch.float64):
        raise TypeError(f"kernels: hidden must be bf16/fp16/fp32/fp64, got {hidden.dtype}")
    if hidden.dim() < 1 or hidden.shape[-1] == 0:
        raise ValueError(f"kernels: hidden must have a non-empty last dim, got {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"kernels: weight must be (V, D) with D = hidden.shape[-1] = {hidden.shape[-1]}, "
                         f"got {tuple(weight.shape)}")
    if weight.dtype != hidden.dtype or weight.device != hidden.device:
        raise TypeError(f"kernels: hidden ({hidden.dtype}, {hidden.device}) and weight ({weight.dtype}, "
                        f"{weight.device}) must share dtype and device")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"kernels: chunk_size must be a positive int, got {chunk_size!r}")
    if targets.dtype != torch.int64:
        raise TypeError(f"kernels: targets must be an int64 (long) tensor, got {targets.dtype}")
    if targets.shape != hidden.shape[:-1]:
        raise ValueError(f"kernels: targets shape {tuple(targets.shape)} must equal the leading dims "
                         f"{tuple(hidden.shape[:-1])} of the hidden states")
    if targets.device != hidden.device:
        raise ValueError(f"kernels: targets on {targets.device} but hidden on {hidden.device}")
    if targets.numel():
        lo, hi = int(targets.min()), int(targets.max())  # a host sync; the kernels would read out of bounds
        if lo < 0 or hi >= weight.shape[0]:
            raise IndexError(f"kernels: target ids must lie in [0, {weight.shape[0]}), got min {lo}, "
                             f"max {hi}")


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
