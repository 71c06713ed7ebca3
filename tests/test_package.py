"""The package's surface: ``import fxqbn`` is light (no torch until a name needs it), every export resolves."""

import importlib
import subprocess
import sys

import fxqbn

LAZY = """
import sys
import fxqbn
assert "torch" not in sys.modules, "import fxqbn imported torch"
assert fxqbn.__version__
from fxqbn import *  # every name in __all__ resolves
import fxqbn.comparing, fxqbn.command, fxqbn.whole_model  # importing every submodule leaves the function
assert fxqbn.compare is sys.modules["fxqbn.comparing"].compare and callable(fxqbn.compare)
assert isinstance(fxqbn.nn, type(sys)) and fxqbn.nn.__name__ == "fxqbn.nn"
print(sorted(fxqbn.__all__))
"""


def test_import_is_lazy_and_every_export_resolves():
    result = subprocess.run([sys.executable, "-c", LAZY], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(sorted(fxqbn.__all__))


def test_exports_are_the_documented_api():
    assert set(fxqbn.__all__) == {
        "prepare", "convert", "get_report", "compare", "save", "load", "load_report",
        "FxqbnError", "AccuracyWarning", "Report", "ReportRow", "ReportSummary", "QParams", "DEFAULT_OBSERVER", "nn",
        "sync_observers", "distributed", "lower",
    }
    assert set(fxqbn.__all__) <= set(dir(fxqbn))
    assert callable(fxqbn.distributed.shard)  # as fxqbn/distributed.py's docstring uses it, after `import fxqbn`
    importlib.import_module("fxqbn.lowering")  # the submodule behind it: fxqbn.lower stays the function

    assert callable(fxqbn.lower) and fxqbn.lower.__name__ == "lower" and fxqbn.lower.__module__ == "fxqbn.lowering"
    assert fxqbn.FxqbnError.__module__ == "fxqbn.errors" and fxqbn.prepare.__module__ == "fxqbn.api"


def test_no_function_of_the_library_or_its_passes_is_over_40_lines():
    """Small functions with one job each (the developers' standards): a function past 40 lines is a sign it does several."""
    import ast
    import pathlib

    import fxqbn.passes

    long, packages = [], [pathlib.Path(m.__file__).parent for m in (fxqbn, fxqbn.passes)]
    assert all(len(list(p.glob("*.py"))) > 5 for p in packages)
    for package in packages:
        for path in sorted(package.glob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 40:
                    long.append(f"{path.name}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)")
    assert not long, "split these into named steps: " + ", ".join(long)


def test_the_graph_passes_import_no_backend_and_the_command_line_no_command():
    """Layers import one way: ``fxqbn.passes`` is handed a backend, never imports one; ``command.py``
    never imports ``cli.py`` (cli parses, command works)."""
    import ast
    import pathlib

    import fxqbn.passes

    def imported(path: pathlib.Path) -> set[str]:
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):  # "from fxqbn import fused": "fxqbn" and "fxqbn.fused"
                prefix = "." * node.level + (node.module or "")
                names |= {prefix, *(prefix + a.name if prefix.endswith(".") else f"{prefix}.{a.name}" for a in node.names)}
            elif isinstance(node, ast.Import):
                names |= {a.name for a in node.names}
        return names

    backends = {"fxqbn.backends", "fxqbn.fused", "fxqbn.fused_io", "fxqbn.nn", "fxqbn.ckernels", "fxqbn.lowered"}
    for path in sorted(pathlib.Path(fxqbn.passes.__file__).parent.glob("*.py")):
        found = {name for name in imported(path) if any(name == b or name.startswith(b + ".") for b in backends)}
        assert not found, f"passes/{path.name} imports {sorted(found)}"
    command = pathlib.Path(fxqbn.__file__).parent / "command.py"
    assert not {n for n in imported(command) if n in (".cli", "fxqbn.cli") or n.startswith((".cli.", "fxqbn.cli."))}
