"""Fused lm_head + selected-token logprob: logits are made chunk by chunk over tokens and never exist in full.

Forward keeps only the per-token log-sum-exp (and entropy). Backward recomputes each chunk's logits (one extra
matmul, as in activation checkpointing), turns them into grad_logits in place, and folds them into grad_hidden
and grad_weight right away: the peak is about two (chunk_size, V) buffers plus grad_weight, at any length.
Autocast does not reach inside: logits are made in hidden's and weight's dtype, so log-probs under autocast
keep their precision, and the in-place `out=` buffers their dtype.
"""
import torch


def no_autocast(fn):
    def wrapper(ctx, *args):
        with torch.autocast(args[0].device.type, enabled=False):
            return fn(ctx, *args)
    return wrapper


class FusedLinearLogprobs(torch.autograd.Function):
    @staticmethod
    @no_autocast
    def forward(ctx, hidden, weight, targets, temperature, with_entropy, chunk_size, backend):
        # hidden (N, D), weight (V, D), targets (N,) long
        n = hidden.shape[0]
        acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        logprobs = torch.empty(n, dtype=acc, device=hidden.device)
        lse = torch.empty_like(logprobs)
        entropy = torch.empty_like(logprobs) if with_entropy else None
        for s in range(0, n, chunk_size):
            e = min(s + chunk_size, n)
            logits = hidden[s:e] @ weight.T                                   # (C, V), the only big buffer
            lp, ent, chunk_lse = backend.logprobs_forward(logits, targets[s:e], temperature, with_entropy)
            logprobs[s:e], lse[s:e] = lp, chunk_lse
            if with_entropy:
                entropy[s:e] = ent
            del logits
        ctx.save_for_backward(hidden, weight, targets, lse, entropy)
        ctx.temperature, ctx.chunk_size, ctx.backend = temperature, chunk_size, backend
        return (logprobs, entropy) if with_entropy else logprobs

    @staticmethod
    @torch.autograd.function.once_differentiable
    @no_autocast
    def backward(ctx, grad_logprobs, grad_entropy=None):
        hidden, weight, targets, lse, entropy = ctx.saved_tensors
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_logprobs = grad_logprobs.contiguous()
        if entropy is not None:
            grad_entropy = grad_entropy.contiguous()
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        # Low-precision weights accumulate their gradient in fp32 across chunks, then round once.
        wide = weight.dtype in (torch.float32, torch.float64)
        grad_weight = torch.zeros(weight.shape, dtype=weight.dtype if wide else torch.float32,
                                  device=weight.device) if need_weight else None
        n = hidden.shape[0]
        for s in range(0, n, ctx.chunk_size):
            e = min(s + ctx.chunk_size, n)
            h = hidden[s:e]
            logits = h @ weight.T                                             # (C, V) recomputed
            grad_logits = ctx.backend.logprobs_backward(
                logits, targets[s:e], ctx.temperature, lse[s:e], None if entropy is None else entropy[s:e],
                grad_logprobs[s:e], None if entropy is None else grad_entropy[s:e], out=logits)
            if need_hidden:
                torch.mm(grad_logits, weight, out=grad_hidden[s:e])           # (C, D)
            if need_weight:
                if wide:
                    grad_weight.addmm_(grad_logits.T, h)                      # (V, D) in place
                else:
                    grad_weight += (grad_logits.T @ h).float()
            del logits, grad_logits
        if need_weight and not wide:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None, None, None
