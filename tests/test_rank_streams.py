"""Random streams under DDP: every process is seeded alike (the model's initialisation needs it), so
without a split the ranks would draw identical dropout masks for different data. After
:func:`split_streams_by_rank` each rank draws its own masks, rank 0 (so a one-process run) draws what it
drew before, and the split is deterministic."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from search_r3.common.distributed import split_streams_by_rank


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out: str) -> None:  # module level: spawn pickles it
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)  # seed_everything(0) on every rank
        split_streams_by_rank()
        mask = torch.nn.functional.dropout(torch.ones(64), p=0.5)  # a dropout mask as LoRA draws it
        torch.save(mask, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_ranks_draw_their_own_dropout_masks_and_rank_zero_keeps_its_stream(tmp_path: Path) -> None:
    runs = []
    for attempt in range(2):  # twice: the split is deterministic
        out = tmp_path / str(attempt)
        out.mkdir()
        mp.spawn(_worker, args=(2, _free_port(), str(out)), nprocs=2, join=True)
        runs.append([torch.load(out / f"rank{r}.pt") for r in range(2)])
    (zero, one), again = runs
    assert not torch.equal(zero, one), "both ranks drew the same dropout mask"
    torch.manual_seed(0)
    assert torch.equal(zero, torch.nn.functional.dropout(torch.ones(64), p=0.5))  # one process: unchanged
    assert torch.equal(again[0], zero) and torch.equal(again[1], one)
