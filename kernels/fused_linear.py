"""Fused lm_head + selected-token logprob: logits are made chunk by chunk over tokens and never exist in full.

Forward keeps only the per-token log-sum-exp (and entropy). Backward recomputes each chunk's logits
(one extra matmul, the price of the memory saving, as in activation checkpointing), turns them into
grad_logits in place, and folds them into grad_hidden and grad_weight right away. Peak extra memory is
about two (chunk_size, V) buffers plus grad_weight, whatever the number of tokens.

When the weight is frozen (LoRA) and there is no entropy term, d lp_i / d hidden_i = g_i * b_i with
b_i = ((onehot - p_i) / T) @ W independent of the upstream g, so forward computes b (N, D) while the logits
chunk is still there and backward is one multiply: no recompute, the same matmul count as the naive path.

Autocast does not reach inside: the logits are made in the dtype of hidden and weight (which must match), so
log-probs under torch.autocast keep their precision, and the in-place `out=` buffers keep their dtype when
backward runs inside an autocast region too.
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
    def forward(ctx, hidden, weight, targets, temperature, with_entropy, chunk_size, backend, precompute):
        # hidden (N, D), weight (V, D), targets (N,) long
        n = hidden.shape[0]
        acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        logprobs = torch.empty(n, dtype=acc, device=hidden.device)
        lse = torch.empty_like(logprobs)
        entropy = torch.empty_like(logprobs) if with_entropy else None
        basis = torch.empty_like(hidden) if precompute else None             # (N, D) d lp / d hidden at g = 1
        for s in range(0, n, chunk_size):
            e = min(s + chunk_size, n)
            logits = hidden[s:e] @ weight.T                                   # (C, V), the only big buffer
            lp, ent, chunk_lse = backend.logprobs_forward(logits, targets[s:e], temperature, with_entropy)
            logprobs[s:e], lse[s:e] = lp, chunk_lse
            if with_entropy:
                entropy[s:e] = ent
            if precompute:
                ones = torch.ones(e - s, dtype=acc, device=hidden.device)
                grad_logits = backend.logprobs_backward(logits, targets[s:e], temperature, chunk_lse, None,
                                                        ones, None, out=logits)
                torch.mm(grad_logits, weight, out=basis[s:e])
                del grad_logits                                               # same buffer as logits
            del logits
        ctx.save_for_backward(hidden, weight, targets, lse, entropy, basis)
        ctx.temperature, ctx.chunk_size, ctx.backend = temperature, chunk_size, backend
        return (logprobs, entropy) if with_entropy else logprobs

    @staticmethod
    @torch.autograd.function.once_differentiable
    @no_autocast
    def backward(ctx, grad_logprobs, grad_entropy=None):
        hidden, weight, targets, lse, entropy, basis = ctx.saved_tensors
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if basis is not None and not need_weight:
            return basis * grad_logprobs[:, None].to(basis.dtype), None, None, None, None, None, None, None
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
        return grad_hidden, grad_weight, None, None, None, None, None, None
