"""Cross-rank pieces that make a multi-process step compute what one process computes on the global batch.

``torch.distributed`` is used directly (not Lightning's ``all_gather``) because the contrastive losses
need a gather that keeps the *local* rows differentiable and accepts a different row count per rank
(the last global batch of an epoch splits unevenly). With one process every function is the identity.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor


def world_and_rank() -> tuple[int, int]:
    """(processes, this process's rank) of ``torch.distributed``, or (1, 0) outside it."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size(), torch.distributed.get_rank()
    return 1, 0



def split_streams_by_rank() -> None:
    """Give every rank but 0 its own global random streams (Python's, torch's CPU and CUDA ones).

    The CLI seeds every process alike (``seed_everything``), which the model's initialisation needs, but
    dropout masks drawn from identical streams on different data are correlated across ranks, not the
    independent masks one process would draw for the global batch. Rank ``r > 0`` reseeds from a number
    drawn from the stream all ranks share, plus ``r``: deterministic, different per rank, and rank 0 (so
    a one-process run) is untouched. Nothing that must agree across ranks reads these streams: rollouts
    and data order draw from their own seeded generators."""
    import random

    _, rank = world_and_rank()
    if rank == 0:
        return
    seed = int(torch.randint(2**62, (1,)).item()) + rank
    random.seed(seed)
    torch.manual_seed(seed)  # the CUDA generators too


def gather_with_grad(x: Tensor) -> tuple[Tensor, list[int]]:
    """Every rank's rows of ``x`` concatenated in rank order, and each rank's row count.

    The local slice *is* ``x`` (its gradient flows back into this rank's graph); the other ranks' rows
    are constants. A loss computed on the gathered rows by every rank therefore gives each rank the full
    gradient of that loss with respect to its own rows; DDP then averages the parameter gradients over
    ranks, so the caller scales the loss by the world size (as Tevatron and GradCache do) to get the
    gradient one process would compute on the whole batch.
    """
    world, rank = world_and_rank()
    if world == 1:
        return x, [x.shape[0]]
    count = torch.tensor([x.shape[0]], device=x.device)
    counts = [torch.zeros_like(count) for _ in range(world)]
    torch.distributed.all_gather(counts, count)
    sizes = [int(c) for c in counts]
    width = max(sizes)
    padded = torch.cat([x.detach(), x.new_zeros((width - x.shape[0], *x.shape[1:]))]).contiguous()
    parts = [torch.empty_like(padded) for _ in range(world)]
    torch.distributed.all_gather(parts, padded)
    rows = [p[:n] for p, n in zip(parts, sizes)]
    rows[rank] = x
    return torch.cat(rows), sizes


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order."""
    world, _ = world_and_rank()
    if world == 1:
        return [obj]
    out: list[Any] = [None] * world
    torch.distributed.all_gather_object(out, obj)
    return out


def sum_over_ranks(value: float | int, device: torch.device | None = None) -> float:
    """The sum of a scalar over ranks (token counts, loss sums)."""
    world, _ = world_and_rank()
    if world == 1:
        return float(value)
    t = torch.tensor([float(value)], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t)
    return float(t)


def comm_device() -> torch.device:
    """Where collectives need their tensors: the current GPU under NCCL, the CPU otherwise (gloo)."""
    world, _ = world_and_rank()
    if world > 1 and torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def union_over_ranks(indices: Tensor) -> Tensor:
    """The sorted distinct values of every rank's ``indices`` (the same tensor on every rank)."""
    world, _ = world_and_rank()
    if world == 1:
        return indices.unique()
    gathered, _ = gather_with_grad(indices.to(comm_device()))
    return gathered.cpu().unique()


def encode_sharded(positions: list[int], encode: Callable[[list[int]], Tensor]) -> Tensor:
    """Rows for ``positions`` (in that order) on every rank, each position encoded by one rank only.

    Every rank must call this with the same ``positions``; rank r encodes ``positions[r::world]`` (strided,
    so ranks get similar length mixes), and the rows are gathered. So N ranks share one encode's work and
    end with identical vectors, where each encoding the whole list would cost N times as much."""
    world, rank = world_and_rank()
    if world == 1:
        return encode(positions)
    local = encode(positions[rank::world])
    rows, _ = gather_with_grad(local.to(comm_device()))
    order = torch.tensor([i for r in range(world) for i in range(r, len(positions), world)], dtype=torch.long)
    out = torch.empty_like(rows, device="cpu")
    out[order] = rows.cpu()
    return out
