"""fxqbn.lower's default (the cost model) against the unlowered torch.ao model, and against forcing each kernel.

    OMP_NUM_THREADS=1 python benchmarks/lower_cost.py [--repeats 31] [--models ...]

For each model (tests/lower_models.py ``cost_models``: the timm-style net at 16 channels on 24x24, a
128-channel net on 14x14, pre-activation residual blocks, an MLP with BatchNorm1d), quantized whole by
torch.ao FX (x86 mapping), and batch 1 and 16, one thread: the median latency of the unlowered int8 model,
``fxqbn.lower(int8)`` (default), ``backend="native"`` and ``backend="fused"``, run interleaved (unlowered,
default, native, fused, unlowered, ...). Each ratio is the median over rounds of that variant / the
unlowered model in the same round (drift cancels); "noise" is the interquartile range of the default's
per-round ratio. "default ok": the default's ratio is at most 1.05 (or within its noise of 1.0).
"kernels": what the default chose per BN. The CPU may be shared: compare ratios within one run only.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from collections import Counter

import torch
from tabulate import tabulate

import fxqbn
from fxqbn.whole_model import int8_model

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from lower_models import cost_models  # noqa: E402
from lower_speed import round_times  # noqa: E402 (this folder: python benchmarks/lower_cost.py)

BATCHES = (1, 16)
VARIANTS = ("unlowered", "default", "native", "fused")


def paired(variants: list, x: tuple, repeats: int) -> tuple[list[float], list[list[float]]]:
    """Median ms of each variant over ``repeats`` interleaved rounds, and each round's ratio to the first."""
    times = round_times(variants, x, repeats)
    ratios = [[b / a for a, b in zip(times[0], t)] for t in times]
    return [statistics.median(t) for t in times], ratios


def chosen(lowered) -> str:
    """What the default did per BN: 'fused x3', 'float x1' ..."""
    rows = fxqbn.get_report(lowered).rows
    kinds = Counter("float" if r.status != "rewritten" else r.op.split(".")[1] if r.op.startswith("fxqbn.") else "native" for r in rows)
    return ", ".join(f"{k} x{n}" for k, n in sorted(kinds.items()))


def rows_for(name: str, model, example, repeats: int) -> list[list]:
    torch.manual_seed(1)
    calib = [(torch.randn(16, *example[0].shape[1:]),) for _ in range(4)]
    int8 = int8_model(model, example, calib, "ao")
    lowered = [fxqbn.lower(int8), fxqbn.lower(int8, backend="native"), fxqbn.lower(int8, backend="fused")]
    rows = []
    for batch in BATCHES:
        x = (torch.randn(batch, *example[0].shape[1:]),)
        medians, ratios = paired([int8, *lowered], x, repeats)
        q = statistics.quantiles(ratios[1], n=4)
        ratio, noise = statistics.median(ratios[1]), q[2] - q[0]
        ok = "yes" if ratio <= 1.05 or ratio - noise <= 1.0 else "NO"
        rows.append([
            name, batch, f"{medians[0]:.3f}",
            *(f"{m:.3f} ({statistics.median(r):.2f}x)" for m, r in zip(medians[1:], ratios[1:])),
            f"{noise:.2f}", ok, chosen(lowered[0]),
        ])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=31)
    nets = cost_models()
    parser.add_argument("--models", nargs="+", default=list(nets), choices=list(nets))
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    rows = []
    for name in args.models:
        rows += rows_for(name, *nets[name], args.repeats)
    headers = ["model", "batch", "unlowered ms", "default ms (x)", "native ms (x)", "fused ms (x)", "noise", "default ok", "kernels"]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), torch.ao x86 mapping, "
          f"median of {args.repeats} interleaved rounds; (x) = median per-round ratio to unlowered")
    print(tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True))


if __name__ == "__main__":
    main()
