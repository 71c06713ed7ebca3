"""Run a function on N local gloo ranks (127.0.0.1), for the distributed benchmarks."""

from __future__ import annotations

import datetime
import os
import socket
import tempfile
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, fn: Callable[..., Any], world: int, port: int, timeout_s: int, out: str, args: tuple) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout_s))
    try:
        result = fn(rank, *args)
        if rank == 0:
            torch.save(result, out)
    finally:
        dist.destroy_process_group()


def run_on_ranks(fn: Callable[..., Any], world: int, args: tuple = (), timeout_s: int = 600) -> Any:
    """``fn(rank, *args)`` on ranks 0..world-1 of one gloo group, one thread each (spawned
    processes); returns what rank 0 returned."""
    with tempfile.TemporaryDirectory() as folder:
        out = os.path.join(folder, "rank0.pt")
        mp.start_processes(_rank, args=(fn, world, _free_port(), timeout_s, out, args), nprocs=world, start_method="spawn")
        return torch.load(out, weights_only=False)
