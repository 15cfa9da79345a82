"""The Hugging Face side of the parity tests, in its own process: `python -I tests/hf_reference.py JOBS OUT`.

The repository's top-level `kernels/` shadows Hugging Face's `kernels` package, which transformers >= 5.24
imports. So this script never imports repository code, and the tests start it with `python -I` from a
temporary directory (no script directory, cwd or PYTHONPATH on sys.path): it sees only installed packages.

JOBS is a JSON list; each job has an "op" and a "name". Tensors travel in safetensors files: inputs from
JOBS.safetensors (keys "<name>.<field>"), outputs to OUT.safetensors; everything else to OUT.json {name: ...}.
  build     create a random HF model (arch, config, seed, dtype, optional bias_std / max_shard_size) and
            save_pretrained it to dir
  forward   AutoModelForCausalLM from dir at dtype: logits (and the last hidden state) for input_ids
            [+ attention_mask, position_ids]
  tokenizer AutoTokenizer from dir: ids of apply_chat_template for each dialog (with the generation prompt
            unless generation_prompt is false),
            ids of plain texts, and the special ids
  generate  AutoModelForCausalLM + generation_config.json from dir: greedy generate for each prompt
"""
import json
import sys

import torch
import transformers
from safetensors.torch import load_file, save_file

transformers.logging.set_verbosity_error()


def build(job, inputs):
    torch.manual_seed(job.get("seed", 0))
    config = getattr(transformers, job["arch"].replace("ForCausalLM", "Config"))(**job["config"])
    model = getattr(transformers, job["arch"])(config).eval()
    if job.get("bias_std"):  # HF zero-inits biases; random ones make a bias test meaningful
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                torch.nn.init.normal_(p, std=job["bias_std"])
    model = model.to(getattr(torch, job.get("dtype", "float32")))
    kwargs = {"max_shard_size": job["max_shard_size"]} if job.get("max_shard_size") else {}
    model.save_pretrained(job["dir"], **kwargs)
    return {}, {}


def forward(job, inputs):
    model = transformers.AutoModelForCausalLM.from_pretrained(job["dir"], dtype=getattr(torch, job["dtype"]))
    kwargs = {k: inputs[f"{job['name']}.{k}"] for k in ("input_ids", "attention_mask", "position_ids")
              if f"{job['name']}.{k}" in inputs}
    with torch.no_grad():
        out = model.eval()(**kwargs, output_hidden_states=True)
    tensors = {"logits": out.logits.float(), "hidden": out.hidden_states[-1].float()}
    return {f"{job['name']}.{k}": v.contiguous() for k, v in tensors.items()}, {"class": type(model).__name__}


def tokenizer(job, inputs):
    tok = transformers.AutoTokenizer.from_pretrained(job["dir"])
    chats = []
    for dialog in job.get("dialogs", []):
        ids = tok.apply_chat_template(dialog, tokenize=True, add_generation_prompt=job.get("generation_prompt", True),
                                      return_dict=True)
        chats.append(list(ids["input_ids"]))
    texts = [tok(t, add_special_tokens=False)["input_ids"] for t in job.get("texts", [])]
    specials = {k: getattr(tok, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    return {}, {"chats": chats, "texts": texts, "specials": specials, "vocab": len(tok)}


def generate(job, inputs):
    model = transformers.AutoModelForCausalLM.from_pretrained(job["dir"]).eval()
    outs = []
    for prompt in job["prompts"]:
        x = torch.tensor([prompt])
        with torch.no_grad():
            y = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=job["max_new_tokens"],
                               do_sample=False)
        outs.append(y[0, len(prompt):].tolist())
    gc = model.generation_config
    return {}, {"new_tokens": outs, **{k: getattr(gc, k) for k in (
        "eos_token_id", "pad_token_id", "bos_token_id", "do_sample", "temperature", "top_p")}}


def main(jobs_file, out_file):
    jobs = json.loads(open(jobs_file).read())
    try:
        inputs = load_file(jobs_file + ".safetensors")
    except FileNotFoundError:
        inputs = {}
    tensors, results = {}, {}
    for job in jobs:
        t, r = {"build": build, "forward": forward, "tokenizer": tokenizer, "generate": generate}[job["op"]](
            job, inputs)
        tensors.update(t)
        results[job["name"]] = r
    results["_versions"] = {"transformers": transformers.__version__, "kernels_module": _kernels_origin()}
    save_file(tensors, out_file + ".safetensors")
    with open(out_file + ".json", "w") as f:
        json.dump(results, f)


def _kernels_origin() -> str | None:
    """Where `kernels` resolves: Hugging Face's package, never the repository's folder."""
    import importlib.util
    spec = importlib.util.find_spec("kernels")
    return spec.origin if spec else None


if __name__ == "__main__":
    main(*sys.argv[1:3])
