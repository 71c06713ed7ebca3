"""The command's paths, checked before any work: each output must be a file fxqbn can write, each input exist.

Imports nothing heavy: the command checks them before it loads torch.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping

__all__ = ["output_problem", "clash", "calibration_files"]


def _nearest_existing(folder: str) -> str:
    """``folder`` or the nearest of its parents that exists ("" is the current folder)."""
    while folder and not os.path.exists(folder):
        parent = os.path.dirname(folder)
        if parent == folder:
            break
        folder = parent
    return folder


def _writable_problem(path: str, folder: str) -> str | None:
    """Why the OS would refuse to write ``path`` (in ``folder``), found without changing anything."""
    try:
        if os.path.exists(path):
            with open(path, "ab"):  # appending nothing: the file keeps its contents and time
                pass
        else:
            with tempfile.TemporaryFile(dir=folder or "."):  # created and removed at once
                pass
    except OSError as exc:
        where = path if os.path.exists(path) else f"in folder {folder or '.'}"
        return f"cannot write {where}: {exc.strerror or type(exc).__name__}"
    return None


def output_problem(path: str) -> str | None:
    """Why ``path`` cannot be written as a file, in words naming it; None when it can."""
    if path == "":
        return "the path is empty; give a file name"
    if os.path.isdir(path):
        return f"{path} is a folder; give a file name"
    folder = os.path.dirname(path)
    existing = _nearest_existing(folder)
    if existing and not os.path.isdir(existing):
        return f"{existing} is a file, not a folder (in {path})"
    if existing != folder:
        return f"folder {folder} does not exist"
    return _writable_problem(path, folder)


def clash(outputs: Mapping[str, str], inputs: Mapping[str, str]) -> str | None:
    """Two options writing one file, or an output overwriting an input: the problem in words, or None."""
    seen: dict[str, str] = {}
    for option, path in outputs.items():
        real = os.path.realpath(path)
        for other, input_path in inputs.items():
            if os.path.exists(input_path) and os.path.realpath(input_path) == real:
                return f"argument {option}: {path} is also {other}; writing it would destroy it"
        if real in seen:
            return f"arguments {seen[real]} and {option} both write {path}: give each its own file"
        seen[real] = option
    return None


def calibration_files(path: str) -> list[str]:
    """``--calib``'s files: ``path`` itself, or the .pt files of the folder ``path`` in name order.

    Raises ValueError naming ``path`` when it does not exist or is a folder without .pt files.
    """
    if not os.path.exists(path):
        raise ValueError(f"{path} does not exist")
    if not os.path.isdir(path):
        return [path]
    names = sorted(name for name in os.listdir(path) if name.endswith(".pt") and os.path.isfile(os.path.join(path, name)))
    if not names:
        raise ValueError(f"folder {path} holds no .pt files")
    return [os.path.join(path, name) for name in names]
