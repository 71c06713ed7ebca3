"""What the command line (``fxqbn.cli``) and the work (``fxqbn.command``) both use: the built-in model,
MODEL's file, usage errors, an exception's first line.

Imports no torch: ``fxqbn.cli`` answers before PyTorch loads.
"""

from __future__ import annotations

import os

__all__ = ["BUILTIN_MODEL", "UsageError", "usage", "first_line", "model_file"]

BUILTIN_MODEL = "fxqbn.models:densenet_bc"


class UsageError(Exception):
    """The command line is wrong: exit status 2."""


def usage(prog: str, message: str) -> UsageError:
    return UsageError(f"{prog}: error: {message}")


def first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def model_file(spec: str | None) -> str | None:
    """The file MODEL names (``path/to/file.py:factory``), or None for ``package.module:factory``."""
    target = (spec or "").rpartition(":")[0]
    return target if target.endswith(".py") or "/" in target or os.sep in target else None
