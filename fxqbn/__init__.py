"""fxqbn: quantize the BatchNorm layers of PyTorch models with a torch.fx pass.

    observed = fxqbn.prepare(model.eval(), (example_input,))
    for batch in calibration_batches:
        observed(batch)
    quantized = fxqbn.convert(observed)
    print(fxqbn.get_report(quantized))
    fxqbn.save(quantized, "model.fxqbn.pt")  # data only: fxqbn.load("model.fxqbn.pt", model)

The names below load on first use (PEP 562), so that ``import fxqbn`` and ``fxqbn --help`` do not
import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"  # the one place the version is written (pyproject.toml reads it)

# public name -> "submodule.attribute" it comes from, or "submodule" for the submodule itself.
_EXPORTS = {
    "prepare": "api.prepare",
    "convert": "api.convert",
    "lower": "lowering.lower",
    "get_report": "api.get_report",
    "compare": "comparing.compare",
    "save": "serialize.save",
    "load": "serialize.load",
    "load_report": "serialize.load_report",
    "FxqbnError": "errors.FxqbnError",
    "AccuracyWarning": "errors.AccuracyWarning",
    "Report": "report.Report",
    "ReportRow": "report.ReportRow",
    "ReportSummary": "report.ReportSummary",
    "QParams": "qparams.QParams",
    "DEFAULT_OBSERVER": "qconfig.DEFAULT_OBSERVER",
    "nn": "nn",
    "sync_observers": "distributed.sync_observers",
    "distributed": "distributed",  # fxqbn.distributed.shard(batches) under torchrun
}
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'fxqbn' has no attribute {name!r}")
    module_name, _, attribute = _EXPORTS[name].partition(".")
    module = importlib.import_module(f".{module_name}", __name__)
    value = getattr(module, attribute) if attribute else module
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))

