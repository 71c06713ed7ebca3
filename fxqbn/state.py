"""What fxqbn keeps on the GraphModules it returns.

Values live in ``gm.meta`` (which ``copy.deepcopy`` keeps) and as plain attributes of the module
(which pickling keeps, while it drops ``meta``); reading the attribute puts the value back
in ``meta`` so that a later deep copy keeps it too.
"""

from __future__ import annotations

from typing import Any

from torch import fx

__all__ = ["PREPARED_KEY", "REPORT_KEY", "CONVERTED_KEY", "LOWERED_KEY", "INPUTS_KEY", "attach", "attached", "detach"]

PREPARED_KEY = "fxqbn_prepared"  # passes.Prepared: what convert needs from prepare
REPORT_KEY = "fxqbn_report"  # report.Report of a converted module
CONVERTED_KEY = "fxqbn_converted"  # passes.Converted of a converted module: its rewrites and boundary nodes
LOWERED_KEY = "fxqbn_lowered"  # tuple of passes.Match (int8 graphs) of a module fxqbn.lower returned
INPUTS_KEY = "fxqbn_inputs"  # input_specs.StoredInputs: prepare's example inputs, kept through convert for fxqbn.save


def attach(gm: fx.GraphModule, key: str, value: Any) -> None:
    gm.meta[key] = value
    setattr(gm, key, value)


def attached(gm: Any, key: str) -> Any:
    """The value stored under ``key``, or None."""
    if not isinstance(gm, fx.GraphModule):
        return None
    if key in gm.meta:
        return gm.meta[key]
    value = getattr(gm, key, None)
    if value is not None:
        gm.meta[key] = value
    return value


def detach(gm: fx.GraphModule, key: str) -> None:
    gm.meta.pop(key, None)
    if hasattr(gm, key):
        delattr(gm, key)
