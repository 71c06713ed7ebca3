"""PT2E int8 routes against float, eager and compiled: stock torchao, torchao with a correct fold, fxqbn.

    python benchmarks/pt2e.py [--models preact_resnet densenet_bc mobilenet_v2 mlp] [--batch 1 16]
                              [--repeats 15] [--quick]

Routes, all with X86InductorQuantizer's default config (static uint8 activations, int8 per-channel weights):

* float: the model, eager and ``torch.compile``-d.
* stock: torchao's ``prepare_pt2e``, then torchao's conversion. The conversion is
  ``fxqbn.pt2e._convert_steps``: torchao 0.18's ``convert_pt2e`` without its QAT-only conv-BN step,
  which does nothing to these graphs but costs ~100 pattern exports whenever a BN is left in the graph.
  torchao folds every conv -> BN, also where the conv's output has other readers (a wrong model).
* fold: ``fxqbn.pt2e.prepare_pt2e(..., bn="float")`` / ``convert_pt2e``: stock PT2E with only the fold
  corrected (the BNs that cannot fold stay float): the fair baseline. It is also fxqbn's route with
  ``bn="float"``.
* int8: ``fxqbn.pt2e.prepare_pt2e(..., bn="int8")``: every standalone BN int8 (fxqbn's fused kernel).

Each (model, batch) cell builds every route from one exported model, calibrates on 4 random batches and
measures the SQNR of each route's output against the float model's on 4 other ones. Compiled models use
inductor with ``torch._inductor.config.freezing = True`` (as torchao's x86 docs say) under ``no_grad``;
each is checked with ``torch._dynamo.explain`` (graphs) and against its eager model (SQNR). One thread;
median single-call latency over interleaved repeats (each repeat times 5 single calls of every variant);
speeds are ratios of the float eager time (lower is faster). ``BNs`` counts the float model's BNs;
``folded/int8/float`` what each route made of them (stock: BN nodes left in its converted graph).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torchao
from tabulate import tabulate
from torch import nn

import fxqbn
from fxqbn import pt2e
from fxqbn.comparing import sqnr_db
from fxqbn.whole_model import import_pt2e

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from pt2e_models import MODELS

warnings.filterwarnings("ignore")
torchao_prepare, _, X86Quantizer, x86_config = import_pt2e()


@dataclass(frozen=True)
class Route:
    """One int8 route of one model: its eager module, what became of the BNs, its output SQNR vs float."""

    name: str
    model: nn.Module
    folded: int
    int8: int
    float: int
    rows: int | None  # report rows (fxqbn routes); None for stock
    sqnr: float


def sqnr(want: list[torch.Tensor], got: list[torch.Tensor]) -> float:
    signal = sum(float(w.double().pow(2).sum()) for w in want)
    return sqnr_db(signal, sum(float((w.double() - g.double()).pow(2).sum()) for w, g in zip(want, got)))


def run_all(model: Callable, batches: list[torch.Tensor]) -> list[torch.Tensor]:
    with torch.no_grad():
        return [model(x) for x in batches]


def bn_nodes(gm: torch.fx.GraphModule) -> int:
    return sum(n.op == "call_function" and "batch_norm" in str(n.target) for n in gm.graph.nodes)


def quantizer():
    return X86Quantizer().set_global(x86_config())


def routes(model: nn.Module, example: torch.Tensor, calib: list, held: list, want: list) -> list[Route]:
    """stock, fold (bn="float") and int8 routes of ``model``, calibrated on ``calib``, scored on ``held``."""
    total = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    found = []
    exported = torch.export.export(model, (example,)).module()
    stock = torchao_prepare(torch.export.export(model, (example,)).module(), quantizer())
    run_all(stock, calib)
    stock = pt2e._convert_steps(stock)
    left = bn_nodes(stock)
    found.append(Route("stock", stock, total - left, 0, left, None, sqnr(want, run_all(stock, held))))
    for bn in ("float", "int8"):
        prepared = pt2e.prepare_pt2e(exported, quantizer(), bn=bn)
        run_all(prepared, calib)
        converted = pt2e.convert_pt2e(prepared)
        rows = fxqbn.get_report(converted).rows
        counts = [sum(r.status == s for r in rows) for s in ("folded", "rewritten", "skipped")]
        found.append(Route("fold" if bn == "float" else "int8", converted, *counts, len(rows),
                           sqnr(want, run_all(converted, held))))
    return found


def compile_checked(models: dict[str, nn.Module], x: torch.Tensor) -> tuple[dict, dict, dict, dict]:
    """(compiled models, dynamo graph counts, compile seconds, compile errors); a model inductor fails on
    is left out of the first three. explain() resets dynamo: all of it first."""
    with torch.no_grad():
        graphs = {name: torch._dynamo.explain(m)(x).graph_count for name, m in models.items()}
        compiled, seconds, errors = {}, {}, {}
        for name, m in models.items():
            start = time.perf_counter()
            try:
                compiled[name] = torch.compile(m)
                compiled[name](x)
                compiled[name](x)
            except Exception as exc:  # noqa: BLE001 (inductor's own errors: reported, the other routes go on)
                errors[name] = str(exc).strip().splitlines()[0][:160]
                del compiled[name]
                continue
            seconds[name] = time.perf_counter() - start
    return compiled, graphs, seconds, errors


def medians(fns: dict[str, Callable], x: torch.Tensor, repeats: int, calls: int = 5) -> dict[str, float]:
    """Median seconds of one call of each fn, over ``repeats`` rounds of ``calls`` single calls each, interleaved.

    Single calls, not means of several: on a loaded machine a mean counts the time other processes had
    the core; the median call is the one nothing preempted."""
    with torch.no_grad():
        for fn in fns.values():
            fn(x)
        times: dict[str, list[float]] = {name: [] for name in fns}
        for _ in range(repeats):
            for name, fn in fns.items():
                for _ in range(calls):
                    start = time.perf_counter()
                    fn(x)
                    times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def cell(name: str, batch: int, repeats: int) -> tuple[list, list[str]]:
    """One table row for ``name`` at ``batch``, and notes on anything a target misses."""
    torch._dynamo.reset()
    model, shape = MODELS[name]()
    gen = torch.Generator().manual_seed(1)
    scale = 3.0 if name == "mlp" else 1.0
    calib = [torch.randn(batch, *shape, generator=gen) * scale for _ in range(4)]
    held = [torch.randn(batch, *shape, generator=gen) * scale for _ in range(4)]
    want = run_all(model, held)
    found = {r.name: r for r in routes(model, held[0], calib, held, want)}
    eager = {"float": model, **{r: found[r].model for r in ("stock", "fold", "int8")}}
    compiled, graphs, seconds, errors = compile_checked(eager, held[0])
    agree = {r: sqnr(run_all(eager[r], held), run_all(compiled[r], held)) for r in compiled}
    t = medians({**{f"{r} eager": m for r, m in eager.items()}, **{f"{r} compiled": m for r, m in compiled.items()}},
                held[0], repeats)
    base = t["float eager"]
    ratio = {k: v / base for k, v in t.items()}
    fmt = {k: f"{ratio[k]:.2f}" if k in ratio else "fails" for k in (f"{r} {w}" for r in eager for w in ("eager", "compiled"))}
    fmt["int8/fold"] = (f"{ratio['int8 compiled'] / ratio['fold compiled']:.2f}"
                        if "int8 compiled" in ratio and "fold compiled" in ratio else "-")
    row = [name, batch, f"{base * 1e3:.2f}", *(fmt[k] for k in (
        "float compiled", "stock eager", "stock compiled", "fold eager", "fold compiled", "int8 eager", "int8 compiled",
        "int8/fold")),
        *(f"{found[r].sqnr:.1f}" for r in ("stock", "fold", "int8")),
        sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()),
        *(f"{found[r].folded}/{found[r].int8}/{found[r].float}" for r in ("stock", "fold", "int8"))]
    notes = [f"{name} b{batch}: compile s " + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items())]
    notes += [f"{name} b{batch}: compiled vs eager SQNR " + ", ".join(f"{r} {agree[r]:.1f} dB" for r in agree)]
    notes += [f"{name} b{batch}: {r} compiled fails: {e}" for r, e in errors.items()]
    notes += [f"{name} b{batch}: graphs " + ", ".join(f"{r} {graphs[r]}" for r in graphs)]
    notes += [f"{name} b{batch}: {r} report has {found[r].rows} rows for {row[14]} BNs"
              for r in ("fold", "int8") if found[r].rows != row[14]]
    return row, notes


HEADERS = ["model", "batch", "float eager ms", "float comp", "stock eager", "stock comp", "fold eager", "fold comp",
           "int8 eager", "int8 comp", "int8/fold comp", "SQNR stock", "SQNR fold", "SQNR int8", "BNs",
           "stock f/i/fl", "fold f/i/fl", "int8 f/i/fl"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=list(MODELS))
    parser.add_argument("--batch", nargs="+", type=int, default=[1, 16])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--quick", action="store_true", help="batch 1 only, 5 repeats")
    args = parser.parse_args()
    batches, repeats = ([1], 5) if args.quick else (args.batch, args.repeats)
    torch.set_num_threads(1)
    torch._inductor.config.freezing = True
    rows, notes = [], []
    for name in args.models:
        for batch in batches:
            row, more = cell(name, batch, repeats)
            rows.append(row)
            notes += more
            print(tabulate([row], HEADERS), *more, sep="\n", flush=True)
    print(f"\ntorch {torch.__version__}, torchao {torchao.__version__}, one thread, {repeats} repeats; speeds: ratio of float eager (lower is faster); "
          "f/i/fl: BNs folded / int8 / float")
    print(tabulate(rows, HEADERS, tablefmt="github"))
    print("\n".join(notes) if notes else "")


if __name__ == "__main__":
    main()
