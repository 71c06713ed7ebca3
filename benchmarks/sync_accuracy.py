"""How close observers merged by fxqbn.sync_observers come to one process on all batches.

    python benchmarks/sync_accuracy.py [--observer histogram|moving_average] [--ranks 2 4] [--batches 16] [--quick]

For each model and data distribution: N gloo ranks on 127.0.0.1 each calibrate on their shard (rank
r takes batches r, r + N, ...; "non-iid" gives each rank a contiguous block instead), sync, and
read every observer's qparams; one process calibrates on all the batches. The table shows, over all
observers, the largest zero-point difference (in integer steps), the largest scale difference (%),
and how many observers got exactly the same qparams. Accuracy only: no timings.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import warnings

import torch
from tabulate import tabulate

from torch.ao.quantization import HistogramObserver, MovingAverageMinMaxObserver

import fxqbn
from fxqbn.distributed import Ranks, shard
from gloo_ranks import run_on_ranks  # benchmarks/gloo_ranks.py, beside this script
from fxqbn.models import densenet_bc
from fxqbn.qparams import qparams_from_observer

warnings.filterwarnings("ignore", message=".*quantized tensor creation functions", category=UserWarning)
EXAMPLES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples")
DATA = ("normal", "skewed", "drifting", "non-iid")
OBSERVERS = {"histogram": HistogramObserver, "moving_average": MovingAverageMinMaxObserver}


def _example(name: str):
    spec = importlib.util.spec_from_file_location(f"fxqbn_example_{name}", os.path.join(EXAMPLES, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.build


MODELS = {"densenet_bc": lambda: densenet_bc(), "preact_resnet": lambda: _example("preact_resnet")(),
          "tabular_mlp": lambda: _example("tabular_mlp")(), "cnn3d": lambda: _example("cnn3d")()}


def _batches(example: torch.Tensor, data: str, n: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(11)
    shape = (4, *example.shape[1:])
    if data == "skewed":  # heavy right tail
        return [torch.empty(shape).exponential_(1.0, generator=gen) ** 2 - 0.5 for _ in range(n)]
    batches = [torch.randn(shape, generator=gen) for _ in range(n)]
    if data in ("drifting", "non-iid"):  # the range grows batch by batch
        batches = [b * (1 + 2 * i / n) + i / n for i, b in enumerate(batches)]
    return batches


def _mine(batches: list, data: str, rank: int, world: int) -> list:
    """Rank's batches: fxqbn.shard's for iid data; for non-iid, one contiguous block per rank (each rank sees other data)."""
    if data == "non-iid":
        per = -(-len(batches) // world)
        return batches[rank * per:(rank + 1) * per]
    return shard(batches, Ranks(rank, world, "gloo"))


def _qparams(model_name: str, data: str, n: int, observer: str, rank: int | None, world: int, reorder: bool = False) -> dict:
    """Qparams after calibrating: rank's shard then the sync; or one process on all batches, in order
    or (``reorder``) in the order of the shards, rank 0's first."""
    model, example = MODELS[model_name]()
    batches = _batches(example[0], data, n)
    if reorder:
        batches = [b for r in range(world) for b in _mine(batches, data, r, world)]
    observed = fxqbn.prepare(model, example, OBSERVERS[observer])
    with torch.no_grad():
        for batch in batches if rank is None else _mine(batches, data, rank, world):
            observed(batch)
    if rank is not None:
        fxqbn.sync_observers(observed)
    return {name: qparams_from_observer(m) for name, m in observed.named_children() if name.startswith("fxqbn_observer_")}


def _rank_main(rank: int, world: int, jobs: list) -> dict:
    return {job: _qparams(*job, rank, world) for job in jobs}


def _distributed(world: int, jobs: list) -> dict:
    return run_on_ranks(_rank_main, world, (world, jobs), timeout_s=300)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--observer", choices=sorted(OBSERVERS), default="histogram")
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--batches", type=int, default=16)
    parser.add_argument("--quick", action="store_true", help="densenet_bc and tabular_mlp only, 2 ranks, 8 batches")
    args = parser.parse_args()
    models = ["densenet_bc", "tabular_mlp"] if args.quick else list(MODELS)
    ranks, n = ([2], 8) if args.quick else (args.ranks, args.batches)
    torch.set_num_threads(1)
    jobs = [(model, data, n, args.observer) for model in models for data in DATA]
    rows = []
    for world in ranks:
        merged = _distributed(world, jobs)
        for job in jobs:
            alone = _qparams(*job, None, world)
            rows.append([job[0], job[1], world, *_distance(merged[job], alone), *_distance(_qparams(*job, None, world, True), alone)])
    print(f"{OBSERVERS[args.observer].__name__}, {n} batches. merged: N ranks merged by fxqbn.sync_observers vs one process on all batches "
          "in order; reordered: one process on them in shard order (rank 0's first) vs in order")
    print(tabulate(rows, headers=["model", "data", "ranks", "merged: same", "zp steps", "scale %",
                                  "reordered: same", "zp steps", "scale %"]))


def _distance(ours: dict, alone: dict) -> list:
    """[observers with identical qparams, largest zero-point difference, largest scale difference in %]."""
    zp = max(abs(ours[k].zero_point - alone[k].zero_point) for k in alone)
    scale = max(abs(ours[k].scale / alone[k].scale - 1) for k in alone) * 100
    return [f"{sum(ours[k] == alone[k] for k in alone)}/{len(alone)}", zp, f"{scale:.2f}"]


if __name__ == "__main__":
    sys.exit(main())
