"""docs/file-format.md's code runs as written: its ```python blocks, in order, in one namespace, in an
empty folder; each prints exactly the ```text block that follows it (when one does)."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

DOC = Path(__file__).resolve().parent.parent / "docs" / "file-format.md"
BLOCK = re.compile(r"^```python\n(.*?)^```\n(?:\n```text\n(.*?)^```$)?", re.M | re.S)


def test_every_python_block_runs_and_prints_what_the_page_shows(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    blocks = BLOCK.findall(DOC.read_text())
    assert len(blocks) >= 5
    namespace: dict = {"__name__": "file_format_doc"}
    for i, (code, shown) in enumerate(blocks):
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            exec(compile(code, f"{DOC.name} block {i + 1}", "exec"), namespace)  # noqa: S102 -- the page's own code
        assert printed.getvalue() == shown, f"block {i + 1} printed other lines than the page shows"
