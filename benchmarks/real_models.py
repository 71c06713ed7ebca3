"""Real torchvision and timm models through fxqbn: what is fused, what is left, and how close it stays.

    python benchmarks/real_models.py [--quick] [--models tv/resnet18 timm/dla34 ...]

Needs torchvision and timm (``pip install torch==2.14.1 torchvision==0.29.1 timm``); weights are
random (``pretrained=False``, no network), BN statistics estimated on two random batches. For each
model (tests/real_model_zoo.py): its BNs and its BN -> (Identity / eval Dropout)* -> ReLU/ReLU6
chains, counted from the float ``torch.fx`` graph by the zoo's own tables; the patterns fxqbn
rewrote, per rule (from the report); the chains left unfused, counted again in each converted
graph (activations still reading a BN's output); skips; and the output SQNR of the native and fused
conversions against float on a fresh random input (MinMaxObserver, two calibration batches).
"model kept": the user's model is bit-identical after prepare, calibration and both converts.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import Counter

import torch
from tabulate import tabulate

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from real_model_zoo import MODELS, QUICK, Result, Spec, run  # noqa: E402

BACKENDS = ("native", "fused")
HEADERS = ["model", "BNs", "rewritten", "BN", "BN>ReLU", "BN>Id/Drop>ReLU", "BN>ReLU6", "chains", "fused",
           "left n/f", "skips", "SQNR n/f", "vs fake-quant n/f", "kept"]


def _kinds(result: Result) -> tuple[int, int, int]:
    """The float graph's chains: BN -> ReLU, BN -> pass-through(s) -> ReLU, BN -> (...) -> ReLU6."""
    chains = result.float.chains
    direct = sum(c.activation == "ReLU" and not c.via for c in chains)
    via = sum(c.activation == "ReLU" and bool(c.via) for c in chains)
    return direct, via, sum(c.activation == "ReLU6" for c in chains)


def _plain(fused: Counter) -> int:
    """Rewritten patterns without an activation."""
    return sum(n for pattern, n in fused.items() if "+" not in pattern and "ReLU" not in pattern)


def _pair(values: dict[str, float], digits: int = 1) -> str:
    return "/".join(f"{values[b]:.{digits}f}" if b in values else "-" for b in BACKENDS)


def _row(spec: Spec, result: Result) -> list[object]:
    if not result.float.bns:
        status = "no BN"  # fxqbn.prepare refuses it, saying so
    else:
        status = result.error[:70] if result.error else result.rewritten
    return [spec.label, result.float.bns, status, _plain(result.fused), *_kinds(result), len(result.float.chains),
            result.fused_chains, _pair(result.left, 0), sum(result.skips.values()), _pair(result.sqnr),
            _pair(result.oracle), "yes" if result.model_kept else "NO"]


def _totals(results: list[Result]) -> list[object]:
    kinds = [sum(k) for k in zip(*(_kinds(r) for r in results))]
    left = {b: sum(r.left.get(b, 0) for r in results) for b in BACKENDS}
    return ["total", sum(r.float.bns for r in results), sum(r.rewritten for r in results),
            _plain(sum((r.fused for r in results), Counter())), *kinds, sum(len(r.float.chains) for r in results),
            sum(r.fused_chains for r in results), _pair(left, 0), sum(sum(r.skips.values()) for r in results), "", "",
            f"{sum(r.model_kept for r in results)}/{len(results)}"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"only {', '.join(QUICK)}")
    parser.add_argument("--models", nargs="+", metavar="LABEL", help="these models of the zoo")
    args = parser.parse_args(argv)
    wanted = args.models or (QUICK if args.quick else [s.label for s in MODELS])
    specs = [s for s in MODELS if s.label in wanted]
    unknown = set(wanted) - {s.label for s in specs}
    if unknown:
        parser.error(f"unknown models {sorted(unknown)}; the zoo has {[s.label for s in MODELS]}")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    rows, results, reasons, start = [], [], Counter(), time.perf_counter()
    for spec in specs:
        result = run(spec, BACKENDS)
        rows.append(_row(spec, result))
        results.append(result)
        reasons.update(result.skips)
        print(f"  {spec.label}: {time.perf_counter() - start:.0f} s", file=sys.stderr)
    rows.append(_totals(results))
    print(tabulate(rows, headers=HEADERS, disable_numparse=True))
    print("\nfused per rule:", dict(sorted(sum((r.fused for r in results), Counter()).items())))
    for reason, count in reasons.most_common():
        print(f"skipped {count}x: {reason}")
    for spec, result in zip(specs, results):
        if result.error:
            print(f"{spec.label} failed: {result.error}")


if __name__ == "__main__":
    main()
