"""Scale-out under ``torchrun``: process group, FSDP2 sharding, rank 0's command broadcast and
the worker ranks' loop, each rank's share of the micro-batches, sums and full tensors over ranks.

Rank 0 owns the submitted batch and broadcasts each command (a name and its payload) to the
other ranks, which sit in :func:`serve_workers` and run the same collective method."""

from __future__ import annotations

import math
import os
from collections.abc import Callable

import torch
import torch.distributed as dist


def init_distributed() -> tuple[int, int]:
    """``(world_size, rank)``; joins the process group when ``WORLD_SIZE > 1`` and none exists."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    return world_size, rank


def shard(model) -> None:
    """FSDP2: ``fully_shard`` each decoder layer (the model's ``_no_split_modules``), then the root."""
    from torch.distributed.fsdp import fully_shard

    block_names = set(getattr(model, "_no_split_modules", None) or [])
    for m in model.modules():
        if type(m).__name__ in block_names:
            fully_shard(m)
    fully_shard(model)


def command(world_size: int, rank: int, name: str, payload=None) -> None:
    """Rank 0: tell the worker ranks which collective method to run next."""
    if world_size > 1 and rank == 0:
        dist.broadcast_object_list([name, payload], src=0)


def serve_workers(handlers: dict[str, Callable]) -> None:
    """Ranks > 0: run ``handlers[name](payload)`` for each of rank 0's commands until ``stop``."""
    while True:
        box = [None, None]
        dist.broadcast_object_list(box, src=0)
        name, payload = box
        if name == "stop":
            dist.barrier()  # pairs with stop_workers: nobody tears the group down mid-message
            return
        if name not in handlers:
            raise RuntimeError(f"unknown learner worker command {name!r}")
        handlers[name](payload)


def stop_workers(world_size: int, rank: int) -> None:
    """Rank 0: release the worker ranks; returns once every rank has received the stop."""
    command(world_size, rank, "stop")
    if world_size > 1 and rank == 0:
        # Without this barrier rank 0 could destroy its process group while a worker is
        # still reading the broadcast; gloo then aborts the worker (seen in CI).
        dist.barrier()


def rank_chunks(rows: list[int], micro_batch_size: int, world_size: int, rank: int) -> list[tuple[int, list[int]]]:
    """This rank's ``(index, micro-batch)`` pairs of ``rows``: consecutive micro-batches
    dealt round-robin, so their composition does not depend on the world size; every
    rank gets the same count (an empty micro-batch keeps FSDP's collectives in step)."""
    mbs, w = micro_batch_size, world_size
    chunks = [rows[i: i + mbs] for i in range(0, len(rows), mbs)]
    n_local = math.ceil(len(chunks) / w)
    mine = list(range(rank, len(chunks), w))
    return [(i, chunks[i]) for i in mine] + [(-1, [])] * (n_local - len(mine))


def allreduce_sum(t: torch.Tensor, world_size: int) -> torch.Tensor:
    """``t`` summed over ranks, in place (``t`` itself on one process)."""
    if world_size > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def full_state(policy, params_only: bool = False):
    """(name, full tensor) over the policy's state dict (or parameters); collective under FSDP2."""
    items = policy.named_parameters() if params_only else policy.state_dict().items()
    for name, t in items:
        if hasattr(t, "full_tensor"):
            t = t.full_tensor()
        yield name, t.detach()
