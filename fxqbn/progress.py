"""What the command is doing, on stderr while it works: one line a step, a bar over calibration batches.

Shown only when stderr is a terminal (and not ``--quiet``, and not on a torchrun rank other than 0):
piped or redirected output stays clean.
Imports nothing heavy: the first step ("loading PyTorch") shows before torch is imported.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import IO, TypeVar

__all__ = ["Progress"]

T = TypeVar("T")


class Progress:
    """Step lines (``with progress.step("tracing"):``) and bars, written to ``stream`` when ``enabled``."""

    def __init__(self, enabled: bool, stream: IO[str] | None = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self._open = False  # a step line is written without its end

    @classmethod
    def for_terminal(cls, quiet: bool) -> "Progress":
        """Enabled when stderr is a terminal and the user did not ask for quiet; under torchrun, on rank 0 only."""
        return cls(enabled=not quiet and sys.stderr.isatty() and os.environ.get("RANK", "0") == "0")

    @contextmanager
    def step(self, what: str) -> Iterator[None]:
        """``what...`` when the step starts, its duration when it ends."""
        if not self.enabled:
            yield
            return
        self._open = True  # before the write: a Ctrl-C right after it still ends the line
        self.stream.write(f"{what}...")
        self.stream.flush()
        start = time.perf_counter()
        yield
        self.stream.write(f" {time.perf_counter() - start:.1f} s\n")
        self.stream.flush()
        self._open = False

    def bar(self, items: Sequence[T], desc: str, unit: str) -> Iterator[T]:
        """``items``, with a tqdm bar while they are consumed; the bar ends its line however the loop ends."""
        if not self.enabled:
            yield from items
            return
        from tqdm import tqdm

        self._open, bar = True, None  # the bar's line has no end until the bar closes
        try:
            bar = tqdm(items, desc=desc, unit=unit, file=self.stream, leave=True)
            yield from bar
        finally:
            if bar is not None:
                bar.close()  # ends the line
                self._open = False

    def end_line(self) -> None:
        """End a step line cut short (by an error or Ctrl-C), so that the next message starts a line."""
        if self._open:
            self.stream.write("\n")
            self.stream.flush()
            self._open = False
