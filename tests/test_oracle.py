"""Oracle tests: fxqbn against torch.ao FX graph mode quantization.

torch.ao's ``prepare_fx``/``convert_fx``, given a QConfigMapping that quantizes only BatchNorm2d/3d,
nn.ReLU and F.relu, rewrites the same patterns fxqbn does into modules calling the same quantized
kernels. Calibrated on the same batches, both must give bit-identical outputs on fresh batches,
with the same qparams on every pattern. The models live in tests/models.py.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import pytest
import torch
import torch.ao.nn.intrinsic.quantized as nniq
import torch.ao.nn.quantized as nnq
import torch.nn.functional as F
from torch import fx, nn
from torch.ao.quantization import (
    HistogramObserver,
    MinMaxObserver,
    QConfig,
    QConfigMapping,
    default_weight_observer,
)
from torch.ao.quantization.backend_config import get_qnnpack_backend_config
from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

import fxqbn
from fxqbn import qops
from fxqbn.float_io import FloatIO

from models import CASES, Case, randomize_batchnorms

CALIBRATION_BATCHES = 4
EVAL_BATCHES = 3
QNNPACK_EPS = 2**-12  # the qnnpack backend config refuses activation observers with a smaller eps

AO_QUANTIZED_BN = (nnq.BatchNorm2d, nnq.BatchNorm3d, nniq.BNReLU2d, nniq.BNReLU3d)
AO_FUSED_RELU = (nniq.BNReLU2d, nniq.BNReLU3d)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The tensors are tiny: intra-op threads only add barrier spinning (slow on a busy CI box)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# -- the two configurations --------------------------------------------------------------------

@dataclass(frozen=True)
class Setting:
    """An activation observer, its dtype, and the backend config torch.ao is given."""

    observer: Any
    dtype: torch.dtype
    backend_config: Any  # None: torch.ao's default (native / x86) backend config

    @property
    def qconfig(self) -> QConfig:
        return QConfig(activation=self.observer, weight=default_weight_observer)

    def mapping(self) -> QConfigMapping:
        """Quantize only BatchNorm and ReLU, as fxqbn does."""
        mapping = QConfigMapping()
        for object_type in (nn.BatchNorm2d, nn.BatchNorm3d, nn.ReLU, F.relu):
            mapping.set_object_type(object_type, self.qconfig)
        return mapping


def make_setting(observer_name: str, dtype_name: str) -> Setting:
    if dtype_name == "quint8":
        observer = {
            "histogram": HistogramObserver.with_args(reduce_range=False),
            "minmax": MinMaxObserver,  # the bare class
        }[observer_name]
        return Setting(observer, torch.quint8, None)
    observer_class = {"histogram": HistogramObserver, "minmax": MinMaxObserver}[observer_name]
    kwargs: dict[str, Any] = {"dtype": torch.qint8, "eps": QNNPACK_EPS}
    if observer_class is HistogramObserver:
        kwargs["reduce_range"] = False
    return Setting(observer_class.with_args(**kwargs), torch.qint8, get_qnnpack_backend_config())


OBSERVER_NAMES = ("histogram", "minmax")
DTYPE_NAMES = ("quint8", "qint8")


# -- running both tools -----------------------------------------------------------------------

@dataclass
class Result:
    model: nn.Module  # the float model handed to fxqbn
    quantized: fx.GraphModule  # fxqbn's
    oracle: fx.GraphModule  # torch.ao's
    batches: list[tuple[torch.Tensor, ...]]  # fresh evaluation batches


def _as_tuple(out: Any) -> tuple[torch.Tensor, ...]:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def _snapshot(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, tuple[type, bool]]]:
    state = {key: value.detach().clone() for key, value in model.state_dict().items()}
    modules = {name: (type(module), module.training) for name, module in model.named_modules()}
    return state, modules


def run_both(case: Case, setting: Setting, seed: int, fxqbn_qconfig: Any = None) -> Result:
    """Build the case's model, prepare/calibrate/convert it with fxqbn and with torch.ao."""
    torch.manual_seed(seed)
    model = randomize_batchnorms(case.build())
    state, modules = _snapshot(model)
    example = case.inputs()
    reference = prepare_fx(
        copy.deepcopy(model), setting.mapping(), example, backend_config=setting.backend_config
    )
    observed = fxqbn.prepare(model, example, setting.observer if fxqbn_qconfig is None else fxqbn_qconfig)
    with torch.no_grad():
        for i in range(CALIBRATION_BATCHES):
            batch = case.inputs(scale=1.0 + 0.25 * i)
            observed(*batch)
            reference(*batch)
    quantized = fxqbn.convert(observed)
    oracle = convert_fx(reference, backend_config=setting.backend_config)

    # The float model fxqbn was given is untouched by prepare, calibration and convert.
    after_state, after_modules = _snapshot(model)
    assert after_modules == modules
    assert after_state.keys() == state.keys()
    for key, value in state.items():
        assert torch.equal(after_state[key], value), f"prepare/convert changed the float model's {key}"

    # Fresh batches, the last one well outside the calibration range (saturating both tools).
    batches = [case.inputs() for _ in range(EVAL_BATCHES - 1)] + [case.inputs(scale=4.0)]
    return Result(model, quantized, oracle, batches)


# -- graph inspection -------------------------------------------------------------------------

def _calls(gm: fx.GraphModule, op: str, target: Any) -> list[fx.Node]:
    return [node for node in gm.graph.nodes if node.op == op and node.target == target]


def _oracle_patterns(oracle: fx.GraphModule) -> dict[str, dict[str, Any]]:
    """For every quantized BN module in torch.ao's graph: its input and output qparams, fused ReLU."""
    modules = dict(oracle.named_modules())
    found = {}
    for node in oracle.graph.nodes:
        if node.op != "call_module" or not isinstance(modules[node.target], AO_QUANTIZED_BN):
            continue
        module = modules[node.target]
        source = node.args[0]
        if source.op == "call_function" and source.target is torch.quantize_per_tensor:
            scale, zero_point = (getattr(oracle, arg.target) for arg in source.args[1:3])
        else:  # another quantized BN's output
            assert source.op == "call_module" and isinstance(modules[source.target], AO_QUANTIZED_BN)
            scale, zero_point = modules[source.target].scale, modules[source.target].zero_point
        found[node.target] = {
            "input": (float(scale), int(zero_point)),
            "output": (float(module.scale), int(module.zero_point)),
            "relu": isinstance(module, AO_FUSED_RELU),
        }
    return found


def _assert_oracle_quantized(result: Result, case: Case, setting: Setting) -> None:
    """torch.ao really quantized every BN: a silently float oracle must not pass."""
    quantize_nodes = _calls(result.oracle, "call_function", torch.quantize_per_tensor)
    assert quantize_nodes, result.oracle.graph
    assert all(node.args[3] == setting.dtype for node in quantize_nodes)
    modules = [m for m in result.oracle.modules() if isinstance(m, AO_QUANTIZED_BN)]
    assert len(modules) == case.num_bns, result.oracle.graph
    float_bns = [
        m for m in result.oracle.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and not isinstance(m, AO_QUANTIZED_BN)
    ]  # torch.ao's quantized BN subclasses the float one
    assert not float_bns, result.oracle.graph


_FXQBN_BN_NAMES = ("BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "BNReLU1d", "BNReLU2d", "BNReLU3d")
FXQBN_QUANTIZED_BN = tuple(getattr(fxqbn.nn, name) for name in _FXQBN_BN_NAMES if hasattr(fxqbn.nn, name))
FXQBN_QUANTIZE = getattr(fxqbn.nn, "Quantize", ())  # () where the boundaries are function nodes
FXQBN_DEQUANTIZE = getattr(fxqbn.nn, "DeQuantize", ())


def _quantize_boundaries(gm: fx.GraphModule) -> list[tuple[fx.Node, torch.dtype]]:
    """fxqbn's float -> quantized boundaries with their dtype: ``fxqbn.nn.Quantize`` module calls
    (or, in older versions, ``fxqbn.qops.quantize`` call_function nodes)."""
    modules = dict(gm.named_modules())
    found = []
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is qops.quantize:
            found.append((node, node.args[3]))
        elif node.op == "call_module" and isinstance(modules[node.target], FXQBN_QUANTIZE):
            found.append((node, modules[node.target].dtype))
    return found


def _dequantize_boundaries(gm: fx.GraphModule) -> list[fx.Node]:
    """fxqbn's quantized -> float boundaries (``fxqbn.nn.DeQuantize`` or ``fxqbn.qops.dequantize``)."""
    modules = dict(gm.named_modules())
    return [
        node for node in gm.graph.nodes
        if (node.op == "call_function" and node.target is qops.dequantize)
        or (node.op == "call_module" and isinstance(modules[node.target], FXQBN_DEQUANTIZE))
    ]


def _float_io_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    """Calls of ``fxqbn.float_io.FloatIO``: a BN between float code, quantize and dequantize inside."""
    modules = dict(gm.named_modules())
    return [n for n in gm.graph.nodes if n.op == "call_module" and isinstance(modules[n.target], FloatIO)]


def _assert_fxqbn_graph(result: Result, case: Case, setting: Setting) -> None:
    """Quantized BNs read quantized values; boundaries sit exactly where float and quantized meet;
    a BN between float code (read by no other BN, reading none) is one FloatIO call."""
    q = result.quantized
    q.graph.lint()
    modules = dict(q.named_modules())
    bn_nodes = [n for n in q.graph.nodes if n.op == "call_module" and isinstance(modules[n.target], FXQBN_QUANTIZED_BN)]
    quantizes = _quantize_boundaries(q)
    dequantizes = _dequantize_boundaries(q)
    float_ios = _float_io_nodes(q)
    produces_quantized = set(bn_nodes) | {node for node, _ in quantizes}

    assert len(bn_nodes) + len(float_ios) == case.num_bns
    for node in float_ios:
        io = modules[node.target]
        assert isinstance(io.bn, FXQBN_QUANTIZED_BN) and isinstance(io.dequantize, FXQBN_DEQUANTIZE)
        assert isinstance(io.quantize, FXQBN_QUANTIZE) and io.quantize.dtype == setting.dtype
        assert not any(quantize.args[0] is node.args[0] for quantize, _ in quantizes), f"{node.name}'s input is quantized twice"
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in q.modules())
    called = {n.target for n in q.graph.nodes if n.op == "call_module"}
    assert all(name in called for name, m in modules.items() if isinstance(m, nn.ReLU)), "fused ReLU module left behind"
    assert not any(name.startswith("fxqbn_observer_") for name in modules)
    for node in bn_nodes:
        assert node.args[0] in produces_quantized, f"{node.name} reads a float value"
    for node, dtype in quantizes:
        assert dtype == setting.dtype
        assert node.args[0] not in produces_quantized
        assert node.args[0] not in dequantizes, "dequantize -> quantize pair"
    for node in dequantizes:
        assert node.args[0] in bn_nodes
    # Every other node reads only float values: quantized values never leak into float code.
    for node in q.graph.nodes:
        if node in bn_nodes or node in dequantizes:
            continue
        for arg in node.all_input_nodes:
            assert arg not in produces_quantized, f"float node {node.name} reads quantized {arg.name}"

    if not case.same_boundaries:
        return
    # As many boundaries as torch.ao's converted graph has (a FloatIO holds one of each).
    assert len(quantizes) + len(float_ios) == len(_calls(result.oracle, "call_function", torch.quantize_per_tensor))
    assert len(dequantizes) + len(float_ios) == len(_calls(result.oracle, "call_method", "dequantize"))


def _assert_report(result: Result, case: Case, setting: Setting) -> None:
    """One 'rewritten' row per BN, with the kernel, dtype and qparams torch.ao chose."""
    rows = fxqbn.get_report(result.quantized).rows
    bn_names = [n for n, m in result.model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert len(rows) == case.num_bns == len(bn_names)
    assert all(row.status == "rewritten" for row in rows), fxqbn.get_report(result.quantized)
    assert sorted(row.module for row in rows) == sorted(bn_names)
    oracle = _oracle_patterns(result.oracle)
    assert sorted(oracle) == sorted(bn_names)
    dtype_name = str(setting.dtype).removeprefix("torch.")
    for row in rows:
        expected = oracle[row.module]
        assert row.dtype == dtype_name
        assert row.pattern.endswith("+ReLU") == expected["relu"], row
        assert row.op.endswith("_relu") == expected["relu"], row
        assert (row.input_scale, row.input_zero_point) == expected["input"], row
        assert (row.output_scale, row.output_zero_point) == expected["output"], row


def _assert_bit_identical(result: Result) -> None:
    with torch.no_grad():
        for batch in result.batches:
            ours = _as_tuple(result.quantized(*batch))
            theirs = _as_tuple(result.oracle(*batch))
            assert len(ours) == len(theirs)
            for i, (a, b) in enumerate(zip(ours, theirs)):
                assert not a.is_quantized and not b.is_quantized
                assert a.dtype == b.dtype and a.shape == b.shape
                assert torch.equal(a, b), f"output {i} differs by up to {(a - b).abs().max().item()}"


# -- tests ------------------------------------------------------------------------------------

CASE_IDS = [case.name for case in CASES]


@pytest.mark.parametrize("dtype_name", DTYPE_NAMES)
@pytest.mark.parametrize("observer_name", OBSERVER_NAMES)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_matches_torch_ao(case: Case, observer_name: str, dtype_name: str) -> None:
    setting = make_setting(observer_name, dtype_name)
    result = run_both(case, setting, seed=CASES.index(case))
    _assert_oracle_quantized(result, case, setting)
    _assert_fxqbn_graph(result, case, setting)
    _assert_report(result, case, setting)
    _assert_bit_identical(result)


@pytest.mark.parametrize(("form", "dtype_name"), [("qconfig", "quint8"), ("mapping", "qint8")])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_qconfig_forms_match_torch_ao(case: Case, form: str, dtype_name: str) -> None:
    """fxqbn given the QConfig, or the very QConfigMapping torch.ao gets, agrees with torch.ao too."""
    setting = make_setting("minmax", dtype_name)
    qconfig = setting.qconfig if form == "qconfig" else setting.mapping()
    result = run_both(case, setting, seed=100 + CASES.index(case), fxqbn_qconfig=qconfig)
    _assert_oracle_quantized(result, case, setting)
    _assert_fxqbn_graph(result, case, setting)
    _assert_report(result, case, setting)
    _assert_bit_identical(result)


def test_chain_has_one_quantize_and_one_dequantize() -> None:
    """bn1 -> bn2 -> ReLU -> bn3 stays quantized from the first BN's input to the last BN's output."""
    case = next(case for case in CASES if case.name == "bn_chain")
    setting = make_setting("histogram", "quint8")
    result = run_both(case, setting, seed=7)
    q = result.quantized
    assert len(_quantize_boundaries(q)) == 1
    assert len(_dequantize_boundaries(q)) == 1
    assert [row.pattern for row in fxqbn.get_report(q).rows] == ["BatchNorm2d", "BatchNorm2d+ReLU", "BatchNorm2d"]
    _assert_bit_identical(result)
