"""torch.compile of converted and lowered models: one graph where no quantized tensor flows, the same
numbers as eager, and no more compiles than the float model.

The fast tests trace with ``torch._dynamo.explain`` or compile with ``backend="aot_eager"`` (no
inductor); the tests marked slow compile with inductor, a small model each.
"""

import pytest
import torch
import torch.fx as fx
from conftest import installed, randomize_bn
from lower_models import Sandwich
from torch import nn

import fxqbn

CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
SIDE = {1: 12, 2: 6, 3: 4}


class Net(nn.Module):
    """``bn1`` between float convs (one FloatIO); ``bn2`` -> ReLU -> ``bn3`` hand codes (or quantized
    tensors) to each other; channels differ, so each BN module has its own shapes."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.conv1, self.conv2 = CONV[dim](3, 4, 1), CONV[dim](4, 6, 1)
        self.bn1, self.bn2, self.bn3 = BN[dim](4), BN[dim](6), BN[dim](6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv2(torch.relu(self.bn1(self.conv1(x))))
        return self.bn3(torch.relu(self.bn2(y)))


def example(dim: int, batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, *[SIDE[dim]] * dim, generator=torch.Generator().manual_seed(seed))


def converted(dim: int, backend: str) -> tuple[nn.Module, nn.Module]:
    """(the float model, its conversion with ``backend``)."""
    torch.manual_seed(dim)
    model = randomize_bn(Net(dim)).eval()
    observed = fxqbn.prepare(model, (example(dim),), fold=False)  # every BN int8: the BNs under test
    with torch.no_grad():
        for seed in range(3):
            observed(example(dim, 4, seed))
    return model, fxqbn.convert(observed, backend=backend)


def recompiles(model: nn.Module, inputs: list[torch.Tensor], dynamic: bool | None) -> int:
    """How many graphs torch.compile builds after the first input (a model with graph breaks builds
    several for the first) running ``model`` on ``inputs``."""
    return graphs_compiled(model, inputs, dynamic) - graphs_compiled(model, inputs[:1], dynamic)


def graphs_compiled(model: nn.Module, inputs: list[torch.Tensor], dynamic: bool | None) -> int:
    """How many graphs torch.compile builds (first compiles and recompiles) running ``model`` on ``inputs``."""
    built = []

    def backend(gm: fx.GraphModule, example_inputs: list) -> object:
        built.append(gm)
        return gm.forward

    torch._dynamo.reset()
    compiled = torch.compile(model, backend=backend, dynamic=dynamic)
    with torch.no_grad():
        for x in inputs:
            compiled(x)
    return len(built)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("dim", [1, 2, 3])
def test_a_fused_model_is_one_graph(dim):
    _, q = converted(dim, "fused")
    with torch.no_grad():
        explained = torch._dynamo.explain(q)(example(dim))
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


@pytest.mark.parametrize("dim", [1, 2, 3])
def test_a_native_bn_between_float_code_is_one_op_in_the_graph(dim):
    """bn1 (a FloatIO) is one fxqbn op; only bn2 -> bn3, which hand quint8 tensors over, run eagerly."""
    _, q = converted(dim, "native")
    with torch.no_grad():
        explained = torch._dynamo.explain(q)(example(dim))
    ops = [n.target for g in explained.graphs for n in g.graph.nodes if n.op == "call_function"]
    assert torch.ops.fxqbn.native_batch_norm_between_floats.default in ops or \
        torch.ops.fxqbn.native_batch_norm_between_floats in ops
    assert not any("FakeTensor" in str(r.reason) or "item()" in str(r.reason) for r in explained.break_reasons)


@pytest.mark.parametrize("backend", ["fused", "native"])
@pytest.mark.parametrize("dim", [1, 2, 3])
def test_compiled_equals_eager_bit_for_bit(dim, backend):
    """aot_eager runs the traced aten ops (fused) or the one op (native): the eager kernels' numbers."""
    _, q = converted(dim, backend)
    x = example(dim, 3, seed=10)
    with torch.no_grad():
        assert torch.equal(torch.compile(q, backend="aot_eager")(x), q(x))


@pytest.mark.parametrize("backend", ["fused", "native"])
@pytest.mark.parametrize("dynamic", [None, True])
def test_no_more_compiles_than_the_float_model(backend, dynamic):
    """Three modules of one class (FloatIO, FusedBatchNorm) with different channel counts, four batch
    sizes: the converted model compiles as often as the float model does under the same settings."""
    model, q = converted(2, backend)
    inputs = [example(2, batch) for batch in (1, 2, 3, 5)]
    assert recompiles(q, inputs, dynamic) <= recompiles(model, inputs, dynamic)
    if dynamic and backend == "fused":  # batch 1 is specialised, as in any model; past it one graph serves
        assert graphs_compiled(q, inputs[1:], dynamic) == 1


@pytest.mark.parametrize("backend", ["fused", "native"])
def test_a_lowered_pt2e_bn_compiles_and_equals_eager(backend):
    """PT2E graphs with the fused kernel are one graph; with the native kernel the BN runs eagerly."""
    model = Sandwich("pt2e", 2, "module", "ReLU", "none")
    lowered = fxqbn.lower(fx.symbolic_trace(model), backend=backend)
    x = model.codes((2, 5, 16, 16))
    explained = torch._dynamo.explain(lowered)(x)
    if backend == "fused":
        assert (explained.graph_count, explained.graph_break_count) == (1, 0)
    assert torch.equal(torch.compile(lowered, backend="aot_eager")(x), lowered(x))


@pytest.mark.parametrize("backend", ["fused", "native"])
def test_a_wrong_input_is_refused_under_compile_too(backend):
    _, q = converted(2, backend)
    bn = q.get_submodule("bn1")  # a FloatIO: float in
    with pytest.raises(fxqbn.FxqbnError, match="has 4 channels"):
        torch.compile(bn, backend="aot_eager")(torch.randn(2, 5, 6, 6))


def sqnr(reference: torch.Tensor, other: torch.Tensor) -> float:
    return float(10 * torch.log10(reference.pow(2).mean() / (reference - other).pow(2).mean().clamp_min(1e-30)))


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["fused", "native"])
def test_inductor_agrees_with_eager(backend):
    """Inductor's convs round differently from eager's, so a few codes move by one: SQNR >= 40 dB.
    Without convs (bn2 -> bn3 alone) the codes are equal."""
    _, q = converted(2, backend)
    compiled = torch.compile(q)
    x = example(2, 3)
    with torch.no_grad():
        assert sqnr(q(x), compiled(x)) >= 40
    if backend == "fused":
        tail = nn.Sequential(installed(q, "bn2"), installed(q, "bn3"))
        codes = torch.randint(0, 256, (3, 6, 6, 6), dtype=torch.uint8)
        assert torch.equal(torch.compile(tail)(codes), tail(codes))
