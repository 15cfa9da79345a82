"""Triton path: the same four primitives as torch_ref.py, as GPU kernels.

Forward kernels run one program per row and stream the vocabulary in BLOCK_V blocks with an online softmax
(Milakov & Gimelshein 2018, "Online normalizer calculation for softmax"), so a row is read once and nothing of
size V is written. Backward kernels are fully parallel over (rows x vocabulary blocks) and rebuild p from the
log-sum-exp saved by forward. Row offsets are int64 (row * stride overflows int32 past 16k rows at V = 128k).

On the CPU these run under Triton's interpreter (TRITON_INTERPRET=1 set before triton is imported);
kernels/__init__.py imports this module only when the Triton backend is chosen.
"""
import torch
import triton
import triton.language as tl

BLOCK_V = 4096       # vocabulary elements per program step: 16 fp32 registers per thread at 8 warps
NUM_WARPS = 8
NEG_BIG = tl.constexpr(-1.0e30)  # finite start for running maxima: exp(NEG_BIG - m) = 0 and 0 * (NEG_BIG - m) = 0, no nan


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
    z = tl.load(logits_ptr + row * stride_row + cols, mask=mask, other=-float("inf")).to(ACC_DTYPE) / temperature
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


@triton.jit
def full_kl_fwd_kernel(p_logits_ptr, q_logits_ptr, kl_ptr, lse_p_ptr, lse_q_ptr,
                       V, stride_p_row, stride_q_row, temperature,
                       ACC_DTYPE: tl.constexpr, BLOCK_V: tl.constexpr):
    """KL(p || q) per row in one pass over both rows. With zp, zq = logits / T and running maxima mp, mq:
        sp = sum exp(zp - mp),  sq = sum exp(zq - mq),  a = sum exp(zp - mp) ((zp - mp) - (zq - mq))
    Then log p = zp - mp - log sp, log q = zq - mq - log sq, and
        KL = sum p (log p - log q) = (1/sp) sum exp(zp - mp) ((zp - mp) - (zq - mq)) - log sp + log sq
           = a / sp - log sp + log sq.
    When the maxima move (mp -> mp', mq -> mq'), with alpha = exp(mp - mp'), dp = mp - mp', dq = mq - mq':
        exp(zp - mp') = alpha exp(zp - mp),  (zp - mp') - (zq - mq') = ((zp - mp) - (zq - mq)) + dp - dq
    so a' = alpha (a + (dp - dq) sp) + sum_block, sp' = alpha sp + sum_block, sq' = exp(dq) sq + sum_block.
    Every term stays O(logit spread): adding a constant to all of q's logits changes nothing, exactly."""
    row = tl.program_id(0).to(tl.int64)
    p_row = p_logits_ptr + row * stride_p_row
    q_row = q_logits_ptr + row * stride_q_row
    mp = tl.full((), NEG_BIG, ACC_DTYPE)
    mq = tl.full((), NEG_BIG, ACC_DTYPE)
    sp = tl.zeros((), ACC_DTYPE)
    sq = tl.zeros((), ACC_DTYPE)
    a = tl.zeros((), ACC_DTYPE)
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = cols < V
        zp = tl.load(p_row + cols, mask=mask, other=-float("inf")).to(ACC_DTYPE) / temperature
        zq = tl.load(q_row + cols, mask=mask, other=-float("inf")).to(ACC_DTYPE) / temperature
        mp_new = tl.maximum(mp, tl.max(zp, axis=0))
        mq_new = tl.maximum(mq, tl.max(zq, axis=0))
        alpha = tl.exp(mp - mp_new)
        ep = tl.exp(zp - mp_new)
        eq = tl.exp(zq - mq_new)
        term = ep * (tl.where(ep > 0, zp - mp_new, 0.0) - tl.where(ep > 0, zq - mq_new, 0.0))
        a = alpha * (a + ((mp - mp_new) - (mq - mq_new)) * sp) + tl.sum(term, axis=0)
        sp = alpha * sp + tl.sum(ep, axis=0)
        sq = tl.exp(mq - mq_new) * sq + tl.sum(eq, axis=0)
        mp = mp_new
        mq = mq_new
    log_sp = tl.log(sp)
    log_sq = tl.log(sq)
    tl.store(kl_ptr + row, a / sp - log_sp + log_sq)
    tl.store(lse_p_ptr + row, mp + log_sp)
    tl.store(lse_q_ptr + row, mq + log_sq)


@triton.jit
def full_kl_bwd_kernel(p_logits_ptr, q_logits_ptr, lse_p_ptr, lse_q_ptr, kl_ptr, grad_kl_ptr, grad_ptr,
                       V, stride_p_row, stride_q_row, stride_grad_row, temperature,
                       ACC_DTYPE: tl.constexpr, BLOCK_V: tl.constexpr):
    """Grid (rows, vocab blocks). d KL / d zp_i = p_i (log p_i - log q_i - KL), times g / T for the logits:
    from d p_j / d zp_i = p_j (delta_ij - p_i), the sum_j p_j d(log p_j)/d zp_i = p_i - p_i = 0 drops out."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    mask = cols < V
    zp = tl.load(p_logits_ptr + row * stride_p_row + cols, mask=mask, other=-float("inf")).to(ACC_DTYPE)
    zq = tl.load(q_logits_ptr + row * stride_q_row + cols, mask=mask, other=-float("inf")).to(ACC_DTYPE)
    logp = zp / temperature - tl.load(lse_p_ptr + row)
    logq = zq / temperature - tl.load(lse_q_ptr + row)
    p = tl.exp(logp)
    scale = tl.load(grad_kl_ptr + row).to(ACC_DTYPE) / temperature
    grad = p * (tl.where(p > 0, logp, 0.0) - tl.where(p > 0, logq, 0.0) - tl.load(kl_ptr + row)) * scale
    tl.store(grad_ptr + row * stride_grad_row + cols, grad, mask=mask)


# ----------------------------------------------------------------------------- host wrappers
def _acc(logits: torch.Tensor):
    """Accumulation dtype: fp64 for fp64 logits (gradcheck), fp32 otherwise. Returns (torch, triton) dtypes."""
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


def logprobs_backward(logits, targets, temperature, lse, entropy, grad_logprobs, grad_entropy, out=None):
    n, vocab = logits.shape
    out = torch.empty_like(logits) if out is None else out
    with_entropy = entropy is not None
    block = _block(vocab)
    if n:
        logprobs_bwd_kernel[(n, triton.cdiv(vocab, block))](
            logits, targets, lse, entropy if with_entropy else lse, grad_logprobs,
            grad_entropy if with_entropy else grad_logprobs, out,
            vocab, logits.stride(0), out.stride(0), temperature,
            WITH_ENTROPY=with_entropy, ACC_DTYPE=_acc(logits)[1], BLOCK_V=block, num_warps=NUM_WARPS)
    return out


def full_kl_forward(policy_logits, ref_logits, temperature: float):
    n, vocab = policy_logits.shape
    acc, acc_tl = _acc(policy_logits)
    kl = torch.empty(n, dtype=acc, device=policy_logits.device)
    lse_p = torch.empty_like(kl)
    lse_q = torch.empty_like(kl)
    if n:
        full_kl_fwd_kernel[(n,)](policy_logits, ref_logits, kl, lse_p, lse_q,
                                 vocab, policy_logits.stride(0), ref_logits.stride(0), temperature,
                                 ACC_DTYPE=acc_tl, BLOCK_V=_block(vocab), num_warps=NUM_WARPS)
    return kl, lse_p, lse_q


def full_kl_backward(policy_logits, ref_logits, temperature, lse_p, lse_q, kl, grad_kl):
    n, vocab = policy_logits.shape
    out = torch.empty_like(policy_logits)
    block = _block(vocab)
    if n:
        full_kl_bwd_kernel[(n, triton.cdiv(vocab, block))](
            policy_logits, ref_logits, lse_p, lse_q, kl, grad_kl, out,
            vocab, policy_logits.stride(0), ref_logits.stride(0), out.stride(0), temperature,
            ACC_DTYPE=_acc(policy_logits)[1], BLOCK_V=block, num_warps=NUM_WARPS)
    return out
