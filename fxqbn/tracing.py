"""Trace a model with torch.fx (failures become an FxqbnError naming the line), build GraphModules,
and propagate shapes when the BN ranks are not known from modules."""

from __future__ import annotations

import contextlib
import operator
import sys
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import _extract_tensor_metadata

from fxqbn.passes.registry import module_targets

from .errors import FxqbnError
from .source import stack_trace, user_frame

__all__ = ["trace", "trace_graph", "build_graph_module", "propagate_shapes", "set_training_flags"]

_ABSENT = object()


def _input_checks(module: nn.Module) -> tuple[str, ...]:
    """The methods torch's forward of this BatchNorm calls to check its input in Python (fx cannot
    trace them: they branch on the input's rank and channels)."""
    if isinstance(module, nn.SyncBatchNorm):
        return ("_check_input_dim", "_check_non_zero_input_channels")
    return ("_check_input_dim",) if isinstance(module, nn.modules.batchnorm._BatchNorm) else ()


@contextlib.contextmanager
def _traceable_batch_norms(tracer: fx.Tracer, root: nn.Module) -> Iterator[None]:
    """While ``tracer`` traces ``root``: each BatchNorm in ``root`` whose torch forward runs on a Proxy
    (a subclass's ``super().forward(x)``, as timm's ``SyncBatchNormAct``) skips its input checks, so
    that torch's forward records its eval-mode ``F.batch_norm`` call; in training mode it is refused.
    The checks are instance attributes of ``root``'s modules only (fxqbn's own copy of the model),
    removed afterwards: nothing shared with other threads or models changes."""
    shimmed: list[tuple[nn.Module, str, Any]] = []  # (module, method name, its instance attribute before)
    try:
        for bn in root.modules() if isinstance(root, nn.Module) else ():
            for name in _input_checks(bn):
                shimmed.append((bn, name, vars(bn).get(name, _ABSENT)))
                setattr(bn, name, _proxy_check(tracer, bn, getattr(bn, name)))
        yield
    finally:
        for bn, name, before in reversed(shimmed):
            if before is _ABSENT:
                delattr(bn, name)
            else:
                setattr(bn, name, before)


def _proxy_check(tracer: fx.Tracer, bn: nn.Module, check: Callable[[Any], None]) -> Callable[[Any], None]:
    """``check`` for real inputs; for a Proxy, the refusal of a BN in training mode (calibrating it
    would move its statistics), else nothing."""

    def checked(input: Any) -> None:
        if not isinstance(input, fx.Proxy):
            return check(input)
        if bn.training:
            raise FxqbnError(
                f"BatchNorm '{tracer.path_of_module(bn)}' ({type(bn).__name__}) is in training mode: calibrating "
                "it would overwrite its running statistics. Call model.eval() before fxqbn.prepare"
            )

    return checked


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
    * a BatchNorm subclass's call of torch's BN forward records its eval-mode ``F.batch_norm``
      (``_traceable_batch_norms``);
    * each call node's ``stack_trace`` holds just the innermost frame of the user's code
      (``fxqbn.source.stack_trace``), which is what the report's source column shows.
    """

    def __init__(self) -> None:
        self.declared_leaves, functions = _declared_untraceable()
        self.bn_modules = module_targets()  # the BN spellings' module types, read once per trace
        super().__init__(autowrap_functions=functions)

    def trace(self, root: Any, concrete_args: Any = None) -> fx.Graph:
        with _traceable_batch_norms(self, root):
            return super().trace(root, concrete_args)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if type(m) in self.bn_modules or super().is_leaf_module(m, module_qualified_name):
            return True
        return type(m) in self.declared_leaves and not isinstance(m, nn.modules.batchnorm._BatchNorm)

    def create_node(self, kind, target, args, kwargs, name=None, type_expr=None) -> fx.Node:  # noqa: ANN001
        node = super().create_node(kind, target, args, kwargs, name, type_expr)
        if kind in ("call_module", "call_function", "call_method"):
            where = stack_trace(stop=trace_graph.__code__)
            if where is not None:
                node.meta["stack_trace"] = where
        return node


def trace_graph(model: nn.Module) -> fx.Graph:
    """Symbolically trace ``model`` into a Graph whose targets refer to ``model``'s attributes."""
    try:
        return _Tracer().trace(model)
    except FxqbnError:
        raise
    except Exception as exc:  # any tracer failure is the model's: report it with its line
        where = user_frame(exc)
        raise FxqbnError(
            f"torch.fx cannot trace {type(model).__name__}: {type(exc).__name__}: {exc}"
            + (f"\n  at {where}" if where else "")
            + "\nMake the model symbolically traceable (no data-dependent control flow in forward), "
            "or wrap the untraceable part with torch.fx.wrap / a leaf module"
        ) from exc


def build_graph_module(
    root: nn.Module, graph: fx.Graph, extra: Mapping[str, Any] = {}, class_name: str | None = None
) -> fx.GraphModule:
    """A GraphModule running ``graph``: its targets resolve in ``extra`` first, then in ``root``.

    The leaves are shared with ``root`` (not copied); the module hierarchy above them is new.
    """
    attrs: dict[str, Any] = {}
    for node in graph.nodes:
        if node.op in ("call_module", "get_attr") and node.target not in attrs:
            target = str(node.target)
            attrs[target] = extra[target] if target in extra else operator.attrgetter(target)(root)
    set_training_flags({t: v for t, v in extra.items() if t in attrs}, root)
    gm = fx.GraphModule(attrs, graph, class_name or type(root).__name__)
    _copy_training_flags(gm, root)
    return gm


def set_training_flags(new: Mapping[str, Any], root: nn.Module) -> None:
    """Each new module in ``new`` (by target), and the modules inside it, take the training flag of
    ``root``'s module at that target (the one it replaces), or ``root``'s."""
    for target, value in new.items():
        if isinstance(value, nn.Module):
            value.train(_flag_at(target, root))


def _flag_at(name: str, root: nn.Module) -> bool:
    """The training flag of ``root``'s module called ``name``, or ``root``'s when there is none."""
    try:
        return root.get_submodule(name).training
    except AttributeError:
        return root.training


def _copy_training_flags(gm: fx.GraphModule, root: nn.Module) -> None:
    """The modules ``gm`` made (itself, the containers above its targets) take the training flag of
    ``root``'s module at the same name, or ``root``'s; its leaves (shared with ``root``, or new and
    set by the caller) have theirs already."""
    made = {""}  # gm, and every container above a target ("a" and "a.b" above "a.b.c")
    for node in gm.graph.nodes:
        if node.op in ("call_module", "get_attr"):
            parts = str(node.target).split(".")
            made.update(".".join(parts[:k]) for k in range(1, len(parts)))
    for name in made:
        gm.get_submodule(name).training = _flag_at(name, root)  # the container only: its leaves keep theirs


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
        where = user_frame(exc)
        raise FxqbnError(
            f"{type(root).__name__} failed on example_inputs: {type(exc).__name__}: {exc}"
            + (f"\n  at {where}" if where else "")
            + "\nPass example_inputs that the model accepts (a tuple, one entry per forward argument)"
        ) from exc
    finally:
        for module, training in flags.items():
            module.training = training  # one module at a time: train() would recurse
