"""Do bf16 checkpoints really train? The share of trained elements an optimizer moves, and the memory per trained
parameter, with the weights in bf16 (as the presets were before) and with fp32 master weights (as train.py does).

    python bench/bench_master_weights.py [--steps 50] [--hidden 128] [--layers 2]

A Llama-shaped model with random weights of std 0.02 (a pretrained Llama's are of that size), bf16 as its
checkpoint. Each case runs AdamW at a preset's learning rate on a fixed next-token loss:
  full fine-tuning, lr 1e-6 (llama-3.2-1b, qwen3-0.6b), and LoRA rank 64, lr 2e-5 (llama-3.1-8b).
"Moved" counts the elements whose value differs from the start after N steps; for master weights it is
reported for the fp32 masters and for the bf16 weights the forward uses (the masters rounded).
Memory is measured from the live tensors after a step: trained parameters, their gradients and Adam's state,
divided by the number of trained elements; plus the copies the forward casts to bf16 and keeps for backward
(counted with torch.autograd.graph.saved_tensors_hooks).
"""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from model import ModelConfig, Transformer  # noqa: E402


def make_model(hidden: int, layers: int, lora: bool, master: bool) -> Transformer:
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=2048, hidden_size=hidden, intermediate_size=hidden * 3,
                         num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=4,
                         max_position_embeddings=256, tie_word_embeddings=False)
    model = Transformer(config).to(torch.bfloat16)
    if lora:
        model.add_lora(64, 128.0, ("q_proj", "k_proj", "v_proj", "o_proj"))
        with torch.no_grad():  # a trained adapter: B != 0, so A gets a gradient from the first step
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(std=0.02)
    if master:
        model.mixed_precision_(torch.bfloat16)
    return model


def run(model: Transformer, lr: float, steps: int) -> dict:
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    start = {n: p.detach().clone() for n, p in named}
    opt = torch.optim.AdamW([p for _, p in named], lr=lr, weight_decay=0.0)
    tokens = torch.randint(0, model.config.vocab_size, (4, 128), generator=torch.Generator().manual_seed(0))
    saved = []

    def keep(t):
        saved.append(t)
        return t
    for step in range(steps):
        hooks = torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t) if step == 0 else None
        if hooks:
            hooks.__enter__()
        logits = model(tokens[:, :-1]).float()
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        if hooks:
            hooks.__exit__(None, None, None)
        loss.backward()
        opt.step()
        if step == 0:
            n = sum(p.numel() for _, p in named)
            state = sum(t.nbytes for s in opt.state.values() for t in s.values() if torch.is_tensor(t) and t.dim())
            persistent = sum(p.nbytes + p.grad.nbytes for _, p in named) + state
            shapes = {tuple(p.shape) for p in model.parameters()}
            casts = {t.data_ptr(): t.nbytes for t in saved if t.dtype == torch.bfloat16 and tuple(t.shape) in shapes
                     and all(t.data_ptr() != p.data_ptr() for p in model.parameters())}
        opt.zero_grad()
    moved = sum(int((p.detach() != start[name]).sum()) for name, p in named)
    moved_bf16 = sum(int((p.detach().bfloat16() != start[name].bfloat16()).sum()) for name, p in named)
    lora_a = [(name, p) for name, p in named if "lora_A" in name]
    out = {"moved": moved / n, "moved_as_bf16": moved_bf16 / n, "bytes_per_trained": persistent / n,
           "cast_bytes_per_trained": sum(casts.values()) / n, "dtypes": sorted({str(p.dtype)[6:] for _, p in named}),
           "optimizer_state": sorted({str(t.dtype)[6:] for s in opt.state.values() for t in s.values()
                                      if torch.is_tensor(t) and t.dim()})}
    if lora_a:
        out["lora_A_moved"] = sum(int((p.detach() != start[nm]).sum()) for nm, p in lora_a) / sum(
            p.numel() for _, p in lora_a)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(2)
    print(f"{'case':<34} {'moved':>7} {'as bf16':>8} {'lora_A':>7} {'B/param':>8} {'casts':>6}  param / Adam")
    for label, lora, lr in (("full fine-tuning, lr 1e-6", False, 1e-6), ("LoRA r64, lr 2e-5", True, 2e-5)):
        for master in (False, True):
            r = run(make_model(args.hidden, args.layers, lora, master), lr, args.steps)
            name = f"{label}, {'fp32 master' if master else 'bf16 weights'}"
            print(f"{name:<34} {r['moved']:7.1%} {r['moved_as_bf16']:8.1%} "
                  f"{r.get('lora_A_moved', float('nan')):7.1%} {r['bytes_per_trained']:8.1f} "
                  f"{r['cast_bytes_per_trained']:6.1f}  {'/'.join(r['dtypes'])} / {'/'.join(r['optimizer_state'])}")
    print(f"({args.steps} AdamW steps; B/param = trained parameter + gradient + Adam state, bytes per trained "
          "element; casts = bf16 copies of fp32 weights kept for backward, bytes per trained element)")


if __name__ == "__main__":
    main()
