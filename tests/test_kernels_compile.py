"""Every Triton kernel compiles to sm_90 (Hopper) PTX and cubin, with no GPU present.

The interpreter used by test_kernels.py executes kernels as numpy and accepts code the GPU compiler rejects,
so this compiles for real with triton.compile in a subprocess whose environment has no TRITON_INTERPRET
(Triton reads it at import). Signatures mirror what a launch on CUDA tensors would specialise to.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

COMPILE_ALL = r"""
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from kernels import triton_kernels as K

def compile_kernel(kernel, types, constexprs):
    signature = {name: ("constexpr" if name in constexprs else types[name]) for name in kernel.arg_names}
    src = triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": K.NUM_WARPS})
    assert ".target sm_90" in compiled.asm["ptx"] and len(compiled.asm["cubin"]) > 0, kernel.__name__
    print("compiled", kernel.__name__, sorted(types.items())[:1], constexprs)

scalars = {"V": "i32", "temperature": "fp32", "stride_row": "i32", "stride_grad_row": "i32"}
for dtype in ("bf16", "fp16", "fp32"):
    flags = [True, False] if dtype == "bf16" else [True]
    for with_entropy in flags:
        c = {"WITH_ENTROPY": with_entropy, "ACC_DTYPE": tl.float32, "BLOCK_V": K.BLOCK_V}
        compile_kernel(K.logprobs_fwd_kernel, {**scalars, "logits_ptr": f"*{dtype}", "targets_ptr": "*i64",
                       "logprobs_ptr": "*fp32", "entropy_ptr": "*fp32", "lse_ptr": "*fp32"}, c)
        compile_kernel(K.logprobs_bwd_kernel, {**scalars, "logits_ptr": f"*{dtype}", "targets_ptr": "*i64",
                       "lse_ptr": "*fp32", "entropy_ptr": "*fp32", "grad_lp_ptr": "*fp32",
                       "grad_ent_ptr": "*fp32", "grad_ptr": f"*{dtype}"}, c)
# fp64 accumulation (the gradcheck configuration) must compile too.
compile_kernel(K.logprobs_fwd_kernel, {**scalars, "logits_ptr": "*fp64", "targets_ptr": "*i64",
               "logprobs_ptr": "*fp64", "entropy_ptr": "*fp64", "lse_ptr": "*fp64"},
               {"WITH_ENTROPY": True, "ACC_DTYPE": tl.float64, "BLOCK_V": K.BLOCK_V})
print("ALL_COMPILED")
"""


@pytest.mark.slow
def test_every_kernel_compiles_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"          # silence Triton 3.9's default-change warning
    proc = subprocess.run([sys.executable, "-c", COMPILE_ALL], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "ALL_COMPILED" in proc.stdout
    assert proc.stdout.count("compiled ") == 9      # forward and backward: bf16 with and without entropy,
                                                    # fp16, fp32; forward in fp64
