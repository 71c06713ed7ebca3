"""Trace a model with torch.fx, turning tracer failures into an FxqbnError that names the line."""

from __future__ import annotations

import os
import traceback

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from .errors import FxqbnError

__all__ = ["trace", "propagate_shapes"]

_OWN_DIRS = (
    os.path.dirname(os.path.dirname(os.path.abspath(fx.__file__))) + os.sep,  # torch/
    os.path.dirname(os.path.abspath(__file__)) + os.sep,  # fxqbn/
)


def _user_frame(exc: BaseException) -> str:
    """``file:line: code`` of the innermost frame of the user's code in the exception's traceback."""
    frames = traceback.extract_tb(exc.__traceback__)
    for frame in reversed(frames):
        path = os.path.abspath(frame.filename)
        if not path.startswith(_OWN_DIRS) and not frame.filename.startswith("<"):
            return f"{frame.filename}:{frame.lineno}: {(frame.line or '').strip()}"
    return ""


class _Tracer(fx.Tracer):
    """torch.fx's tracer, keeping every module a pattern rule replaces (e.g. torch.ao's fused
    ``BNReLU2d``, a Sequential) as one call_module node."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        from fxqbn.passes.patterns import MODULE_TARGETS

        return type(m) in MODULE_TARGETS or super().is_leaf_module(m, module_qualified_name)


def trace(model: nn.Module) -> fx.GraphModule:
    """Symbolically trace ``model`` with stack traces recorded on every node."""
    tracer = _Tracer()
    tracer.record_stack_traces = True
    try:
        graph = tracer.trace(model)
    except Exception as exc:  # any tracer failure is the model's: report it with its line
        where = _user_frame(exc)
        raise FxqbnError(
            f"torch.fx cannot trace {type(model).__name__}: {type(exc).__name__}: {exc}"
            + (f"\n  at {where}" if where else "")
            + "\nMake the model symbolically traceable (no data-dependent control flow in forward), "
            "or wrap the untraceable part with torch.fx.wrap / a leaf module"
        ) from exc
    name = model.__class__.__name__
    return fx.GraphModule(tracer.root, graph, name)


class _ShapeAndDeviceProp(ShapeProp):
    def run_node(self, n: fx.Node):
        result = super().run_node(n)
        if isinstance(result, torch.Tensor):
            n.meta["fxqbn_device"] = result.device.type
        return result


def propagate_shapes(gm: fx.GraphModule, example_inputs: tuple) -> None:
    """Run ``gm`` once on ``example_inputs`` in eval mode, leaving ``tensor_meta`` (shape, dtype) and
    ``fxqbn_device`` on its nodes. Training flags are restored afterwards, so no BN statistics move.
    """
    flags = {module: module.training for module in gm.modules()}
    gm.eval()
    try:
        with torch.no_grad():
            _ShapeAndDeviceProp(gm).propagate(*example_inputs)
    except Exception as exc:  # the user's model failed on the user's inputs: say so, with the line
        where = _user_frame(exc)
        raise FxqbnError(
            f"{type(gm).__name__} failed on example_inputs: {type(exc).__name__}: {exc}"
            + (f"\n  at {where}" if where else "")
            + "\nPass example_inputs that the model accepts (a tuple, one entry per forward argument)"
        ) from exc
    finally:
        for module, training in flags.items():
            module.training = training  # one module at a time: train() would recurse
