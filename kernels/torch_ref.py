"""Chunked pure-PyTorch path: the same two primitives as triton_kernels.py, for CPU (and any device).

Each primitive walks the rows in chunks, so that one fp32 (rows, V) block of 16 MB and a few temporaries of
its size exist at a time. Backward recomputes each chunk's softmax from the saved log-sum-exp. The inputs are
one contiguous (N, V) chunk of logits from fused_linear.py; accumulation is in fp32 (fp64 for fp64 logits, so
gradcheck can run).
"""
import torch

CHUNK_ELEMENTS = 1 << 22  # fp32 elements in one (rows, V) working block: 16 MB, about 32 rows at V = 128256


def _row_chunks(n_rows: int, vocab: int):
    step = max(1, CHUNK_ELEMENTS // max(vocab, 1))
    for start in range(0, n_rows, step):
        yield start, min(start + step, n_rows)


def _log_softmax_(z: torch.Tensor) -> torch.Tensor:
    """In place z -> log softmax(z) over the last dim; returns lse (R,). The max is subtracted first (exact
    for the top logits), so log p keeps its digits even when all logits sit far from 0 (e.g. +1000)."""
    m = z.amax(-1, keepdim=True).clamp_min_(-1e30)      # clamp: an all -inf row gives nan, not -inf - -inf
    lse_shifted = torch.logsumexp(z.sub_(m), dim=-1, keepdim=True)
    z.sub_(lse_shifted)
    return (m + lse_shifted).squeeze(-1)


def logprobs_forward(logits, targets, temperature: float, with_entropy: bool):
    """logits (N, V), targets (N,) long -> logprobs (N,), entropy (N,) or None, lse (N,) of logits / T."""
    n, vocab = logits.shape
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    logprobs = torch.empty(n, dtype=acc, device=logits.device)
    lse = torch.empty(n, dtype=acc, device=logits.device)
    entropy = torch.empty(n, dtype=acc, device=logits.device) if with_entropy else None
    for s, e in _row_chunks(n, vocab):
        logp = logits[s:e].to(acc) / temperature                  # (R, V) z = logits / T, a fresh tensor
        lse[s:e] = _log_softmax_(logp)                             # now log p
        logprobs[s:e] = logp.gather(1, targets[s:e, None]).squeeze(1)
        if with_entropy:  # H = -sum p log p, where p = 0 (log p = -inf) adds 0, not nan
            p = logp.exp()
            entropy[s:e] = -torch.where(p > 0, p * logp, 0.0).sum(-1)
    return logprobs, entropy, lse


def logprobs_backward(logits, targets, temperature, lse, entropy, grad_logprobs, grad_entropy, out):
    """Gradient w.r.t. the logits, written into `out` (N, V) in the logits dtype (may be `logits` itself).

    With z = logits / T, p = softmax(z), lp_t = log p_t and H = -sum p log p:
      d lp_t / d z_i = onehot_i - p_i
      d H / d z_i    = -p_i (log p_i + H)
    and d/d logits = (1/T) d/d z. The target element g (1 - p_t) is formed in fp32 as -g expm1(lp_t), which
    keeps its digits when p_t -> 1 (1 - p_t would cancel), and only then rounded to the logits dtype.
    """
    n, vocab = logits.shape
    for s, e in _row_chunks(n, vocab):
        logp = (logits[s:e].to(lse.dtype) / temperature).sub_(lse[s:e, None])   # (R, V) log p
        p = logp.exp()
        g = grad_logprobs[s:e, None].to(p.dtype)
        t = targets[s:e, None]
        grad = p * -g                                                    # (R, V): -g p off target
        grad.scatter_(1, t, -g * torch.expm1(logp.gather(1, t)))         # g (1 - p_t) on target
        if entropy is not None:
            gh = grad_entropy[s:e, None].to(p.dtype)
            grad -= gh * torch.where(p > 0, p * (logp + entropy[s:e, None]), 0.0)
        out[s:e] = grad.div_(temperature)
    return out
