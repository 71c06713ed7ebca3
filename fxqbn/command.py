"""The work behind ``fxqbn convert`` and ``fxqbn report``: load the model and data, calibrate, convert, verify, write.

``fxqbn.cli`` parses the command line without importing torch and calls ``convert_command`` /
``report_command`` here; this module imports torch.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import importlib.util
import json
import math
import os
import statistics
import sys
import textwrap
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
from torch import nn
from torch.ao.quantization import HistogramObserver, MinMaxObserver

from . import distributed
from .api import convert, get_report, prepare
from .cli import BUILTIN_MODEL, first_line, model_file, usage
from .comparing import compare, sqnr_db, tensors_in
from .errors import FxqbnError
from .lower import lower
from .paths import calibration_files
from .progress import Progress
from .report import COLUMNS, DEFAULT_COLUMNS, WIDTH, Report
from .serialize import describe_load_error, load_report, save
from .state import PREPARED_KEY, attached
from .whole_model import int8_model

__all__ = ["convert_command", "report_command", "verify", "Verification"]

OBSERVERS = {"histogram": HistogramObserver, "minmax": MinMaxObserver}
DTYPES = {"quint8": torch.quint8, "qint8": torch.qint8}
LATENCY_RUNS = 20

# -- loading the model and the data ----------------------------------------------------------------


def _import_target(prog: str, target: str) -> Any:
    """The module named by MODEL's part before the colon: a .py file, or an importable module."""
    if model_file(f"{target}:") is not None:  # fxqbn.cli checked that the file exists
        path = os.path.abspath(target)
        name = "fxqbn_model_" + os.path.splitext(os.path.basename(path))[0]
        spec = importlib.util.spec_from_file_location(name, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        sys.path.insert(0, os.path.dirname(path))  # as when running the file: its siblings are importable
        try:
            spec.loader.exec_module(module)
        except Exception as exc:
            raise FxqbnError(f"importing {target} failed: {first_line(exc)}") from exc
        return module
    try:
        return importlib.import_module(target)
    except ModuleNotFoundError as exc:
        if exc.name and (target == exc.name or target.startswith(exc.name + ".")):
            raise usage(prog, f"no module named {exc.name!r} (MODEL is path/to/file.py:factory or package.module:factory)") from None
        raise FxqbnError(f"importing {target} failed: {first_line(exc)}") from exc
    except Exception as exc:
        raise FxqbnError(f"importing {target} failed: {first_line(exc)}") from exc


def _load_factory(prog: str, spec: str) -> Callable[[], Any]:
    target, sep, attr = spec.rpartition(":")
    if not sep or not target or not attr:
        raise usage(prog, f"MODEL {spec!r} must be path/to/file.py:factory or package.module:factory")
    obj = _import_target(prog, target)
    for part in attr.split("."):
        if not hasattr(obj, part):
            names = [n for n in dir(obj) if not n.startswith("_")]
            close = difflib.get_close_matches(part, names, n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise usage(prog, f"{target} has no attribute {part!r}{hint}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise usage(prog, f"{spec} is not callable ({type(obj).__name__}): name a function returning an nn.Module")
    return obj


def _as_inputs(value: Any) -> tuple[Any, ...]:
    return (value,) if isinstance(value, torch.Tensor) else tuple(value)


def _build_model(spec: str, factory: Callable[[], Any]) -> tuple[nn.Module, tuple[Any, ...] | None]:
    try:
        result = factory()
    except Exception as exc:
        raise FxqbnError(f"{spec} raised {first_line(exc)}") from exc
    example = None
    if isinstance(result, (tuple, list)) and len(result) == 2 and isinstance(result[0], nn.Module):
        result, example = result
        if not isinstance(example, (torch.Tensor, tuple, list)):
            raise FxqbnError(f"{spec} returned example inputs of type {type(example).__name__}: return a tensor or a tuple of tensors")
        example = _as_inputs(example)
    if not isinstance(result, nn.Module):
        raise FxqbnError(f"{spec} returned {type(result).__name__}: return an nn.Module or (module, example_inputs)")
    return result.eval(), example


def _shapes(inputs: Sequence[Any]) -> str:
    return ", ".join(str(tuple(x.shape)) if isinstance(x, torch.Tensor) else type(x).__name__ for x in inputs)


def _run(model: nn.Module, inputs: tuple[Any, ...], what: str) -> Any:
    """``model(*inputs)``, with whatever the model raises turned into a refusal naming ``what``."""
    try:
        with torch.no_grad():
            return model(*inputs)
    except FxqbnError:
        raise
    except Exception as exc:
        raise FxqbnError(f"{what} {_shapes(inputs)} does not fit the model: {first_line(exc)}") from exc


def _read_calibration(path: str, n_inputs: int) -> list[tuple[torch.Tensor, ...]]:
    try:
        data = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as exc:
        raise FxqbnError(
            f"cannot read calibration file {path}: {describe_load_error(exc)}; save a tensor or a list of batches with torch.save"
        ) from None
    if isinstance(data, torch.Tensor):
        data = [data]
    if not isinstance(data, (list, tuple)) or not data:
        raise FxqbnError(f"calibration file {path} holds {type(data).__name__ if data is not None else 'None'}"
                         f"{' (empty)' if isinstance(data, (list, tuple)) else ''}: save a tensor or a non-empty list of batches")
    batches = []
    for i, batch in enumerate(data):
        batch = _as_inputs(batch) if isinstance(batch, (torch.Tensor, tuple, list)) else None
        if batch is None or not all(isinstance(x, torch.Tensor) for x in batch):
            raise FxqbnError(f"batch {i} of calibration file {path} is not a tensor or a tuple of tensors")
        if len(batch) != n_inputs:
            raise FxqbnError(f"batch {i} of calibration file {path} has {len(batch)} tensors; the model takes {n_inputs} inputs")
        batches.append(batch)
    return batches


# -- quantization choices ---------------------------------------------------------------------------


def _qconfig(prog: str, model: nn.Module, observer: str, dtype: str, skip: Sequence[str]) -> Any:
    """The activation observer for ``prepare``, after checking that every ``--skip`` module exists."""
    names = [name for name, _ in model.named_modules() if name]
    for name in skip:
        if name not in names:
            close = difflib.get_close_matches(name, names, n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise usage(prog, f"argument --skip: the model has no module {name!r}{hint}")
    return OBSERVERS[observer].with_args(dtype=DTYPES[dtype], qscheme=torch.per_tensor_affine, reduce_range=False)


# -- verification ----------------------------------------------------------------------------------


def _median_ms(model: nn.Module, inputs: tuple[Any, ...], runs: int) -> float:
    times = []
    with torch.no_grad():
        for i in range(runs + 2):  # two warm-up runs
            start = time.perf_counter()
            model(*inputs)
            if i >= 2:
                times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


@dataclass(frozen=True)
class Verification:
    batch: str  # the shapes of the held-out batch
    sqnr_db: float | None  # None when the outputs are identical
    max_abs_error: float
    float_ms: float
    quantized_ms: float
    runs: int

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: a non-finite SQNR (identical or all-zero outputs) is None."""
        data = asdict(self)
        data["sqnr_db"] = self.sqnr_db if self.sqnr_db is not None and math.isfinite(self.sqnr_db) else None
        return data

    def lines(self) -> list[str]:
        sqnr = "inf (identical outputs)" if self.sqnr_db is None else f"{self.sqnr_db:.1f} dB"
        return [
            f"verification on a held-out batch {self.batch}: output SQNR {sqnr}, max abs error {self.max_abs_error:.4g}",
            f"latency, median of {self.runs} runs: float {self.float_ms:.2f} ms, quantized {self.quantized_ms:.2f} ms",
        ]


def verify(float_model: nn.Module, quantized: nn.Module, inputs: tuple[Any, ...], runs: int = LATENCY_RUNS) -> Verification:
    reference = tensors_in(_run(float_model, inputs, "the verification batch"))
    output = tensors_in(_run(quantized, inputs, "the verification batch"))
    pairs = [(r.double(), o.double()) for r, o in zip(reference, output) if r.is_floating_point()]
    signal = sum(float(r.pow(2).sum()) for r, _ in pairs)
    noise = sum(float((r - o).pow(2).sum()) for r, o in pairs)
    max_err = max((float((r - o).abs().max()) for r, o in pairs if r.numel()), default=0.0)
    sqnr = None if noise == 0 else sqnr_db(signal, noise)
    return Verification(
        batch=_shapes(inputs), sqnr_db=sqnr, max_abs_error=max_err,
        float_ms=_median_ms(float_model, inputs, runs), quantized_ms=_median_ms(quantized, inputs, runs), runs=runs,
    )


# TorchScript is deprecated (DeprecationWarning in torch 2.13, FutureWarning in 2.14); --torchscript asks for it.
_TORCHSCRIPT_WARNINGS = (
    r"`torch\.jit\.\w+` is deprecated",
    r"The TorchScript type system doesn't support instance-level annotations",  # from torch's own GraphModule
)


def _write_torchscript(quantized: nn.Module, inputs: tuple[Any, ...], path: str) -> None:
    with warnings.catch_warnings():
        for message in _TORCHSCRIPT_WARNINGS:
            warnings.filterwarnings("ignore", message=message)
        try:
            scripted = torch.jit.script(quantized)
        except Exception as exc:
            raise FxqbnError(f"torch.jit.script cannot compile the converted model: {first_line(exc)} (--out needs no scripting)") from exc
        same = zip(tensors_in(_run(scripted, inputs, "the example input")), tensors_in(_run(quantized, inputs, "the example input")))
        if not all(torch.equal(a, b) for a, b in same):
            raise FxqbnError("the TorchScript model's outputs differ from the converted model's; not writing --torchscript")
        torch.jit.save(scripted, path)


@dataclass(frozen=True)
class Calibration:
    """The batches to calibrate with, the batch held out for --verify (None when not needed), and where they came from."""

    batches: list[tuple[torch.Tensor, ...]]
    held_out: tuple[torch.Tensor, ...] | None
    source: str  # a file or folder name, or "random"
    ranks: distributed.Ranks | None = None  # under torchrun: the ranks that shared the batches

    @property
    def note(self) -> str:
        n = len(self.batches)
        if self.source == "random":
            return f"calibration: {n} random batches - DEMO ONLY: real inputs have other ranges; pass --calib FILE{self._split}"
        held = " (its last batch held out for --verify)" if self.held_out is not None else ""
        return f"calibration: {n} batch{'es' if n > 1 else ''} from {self.source}{held}{self._split}"

    @property
    def _split(self) -> str:
        return f"; {self.ranks.describe(len(self.batches))}" if self.ranks is not None else ""

    def to_dict(self) -> dict[str, Any]:
        data = {"source": self.source, "batches": len(self.batches), "demo_only": self.source == "random"}
        return {**data, "ranks": self.ranks.to_dict(len(self.batches))} if self.ranks is not None else data


def _calibration(args: argparse.Namespace, example: tuple[Any, ...], verify: bool) -> Calibration:
    if args.calib is not None:
        batches = [b for path in calibration_files(args.calib) for b in _read_calibration(path, len(example))]
        if not verify:
            return Calibration(batches, None, args.calib)
        if len(batches) < 2:
            raise FxqbnError(f"--verify needs a batch held out of calibration: {args.calib} holds 1 batch; save a list of at least 2")
        return Calibration(batches[:-1], batches[-1], args.calib)
    if not all(isinstance(x, torch.Tensor) for x in example):
        raise FxqbnError("random calibration needs tensor inputs: pass --calib FILE with real batches")
    gen = torch.Generator().manual_seed(args.seed)
    batches = [tuple(torch.randn(*x.shape, generator=gen, dtype=x.dtype) for x in example) for _ in range(args.calib_batches + 1)]
    return Calibration(batches[:-1], batches[-1] if verify else None, "random")  # same batches either way


def _render(
    args: argparse.Namespace, spec: str, example: tuple[Any, ...], report: Report, calibration: Calibration,
    checked: Verification | None,
) -> tuple[str, list[str]]:
    """(what goes to stdout and --report, lines for stderr) in the chosen --format."""
    written = [f"{what}: {path}" for what, path in (("saved", args.out), ("torchscript", args.torchscript), ("report", args.report)) if path]
    if args.format == "json":
        document: dict[str, Any] = {
            "model": spec, "inputs": [list(x.shape) for x in example if isinstance(x, torch.Tensor)],
            **_settings(args), "calibration": calibration.to_dict(), "report": report.to_dict(),
        }
        if checked is not None:
            document["verification"] = checked.to_dict()
        return json.dumps(document, indent=2), written
    width = None if args.wide else WIDTH
    how = f"whole-model int8 via {args.int8}, BNs lowered" if args.int8 else f"{args.observer} observer, {args.dtype}"
    header = [f"model: {spec}, input {_shapes(example)}, {how}", calibration.note]
    footer = checked.lines() if checked is not None else []
    if args.format == "csv":  # the table stays a table: the other lines go to stderr
        return _table(args, report), [*header, *footer, *written]
    return "\n".join([*_wrap(header, width), _table(args, report), *_wrap(footer, width)]), written


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    """What the JSON document says was asked: --int8's route (its quantizer picks observers and dtypes,
    and --skip is refused with it), or the BN-only conversion's observer, dtype and skipped modules."""
    if args.int8:
        return {"int8": args.int8}
    return {"observer": args.observer, "dtype": args.dtype, "skip": args.skip}


def _wrap(lines: list[str], width: int | None) -> list[str]:
    """Each line in at most ``width`` characters, its continuation indented."""
    if width is None:
        return lines
    return [part for line in lines for part in textwrap.wrap(line, width, subsequent_indent="  ", break_on_hyphens=False)]


def _table(args: argparse.Namespace, report: Report) -> str:
    """The report in --format, with --columns / --wide for the tables."""
    if args.format in ("json", "csv"):
        return report.format(args.format).rstrip("\n")
    columns = COLUMNS if args.wide and args.columns == DEFAULT_COLUMNS else args.columns
    return report.format(args.format, columns=columns, width=None if args.wide else WIDTH)


def _model_and_inputs(prog: str, args: argparse.Namespace, spec: str) -> tuple[nn.Module, tuple[Any, ...]]:
    model, example = _build_model(spec, _load_factory(prog, spec))
    if args.input_shape:
        gen = torch.Generator().manual_seed(args.seed)
        example = tuple(torch.randn(*shape, generator=gen) for shape in args.input_shape)
    elif example is None:
        raise usage(prog, f"{spec} returned no example inputs: give their shapes with --input-shape, e.g. --input-shape 1,3,224,224")
    _run(model, example, "--input-shape" if args.input_shape else "the example input")
    return model, example


def _no_batch_norm(spec: str) -> FxqbnError:
    return FxqbnError(f"{spec} holds no BatchNorm: nothing to quantize (fxqbn quantizes BatchNorm1d/2d/3d and F.batch_norm "
                      "on module statistics)")


def _check_found(prog: str, spec: str, observed: nn.Module, skip: Sequence[str]) -> None:
    """Refuse a model without BatchNorm, and a --skip module holding none of the model's BatchNorms."""
    found = attached(observed, PREPARED_KEY)
    modules = [p.match.module for p in found.patterns] + [s.module for s in found.skips]
    if not modules:
        raise _no_batch_norm(spec)
    for name in skip:
        if not any(m == name or m.startswith(name + ".") for m in modules):
            held = sorted({m.split(".")[0] for m in modules})
            raise usage(prog, f"argument --skip: module {name!r} holds no BatchNorm; the BatchNorms are in "
                        f"{', '.join(held[:5])}{', ...' if len(held) > 5 else ''}")


def _calibrate(observed: nn.Module, calibration: Calibration, progress: Progress) -> Calibration:
    """Run the batches through ``observed``; under torchrun, this rank's share, then every rank's observers merged."""
    ranks = distributed.join_launched()  # under torchrun: rank r of N calibrates on batches r, r + N, ...
    for i, batch in progress.bar(distributed.shard(list(enumerate(calibration.batches)), ranks), desc="calibrating", unit="batch"):
        _run(observed, batch, f"calibration batch {i}")
    if ranks is None:
        return calibration
    with progress.step(f"merging the observers of {ranks.world_size} ranks"):
        distributed.sync_observers(observed)  # every rank now holds the observers of all the batches
    return replace(calibration, ranks=ranks)


def _quantize(args: argparse.Namespace, model: nn.Module, example: tuple[Any, ...], calibration: Calibration,
              progress: Progress, spec: str) -> tuple[nn.Module | None, Calibration]:
    """The converted model (None on a torchrun rank other than 0: rank 0 converts) and the calibration done."""
    if args.int8:
        return _whole_model_int8(args, model, example, calibration, progress, spec), calibration
    prog = "fxqbn convert"
    qconfig = _qconfig(prog, model, args.observer, args.dtype, args.skip)
    with progress.step("tracing"):
        observed = prepare(model, example, qconfig, skip=args.skip)
    _check_found(prog, spec, observed, args.skip)
    calibration = _calibrate(observed, calibration, progress)
    if calibration.ranks is not None and calibration.ranks.rank != 0:
        return None, calibration
    with progress.step("converting"):
        return convert(observed, backend=args.backend or "native"), calibration


def _whole_model_int8(args: argparse.Namespace, model: nn.Module, example: tuple[Any, ...], calibration: Calibration,
                      progress: Progress, spec: str) -> nn.Module:
    """--int8 ao|pt2e: the whole model to int8 (torch.ao FX or torchao PT2E), then its BNs lowered (fxqbn.lower)."""
    if distributed.is_launched():
        raise FxqbnError("fxqbn convert --int8 calibrates in one process: run it without torchrun")
    with progress.step(f"quantizing the whole model to int8 ({args.int8}), calibrating on {len(calibration.batches)} batches"):
        int8 = int8_model(model, example, calibration.batches, args.int8)
    with progress.step("lowering the BatchNorms"):
        lowered = lower(int8, backend=args.backend)
    if not get_report(lowered).rows:  # the report lists every BN, lowered, already int8 or left float
        raise _no_batch_norm(spec)
    return lowered


def convert_command(args: argparse.Namespace, progress: Progress) -> int:
    """``fxqbn convert``: the command line is checked already (``fxqbn.cli``)."""
    spec = args.model or BUILTIN_MODEL
    with progress.step(f"building {spec}"):
        model, example = _model_and_inputs("fxqbn convert", args, spec)
    verify_it = args.verify or (args.model is None and args.calib is None)  # `fxqbn convert` alone verifies
    calibration = _calibration(args, example, verify_it)
    quantized, calibration = _quantize(args, model, example, calibration, progress, spec)
    if quantized is None:
        return 0  # a torchrun rank other than 0: rank 0 writes the outputs and prints the report
    checked = None
    if calibration.held_out is not None:
        with progress.step("verifying"):
            checked = verify(model, quantized, calibration.held_out)
            if not args.int8:  # lowered graphs have no BN-only pipeline to compare per BN
                compare(model, quantized, [calibration.held_out])  # fills the report's per-BN error columns
    if args.out:
        with progress.step(f"saving {args.out}"):
            save(quantized, args.out)
    if args.torchscript:
        with progress.step("compiling TorchScript"):
            _write_torchscript(quantized, example, args.torchscript)
    text, side = _render(args, spec, example, get_report(quantized), calibration, checked)
    if args.report:
        with open(args.report, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    if not args.quiet:
        print(text)
        for line in side:
            print(line, file=sys.stderr)
    return 0


def report_command(args: argparse.Namespace, progress: Progress) -> int:
    """``fxqbn report PATH`` (``fxqbn.cli`` checked that PATH is a file)."""
    report = load_report(args.path)
    if not args.quiet:
        print(_table(args, report))
    return 0
