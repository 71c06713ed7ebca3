"""Whole-model int8 with and without fxqbn.lower: latency against float, output SQNR, BNs left float.

    python benchmarks/lower_speed.py [--repeats 15] [--models timm_style mlp densenet_bc] [--routes ao pt2e]

For each model (tests/lower_models.py: a timm-style net, an MLP with Linear -> ReLU -> BatchNorm1d, the
built-in DenseNet-BC), route (torch.ao FX with the x86 mapping; PT2E with X86InductorQuantizer) and
batch (1, 16): the median latency of the float model, the int8 model as converted, and the same after
``fxqbn.lower``, run interleaved (float, int8, lowered, float, ...) so drift hits all three alike, with
the ratios to float; "lowered / int8" is the median of that ratio within each round; "noise" is the
largest interquartile range relative to its median. Models run
eagerly (PT2E graphs are meant for inductor; eager they run their quantize/dequantize as ops). SQNR:
model output against float on 4 held-out batches of 16. "int8 build s": building the int8 model once
(prepare, 4 calibration batches, convert_fx / convert_pt2e); "fxqbn.lower ms": lowering it once. The
CPU may be shared: compare ratios within one run only.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
from tabulate import tabulate

import fxqbn
from fxqbn.comparing import sqnr_db
from fxqbn.passes import BnCall, read_bn
from fxqbn.whole_model import ROUTES, int8_model

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from lower_models import models  # noqa: E402

BATCHES = (1, 16)


def float_bns(gm: torch.fx.GraphModule) -> int:
    modules = dict(gm.named_modules())
    return sum(isinstance(read_bn(node, modules), BnCall) for node in gm.graph.nodes)


def example(model, inputs, batch: int) -> tuple[torch.Tensor, ...]:
    return tuple(torch.randn(batch, *x.shape[1:]) for x in inputs)


def round_times(variants: list, x: tuple, repeats: int) -> list[list[float]]:
    """Each variant's ms per round, over ``repeats`` interleaved rounds (A B C A B C ...) after a warm-up."""
    times: list[list[float]] = [[] for _ in variants]
    with torch.no_grad():
        for model in variants:  # warm-up
            for _ in range(5):
                model(*x)
        for _ in range(repeats):
            for k, model in enumerate(variants):
                start = time.perf_counter()
                model(*x)
                times[k].append((time.perf_counter() - start) * 1000)
    return times


def interleaved_ms(variants: list, x: tuple, repeats: int) -> tuple[list[float], float, float]:
    """Median ms of each variant over ``repeats`` interleaved rounds, the noise (max IQR / median), and the
    median over rounds of last / second variant (a ratio within each round: drift cancels)."""
    times = round_times(variants, x, repeats)
    medians = [statistics.median(t) for t in times]
    noise = max((statistics.quantiles(t, n=4)[2] - statistics.quantiles(t, n=4)[0]) / m for t, m in zip(times, medians))
    return medians, noise, statistics.median(b / a for a, b in zip(times[-2], times[-1]))


def output_sqnr(reference, model, held_out) -> float:
    with torch.no_grad():
        ref = torch.cat([reference(*x).flatten() for x in held_out])
        out = torch.cat([model(*x).flatten() for x in held_out])
    return sqnr_db(float(ref.pow(2).sum()), float((ref - out).pow(2).sum()))


def rows_for(name: str, model, inputs, route: str, repeats: int) -> list[list]:
    torch.manual_seed(1)
    calib = [example(model, inputs, 16) for _ in range(4)]
    start = time.perf_counter()
    int8 = int8_model(model, inputs, calib, route)  # prepare, calibrate, convert_fx / convert_pt2e
    built = time.perf_counter() - start
    start = time.perf_counter()
    lowered = fxqbn.lower(int8)
    lowering = time.perf_counter() - start
    held_out = [example(model, inputs, 16) for _ in range(4)]
    sqnr = (output_sqnr(model, int8, held_out), output_sqnr(model, lowered, held_out))
    rows = []
    for batch in BATCHES:
        (f, i, lo), noise, paired = interleaved_ms([model, int8, lowered], example(model, inputs, batch), repeats)
        rows.append([
            name, route, batch, f"{f:.3f}", f"{i:.3f} ({i / f:.2f}x)", f"{lo:.3f} ({lo / f:.2f}x)", f"{paired:.2f}",
            f"{noise:.2f}", f"{sqnr[0]:.1f}", f"{sqnr[1]:.1f}", f"{float_bns(int8)} -> {float_bns(lowered)}",
            f"{built:.1f}", f"{lowering * 1000:.0f}",
        ])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--models", nargs="+", default=["timm_style", "mlp", "densenet_bc"])
    parser.add_argument("--routes", nargs="+", default=list(ROUTES), choices=ROUTES)
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    nets = models()
    rows = []
    for name in args.models:
        model, inputs = nets[name]
        for route in args.routes:
            rows += rows_for(name, model, inputs, route, args.repeats)
    headers = [
        "model", "route", "batch", "float ms", "int8 ms (x float)", "lowered ms (x float)", "lowered / int8 (paired)",
        "noise", "SQNR int8 dB", "SQNR lowered dB", "float BNs int8 -> lowered", "int8 build s", "fxqbn.lower ms",
    ]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), median of {args.repeats} interleaved rounds")
    print(tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True))


if __name__ == "__main__":
    main()
