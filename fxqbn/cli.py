"""The ``fxqbn`` command (also ``python -m fxqbn``): the command line, exit statuses and messages.

    fxqbn convert [MODEL] [options]   quantize MODEL's BatchNorms (default: a built-in DenseNet-BC)
    fxqbn report PATH                 print the report of a model saved with --out / fxqbn.save

Exit status: 0 on success; 2 when the command line is wrong (a malformed or missing argument, a file,
module or factory that does not exist, a --skip module that holds no BatchNorm, an output path that
cannot be written); 1 when fxqbn refuses the model or the data (a model it cannot trace or that holds
no BatchNorm, inputs or calibration batches the model does not take, an unreadable file); 130 when
interrupted (Ctrl-C). Errors are one line on stderr; ``--debug`` adds the Python traceback. A reader
that closes stdout early (``fxqbn convert | head -3``) ends the command quietly, with status 0.

This module imports no torch: ``--help``, ``--version`` and usage errors answer at once, and every
path is checked before any work. It parses the command line into records (``fxqbn.requests``);
``fxqbn.command`` does the work they ask for.
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import sys
import traceback
from collections.abc import Sequence
from importlib import metadata

from . import __version__
from .paths import calibration_files, clash, output_problem
from .progress import Progress
from .report import COLUMNS, DEFAULT_COLUMNS, FORMATS, column_names
from .requests import BUILTIN_MODEL, ConvertRequest, Data, Outputs, Quantization, ReportRequest, Table, UsageError, first_line, model_file, usage

__all__ = ["main", "build_parser", "UsageError"]

# The choices, named here without torch; tests check them against the tables they name.
OBSERVERS = ("histogram", "minmax")  # fxqbn.command.OBSERVERS: name -> torch.ao observer class
DTYPES = ("quint8", "qint8")  # fxqbn.command.DTYPES: name -> torch dtype
BACKENDS = ("native", "fused")  # fxqbn.backends.BACKENDS
INT8_ROUTES = ("ao", "pt2e")  # fxqbn.whole_model.ROUTES
EXIT_STATUS = ("exit status: 0 done; 1 fxqbn refused the model or the data (e.g. a model with no BatchNorm); "
               "2 the command line is wrong (e.g. a --skip module without BatchNorm, an output path it cannot write); "
               "130 interrupted")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{self.prog}: error: {message} (see {self.prog} --help)")


def _one_line(text: str) -> str:
    return " ".join(part.strip() for part in str(text).strip().splitlines() if part.strip())


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


def _decibels(text: str) -> float:
    """--min-sqnr's DB: a finite number."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of dB (e.g. 20)")
    return value


def _output_path(text: str) -> str:
    """An output option's PATH: a file fxqbn can write, checked when the command line is read."""
    problem = output_problem(text)
    if problem is not None:
        raise argparse.ArgumentTypeError(problem)
    return text


def _calib_path(text: str) -> str:
    """--calib's FILE_OR_FOLDER: a file, or a folder holding .pt files."""
    try:
        calibration_files(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _columns(text: str) -> tuple[str, ...]:
    try:
        return column_names(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


class _Version(argparse.Action):
    """``--version``: fxqbn's version and the installed torch's, read from package metadata (torch not imported)."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: object) -> None:
        super().__init__(option_strings, dest, nargs=0, help="print fxqbn's and torch's versions and exit")

    def __call__(self, parser: argparse.ArgumentParser, *args: object) -> None:
        try:
            torch_version = metadata.version("torch")
        except metadata.PackageNotFoundError:
            torch_version = "not installed"
        print(f"fxqbn {__version__} (torch {torch_version})")
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    common = _common_options()
    parser = _Parser(prog="fxqbn", description="Quantize the BatchNorm layers of PyTorch models with a torch.fx pass.",
                     epilog=EXIT_STATUS)
    parser.add_argument("--version", action=_Version)
    commands = parser.add_subparsers(dest="command", required=True, metavar="{convert,report}")
    _add_convert(commands, common)
    r = commands.add_parser("report", parents=[common], help="print the report of a saved model",
                            description="Print the report stored in a file written by `fxqbn convert --out` or fxqbn.save.")
    r.add_argument("path", metavar="PATH", help="a file written by fxqbn.save")
    r.set_defaults(run=run_report)
    return parser


def _common_options() -> argparse.ArgumentParser:
    """The options both commands take (a parent parser)."""
    common = _Parser(add_help=False)
    common.add_argument("--quiet", action="store_true", help="no progress bar and nothing on stdout/stderr but errors")
    common.add_argument("--debug", action="store_true", help="show the Python traceback of an error")
    common.add_argument("--format", choices=FORMATS, default="plain", help="report format (default: plain)")
    common.add_argument("--columns", type=_columns, default=DEFAULT_COLUMNS, metavar="A,B,...",
                        help=f"the table's columns, from: {', '.join(COLUMNS)}; or all "
                        f"(default: {','.join(DEFAULT_COLUMNS)}); JSON and CSV keep every field")
    common.add_argument("--wide", action="store_true",
                        help="every column (unless --columns), nothing cut; the default table fits 100 columns")
    return common


def _add_convert(commands: "argparse._SubParsersAction", common: argparse.ArgumentParser) -> None:
    """``fxqbn convert``: the model and its inputs, calibration, quantization choices, outputs."""
    c = commands.add_parser(
        "convert", parents=[common], help="quantize a model's BatchNorms",
        description="Quantize MODEL's BatchNorm layers, print the report, and optionally save the result.", epilog=EXIT_STATUS,
    )
    c.add_argument(
        "model", nargs="?", metavar="MODEL",
        help="path/to/file.py:factory or package.module:factory, a callable returning an nn.Module or "
        f"(module, example_inputs); default: the built-in DenseNet-BC ({BUILTIN_MODEL})",
    )
    c.add_argument("--input-shape", action="append", type=_shape, metavar="N,C,...",
                   help="shape of a model input, e.g. 1,3,224,224 (repeat for several inputs); "
                   "default: the factory's example inputs")
    _add_calibration(c)
    _add_quantization(c)
    # files the command writes: each checked before any work
    c.add_argument("--out", metavar="PATH", type=_output_path, help="save the converted model with fxqbn.save (load with fxqbn.load)")
    c.add_argument("--torchscript", metavar="PATH", type=_output_path, help="save the converted model compiled with torch.jit.script")
    c.add_argument("--report", metavar="PATH", type=_output_path, help="write the report, in --format, to PATH")
    c.add_argument("--verify", action="store_true",
                   help="run float and quantized models on a held-out batch: output SQNR, max error, latency "
                   "(implied with no MODEL and no --calib)")
    c.set_defaults(run=run_convert)


def _add_calibration(c: argparse.ArgumentParser) -> None:
    """convert's calibration options: real batches, or random ones for a demo."""
    calib = c.add_mutually_exclusive_group()
    calib.add_argument("--calib", metavar="FILE_OR_FOLDER", type=_calib_path,
                       help="calibration data saved with torch.save: a tensor (one batch) or a list of batches "
                       "(a batch of a several-input model is a tuple of tensors); or a folder of such .pt files, "
                       "read in name order")
    calib.add_argument("--calib-batches", type=_positive, default=8, metavar="K",
                       help="without --calib: K random batches of the input shape (demo only; default 8)")
    c.add_argument("--seed", type=int, default=0, help="seed of the random batches (default 0)")


def _add_quantization(c: argparse.ArgumentParser) -> None:
    """convert's quantization choices: observer, dtype, backend, whole-model route, skips, folding."""
    c.add_argument("--observer", choices=OBSERVERS, default="histogram", help="activation observer (default: histogram)")
    c.add_argument("--dtype", choices=list(DTYPES), default="quint8", help="activation dtype (default: quint8)")
    c.add_argument("--backend", choices=BACKENDS, default=None,
                   help="native: PyTorch's quantized kernels; fused: fxqbn's C integer kernels on uint8/int8 tensors "
                   "(default: native; with --int8 pt2e: fused)")
    c.add_argument("--int8", choices=INT8_ROUTES, metavar="{ao,pt2e}",
                   help="quantize the whole model to int8 (ao: torch.ao FX with the x86 mapping, then its float BNs "
                   "lowered into int8 by fxqbn.lower; pt2e: torchao PT2E with X86InductorQuantizer through fxqbn.pt2e, "
                   "which folds conv -> BN only where the outputs keep; needs fxqbn[pt2e])")
    c.add_argument("--bn", choices=("int8", "float"), default="int8",
                   help="with --int8 pt2e: int8 (default: BNs that do not fold become int8) or float (they stay "
                   "float; only the fold is corrected)")
    c.add_argument("--skip", action="append", default=[], metavar="MODULE",
                   help="keep the BatchNorms in MODULE (and its children) float; repeatable; "
                   "a MODULE that holds no BatchNorm is a usage error")
    c.add_argument("--min-sqnr", type=_decibels, default=None, metavar="DB",
                   help="keep float every BN pattern whose sensitivity (the model's output SQNR with only that pattern "
                   "quantized, on the batch --verify holds out) is under DB; costs one forward per pattern")
    c.add_argument("--no-fold", dest="fold", action="store_false",
                   help="quantize every BatchNorm; by default a BatchNorm right after the conv / linear that feeds it "
                   "alone is folded into (a copy of) that conv, as torch.ao's prepare_fx does (reported as folded)")


# -- running ---------------------------------------------------------------------------------------


def run_convert(args: argparse.Namespace, progress: Progress) -> int:
    """Check MODEL's file and what the outputs would overwrite, then convert as the records ask."""
    _check_model_file(args.model)
    outputs = Outputs(args.out, args.torchscript, args.report)
    _check_clashes(outputs, args.model, args.calib)
    request = ConvertRequest(  # refuses --out, --skip, --min-sqnr and --no-fold with --int8
        args.model, Data(tuple(args.input_shape or ()), args.calib, args.calib_batches, args.seed),
        Quantization(args.observer, args.dtype, args.backend, args.int8, tuple(args.skip), bn=args.bn,
                     min_sqnr=args.min_sqnr, fold=args.fold),
        outputs, _table(args), args.verify, args.quiet,
    )
    with progress.step("loading PyTorch"):
        from .command import convert_command
    return convert_command(request, progress)


def run_report(args: argparse.Namespace, progress: Progress) -> int:
    _check_file("fxqbn report", args.path, "")
    with progress.step("loading PyTorch"):
        from .command import report_command
    return report_command(ReportRequest(args.path, _table(args), args.quiet), progress)


def _table(args: argparse.Namespace) -> Table:
    return Table(args.format, args.columns, args.wide)


def _check_file(prog: str, path: str, what: str) -> None:
    """A usage error when ``path`` is no file (``what`` names it in the message, e.g. "model file ")."""
    if not os.path.isfile(path):
        raise usage(prog, f"{what}{path} {'is not a file' if os.path.exists(path) else 'does not exist'}")


def _check_model_file(spec: str | None) -> None:
    path = model_file(spec)
    if path is not None:
        _check_file("fxqbn convert", path, "model file ")


def _check_clashes(outputs: Outputs, model: str | None, calib: str | None) -> None:
    """Two outputs naming one file, or an output that is the model file or the calibration file."""
    inputs = {"MODEL's file": model_file(model) or "", "--calib": calib or ""}
    if calib is not None and os.path.isdir(calib):  # the folder's files are read, so not written
        inputs.update({f"a file of --calib {calib}": path for path in calibration_files(calib)})
    problem = clash(outputs.named(), {what: path for what, path in inputs.items() if path})
    if problem is not None:
        raise usage("fxqbn convert", problem)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; return its exit status."""
    try:
        status = _main(argv)
        sys.stdout.flush()  # a closed pipe shows here, not at the interpreter's exit
        return status
    except BrokenPipeError:  # stdout's reader stopped reading (`fxqbn convert | head -3`): its choice, not an error
        _stdout_to_devnull()
        return 0


def _main(argv: Sequence[str] | None) -> int:
    progress, debug = Progress(enabled=False), False
    try:
        args = build_parser().parse_args(argv)
        progress, debug = Progress.for_terminal(args.quiet), args.debug
        return args.run(args, progress)
    except SystemExit as exc:  # --help and --version
        return exc.code if isinstance(exc.code, int) else 0
    except BrokenPipeError:
        raise
    except (Exception, KeyboardInterrupt) as exc:
        if isinstance(exc, KeyboardInterrupt):
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C does not interrupt the message
        progress.end_line()
        status, message = _status_and_message(exc)
        if debug:
            traceback.print_exception(exc)
        print(message, file=sys.stderr)
        return status


def _stdout_to_devnull() -> None:
    """Point stdout's file descriptor at /dev/null, so that the interpreter's last flush of what is
    still buffered for the closed pipe fails no more (the recipe of Python's ``signal`` docs)."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # not a file (e.g. a test's stream): nothing flushes at exit
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)


def _status_and_message(exc: BaseException) -> tuple[int, str]:
    if isinstance(exc, UsageError):
        return 2, str(exc)
    if isinstance(exc, KeyboardInterrupt):
        return 130, "fxqbn: interrupted"
    from .errors import FxqbnError

    if isinstance(exc, FxqbnError):
        return 1, f"fxqbn: error: {_one_line(str(exc))}"
    # a bug in fxqbn, or something it does not know to refuse
    return 1, f"fxqbn: error: {first_line(exc)} (rerun with --debug for the traceback)"


if __name__ == "__main__":
    sys.exit(main())
