"""The user's source line behind a traced node or a failure: every frame fxqbn inspects, in one place."""

from __future__ import annotations

import functools
import inspect
import os
import re
import traceback
from types import CodeType

from torch import fx

__all__ = ["user_frame", "stack_trace", "source_of"]

_TORCH_DIR = os.path.dirname(os.path.dirname(os.path.abspath(fx.__file__))) + os.sep
_PIPELINE = tuple(  # fxqbn's own frames around the user's code (fxqbn/models.py is user code)
    os.path.join(os.path.dirname(os.path.abspath(__file__)), name) for name in ("source.py", "tracing.py", "api.py")
)
_FRAME = re.compile(r'File "([^"]+)", line (\d+)')
_LIBRARY_DIRS = (_TORCH_DIR,)  # torch/


@functools.lru_cache(maxsize=None)
def _own(filename: str) -> bool:
    path = os.path.abspath(filename)
    return filename.startswith("<") or path.startswith(_TORCH_DIR) or path in _PIPELINE


def user_frame(exc: BaseException) -> str:
    """``file:line: code`` of the innermost frame of the user's code in the exception's traceback."""
    for frame in reversed(traceback.extract_tb(exc.__traceback__)):
        if not _own(frame.filename):
            return f"{frame.filename}:{frame.lineno}: {(frame.line or '').strip()}"
    return ""


def stack_trace(stop: CodeType) -> str | None:
    """``File "...", line N, in f`` of the innermost frame of the user's code on the current stack
    (the caller's callers), or None when there is none before the frame running ``stop``: past it
    lies whoever called fxqbn, not the model (e.g. an nn.Sequential, whose forward is torch's)."""
    frame = inspect.currentframe()
    while frame is not None and _own(frame.f_code.co_filename):
        frame = None if frame.f_code is stop else frame.f_back
    if frame is None:
        return None
    return f'File "{frame.f_code.co_filename}", line {frame.f_lineno}, in {frame.f_code.co_name}'


def source_of(node: fx.Node) -> str:
    """``file.py:123`` of the innermost user frame in the node's recorded stack trace, or ""."""
    frames = _FRAME.findall(node.meta.get("stack_trace") or "")
    user = [(path, line) for path, line in frames if not os.path.abspath(path).startswith(_LIBRARY_DIRS)]
    if not user:
        return ""
    path, line = user[-1]
    return f"{os.path.basename(path)}:{line}"
