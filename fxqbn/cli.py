"""The ``fxqbn`` command (also ``python -m fxqbn``).

    fxqbn convert [MODEL] [options]   quantize MODEL's BatchNorms (default: a built-in DenseNet-BC)
    fxqbn report PATH                 print the report of a model saved with --out / fxqbn.save

Exit status: 0 on success; 2 when the command line is wrong (a malformed or missing argument, a file,
module, factory or --skip module that does not exist); 1 when fxqbn refuses the model or the data
(a model it cannot trace, inputs or calibration batches the model does not take, an unreadable file).
Errors are one line on stderr; ``--debug`` adds the Python traceback.
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
import time
import traceback
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from torch.ao.quantization import HistogramObserver, MinMaxObserver
from tqdm import tqdm

from .api import convert, get_report, prepare
from .compare import compare, sqnr_db, tensors_in
from .errors import FxqbnError
from .report import Report
from .serialize import describe_load_error, load_report, save
from .whole_model import ROUTES as INT8_ROUTES, quantize_whole_model

__all__ = ["main"]

BUILTIN_MODEL = "fxqbn.models:densenet_bc"
OBSERVERS = {"histogram": HistogramObserver, "minmax": MinMaxObserver}
DTYPES = {"quint8": torch.quint8, "qint8": torch.qint8}
FORMATS = ("plain", "github", "json", "csv")
LATENCY_RUNS = 20

# Warnings the command would otherwise print on every run; filtered by message, in the command only.
_NOISE = (
    # pytorch#184982: quantized dtypes are deprecated; fxqbn uses them on purpose.
    (UserWarning, r"torch\.quantize_per_tensor, torch\.quantize_per_channel and other quantized tensor creation"),
    # --torchscript: TorchScript is deprecated in torch 2.13, and checks torch's own GraphModule.__init__.
    (DeprecationWarning, r"`torch\.jit\.\w+` is deprecated"),
    (UserWarning, r"The TorchScript type system doesn't support instance-level annotations"),
)


class UsageError(Exception):
    """The command line is wrong: exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{self.prog}: error: {message} (see {self.prog} --help)")


def _usage(prog: str, message: str) -> UsageError:
    return UsageError(f"{prog}: error: {message}")


def _one_line(text: str) -> str:
    return " ".join(part.strip() for part in str(text).strip().splitlines() if part.strip())


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


# -- arguments ---------------------------------------------------------------------------------


def _shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a shape: give positive integers separated by commas, e.g. 1,3,224,224") from None
    if not shape or any(d <= 0 for d in shape):
        raise argparse.ArgumentTypeError(f"{text!r} is not a shape: every dimension must be a positive integer")
    return shape


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return value


def build_parser() -> argparse.ArgumentParser:
    common = _Parser(add_help=False)
    common.add_argument("--quiet", action="store_true", help="no progress bar and nothing on stdout/stderr but errors")
    common.add_argument("--debug", action="store_true", help="show the Python traceback of an error")
    common.add_argument("--format", choices=FORMATS, default="plain", help="report format (default: plain)")

    parser = _Parser(prog="fxqbn", description="Quantize the BatchNorm layers of PyTorch models with a torch.fx pass.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="{convert,report}")

    c = commands.add_parser(
        "convert", parents=[common], help="quantize a model's BatchNorms",
        description="Quantize MODEL's BatchNorm layers, print the report, and optionally save the result.",
    )
    c.add_argument(
        "model", nargs="?", metavar="MODEL",
        help="path/to/file.py:factory or package.module:factory, a callable returning an nn.Module or "
        f"(module, example_inputs); default: the built-in DenseNet-BC ({BUILTIN_MODEL})",
    )
    c.add_argument("--input-shape", action="append", type=_shape, metavar="N,C,...",
                   help="shape of a model input, e.g. 1,3,224,224 (repeat for several inputs); "
                   "default: the factory's example inputs")
    calib = c.add_mutually_exclusive_group()
    calib.add_argument("--calib", metavar="FILE",
                       help="calibration data saved with torch.save: a tensor (one batch) or a list of batches "
                       "(a batch of a several-input model is a tuple of tensors)")
    calib.add_argument("--calib-batches", type=_positive, default=8, metavar="K",
                       help="without --calib: K random batches of the input shape (demo only; default 8)")
    c.add_argument("--seed", type=int, default=0, help="seed of the random batches (default 0)")
    c.add_argument("--observer", choices=sorted(OBSERVERS), default="histogram", help="activation observer (default: histogram)")
    c.add_argument("--dtype", choices=list(DTYPES), default="quint8", help="activation dtype (default: quint8)")
    c.add_argument("--backend", choices=["native", "fused"], default=None,
                   help="native: PyTorch's quantized kernels; fused: fxqbn's C integer kernels on uint8/int8 tensors "
                   "(default: native; with --int8 pt2e: fused)")
    c.add_argument("--int8", choices=list(INT8_ROUTES), metavar="{ao,pt2e}",
                   help="quantize the whole model to int8 (ao: torch.ao FX with the x86 mapping; pt2e: torchao PT2E "
                   "with X86InductorQuantizer, needs fxqbn[pt2e]), then lower its float BNs into int8 (fxqbn.lower)")
    c.add_argument("--skip", action="append", default=[], metavar="MODULE",
                   help="keep the BatchNorms in MODULE (and its children) float; repeatable")
    c.add_argument("--out", metavar="PATH", help="save the converted model with fxqbn.save (load with fxqbn.load)")
    c.add_argument("--torchscript", metavar="PATH", help="save the converted model compiled with torch.jit.script")
    c.add_argument("--report", metavar="PATH", help="write the report, in --format, to PATH")
    c.add_argument("--verify", action="store_true",
                   help="run float and quantized models on a held-out batch: output SQNR, max error, latency "
                   "(implied with no MODEL and no --calib)")
    c.set_defaults(run=run_convert)

    r = commands.add_parser("report", parents=[common], help="print the report of a saved model",
                            description="Print the report stored in a file written by `fxqbn convert --out` or fxqbn.save.")
    r.add_argument("path", metavar="PATH", help="a file written by fxqbn.save")
    r.set_defaults(run=run_report)
    return parser


# -- the report as text ----------------------------------------------------------------------------


# -- loading the model and the data ----------------------------------------------------------------


def _import_target(prog: str, target: str) -> Any:
    """The module named by MODEL's part before the colon: a .py file, or an importable module."""
    if target.endswith(".py") or "/" in target or os.sep in target:
        if not os.path.isfile(target):
            raise _usage(prog, f"model file {target} does not exist")
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
            raise FxqbnError(f"importing {target} failed: {_first_line(exc)}") from exc
        return module
    try:
        return importlib.import_module(target)
    except ModuleNotFoundError as exc:
        if exc.name and (target == exc.name or target.startswith(exc.name + ".")):
            raise _usage(prog, f"no module named {exc.name!r} (MODEL is path/to/file.py:factory or package.module:factory)") from None
        raise FxqbnError(f"importing {target} failed: {_first_line(exc)}") from exc
    except Exception as exc:
        raise FxqbnError(f"importing {target} failed: {_first_line(exc)}") from exc


def _load_factory(prog: str, spec: str) -> Callable[[], Any]:
    target, sep, attr = spec.rpartition(":")
    if not sep or not target or not attr:
        raise _usage(prog, f"MODEL {spec!r} must be path/to/file.py:factory or package.module:factory")
    obj = _import_target(prog, target)
    for part in attr.split("."):
        if not hasattr(obj, part):
            names = [n for n in dir(obj) if not n.startswith("_")]
            close = difflib.get_close_matches(part, names, n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise _usage(prog, f"{target} has no attribute {part!r}{hint}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise _usage(prog, f"{spec} is not callable ({type(obj).__name__}): name a function returning an nn.Module")
    return obj


def _as_inputs(value: Any) -> tuple[Any, ...]:
    return (value,) if isinstance(value, torch.Tensor) else tuple(value)


def _build_model(spec: str, factory: Callable[[], Any]) -> tuple[nn.Module, tuple[Any, ...] | None]:
    try:
        result = factory()
    except Exception as exc:
        raise FxqbnError(f"{spec} raised {_first_line(exc)}") from exc
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
        raise FxqbnError(f"{what} {_shapes(inputs)} does not fit the model: {_first_line(exc)}") from exc


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
            raise _usage(prog, f"argument --skip: the model has no module {name!r}{hint}")
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


# -- the commands ----------------------------------------------------------------------------------


def _check_output_path(prog: str, option: str, path: str | None) -> None:
    if path is not None:
        folder = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(folder):
            raise _usage(prog, f"argument {option}: folder {os.path.dirname(path) or '.'} does not exist")
        if os.path.isdir(path):
            raise _usage(prog, f"argument {option}: {path} is a folder; give a file name")


def _write_torchscript(quantized: nn.Module, inputs: tuple[Any, ...], path: str) -> None:
    try:
        scripted = torch.jit.script(quantized)
    except Exception as exc:
        raise FxqbnError(f"torch.jit.script cannot compile the converted model: {_first_line(exc)} (--out needs no scripting)") from exc
    if not all(torch.equal(a, b) for a, b in zip(tensors_in(_run(scripted, inputs, "the example input")), tensors_in(_run(quantized, inputs, "the example input")))):
        raise FxqbnError("the TorchScript model's outputs differ from the converted model's; not writing --torchscript")
    torch.jit.save(scripted, path)


@dataclass(frozen=True)
class Calibration:
    """The batches to calibrate with, the batch held out for --verify (None when not needed), and where they came from."""

    batches: list[tuple[torch.Tensor, ...]]
    held_out: tuple[torch.Tensor, ...] | None
    source: str  # a file name, or "random"

    @property
    def note(self) -> str:
        n = len(self.batches)
        if self.source == "random":
            return (f"calibration: {n} random batches - DEMO ONLY: ranges from random data do not fit real inputs; "
                    "pass --calib FILE with real batches")
        held = " (its last batch held out for --verify)" if self.held_out is not None else ""
        return f"calibration: {n} batch{'es' if n > 1 else ''} from {self.source}{held}"

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "batches": len(self.batches), "demo_only": self.source == "random"}


def _calibration(args: argparse.Namespace, example: tuple[Any, ...], verify: bool) -> Calibration:
    if args.calib is not None:
        batches = _read_calibration(args.calib, len(example))
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
            "observer": args.observer, "dtype": args.dtype, "skip": args.skip, "calibration": calibration.to_dict(),
            "report": report.to_dict(),
        }
        if checked is not None:
            document["verification"] = checked.to_dict()
        return json.dumps(document, indent=2), written
    how = f"whole-model int8 via {args.int8}, BNs lowered" if args.int8 else f"{args.observer} observer, {args.dtype}"
    header = [f"model: {spec}, input {_shapes(example)}, {how}", calibration.note]
    footer = checked.lines() if checked is not None else []
    if args.format == "csv":  # the table stays a table: the other lines go to stderr
        return report.format("csv").rstrip("\n"), [*header, *footer, *written]
    return "\n".join([*header, report.format(args.format), *footer]), written


def run_convert(args: argparse.Namespace) -> int:
    prog = "fxqbn convert"
    spec = args.model or BUILTIN_MODEL
    # 1. the command line: everything that can be checked before any work
    if args.calib is not None and not os.path.isfile(args.calib):
        raise _usage(prog, f"argument --calib: {args.calib} {'is not a file' if os.path.exists(args.calib) else 'does not exist'}")
    for option in ("out", "torchscript", "report"):
        _check_output_path(prog, f"--{option}", getattr(args, option))
    if args.int8 and (args.out or args.skip):
        raise _usage(prog, f"argument --int8: {'--out' if args.out else '--skip'} is not supported with --int8 "
                     "(fxqbn.save stores BN-only conversions; --skip names BNs for fxqbn.prepare)")
    # 2. the model and its inputs
    model, example = _build_model(spec, _load_factory(prog, spec))
    if args.input_shape:
        gen = torch.Generator().manual_seed(args.seed)
        example = tuple(torch.randn(*shape, generator=gen) for shape in args.input_shape)
    elif example is None:
        raise _usage(prog, f"{spec} returned no example inputs: give their shapes with --input-shape, e.g. --input-shape 1,3,224,224")
    _run(model, example, "--input-shape" if args.input_shape else "the example input")
    qconfig = _qconfig(prog, model, args.observer, args.dtype, args.skip)
    verify_it = args.verify or (args.model is None and args.calib is None)  # `fxqbn convert` alone verifies
    calibration = _calibration(args, example, verify_it)
    # 3. prepare, calibrate, convert (--int8: the whole model through torch.ao or PT2E, then fxqbn.lower)
    if args.int8:
        quantized = quantize_whole_model(model, example, calibration.batches, args.int8, backend=args.backend)
    else:
        observed = prepare(model, example, qconfig, skip=args.skip)
        for i, batch in enumerate(tqdm(calibration.batches, desc="calibrating", unit="batch", file=sys.stderr,
                                       disable=args.quiet or not sys.stderr.isatty())):
            _run(observed, batch, f"calibration batch {i}")
        quantized = convert(observed, backend=args.backend or "native")
    # 4. check, write, tell
    checked = None
    if calibration.held_out is not None:
        checked = verify(model, quantized, calibration.held_out)
        if not args.int8:  # lowered graphs have no BN-only pipeline to compare per BN
            compare(model, quantized, [calibration.held_out])  # fills the report's per-BN error columns
    if args.out:
        save(quantized, args.out)
    if args.torchscript:
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


def run_report(args: argparse.Namespace) -> int:
    if not os.path.isfile(args.path):
        raise _usage("fxqbn report", f"{args.path} does not exist")
    report = load_report(args.path)
    if not args.quiet:
        print(report.format(args.format).rstrip("\n"))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; return its exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except UsageError as exc:
        print(exc, file=sys.stderr)
        return 2
    with warnings.catch_warnings():
        for category, message in _NOISE:
            warnings.filterwarnings("ignore", message=message, category=category)
        try:
            return args.run(args)
        except (Exception, KeyboardInterrupt) as exc:
            status, message = _status_and_message(exc)
            if args.debug:
                traceback.print_exception(exc)
            print(message, file=sys.stderr)
            return status


def _status_and_message(exc: BaseException) -> tuple[int, str]:
    if isinstance(exc, UsageError):
        return 2, str(exc)
    if isinstance(exc, FxqbnError):
        return 1, f"fxqbn: error: {_one_line(str(exc))}"
    if isinstance(exc, KeyboardInterrupt):
        return 130, "fxqbn: interrupted"
    # a bug in fxqbn, or something it does not know to refuse
    return 1, f"fxqbn: error: {_first_line(exc)} (rerun with --debug for the traceback)"

if __name__ == "__main__":
    sys.exit(main())
