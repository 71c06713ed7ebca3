"""fxqbn: quantize the BatchNorm layers of PyTorch models with a torch.fx pass.

    observed = fxqbn.prepare(model.eval(), (example_input,))
    for batch in calibration_batches:
        observed(batch)
    quantized = fxqbn.convert(observed)
    print(fxqbn.get_report(quantized))
    fxqbn.save(quantized, "model.fxqbn.pt")  # data only: fxqbn.load("model.fxqbn.pt", model)
"""

from . import nn
from .api import convert, get_report, prepare
from .compare import compare
from .errors import FxqbnError
from .lower import lower
from .qconfig import DEFAULT_OBSERVER
from .qparams import QParams
from .report import Report, ReportRow, ReportSummary
from .serialize import load, load_report, save

__all__ = [
    "prepare", "convert", "lower", "get_report", "compare", "save", "load", "load_report",
    "FxqbnError", "Report", "ReportRow", "ReportSummary", "QParams", "DEFAULT_OBSERVER", "nn",
]
__version__ = "0.1.0"
