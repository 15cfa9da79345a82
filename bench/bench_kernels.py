"""Selected-token logprobs + backward at Llama 3 scale: naive PyTorch vs the fused lm_head path.

    python bench/bench_kernels.py            # CPU part (fp32, ~12 min on 2 cores, ~10 GB RAM), then GPU
    python bench/bench_kernels.py --quick    # smaller shapes, to check the script itself

CPU: each case runs in a fresh subprocess so its peak RSS (getrusage ru_maxrss, the kernel's high-water mark)
is its own. "Peak extra" = peak RSS minus RSS after the inputs (hidden, lm_head weight, targets, upstream
grad) exist, i.e. everything the step itself allocates. Every method must also return grad_hidden (N, D) and
grad_weight (V, D) (1.05 GB at this shape), which no method can avoid, so the table also shows
"activations" = peak extra minus those gradient outputs: the memory that logits, softmax and their
gradients cost, which is what the kernels are about. Cases: weight trained (full fine-tune) and weight
frozen (LoRA: lm_head is frozen, only grad_hidden is needed).

GPU: the two primitives the fused path calls on each chunk of logits (forward, then the gradient written
over the logits, as fused_linear.py does), timed with triton.testing.do_bench in bf16 on (N, V) logits, as a
fraction of the bandwidth floor: bytes that must move (logits read in forward, read again in backward,
gradient written) / time, against a measured device-to-device copy bandwidth; and the naive torch path for
comparison.
"""
import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import psutil
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import kernels  # noqa: E402

GB = 1e9


def naive_logprobs(hidden, weight, targets):
    logits = hidden @ weight.T                                        # (N, V) fp32
    return torch.log_softmax(logits, dim=-1).gather(-1, targets[:, None]).squeeze(-1)


def make_fused(chunk_size):
    def fused_logprobs(hidden, weight, targets):
        return kernels.fused_linear_logprobs(hidden, weight, targets, chunk_size=chunk_size)
    return fused_logprobs


def run_case(method, n, d, vocab, train_weight, chunk_size):
    """In a child process: build inputs, measure the baseline, run forward + backward once."""
    torch.manual_seed(0)
    hidden = torch.randn(n, d).requires_grad_()
    weight = torch.randn(vocab, d).mul_(d ** -0.5).requires_grad_(train_weight)   # in place: no freed temp
    targets = torch.randint(0, vocab, (n,))
    upstream = torch.randn(n)
    fn = {"naive": naive_logprobs, "fused": make_fused(chunk_size)}[method]
    baseline = psutil.Process().memory_info().rss
    start = time.perf_counter()
    lp = fn(hidden, weight, targets)
    (lp * upstream).sum().backward()
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024   # Linux: KiB
    grads = hidden.grad.numel() * 4 + (weight.grad.numel() * 4 if train_weight else 0)
    checksum = float(lp.double().sum())
    print(json.dumps({"seconds": seconds, "extra": peak - baseline, "grads": grads, "checksum": checksum}))


def cpu_benchmark(n, d, vocab, chunk_size):
    print(f"CPU fp32: {n} tokens, hidden {d}, vocab {vocab}, fused chunk_size {chunk_size}, "
          f"{torch.get_num_threads()} threads")
    header = f"{'case':28s} {'time s':>8s} {'x naive':>8s} {'peak extra GB':>14s} {'activations GB':>15s} " \
             f"{'naive/this (extra, act.)':>25s}"
    for train_weight in (True, False):
        print(f"\n-- lm_head weight {'trained' if train_weight else 'frozen (LoRA)'}")
        print(header)
        base = None
        for method in ("naive", "fused"):
            cmd = [sys.executable, __file__, "--child", method, "--shape", str(n), str(d), str(vocab),
                   "--chunk-size", str(chunk_size)] + ([] if train_weight else ["--frozen-weight"])
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            r = json.loads(out.strip().splitlines()[-1])
            act = r["extra"] - r["grads"]
            if base is None:
                base = (r["seconds"], r["extra"], act, r["checksum"])
            assert abs(r["checksum"] - base[3]) < 1e-3 * abs(base[3]) + 1e-2, "methods disagree on logprobs"
            print(f"{method:28s} {r['seconds']:8.2f} {r['seconds'] / base[0]:8.2f} {r['extra'] / GB:14.2f} "
                  f"{act / GB:15.2f} {base[1] / r['extra']:11.1f}x {base[2] / max(act, 1):11.1f}x")


def gpu_benchmark(n, vocab):
    if not torch.cuda.is_available():
        print("\nGPU: skipped (no CUDA device); GPU figures are unmeasured until this runs on a GPU.")
        return
    from triton.testing import do_bench
    torch.manual_seed(0)
    logits = torch.randn(n, vocab, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    targets = torch.randint(0, vocab, (n,), device="cuda")
    upstream = torch.randn(n, device="cuda")
    big = torch.empty(n * vocab, device="cuda", dtype=torch.bfloat16)
    copy_ms = do_bench(lambda: big.clone())
    copy_bw = 2 * big.numel() * 2 / (copy_ms * 1e-3)                # bytes read + written per second
    floor_bytes = 3 * n * vocab * 2                                 # read fwd, read bwd, write grad (bf16)
    print(f"\nGPU {torch.cuda.get_device_name()}: bf16 logits ({n}, {vocab}); copy bandwidth "
          f"{copy_bw / 1e12:.2f} TB/s; floor {floor_bytes / copy_bw * 1e3:.2f} ms")

    def step(fn):
        def run():
            logits.grad = None
            (fn() * upstream).sum().backward()
        return run

    def primitives(backend, with_entropy):
        # The fused path writes the gradient over its chunk of logits; here into a buffer of the same size,
        # so that the logits stay the same from one repeat to the next.
        backend, grad = kernels.pick_backend(backend, logits), torch.empty_like(logits)

        @torch.no_grad()
        def run():
            lp, entropy, lse = backend.logprobs_forward(logits, targets, 1.0, with_entropy)
            backend.logprobs_backward(logits, targets, 1.0, lse, entropy, upstream,
                                      upstream if with_entropy else None, out=grad)
        return run

    cases = {
        "naive torch": step(lambda: torch.log_softmax(logits.float(), -1).gather(-1, targets[:, None])[:, 0]),
        "triton": primitives("triton", False),
        "triton + entropy": primitives("triton", True),
        "chunked torch": primitives("torch", False),
    }
    for name, run in cases.items():
        ms = do_bench(run)
        print(f"{name:20s} {ms:8.2f} ms   {floor_bytes / (ms * 1e-3) / copy_bw:6.1%} of the bandwidth floor")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="512 tokens, hidden 256, vocab 32000")
    ap.add_argument("--chunk-size", type=int, default=256, help="tokens per fused chunk")
    ap.add_argument("--child", choices=["naive", "fused"], help=argparse.SUPPRESS)
    ap.add_argument("--shape", nargs=3, type=int, help=argparse.SUPPRESS)
    ap.add_argument("--frozen-weight", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        run_case(args.child, *args.shape, train_weight=not args.frozen_weight, chunk_size=args.chunk_size)
        return
    n, d, vocab = (512, 256, 32000) if args.quick else (4096, 2048, 128256)
    cpu_benchmark(n, d, vocab, args.chunk_size)
    gpu_benchmark(n, vocab)


if __name__ == "__main__":
    main()
