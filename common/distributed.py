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

from search_r3.common.search import ordered_topk


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


def shard_range(n: int) -> range:
    """The contiguous block of positions ``0..n-1`` this rank owns (every position on one process).

    Contiguous blocks (not strides) so that a shard is one slice of the corpus and an owner is found by a
    comparison; block sizes differ by at most one."""
    world, rank = world_and_rank()
    return range(n * rank // world, n * (rank + 1) // world)


def gather_padded(x: Tensor, fill: float | int) -> tuple[Tensor, list[int]]:
    """Every rank's rows of ``x`` ``[R, C, ...]`` (on the CPU, rank order), ``C`` padded with ``fill`` to
    the widest rank's, and each rank's row count. Ranks may differ in ``R`` and ``C``."""
    world, _ = world_and_rank()
    if world == 1:
        return x, [x.shape[0]]
    width = torch.tensor([x.shape[1]], device=comm_device())
    torch.distributed.all_reduce(width, op=torch.distributed.ReduceOp.MAX)
    pad = x.new_full((x.shape[0], int(width) - x.shape[1], *x.shape[2:]), fill)
    rows, sizes = gather_with_grad(torch.cat([x.detach(), pad], dim=1).to(comm_device()))
    return rows.cpu(), sizes


def sum_tensor_over_ranks(x: Tensor) -> Tensor:
    """The element-wise sum of ``x`` over ranks (every rank gets it, on the CPU)."""
    world, _ = world_and_rank()
    if world == 1:
        return x
    x = x.to(comm_device())
    torch.distributed.all_reduce(x)
    return x.cpu()


def own_rows(rows: Tensor, sizes: list[int]) -> Tensor:
    """This rank's slice of rows gathered by :func:`gather_padded` / :func:`gather_with_grad`."""
    _, rank = world_and_rank()
    start = sum(sizes[:rank])
    return rows[start : start + sizes[rank]]


def sharded_topk(queries: Tensor, k: int, search_local: Callable[[Tensor, int], tuple[Tensor, Tensor]],
                 corpus_size: int) -> tuple[Tensor, Tensor]:
    """Top-``k`` ``(scores, positions)`` of this rank's ``queries`` over a corpus split across ranks.

    Each rank holds a part of the corpus and searches it with ``search_local``, which returns corpus
    positions, ordered among equal scores by position; ``k`` is clipped to ``corpus_size`` as one search
    over the whole corpus would. Every rank's queries meet every part: the queries are gathered, each rank
    takes its local top-k of all of them, the k candidates per query and rank are gathered and merged. What
    crosses the network is queries and ``k`` candidates per query per rank, never document vectors, so
    no rank needs more than its block of the corpus. Every rank must call this (a collective)."""
    world, _ = world_and_rank()
    if world == 1:
        return search_local(queries, k)
    all_queries, sizes = gather_with_grad(queries.detach().float().to(comm_device()))
    scores, local = search_local(all_queries.cpu(), k)
    width = k - scores.shape[1]  # a block smaller than k: pad so that every rank sends the same shape
    scores = torch.cat([scores.float(), scores.new_full((scores.shape[0], width), float("-inf"))], dim=1)
    positions = torch.cat([local, local.new_full((local.shape[0], width), -1)], dim=1)
    device = comm_device()
    parts_s = [torch.empty_like(scores, device=device) for _ in range(world)]
    parts_i = [torch.empty_like(positions, device=device) for _ in range(world)]
    torch.distributed.all_gather(parts_s, scores.to(device))
    torch.distributed.all_gather(parts_i, positions.to(device))
    merged_s, merged_i = torch.cat(parts_s, dim=1).cpu(), torch.cat(parts_i, dim=1).cpu()
    merged_i = merged_i.masked_fill(merged_i < 0, torch.iinfo(torch.long).max)  # padding ranks last among -inf
    best, positions = ordered_topk(merged_s, merged_i, min(k, corpus_size))  # ties: lowest position, as one search
    return own_rows(best, sizes), own_rows(positions, sizes)


def gather_to_rank_zero(obj: Any) -> list[Any] | None:
    """Every rank's ``obj`` (picklable) in rank order on rank 0, ``None`` elsewhere: for what only the
    writing rank needs (a cache file), without putting it on every rank."""
    world, rank = world_and_rank()
    if world == 1:
        return [obj]
    out: list[Any] | None = [None] * world if rank == 0 else None
    torch.distributed.gather_object(obj, out, dst=0)
    return out
