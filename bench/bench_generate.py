"""Generation throughput (new tokens/s): model.generate vs transformers' generate on the same ~50M-parameter
Llama weights, fp32, greedy, same batch / prompt / output lengths, on the CPU.

    python bench/bench_generate.py [--batch 8 --prompt 64 --new 128 --threads 2 --repeats 3]
"""
import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
# Before the repository root goes on sys.path: its kernels/ folder would shadow Hugging Face's `kernels`
# package, which transformers >= 5.24 imports with its model classes. model.py does not import kernels/.
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from model import Transformer, generate  # noqa: E402

# ~50M parameters: 6 layers of 512 wide, GQA 8 q / 4 kv heads, Llama 3-style rope scaling, 32k vocab (untied)
CONFIG = dict(vocab_size=32000, hidden_size=512, intermediate_size=1536, num_hidden_layers=6, num_attention_heads=8,
              num_key_value_heads=4, max_position_embeddings=2048, tie_word_embeddings=False,
              rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                               "high_freq_factor": 4.0, "original_max_position_embeddings": 1024})


def best_times(fns, repeats: int) -> list[tuple[float, float]]:
    """Best-of-n (wall seconds, process CPU seconds) of each function, interleaved so that load from other
    processes hits both alike. On a shared machine CPU time is the steadier measure of work done."""
    best = [(float("inf"), float("inf"))] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            wall, cpu = time.perf_counter(), time.process_time()
            fn()
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            best[i] = (min(best[i][0], wall), min(best[i][1], cpu))
    return best


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(**CONFIG)).eval()
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        ours = Transformer.from_pretrained(d, dtype=torch.float32)
    n_params = sum(p.numel() for p in ours.parameters())
    prompts = torch.randint(0, CONFIG["vocab_size"], (args.batch, args.prompt), generator=torch.Generator().manual_seed(1))

    def run_ours():
        return generate(ours, prompts.tolist(), args.new, temperature=0)

    def run_hf():
        with torch.no_grad():
            return hf.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=False,
                               max_new_tokens=args.new, min_new_tokens=args.new, eos_token_id=None, pad_token_id=0)

    # same weights, same greedy tokens (a check that both do the same work); doubles as the warm-up
    a, b = run_ours().tokens, run_hf()[:, args.prompt:]
    agree = (a == b).float().mean().item()
    new_tokens = args.batch * args.new
    (w_ours, c_ours), (w_hf, c_hf) = best_times([run_ours, run_hf], args.repeats)
    print(f"model: {n_params / 1e6:.1f}M params, fp32, {args.threads} threads; batch {args.batch}, "
          f"prompt {args.prompt}, new {args.new} (greedy); token agreement with HF {agree:.3f}")
    print(f"model.py      {new_tokens / w_ours:8.1f} new tokens/s wall  ({w_ours:.2f} s wall, {c_ours:.2f} s CPU)")
    print(f"transformers  {new_tokens / w_hf:8.1f} new tokens/s wall  ({w_hf:.2f} s wall, {c_hf:.2f} s CPU)")
    print(f"ratio (model.py / transformers): {w_hf / w_ours:.2f} by wall time, {c_hf / c_ours:.2f} by CPU time")


if __name__ == "__main__":
    main()
