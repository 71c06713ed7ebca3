"""Top-1 on a real task through every quantization route: a small CNN on scikit-learn's digits.

    python benchmarks/digits_accuracy.py [--train] [--calib-batches 4] [--threads 1]

Needs scikit-learn (``pip install "fxqbn[bench]"``) and, for the PT2E rows, torchao. The model
(``benchmarks/digits.py``: ``DigitsNet``, a BN in every form fxqbn supports) loads its committed
weights (``benchmarks/data/digits_cnn.pt``); ``--train`` trains them again first and overwrites
that file. Every route calibrates on the first ``--calib-batches`` batches of 64 training images
and is scored on the 450 held-out test images: top-1 (%), its drop against float (points), the
SQNR of the test logits against float's (dB), and how many of the float model's BNs run int8, were
folded into the conv/linear before them, or stay float in the result:

* int8: the rows fxqbn's report marks rewritten, plus torch.ao's own int8 BN modules in the graph;
* float: the BN calls (any spelling of fxqbn's registry that is not already int8) left in the graph;
* folded: the rest, gone from the graph (folded by fxqbn, or by torch.ao / torchao's prepare).

Routes the installed fxqbn lacks (``prepare(..., fold=...)``, ``fxqbn.pt2e``) print a row saying
so; a route that fails prints its error in the row. One table (github format) and the command line.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import importlib.util
import inspect
import os
import shlex
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from tabulate import tabulate
from torch import fx, nn

import fxqbn
from fxqbn.passes.reading import already_int8
from fxqbn.passes.registry import bn_spelling
from fxqbn.whole_model import import_pt2e, int8_model

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import digits  # noqa: E402  benchmarks/digits.py, beside this script

BACKENDS = ("native", "fused")
HEADERS = ["route", "top-1 (%)", "drop vs float (points)", "output SQNR vs float (dB)", "BNs int8 / folded / float"]


class Unavailable(Exception):
    """The installed fxqbn (or torch) has no such route: the row says why."""


@dataclass(frozen=True)
class Setup:
    model: nn.Module  # the float model, eval mode
    example: tuple[torch.Tensor, ...]
    calib: list[torch.Tensor]


@dataclass(frozen=True)
class Route:
    label: str
    build: Callable[[Setup], nn.Module]  # the quantized model; raises Unavailable


def _calibrate(observed: nn.Module, calib: list[torch.Tensor]) -> None:
    with torch.no_grad():
        for batch in calib:
            observed(batch)


def _bn_only(backend: str, fold: bool | None) -> Callable[[Setup], nn.Module]:
    def build(setup: Setup) -> nn.Module:
        kwargs = {}
        if fold is not None:
            if "fold" not in inspect.signature(fxqbn.prepare).parameters:
                raise Unavailable("fxqbn.prepare has no fold parameter in this fxqbn")
            kwargs["fold"] = fold
        observed = fxqbn.prepare(setup.model, setup.example, **kwargs)
        _calibrate(observed, setup.calib)
        return fxqbn.convert(observed, backend=backend)
    return build


def _whole(route: str, lowered: bool) -> Callable[[Setup], nn.Module]:
    def build(setup: Setup) -> nn.Module:
        int8 = int8_model(setup.model, setup.example, setup.calib, route)
        return fxqbn.lower(int8) if lowered else int8
    return build


def _export(setup: Setup) -> nn.Module:
    """The model exported with a dynamic batch dimension, as fxqbn.whole_model exports it."""
    dims = ({0: torch.export.Dim.AUTO},)
    return torch.export.export(setup.model, (setup.calib[0],), dynamic_shapes=dims).module()


def _fxqbn_module(name: str) -> object:
    """``fxqbn.<name>`` from the fxqbn imported (an editable install of another checkout would
    otherwise supply a module this one lacks), or Unavailable."""
    spec = importlib.util.find_spec(f"fxqbn.{name}")
    if spec is None or os.path.dirname(spec.origin or "") not in fxqbn.__path__:
        raise Unavailable(f"route not available in this fxqbn (no fxqbn.{name})")
    return importlib.import_module(f"fxqbn.{name}")


def _fxqbn_pt2e(bn: str) -> Callable[[Setup], nn.Module]:
    """fxqbn.pt2e's prepare_pt2e / convert_pt2e, called as torchao's are, plus ``bn=``."""
    def build(setup: Setup) -> nn.Module:
        pt2e = _fxqbn_module("pt2e")
        _, _, quantizer_class, default_config = import_pt2e()
        quantizer = quantizer_class().set_global(default_config())
        observed = pt2e.prepare_pt2e(_export(setup), quantizer, bn=bn)
        _calibrate(observed, setup.calib)
        return pt2e.convert_pt2e(observed)
    return build


def _bn_only_routes() -> list[Route]:
    """Per backend: with fold=True and fold=False where fxqbn.prepare has ``fold``, else its one default."""
    if "fold" not in inspect.signature(fxqbn.prepare).parameters:
        return [Route(f"BN-only fxqbn.prepare/convert, {b}", _bn_only(b, None)) for b in BACKENDS] + [
            Route("BN-only, fold=False", _bn_only("native", False))]
    return [Route(f"BN-only fxqbn.prepare/convert, {b}, fold={fold}", _bn_only(b, fold))
            for fold in (True, False) for b in BACKENDS]


def routes() -> list[Route]:
    return [
        Route("float", lambda setup: setup.model),
        *_bn_only_routes(),
        Route("torch.ao int8 (prepare_fx/convert_fx, x86)", _whole("ao", lowered=False)),
        Route("torch.ao int8 + fxqbn.lower", _whole("ao", lowered=True)),
        Route("PT2E int8 (torchao, X86InductorQuantizer)", _whole("pt2e", lowered=False)),
        Route("PT2E int8 + fxqbn.lower", _whole("pt2e", lowered=True)),
        Route('fxqbn.pt2e, bn="int8"', _fxqbn_pt2e("int8")),
        Route('fxqbn.pt2e, bn="float"', _fxqbn_pt2e("float")),
    ]


def _bn_calls(gm: nn.Module) -> tuple[int, int]:
    """(torch.ao int8 BNs, float BNs) called by ``gm``'s graph (every spelling of fxqbn's registry)."""
    graph = gm.graph if isinstance(gm, fx.GraphModule) else fx.symbolic_trace(gm).graph
    modules = dict(gm.named_modules())
    spellings = [bn_spelling(node, modules) for node in graph.nodes]
    found = [s for s in spellings if s is not None]
    int8 = sum(s.read is already_int8 for s in found)
    return int8, len(found) - int8


def bn_counts(quantized: nn.Module, total: int) -> str:
    """"int8 / folded / float" for the BNs of the float model (``total``) in ``quantized``."""
    ao_int8, left_float = _bn_calls(quantized)
    try:
        rewritten = len(fxqbn.get_report(quantized).rewritten)
    except fxqbn.FxqbnError:  # no fxqbn report: float, or a stock int8 model
        rewritten = 0
    int8 = rewritten + ao_int8
    return f"{int8} / {total - int8 - left_float} / {left_float}"


@torch.no_grad()
def sqnr(reference: torch.Tensor, output: torch.Tensor) -> float:
    noise = (reference - output).pow(2).sum()
    return float("inf") if noise == 0 else (10 * torch.log10(reference.pow(2).sum() / noise)).item()


@torch.no_grad()
def logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return torch.cat([model(b) for b in digits.batches(x)])


def row(route: Route, setup: Setup, split: digits.Split, reference: torch.Tensor) -> list[object]:
    """One table row: the route's top-1, drop, SQNR and BN counts, or why it has none."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.ao's deprecation notices, on every call
            quantized = route.build(setup)
            out = logits(quantized, split.test_x)
    except Unavailable as why:
        return [route.label, str(why), "", "", ""]
    except Exception as exc:  # a route that fails is a finding: its row says how
        return [route.label, f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:100]}", "", "", ""]
    top1, float_top1 = (100.0 * (o.argmax(1) == split.test_y).float().mean().item() for o in (out, reference))
    counts = bn_counts(quantized, sum(_bn_calls(setup.model)))
    if quantized is setup.model:
        return [route.label, f"{top1:.2f}", "-", "-", counts]
    return [route.label, f"{top1:.2f}", f"{top1 - float_top1:+.2f}", f"{sqnr(reference, out):.1f}", counts]


def _model(split: digits.Split, retrain: bool) -> nn.Module:
    if not retrain:
        return digits.load_trained()
    start = time.perf_counter()
    model = digits.train(split)
    torch.save(model.state_dict(), digits.WEIGHTS)
    print(f"trained in {time.perf_counter() - start:.1f} s, saved {os.path.relpath(digits.WEIGHTS)}")
    return model


def _versions() -> str:
    try:
        ao = importlib.import_module("torchao").__version__
    except ImportError:
        ao = "not installed"
    return f"torch {torch.__version__}, torchao {ao}, fxqbn {fxqbn.__version__}, {torch.get_num_threads()} thread(s)"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", action="store_true", help="train the weights again (overwrites the committed file)")
    parser.add_argument("--calib-batches", type=int, default=4, help="calibration batches of 64 training images")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    split = digits.load_split()
    model = _model(split, args.train)
    setup = Setup(model, (split.train_x[:64],), digits.batches(split.train_x)[: args.calib_batches])
    reference = logits(model, split.test_x)
    rows = [row(route, setup, split, reference) for route in routes()]
    print(f"$ python {' '.join(shlex.quote(a) for a in sys.argv)}")
    print(f"{_versions()}, {datetime.date.today().isoformat()}; {len(split.train_y)} train / {len(split.test_y)} test images")
    print(tabulate(rows, headers=HEADERS, tablefmt="github", disable_numparse=True))


if __name__ == "__main__":
    main()
