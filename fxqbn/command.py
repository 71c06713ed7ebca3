"""The work behind ``fxqbn convert`` and ``fxqbn report``: load the model and data, calibrate, convert, verify, write.

``fxqbn.cli`` parses the command line without importing torch into the records of ``fxqbn.requests``
and calls ``convert_command`` / ``report_command`` here with them; this module imports torch.
"""

from __future__ import annotations

import contextlib
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
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
from torch import nn
from torch.ao.quantization import HistogramObserver, MinMaxObserver

from . import distributed
from .api import convert, get_report, prepare
from .comparing import compare, sqnr_db, tensors_in
from .errors import AccuracyWarning, FxqbnError, no_batch_norm
from .paths import calibration_files
from .progress import Progress
from .report import Report
from .sensitivity import LOW_SQNR_DB, collapse_head, collapse_message
from .requests import ConvertRequest, Data, Outputs, Quantization, ReportRequest, Table, first_line, model_file, usage
from .serialize import describe_load_error, load_report, save
from .state import PREPARED_KEY, attached
from .whole_model import quantize_whole_model

__all__ = ["convert_command", "report_command", "verify", "Verification"]

OBSERVERS = {"histogram": HistogramObserver, "minmax": MinMaxObserver}
DTYPES = {"quint8": torch.quint8, "qint8": torch.qint8}
LATENCY_RUNS = 20
PROG = "fxqbn convert"  # the usage errors found here are convert's

# -- loading the model and the data ----------------------------------------------------------------


def _import_target(target: str) -> Any:
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
        with _current_folder_first():
            return importlib.import_module(target)
    except ModuleNotFoundError as exc:
        if exc.name and (target == exc.name or target.startswith(exc.name + ".")):
            raise usage(PROG, f"no module named {exc.name!r} (MODEL is path/to/file.py:factory or package.module:factory)") from None
        raise FxqbnError(f"importing {target} failed: {first_line(exc)}") from exc
    except Exception as exc:
        raise FxqbnError(f"importing {target} failed: {first_line(exc)}") from exc


@contextlib.contextmanager
def _current_folder_first() -> Iterator[None]:
    """The current folder first on ``sys.path`` while MODEL's module is imported, as ``python -m`` has it
    (the ``fxqbn`` script's own folder is there instead); ``sys.path`` as it was afterwards."""
    before = list(sys.path)
    sys.path.insert(0, os.getcwd())
    try:
        yield
    finally:
        sys.path[:] = before


def _load_factory(spec: str) -> Callable[[], Any]:
    target, sep, attr = spec.rpartition(":")
    if not sep or not target or not attr:
        raise usage(PROG, f"MODEL {spec!r} must be path/to/file.py:factory or package.module:factory")
    obj = _import_target(target)
    for part in attr.split("."):
        if not hasattr(obj, part):
            names = [n for n in dir(obj) if not n.startswith("_")]
            close = difflib.get_close_matches(part, names, n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise usage(PROG, f"{target} has no attribute {part!r}{hint}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise usage(PROG, f"{spec} is not callable ({type(obj).__name__}): name a function returning an nn.Module")
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


def _qconfig(model: nn.Module, asked: Quantization) -> Any:
    """The activation observer for ``prepare``, after checking that every ``--skip`` module exists."""
    names = [name for name, _ in model.named_modules() if name]
    for name in asked.skip:
        if name not in names:
            close = difflib.get_close_matches(name, names, n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise usage(PROG, f"argument --skip: the model has no module {name!r}{hint}")
    return OBSERVERS[asked.observer].with_args(dtype=DTYPES[asked.dtype], qscheme=torch.per_tensor_affine, reduce_range=False)


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
    held_for: str = "--verify"  # the option the held-out batch is for (--verify, or --min-sqnr)

    @property
    def note(self) -> str:
        n = len(self.batches)
        if self.source == "random":
            return f"calibration: {n} random batches - DEMO ONLY: real inputs have other ranges; pass --calib FILE{self._split}"
        held = f" (its last batch held out for {self.held_for})" if self.held_out is not None else ""
        return f"calibration: {n} batch{'es' if n > 1 else ''} from {self.source}{held}{self._split}"

    @property
    def _split(self) -> str:
        return f"; {self.ranks.describe(len(self.batches))}" if self.ranks is not None else ""

    def to_dict(self) -> dict[str, Any]:
        data = {"source": self.source, "batches": len(self.batches), "demo_only": self.source == "random"}
        return {**data, "ranks": self.ranks.to_dict(len(self.batches))} if self.ranks is not None else data


def _calibration(data: Data, example: tuple[Any, ...], held_out_for: str | None) -> Calibration:
    """--calib's batches or random ones, the last held out when an option (``held_out_for``) needs it."""
    if data.calib is not None:
        batches = [b for path in calibration_files(data.calib) for b in _read_calibration(path, len(example))]
        if held_out_for is None:
            return Calibration(batches, None, data.calib)
        if len(batches) < 2:
            raise FxqbnError(f"{held_out_for} needs a batch held out of calibration: {data.calib} holds 1 batch; save a list of at least 2")
        return Calibration(batches[:-1], batches[-1], data.calib, held_for=held_out_for)
    if not all(isinstance(x, torch.Tensor) for x in example):
        raise FxqbnError("random calibration needs tensor inputs: pass --calib FILE with real batches")
    gen = torch.Generator().manual_seed(data.seed)
    batches = [tuple(torch.randn(*x.shape, generator=gen, dtype=x.dtype) for x in example) for _ in range(data.calib_batches + 1)]
    return Calibration(batches[:-1], batches[-1] if held_out_for else None, "random")  # same batches either way


def _render(
    request: ConvertRequest, example: tuple[Any, ...], report: Report, calibration: Calibration, checked: Verification | None,
    warned: Sequence[str] = (),
) -> tuple[str, list[str]]:
    """(what goes to stdout and --report, lines for stderr: the warnings and the files written) in the chosen --format."""
    table = request.table
    written = [f"fxqbn: warning: {message}" for message in warned] + request.outputs.written()
    if table.format == "json":
        document: dict[str, Any] = {
            "model": request.spec, "inputs": [list(x.shape) for x in example if isinstance(x, torch.Tensor)],
            **request.quantization.settings(), "calibration": calibration.to_dict(), "report": report.to_dict(),
        }
        if checked is not None:
            document["verification"] = checked.to_dict()
        document["warnings"] = list(warned)
        return json.dumps(document, indent=2), written
    header = [f"model: {request.spec}, input {_shapes(example)}, {request.quantization.describe()}", calibration.note]
    footer = checked.lines() if checked is not None else []
    if table.format == "csv":  # the table stays a table: the other lines go to stderr
        return _table(table, report), [*header, *footer, *written]
    return "\n".join([*_wrap(header, table.width), _table(table, report), *_wrap(footer, table.width)]), written


def _wrap(lines: list[str], width: int | None) -> list[str]:
    """Each line in at most ``width`` characters, its continuation indented."""
    if width is None:
        return lines
    return [part for line in lines for part in textwrap.wrap(line, width, subsequent_indent="  ", break_on_hyphens=False)]


def _table(table: Table, report: Report) -> str:
    """The report in --format, with --columns / --wide for the tables."""
    if table.format in ("json", "csv"):
        return report.format(table.format).rstrip("\n")
    return report.format(table.format, columns=table.shown, width=table.width)


def _model_and_inputs(spec: str, data: Data) -> tuple[nn.Module, tuple[Any, ...]]:
    """MODEL's module and its inputs: random ones of --input-shape, or the factory's; run once to check they fit."""
    model, example = _build_model(spec, _load_factory(spec))
    if data.input_shapes:
        gen = torch.Generator().manual_seed(data.seed)
        example = tuple(torch.randn(*shape, generator=gen) for shape in data.input_shapes)
    elif example is None:
        raise usage(PROG, f"{spec} returned no example inputs: give their shapes with --input-shape, e.g. --input-shape 1,3,224,224")
    _run(model, example, "--input-shape" if data.input_shapes else "the example input")
    return model, example


def _check_found(observed: nn.Module, skip: Sequence[str]) -> None:
    """Refuse a --skip module holding none of the model's BatchNorms (prepare refused a model without any)."""
    found = attached(observed, PREPARED_KEY)
    modules = [p.module for p in found.patterns] + [s.module for s in found.skips] + [f.module for f in found.folded]
    for name in skip:
        if not any(m == name or m.startswith(name + ".") for m in modules):
            held = sorted({m.split(".")[0] for m in modules})
            raise usage(PROG, f"argument --skip: module {name!r} holds no BatchNorm; the BatchNorms are in "
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


def _quantize(asked: Quantization, model: nn.Module, example: tuple[Any, ...], calibration: Calibration,
              progress: Progress) -> tuple[nn.Module | None, Calibration]:
    """The converted model (None on a torchrun rank other than 0: rank 0 converts) and the calibration done."""
    if asked.int8:
        return _whole_model_int8(asked, model, example, calibration, progress), calibration
    qconfig = _qconfig(model, asked)
    with progress.step("tracing"):
        observed = prepare(model, example, qconfig, skip=asked.skip, fold=asked.fold)
    _check_found(observed, asked.skip)
    calibration = _calibrate(observed, calibration, progress)
    if calibration.ranks is not None and calibration.ranks.rank != 0:
        return None, calibration
    held_out = None if asked.min_sqnr is None else [calibration.held_out]
    with progress.step("converting" if held_out is None else "converting, measuring each BN pattern's sensitivity"):
        return convert(observed, backend=asked.backend or "native", keep_float_below=asked.min_sqnr, inputs=held_out), calibration


def _whole_model_int8(asked: Quantization, model: nn.Module, example: tuple[Any, ...], calibration: Calibration,
                      progress: Progress) -> nn.Module:
    """--int8 ao|pt2e: the whole model to int8 (torch.ao FX, then its BNs lowered; or fxqbn.pt2e), every BN
    of the model with a row (those the route folded into a conv / linear: "folded")."""
    if distributed.is_launched():
        raise FxqbnError("fxqbn convert --int8 calibrates in one process: run it without torchrun")
    with progress.step(f"quantizing the whole model to int8 ({asked.int8}), calibrating on {len(calibration.batches)} batches"):
        lowered = quantize_whole_model(model, example, calibration.batches, asked.int8, asked.backend, asked.bn)
    if not get_report(lowered).rows:  # the report lists every BN, lowered, already int8 or left float
        raise no_batch_norm(f"the model ({type(model).__name__})")
    return lowered


def _verify(int8: bool, model: nn.Module, quantized: nn.Module, held_out: tuple[Any, ...] | None,
            progress: Progress) -> Verification | None:
    """--verify on the held-out batch (None without one); it fills the report's per-BN error columns (not ``int8``'s)."""
    if held_out is None:
        return None
    with progress.step("verifying"):
        checked = verify(model, quantized, held_out)
        if not int8:  # lowered graphs have no BN-only pipeline to compare per BN
            compare(model, quantized, [held_out])
    return checked


def _collapse(report: Report, checked: Verification | None) -> list[str]:
    """The warning of an output SQNR under 10 dB, measured by --min-sqnr or --verify (at most one)."""
    message = collapse_message(report)
    if message is None and checked is not None and checked.sqnr_db is not None and checked.sqnr_db < LOW_SQNR_DB:
        message = (f"{collapse_head(checked.sqnr_db)}; per-pattern sensitivity (--min-sqnr) is measured for BN-only "
                   "conversions, without --int8")
    return [] if message is None else [message]


def _write(outputs: Outputs, quantized: nn.Module, example: tuple[Any, ...], progress: Progress) -> None:
    """--out and --torchscript (--report is written with the text)."""
    if outputs.out:
        with progress.step(f"saving {outputs.out}"):
            save(quantized, outputs.out)
    if outputs.torchscript:
        with progress.step("compiling TorchScript"):
            _write_torchscript(quantized, example, outputs.torchscript)


def convert_command(request: ConvertRequest, progress: Progress) -> int:
    """``fxqbn convert``: the command line is checked already (``fxqbn.cli``)."""
    with progress.step(f"building {request.spec}"):
        model, example = _model_and_inputs(request.spec, request.data)
    calibration = _calibration(request.data, example, request.held_out_for)
    with warnings.catch_warnings():  # said once, from the final report, with it (_collapse)
        warnings.simplefilter("ignore", AccuracyWarning)
        quantized, calibration = _quantize(request.quantization, model, example, calibration, progress)
        if quantized is None:
            return 0  # a torchrun rank other than 0: rank 0 writes the outputs and prints the report
        verifies = calibration.held_out if request.verifies else None
        checked = _verify(bool(request.quantization.int8), model, quantized, verifies, progress)
    _write(request.outputs, quantized, example, progress)
    report = get_report(quantized)
    text, side = _render(request, example, report, calibration, checked, _collapse(report, checked))
    if request.outputs.report:
        with open(request.outputs.report, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    if not request.quiet:
        print(text)
        for line in side:
            print(line, file=sys.stderr)
    return 0


def report_command(request: ReportRequest, progress: Progress) -> int:
    """``fxqbn report PATH`` (``fxqbn.cli`` checked that PATH is a file)."""
    report = load_report(request.path)
    if not request.quiet:
        print(_table(request.table, report))
    return 0
