"""Real torchvision and timm models through fxqbn, for benchmarks/real_models.py and tests/test_real_models.py.

The BN -> (Identity / eval Dropout)* -> ReLU/ReLU6 chains of a model are counted here from the float
graph torch.fx's own tracer gives (with timm's notrace leaves for timm models), with this module's
own small spelling tables, not from fxqbn's matcher or report. A chain fxqbn misses shows as "left":
an activation more in the converted graph than the float graph's activations outside chains.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections import Counter
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Callable

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.ao.quantization import MinMaxObserver
from torch.ao.quantization.observer import ObserverBase

import fxqbn
from fxqbn.models import estimate_bn_statistics

__all__ = ["Spec", "MODELS", "QUICK", "Result", "FloatGraph", "float_graph", "chains_left", "run", "build", "to_sync", "sqnr_db", "fake_quantized"]


@dataclass(frozen=True)
class Spec:
    """One real model: where it comes from, how it is built and the input it runs on."""

    label: str  # the table's name for it
    source: str  # "torchvision" or "timm"
    name: str  # torchvision.models.<name> / timm.create_model(<name>)
    kwargs: tuple = ()  # (key, value) pairs for the constructor
    shape: tuple[int, ...] = (1, 3, 64, 64)  # the input's
    sync_bn: str = ""  # "torch" / "timm": its convert_sync_batchnorm(model).eval(), as DDP training leaves it


def _timm_dropout_act():  # timm's BatchNormAct2d with an nn.Dropout (eval) between BN and act
    import timm.layers

    return partial(timm.layers.BatchNormAct2d, drop_layer=nn.Dropout)


MODELS: tuple[Spec, ...] = (
    Spec("tv/resnet18", "torchvision", "resnet18"),
    Spec("tv/resnet50", "torchvision", "resnet50"),
    Spec("tv/mobilenet_v2", "torchvision", "mobilenet_v2"),
    Spec("tv/mobilenet_v3_small", "torchvision", "mobilenet_v3_small"),
    Spec("tv/mobilenet_v3_large", "torchvision", "mobilenet_v3_large"),
    Spec("tv/efficientnet_b0", "torchvision", "efficientnet_b0"),
    Spec("tv/densenet121", "torchvision", "densenet121"),
    Spec("tv/regnet_x_400mf", "torchvision", "regnet_x_400mf"),
    Spec("tv/regnet_y_400mf", "torchvision", "regnet_y_400mf"),
    Spec("tv/shufflenet_v2_x1_0", "torchvision", "shufflenet_v2_x1_0"),
    Spec("tv/mnasnet1_0", "torchvision", "mnasnet1_0"),
    Spec("tv/googlenet", "torchvision", "googlenet", (("aux_logits", False), ("init_weights", True))),
    Spec("tv/inception_v3", "torchvision", "inception_v3", (("aux_logits", False), ("init_weights", True)), shape=(1, 3, 96, 96)),
    Spec("tv/squeezenet1_0", "torchvision", "squeezenet1_0"),  # no BN
    Spec("tv/r3d_18", "torchvision", "video.r3d_18", shape=(1, 3, 4, 32, 32)),  # BatchNorm3d
    Spec("tv/r2plus1d_18", "torchvision", "video.r2plus1d_18", shape=(1, 3, 4, 32, 32)),
    Spec("timm/resnet18", "timm", "resnet18"),
    Spec("timm/resnet26d+drop_block", "timm", "resnet26d", (("drop_block_rate", 0.1),)),
    Spec("timm/efficientnet_b0", "timm", "efficientnet_b0"),
    Spec("timm/tf_mobilenetv3_large_100", "timm", "tf_mobilenetv3_large_100"),  # Conv2dSame: a timm notrace leaf
    Spec("timm/mobilenetv3_large_100", "timm", "mobilenetv3_large_100"),
    Spec("timm/regnetx_002", "timm", "regnetx_002"),
    Spec("timm/regnety_002+Dropout", "timm", "regnety_002", (("norm_layer", "dropout_act"),)),
    Spec("timm/dla34", "timm", "dla34"),
    Spec("timm/dpn68", "timm", "dpn68"),
    Spec("timm/cspdarknet53", "timm", "cspdarknet53"),
    Spec("timm/cspresnet50", "timm", "cspresnet50"),
    Spec("timm/gernet_s+drop_block", "timm", "gernet_s", (("drop_block_rate", 0.1),)),  # BatchNormAct2d(drop_layer=DropBlock2d)
    Spec("timm/ese_vovnet19b_dw", "timm", "ese_vovnet19b_dw"),
    Spec("timm/densenet121", "timm", "densenet121"),
    Spec("timm/levit_128s", "timm", "levit_128s", shape=(1, 3, 224, 224)),  # caches attention biases in a dict
    Spec("timm/mobilevit_xxs", "timm", "mobilevit_xxs", shape=(1, 3, 128, 128)),  # BNs inside notrace blocks
    Spec("timm/mobilenetv2_100", "timm", "mobilenetv2_100"),
    Spec("tv/resnet18 SyncBN", "torchvision", "resnet18", sync_bn="torch"),
    Spec("tv/mobilenet_v2 SyncBN", "torchvision", "mobilenet_v2", sync_bn="torch"),
    Spec("timm/regnetx_002 SyncBN", "timm", "regnetx_002", sync_bn="timm"),
)
QUICK = ("tv/resnet18", "tv/mobilenet_v2", "tv/squeezenet1_0", "timm/resnet26d+drop_block",
         "timm/regnety_002+Dropout", "timm/levit_128s", "tv/resnet18 SyncBN", "timm/regnetx_002 SyncBN")
_KWARG_VALUES: dict[str, Callable[[], object]] = {"dropout_act": _timm_dropout_act}


def build(spec: Spec, seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    """The model in eval mode, its BN statistics estimated on two random batches, and an example input."""
    kwargs = {k: _KWARG_VALUES[v]() if isinstance(v, str) and v in _KWARG_VALUES else v for k, v in spec.kwargs}
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(seed)
        if spec.source == "torchvision":
            import torchvision

            package, _, name = spec.name.rpartition(".")  # e.g. "video.r3d_18"
            model = getattr(getattr(torchvision.models, package) if package else torchvision.models, name)(weights=None, **kwargs)
        else:
            import timm

            model = timm.create_model(spec.name, pretrained=False, **kwargs)
        estimate_bn_statistics(model, [torch.randn(4, *spec.shape[1:]) for _ in range(2)])
        return model, torch.randn(*spec.shape)


def to_sync(model: nn.Module, how: str) -> nn.Module:
    """``model`` with SyncBatchNorm for its BNs: torch's convert_sync_batchnorm (torchvision models),
    timm's (BatchNormAct2d -> SyncBatchNormAct, whose forward calls SyncBatchNorm.forward); eval mode."""
    if how == "torch":
        return nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(model)).eval()
    if how == "timm":
        import timm.layers

        return timm.layers.convert_sync_batchnorm(copy.deepcopy(model)).eval()
    return model


# -- the float graph's chains, counted on their own ---------------------------------------------------

_RELU_MODULES = {nn.ReLU: "ReLU", nn.ReLU6: "ReLU6"}
_RELU_FUNCTIONS = {F.relu: "ReLU", torch.relu: "ReLU", torch.relu_: "ReLU", F.relu6: "ReLU6"}
_RELU_METHODS = {"relu": "ReLU", "relu_": "ReLU"}
_CLAMPS = {F.hardtanh, F.hardtanh_, torch.clamp, "clamp", "clamp_"}  # ReLU6 when (0, 6)
_BN = nn.modules.batchnorm._BatchNorm


def _module(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    return gm.get_submodule(str(node.target)) if node.op == "call_module" else None


def _activation(gm: fx.GraphModule, node: fx.Node) -> str:
    """"ReLU" / "ReLU6" when ``node`` computes one on its first argument, else ""."""
    module = _module(gm, node)
    if module is not None:
        if isinstance(module, nn.Hardtanh) and not isinstance(module, nn.ReLU6):
            return "ReLU6" if (module.min_val, module.max_val) == (0.0, 6.0) else ""
        return _RELU_MODULES.get(type(module), "")
    target = node.target
    if node.op == "call_function" and target in _RELU_FUNCTIONS:
        return _RELU_FUNCTIONS[target]
    if node.op == "call_method" and target in _RELU_METHODS:
        return _RELU_METHODS[target]
    if target in _CLAMPS:
        bounds = [float(a) for a in node.args[1:3] if isinstance(a, (int, float))]
        kw = [node.kwargs.get(k) for k in ("min", "max", "min_val", "max_val") if k in node.kwargs]
        return "ReLU6" if bounds + [float(v) for v in kw] == [0.0, 6.0] else ""
    return ""


def _passthrough(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Identity, or a Dropout module in eval mode: returns its input unchanged."""
    module = _module(gm, node)
    return isinstance(module, nn.Identity) or (isinstance(module, nn.modules.dropout._DropoutNd) and not module.training)


def _bn_owner(gm: fx.GraphModule, node: fx.Node) -> str | None:
    """The BN module's name when ``node`` is a float BatchNorm (module or F.batch_norm), else None."""
    if isinstance(_module(gm, node), _BN):
        return str(node.target)
    if node.op == "call_function" and node.target is F.batch_norm:
        mean = node.args[1] if len(node.args) > 1 else node.kwargs["running_mean"]
        return str(mean.target).rpartition(".")[0]
    return None


@dataclass(frozen=True)
class Chain:
    """A BN whose output goes (through pass-throughs, each its value's only user) into an activation."""

    bn: str  # the BN module's name
    activation: str  # "ReLU" or "ReLU6"
    via: tuple[str, ...]  # the pass-throughs' module types, e.g. ("Identity",)


def _activations(gm: fx.GraphModule) -> int:
    return sum(bool(_activation(gm, node)) for node in gm.graph.nodes)


@dataclass(frozen=True)
class FloatGraph:
    """What ``torch.fx.symbolic_trace`` of the float model holds."""

    bns: int  # BatchNorm calls (modules, F.batch_norm), and the BNs inside leaf modules
    chains: tuple[Chain, ...]  # BN -> (pass-through)* -> ReLU/ReLU6
    activations: int  # ReLU/ReLU6 calls in all


class _TimmTracer(fx.Tracer):
    """torch.fx's tracer with timm's notrace modules (those without a BN inside) and functions as
    leaves, as timm's own fx feature extraction traces (timm's tf_* models pad by the input's size)."""

    def __init__(self) -> None:
        import timm.layers

        self.leaves = set(timm.layers.get_notrace_modules())
        super().__init__(autowrap_functions=tuple(timm.layers.get_notrace_functions()))

    def is_leaf_module(self, m: nn.Module, name: str) -> bool:  # timm's BatchNormAct2d: traced, for its BN
        return super().is_leaf_module(m, name) or (type(m) in self.leaves and not isinstance(m, _BN))


def float_graph(model: nn.Module, source: str = "torchvision") -> FloatGraph:
    """Count the BNs, their chains and the activations of ``model`` (traced on a copy)."""
    model = copy.deepcopy(model)
    tracer = _TimmTracer() if source == "timm" else fx.Tracer()
    gm = fx.GraphModule(model, tracer.trace(model))
    bns, chains = 0, []
    for node in gm.graph.nodes:
        owner = _bn_owner(gm, node)
        if owner is None:  # a leaf module: its BNs count, no graph node reaches them
            module = _module(gm, node)
            bns += sum(isinstance(m, _BN) for m in module.modules()) if module is not None else 0
            continue
        bns += 1
        value, via = node, []
        while len(value.users) == 1 and _passthrough(gm, next(iter(value.users))):
            value = next(iter(value.users))
            via.append(type(_module(gm, value)).__name__)
        if len(value.users) == 1 and _activation(gm, next(iter(value.users))):
            chains.append(Chain(owner, _activation(gm, next(iter(value.users))), tuple(via)))
    return FloatGraph(bns, tuple(chains), _activations(gm))


def chains_left(converted: fx.GraphModule, before: FloatGraph) -> int:
    """The chains convert did not fuse: activations left in the converted graph beyond those of the
    float graph that were in no chain (a fused chain takes its activation into the quantized BN)."""
    return _activations(converted) - (before.activations - len(before.chains))


# -- one model through fxqbn ---------------------------------------------------------------------------


def sqnr_db(reference: torch.Tensor, value: torch.Tensor) -> float:
    noise = float((reference - value).double().pow(2).sum())
    signal = float(reference.double().pow(2).sum())
    return math.inf if noise == 0 else 10 * math.log10(signal / noise)


class _FakeQuantize(nn.Module):
    """An observer's quantize -> dequantize round trip in float, at the qparams it computed."""

    def __init__(self, observer: ObserverBase) -> None:
        super().__init__()
        scale, zero_point = observer.calculate_qparams()
        self.scale, self.zero_point = float(scale), int(zero_point)
        self.lo, self.hi = (0, 255) if observer.dtype == torch.quint8 else (-128, 127)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.fake_quantize_per_tensor_affine(x, self.scale, self.zero_point, self.lo, self.hi)


def fake_quantized(observed: fx.GraphModule) -> fx.GraphModule:
    """The float oracle of a calibrated model: each observer replaced by its float round trip, so
    the quantized BNs' inputs and outputs are rounded where convert quantizes them."""
    oracle = copy.deepcopy(observed)
    for name, module in list(oracle.named_modules()):
        if isinstance(module, ObserverBase):
            oracle.set_submodule(name, _FakeQuantize(module))
    return oracle


@dataclass
class Result:
    """What happened to one model."""

    float: FloatGraph | None = None  # the float graph's counts
    fused: Counter = field(default_factory=Counter)  # rewritten rows per pattern name
    rewritten: int = 0  # BNs rewritten (any pattern)
    fused_chains: int = 0  # chains whose BN was rewritten with that activation
    left: dict[str, int] = field(default_factory=dict)  # backend -> chains_left of its converted graph
    skips: Counter = field(default_factory=Counter)  # reason -> count
    sqnr: dict[str, float] = field(default_factory=dict)  # backend -> output SQNR vs float (dB)
    oracle: dict[str, float] = field(default_factory=dict)  # backend -> output SQNR vs the fake-quantized float
    error: str = ""  # the FxqbnError (or other failure) that stopped it
    model_kept: bool = True  # the user's model bit-identical after prepare / calibrate / convert


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _read_report(result: Result, converted: fx.GraphModule) -> None:
    rows = fxqbn.get_report(converted).rows
    done = {r.module: r.pattern for r in rows if r.status == "rewritten"}
    result.fused = Counter(done.values())
    result.rewritten = len(done)
    result.skips = Counter(r.reason for r in rows if r.status == "skipped")
    result.fused_chains = sum(done.get(c.bn, "").endswith("+" + c.activation) for c in result.float.chains)


def run(spec: Spec, backends: tuple[str, ...] = ("native", "fused"), calib_batches: int = 2) -> Result:
    """Prepare (MinMax observers), calibrate, convert on each backend, and measure ``spec``'s model."""
    plain, x = build(replace(spec, sync_bn=""))
    model = to_sync(plain, spec.sync_bn)
    result = Result(float=float_graph(plain, spec.source))  # SyncBN rows: counted on the model before conversion
    before = _state(model)
    try:
        observed = fxqbn.prepare(model, (x,), qconfig=MinMaxObserver, fold=False)  # every BN int8: what the zoo measures
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(1)
            for _ in range(calib_batches):
                observed(torch.randn_like(x))
            test = torch.randn_like(x)
            reference, simulated = model(test), fake_quantized(observed)(test)
            for backend in backends:
                converted = fxqbn.convert(observed, backend=backend)
                result.left[backend] = chains_left(converted, result.float)
                out = converted(test)
                result.sqnr[backend], result.oracle[backend] = sqnr_db(reference, out), sqnr_db(simulated, out)
        _read_report(result, converted)
    except Exception as exc:  # noqa: BLE001 - the table shows what stopped a model
        result.error = f"{type(exc).__name__}: {exc}"
    result.model_kept = _same(before, _state(model))
    return result
