"""torchrun plumbing for train.py: process group, DDP or FSDP2 wrapping, and the collectives the loop needs.

Every helper is the identity when world == 1. DDP keeps a replica of the model per rank; FSDP2 (`fully_shard`)
shards each block's parameters across ranks, for models that do not fit on one GPU. gloo runs on CPU.
"""
from __future__ import annotations

import os
from contextlib import contextmanager, nullcontext

import torch
import torch.distributed as dist
from torch import nn


def setup_distributed() -> tuple[int, int, torch.device]:
    """(rank, world size, device). torchrun sets RANK and WORLD_SIZE; nccl on GPU, gloo on CPU."""
    use_cuda = torch.cuda.is_available()
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if use_cuda else "cpu")
    dist.init_process_group("nccl" if use_cuda else "gloo")
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    device = torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu")
    return dist.get_rank(), dist.get_world_size(), device


def wrap(module: nn.Module, world: int, fsdp: bool, dtype: torch.dtype) -> nn.Module:
    """Single process: as is. torchrun: DDP, or FSDP2 with each of `module.model.layers` sharded."""
    if world == 1:
        return module
    if not fsdp:
        return nn.parallel.DistributedDataParallel(module)
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    # the shards keep the fp32 master weights; forwards gather them in `dtype`, gradients reduce in fp32
    mixed = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    for block in module.model.layers:
        fully_shard(block, mp_policy=mixed)
    fully_shard(module, mp_policy=mixed)
    # FSDP2 initialises on the first forward through the root; generation calls the blocks directly, so run
    # one token through the root first (a collective: every rank does it)
    token = torch.zeros(1, 1, dtype=torch.long, device=module.model.embed_tokens.weight.device)
    with torch.no_grad():
        module(token, token)
    return module


def unwrap(module: nn.Module) -> nn.Module:
    return module.module if isinstance(module, nn.parallel.DistributedDataParallel) else module


@contextmanager
def full_params(module: nn.Module, fsdp: bool):
    """Under FSDP2 every forward all-gathers, a collective that all ranks must join, but ranks stop generating
    at different steps: so gather every shard once, generate locally, then free the gathered copies."""
    if not fsdp:
        yield
        return
    from torch.distributed.fsdp import FSDPModule
    modules = [m for m in module.modules() if isinstance(m, FSDPModule)]
    for m in modules:
        m.unshard()
        m.set_reshard_after_forward(False)
    try:
        yield
    finally:
        for m in modules:
            m.reshard()
            m.set_reshard_after_forward(True)


def full_state_dict(module: nn.Module, rank: int) -> dict | None:
    """The whole model's state gathered from the FSDP2 shards onto rank 0's CPU (None on the other ranks)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    state = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return state if rank == 0 else None


def no_sync_unless(module: nn.Module | None, sync: bool):
    """DDP's no_sync but on a minibatch's last micro-batch: one gradient all-reduce per optimizer step."""
    if module is None or sync or not isinstance(module, nn.parallel.DistributedDataParallel):
        return nullcontext()
    return module.no_sync()


def finite_on_every_rank(loss: torch.Tensor, world: int) -> bool:
    """Whether the loss is finite on every rank. Each rank skips the backward of a non-finite loss; if one
    rank skipped alone, DDP's gradient all-reduce in the others' backward would be left unmatched."""
    ok = torch.tensor([1.0 if bool(torch.isfinite(loss).all()) else 0.0], device=loss.device)
    if world > 1:
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return bool(ok.item())


def kept_rows(keep: torch.Tensor, world: int) -> torch.Tensor:
    """Indices of the rows of `keep` (B, T) with any weight: the forward and backward passes of the others
    would only add zeros. DDP needs the same number of backward passes on every rank, so each rank pads its
    list with zero-weight rows up to the longest list on any rank."""
    has_weight = (keep > 0).any(1)
    rows = has_weight.nonzero().squeeze(1)
    count = torch.tensor([rows.numel()], device=keep.device)
    if world > 1:
        dist.all_reduce(count, op=dist.ReduceOp.MAX)
    padding = (~has_weight).nonzero().squeeze(1)[:int(count) - rows.numel()]
    return torch.cat([rows, padding])


def check_replicas_in_sync(model: nn.Module, world: int) -> list[float]:
    """The checksums of the DDP replicas, which must hold the same weights: a mismatch is a bug."""
    checksum = sum(float(p.detach().double().sum()) for p in model.parameters())
    sums = gather_objects([checksum], world)
    if len(set(sums)) != 1:
        raise RuntimeError(f"ranks hold different weights after training: checksums {sums}")
    return sums


def all_reduce_mean(values: dict, world: int) -> dict:
    if world == 1:
        return values
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
    dist.all_reduce(t)
    return {k: v / world for k, v in zip(keys, t.tolist())}


def gather_objects(items: list, world: int) -> list:
    if world == 1:
        return items
    out = [None] * world
    dist.all_gather_object(out, items)
    return [x for part in out for x in part]


def broadcast_object(obj, world: int):
    if world == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(world: int):
    if world > 1:
        dist.barrier()
