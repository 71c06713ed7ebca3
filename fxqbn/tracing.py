"""Trace a model with torch.fx (failures become an FxqbnError naming the line), build GraphModules,
and propagate shapes when the BN ranks are not known from modules."""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import traceback
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import _extract_tensor_metadata

from fxqbn.passes.modules import ModuleIndex

from .errors import FxqbnError

__all__ = ["trace", "trace_graph", "build_graph_module", "propagate_shapes", "delete_unused_submodules", "set_training_flags"]

_TORCH_DIR = os.path.dirname(os.path.dirname(os.path.abspath(fx.__file__))) + os.sep
_PIPELINE = tuple(  # fxqbn's own frames around the user's code (fxqbn/models.py is user code)
    os.path.join(os.path.dirname(os.path.abspath(__file__)), name) for name in ("tracing.py", "api.py")
)


@functools.lru_cache(maxsize=None)
def _own(filename: str) -> bool:
    path = os.path.abspath(filename)
    return filename.startswith("<") or path.startswith(_TORCH_DIR) or path in _PIPELINE


def _user_frame(exc: BaseException) -> str:
    """``file:line: code`` of the innermost frame of the user's code in the exception's traceback."""
    for frame in reversed(traceback.extract_tb(exc.__traceback__)):
        if not _own(frame.filename):
            return f"{frame.filename}:{frame.lineno}: {(frame.line or '').strip()}"
    return ""


@contextlib.contextmanager
def _traceable_batch_norms(tracer: fx.Tracer) -> Iterator[None]:
    """While ``tracer`` traces: torch's BatchNorm forwards (``_BatchNorm``, ``SyncBatchNorm``), when
    a subclass's forward calls them on a Proxy (timm's ``SyncBatchNormAct``: ``super().forward(x)``),
    record the ``F.batch_norm`` call they make in eval mode instead of branching on the Proxy's rank."""
    originals = {cls: cls.__dict__["forward"] for cls in (nn.modules.batchnorm._BatchNorm, nn.SyncBatchNorm)}

    def patched(original: Callable[..., Any]) -> Callable[..., Any]:
        def forward(bn: nn.Module, input: Any) -> Any:
            if not isinstance(input, fx.Proxy):
                return original(bn, input)
            if bn.training:
                raise FxqbnError(
                    f"BatchNorm '{tracer.path_of_module(bn)}' ({type(bn).__name__}) is in training mode: calibrating "
                    "it would overwrite its running statistics. Call model.eval() before fxqbn.prepare"
                )
            batch_stats = bn.running_mean is None and bn.running_var is None  # what eval mode normalises with
            momentum = 0.0 if bn.momentum is None else bn.momentum
            return F.batch_norm(input, bn.running_mean, bn.running_var, bn.weight, bn.bias, batch_stats, momentum, bn.eps)

        return forward

    try:
        for cls, original in originals.items():
            cls.forward = patched(original)
        yield
    finally:
        for cls, original in originals.items():
            cls.forward = original


def _declared_untraceable() -> tuple[frozenset[type], tuple[Callable[..., Any], ...]]:
    """The module types and functions a loaded model library declares fx must not trace through
    (timm's ``register_notrace_module`` / ``register_notrace_function``, which its own fx feature
    extraction honours: e.g. ``Conv2dSame``, whose padding depends on the input's size). Read only
    when the user's program imported the library; empty otherwise."""
    timm_fx = sys.modules.get("timm.layers._fx")
    if timm_fx is None:
        return frozenset(), ()
    try:
        return frozenset(timm_fx.get_notrace_modules()), tuple(timm_fx.get_notrace_functions())
    except AttributeError:  # a timm without this registry
        return frozenset(), ()


class _Tracer(fx.Tracer):
    """torch.fx's tracer, with these changes:

    * every module a pattern rule replaces (e.g. torch.ao's fused ``BNReLU2d``, a Sequential) stays
      one call_module node;
    * modules and functions the model's library declares untraceable (timm's notrace registry) stay
      one node, except BatchNorm subclasses (timm's ``BatchNormAct2d`` is declared so), which are
      traced through so that their BN is found (the BNs inside other such modules are reported as
      skipped, by ``passes.match``);
    * a BatchNorm subclass's call of torch's BN forward is recorded as its ``F.batch_norm``;
    * each call node's ``stack_trace`` holds just the innermost frame of the user's code, found by
      walking the Python stack (torch's own recording extracts whole tracebacks: several times
      slower on large models).
    """

    def __init__(self) -> None:
        self.declared_leaves, functions = _declared_untraceable()
        super().__init__(autowrap_functions=functions)

    def trace(self, root: Any, concrete_args: Any = None) -> fx.Graph:
        with _traceable_batch_norms(self):
            return super().trace(root, concrete_args)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        from fxqbn.passes.patterns import MODULE_TARGETS

        if type(m) in MODULE_TARGETS or super().is_leaf_module(m, module_qualified_name):
            return True
        return type(m) in self.declared_leaves and not isinstance(m, nn.modules.batchnorm._BatchNorm)

    def create_node(self, kind, target, args, kwargs, name=None, type_expr=None) -> fx.Node:  # noqa: ANN001
        node = super().create_node(kind, target, args, kwargs, name, type_expr)
        if kind in ("call_module", "call_function", "call_method"):
            frame = sys._getframe(1)
            while frame is not None and _own(frame.f_code.co_filename):
                # Past trace_graph lies whoever called prepare, not the model: no source then
                # (e.g. an nn.Sequential, whose forward is torch's).
                frame = None if frame.f_code is trace_graph.__code__ else frame.f_back
            if frame is not None:
                node.meta["stack_trace"] = (
                    f'File "{frame.f_code.co_filename}", line {frame.f_lineno}, in {frame.f_code.co_name}'
                )
        return node


def trace_graph(model: nn.Module) -> fx.Graph:
    """Symbolically trace ``model`` into a Graph whose targets refer to ``model``'s attributes."""
    try:
        return _Tracer().trace(model)
    except FxqbnError:
        raise
    except Exception as exc:  # any tracer failure is the model's: report it with its line
        where = _user_frame(exc)
        raise FxqbnError(
            f"torch.fx cannot trace {type(model).__name__}: {type(exc).__name__}: {exc}"
            + (f"\n  at {where}" if where else "")
            + "\nMake the model symbolically traceable (no data-dependent control flow in forward), "
            "or wrap the untraceable part with torch.fx.wrap / a leaf module"
        ) from exc


def build_graph_module(
    root: nn.Module, graph: fx.Graph, extra: Mapping[str, Any] = {}, class_name: str | None = None,
    index: ModuleIndex | None = None,
) -> fx.GraphModule:
    """A GraphModule running ``graph``: its targets resolve in ``extra`` first, then in ``root``
    (``index``: ``root``'s modules, when the caller has it).

    The leaves are shared with ``root`` (not copied); the module hierarchy above them is new.
    """
    index = index or ModuleIndex(root)
    attrs: dict[str, Any] = {}
    for node in graph.nodes:
        if node.op in ("call_module", "get_attr") and node.target not in attrs:
            target = str(node.target)
            attrs[target] = extra[target] if target in extra else index.attr(target)
    set_training_flags({t: v for t, v in extra.items() if t in attrs}, root, index)
    gm = fx.GraphModule(attrs, graph, class_name or type(root).__name__)
    _copy_training_flags(gm, root, index)
    return gm


def set_training_flags(new: Mapping[str, Any], root: nn.Module, index: ModuleIndex) -> None:
    """Each new module in ``new`` (by target), and the modules inside it, take the training flag of
    ``root``'s module at that target (the one it replaces), or ``root``'s."""
    for target, value in new.items():
        if isinstance(value, nn.Module):
            _set_training_tree(value, _flag_at(target, root, index))


def _set_training_tree(module: nn.Module, flag: bool) -> None:
    """``module.train(flag)`` without its generator walk (convert's new modules are small trees)."""
    _set_training(module, flag)
    for child in module._modules.values():
        if child is not None:
            _set_training_tree(child, flag)


def _flag_at(name: str, root: nn.Module, index: ModuleIndex) -> bool:
    """The training flag of ``root``'s module called ``name``, or ``root``'s when there is none."""
    try:
        return index.module(name).training
    except AttributeError:
        return root.training


def _set_training(module: nn.Module, flag: bool) -> None:
    if module.training != flag:
        if "training" in module.__dict__:  # a plain attribute: nn.Module.__setattr__'s checks are not needed
            module.__dict__["training"] = flag
        else:
            module.training = flag


def _copy_training_flags(gm: fx.GraphModule, root: nn.Module, index: ModuleIndex) -> None:
    """The modules ``gm`` made (itself, the containers above its targets) take the training flag of
    ``root``'s module at the same name, or ``root``'s; its leaves (shared with ``root``, or new and
    set by the caller) have theirs already."""
    made = {""}  # gm, and every container above a target ("a" and "a.b" above "a.b.c")
    for node in gm.graph.nodes:
        if node.op in ("call_module", "get_attr"):
            parts = str(node.target).split(".")
            made.update(".".join(parts[:k]) for k in range(1, len(parts)))
    ours = ModuleIndex(gm)
    for name in made:
        _set_training(ours.module(name), _flag_at(name, root, index))


def delete_unused_submodules(gm: fx.GraphModule) -> None:
    """``gm.delete_all_unused_submodules()``, with its rules (used: a target, a container above one, or
    inside a called module), in time linear in the graph (torch's tests membership in a list)."""
    used, index = {""}, ModuleIndex(gm)
    for node in gm.graph.nodes:
        if node.op in ("call_module", "get_attr") and isinstance(node.target, str):
            parts = node.target.split(".")
            used.update(".".join(parts[:k]) for k in range(1, len(parts) + 1))
            if node.op == "call_module":
                try:
                    called = index.module(node.target)
                except AttributeError:
                    continue
                used.update(f"{node.target}.{name}" for name, _ in called.named_modules() if name)
    for name in [name for name, _ in gm.named_modules() if name not in used]:
        gm.delete_submodule(name)


def trace(model: nn.Module) -> fx.GraphModule:
    """``model`` traced into a GraphModule that shares its leaf modules."""
    return build_graph_module(model, trace_graph(model))


class _ShapeAndDeviceProp(fx.Interpreter):
    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        if isinstance(result, torch.Tensor):
            n.meta["tensor_meta"] = _extract_tensor_metadata(result)
            n.meta["fxqbn_device"] = result.device.type
        return result


def propagate_shapes(root: nn.Module, graph: fx.Graph, example_inputs: tuple) -> None:
    """Run ``graph`` over ``root`` once on ``example_inputs`` in eval mode and without gradients,
    leaving ``tensor_meta`` (shape, dtype) and ``fxqbn_device`` on its nodes. Training flags are
    restored afterwards, so no BN statistics move.
    """
    flags = {module: module.training for module in root.modules()}
    root.eval()
    try:
        with torch.no_grad():
            _ShapeAndDeviceProp(root, graph=graph).run(*example_inputs)
    except Exception as exc:  # the user's model failed on the user's inputs: say so, with the line
        where = _user_frame(exc)
        raise FxqbnError(
            f"{type(root).__name__} failed on example_inputs: {type(exc).__name__}: {exc}"
            + (f"\n  at {where}" if where else "")
            + "\nPass example_inputs that the model accepts (a tuple, one entry per forward argument)"
        ) from exc
    finally:
        for module, training in flags.items():
            module.training = training  # one module at a time: train() would recurse
