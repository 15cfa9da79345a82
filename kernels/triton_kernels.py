"""Triton path: the same two primitives as torch_ref.py, as GPU kernels.

Forward kernels run one program per row and stream the vocabulary in BLOCK_V blocks with an online softmax
(Milakov & Gimelshein 2018, "Online normalizer calculation for softmax"), so a row is read once and nothing of
size V is written. Backward kernels are fully parallel over (rows x vocabulary blocks) and rebuild p from the
log-sum-exp saved by forward. Row offsets are int64 (row * stride overflows int32 past 16k rows at V = 128k).
On the CPU these run under Triton's interpreter (TRITON_INTERPRET=1 set before triton is imported).
"""
import torch
import triton
import triton.language as tl

BLOCK_V = 4096       # vocabulary elements per program step: 16 fp32 registers per thread at 8 warps
NUM_WARPS = 8
NEG_BIG = tl.constexpr(-1.0e30)  # a finite start for running maxima: exp(NEG_BIG - m) = 0, no inf - inf = nan


@triton.jit
def _one_minus_exp(x):
    """1 - exp(x) for x <= 0 without cancellation near x = 0 (i.e. -expm1(x)); series below |x| < 1e-3."""
    series = -x * (1.0 + x * (0.5 + x * (1.0 / 6.0)))
    return tl.where(x > -1.0e-3, series, 1.0 - tl.exp(x))


@triton.jit
def logprobs_fwd_kernel(logits_ptr, targets_ptr, logprobs_ptr, entropy_ptr, lse_ptr,
                        V, stride_row, temperature,
                        WITH_ENTROPY: tl.constexpr, ACC_DTYPE: tl.constexpr, BLOCK_V: tl.constexpr):
    """One program per row. Running state over blocks, with z = logits / T and m the running max:
        s = sum exp(z - m),   w = sum exp(z - m) (z - m)      (w only for the entropy)
    When the max moves m -> m', old terms pick up alpha = exp(m - m') and (z - m') = (z - m) + (m - m'):
        s' = alpha s + sum_block e,   w' = alpha (w + (m - m') s) + sum_block e (z - m')
    At the end lse = m + log s and H = -sum p log p = log s - w / s; keeping z - m (not z) in w avoids the
    cancellation of H = lse - E[z] when the distribution is peaked."""
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    m = tl.full((), NEG_BIG, ACC_DTYPE)
    s = tl.zeros((), ACC_DTYPE)
    w = tl.zeros((), ACC_DTYPE)
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        z = tl.load(row_ptr + cols, mask=cols < V, other=-float("inf")).to(ACC_DTYPE) / temperature
        m_new = tl.maximum(m, tl.max(z, axis=0))
        alpha = tl.exp(m - m_new)
        e = tl.exp(z - m_new)                                   # 0 on the masked tail and on -inf logits
        if WITH_ENTROPY:
            w = alpha * (w + (m - m_new) * s) + tl.sum(e * tl.where(e > 0, z - m_new, 0.0), axis=0)
        s = alpha * s + tl.sum(e, axis=0)
        m = m_new
    lse = m + tl.log(s)
    target = tl.load(targets_ptr + row)
    z_target = tl.load(row_ptr + target).to(ACC_DTYPE) / temperature
    tl.store(logprobs_ptr + row, z_target - lse)
    tl.store(lse_ptr + row, lse)
    if WITH_ENTROPY:
        tl.store(entropy_ptr + row, tl.log(s) - w / s)


@triton.jit
def logprobs_bwd_kernel(logits_ptr, targets_ptr, lse_ptr, entropy_ptr, grad_lp_ptr, grad_ent_ptr, grad_ptr,
                        V, stride_row, stride_grad_row, temperature,
                        WITH_ENTROPY: tl.constexpr, ACC_DTYPE: tl.constexpr, BLOCK_V: tl.constexpr):
    """Grid (rows, vocab blocks). grad = (1/T) [g (onehot - p) - g_H p (log p + H)], the target element
    g (1 - p_t) formed as g * (-expm1(log p_t)) in fp32 before the store rounds it to the logits dtype.
    grad_ptr may equal logits_ptr: each program reads its block before writing it."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    mask = cols < V
    z = tl.load(logits_ptr + row * stride_row + cols, mask=mask, other=-float("inf")).to(ACC_DTYPE)
    z = z / temperature
    logp = z - tl.load(lse_ptr + row)
    p = tl.exp(logp)
    g = tl.load(grad_lp_ptr + row).to(ACC_DTYPE)
    target = tl.load(targets_ptr + row)
    grad = tl.where(cols == target, g * _one_minus_exp(logp), -g * p)
    if WITH_ENTROPY:
        g_h = tl.load(grad_ent_ptr + row).to(ACC_DTYPE)
        entropy = tl.load(entropy_ptr + row)
        grad -= g_h * p * tl.where(p > 0, logp + entropy, 0.0)
    tl.store(grad_ptr + row * stride_grad_row + cols, grad / temperature, mask=mask)


# ----------------------------------------------------------------------------- host wrappers
def _acc(logits: torch.Tensor):
    """The accumulation dtype, (torch, triton): fp64 for fp64 logits (gradcheck), fp32 otherwise."""
    return (torch.float64, tl.float64) if logits.dtype == torch.float64 else (torch.float32, tl.float32)


def _block(vocab: int) -> int:
    return min(BLOCK_V, triton.next_power_of_2(vocab))


def logprobs_forward(logits, targets, temperature: float, with_entropy: bool):
    n, vocab = logits.shape
    acc, acc_tl = _acc(logits)
    logprobs = torch.empty(n, dtype=acc, device=logits.device)
    lse = torch.empty_like(logprobs)
    entropy = torch.empty_like(logprobs) if with_entropy else None
    if n:
        logprobs_fwd_kernel[(n,)](logits, targets, logprobs, entropy if with_entropy else lse, lse,
                                  vocab, logits.stride(0), temperature,
                                  WITH_ENTROPY=with_entropy, ACC_DTYPE=acc_tl, BLOCK_V=_block(vocab),
                                  num_warps=NUM_WARPS)
    return logprobs, entropy, lse


def logprobs_backward(logits, targets, temperature, lse, entropy, grad_logprobs, grad_entropy, out):
    n, vocab = logits.shape
    with_entropy = entropy is not None
    block = _block(vocab)
    if n:
        logprobs_bwd_kernel[(n, triton.cdiv(vocab, block))](
            logits, targets, lse, entropy if with_entropy else lse, grad_logprobs,
            grad_entropy if with_entropy else grad_logprobs, out,
            vocab, logits.stride(0), out.stride(0), temperature,
            WITH_ENTROPY=with_entropy, ACC_DTYPE=_acc(logits)[1], BLOCK_V=block, num_warps=NUM_WARPS)
    return out
