"""Calibration wall time: one process vs 2 gloo ranks (fxqbn.sync_observers), over the same batches.

    python benchmarks/calib_speed.py [--batches 16] [--batch-size 8] [--repeats 3] [--quick]

The built-in DenseNet-BC, prepared with HistogramObserver and with MinMaxObserver. One process
calibrates on every batch (1 thread, then 2 threads); 2 ranks (1 thread each, spawned on
127.0.0.1) calibrate on half each and merge. Times from the first batch to merged observers, the
slower rank's, median of the repeats; process start-up and model building are not counted.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings

import torch
import torch.distributed as dist
from tabulate import tabulate

import fxqbn
from gloo_ranks import run_on_ranks  # benchmarks/gloo_ranks.py, beside this script
from fxqbn import distributed
from fxqbn.command import OBSERVERS  # the observers `fxqbn convert --observer` offers
from fxqbn.models import densenet_bc

warnings.filterwarnings("ignore", message=".*quantized tensor creation functions", category=UserWarning)
WORLD = 2


def _batches(n: int, size: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(size, 3, 32, 32, generator=gen) for _ in range(n)]


def _observed(observer: str):
    model, example = densenet_bc()
    return fxqbn.prepare(model, example, OBSERVERS[observer])


def _calibrate(observed, batches) -> None:
    with torch.no_grad():
        for batch in batches:
            observed(batch)


def _one_process(observer: str, batches, threads: int, repeats: int) -> float:
    torch.set_num_threads(threads)
    times = []
    for _ in range(repeats):
        observed = _observed(observer)
        start = time.perf_counter()
        _calibrate(observed, batches)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _rank_main(rank: int, n: int, size: int, repeats: int) -> dict:
    """Per observer and repeat: (calibration seconds, sync seconds) of the slower rank."""
    mine = distributed.shard(_batches(n, size))
    results = {}
    for observer in OBSERVERS:
        runs = []
        for _ in range(repeats):
            observed = _observed(observer)
            dist.barrier()
            start = time.perf_counter()
            _calibrate(observed, mine)
            calibrated = time.perf_counter()
            fxqbn.sync_observers(observed)
            done = time.perf_counter()
            everyone: list = [None] * WORLD
            dist.all_gather_object(everyone, (calibrated - start, done - start))
            runs.append(max(everyone, key=lambda t: t[1]))
        results[observer] = runs
    return results


def _two_ranks(n: int, size: int, repeats: int) -> dict:
    return run_on_ranks(_rank_main, WORLD, (n, size, repeats))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="8 batches of 4, one repeat")
    args = parser.parse_args()
    n, size, repeats = (8, 4, 1) if args.quick else (args.batches, args.batch_size, args.repeats)
    batches = _batches(n, size)
    ranks = _two_ranks(n, size, repeats)
    rows = []
    for observer in OBSERVERS:
        one = _one_process(observer, batches, 1, repeats)
        two_threads = _one_process(observer, batches, 2, repeats)
        calib = statistics.median(t[0] for t in ranks[observer])
        total = statistics.median(t[1] for t in ranks[observer])
        rows.append([observer, f"{one:.2f}", f"{two_threads:.2f}", f"{total:.2f}", f"{total - calib:.3f}",
                     f"{one / total:.2f}x", f"{two_threads / total:.2f}x"])
    print(f"DenseNet-BC, {n} batches of {size}x3x32x32, median of {repeats}; seconds")
    print(tabulate(rows, headers=["observer", "1 process, 1 thread", "1 process, 2 threads", "2 ranks (calib + sync)",
                                  "of which sync", "speed-up vs 1 thread", "vs 2 threads"]))


if __name__ == "__main__":
    sys.exit(main())
