"""A BN between float code becomes one FloatIO call (quantize, quantized BN, dequantize inside it);
every other BN keeps its boundaries as nodes. Both layouts compute the same, bit for bit, and
fxqbn.save files of format 1 (boundaries as nodes) still load, in their own layout."""

import io
from pathlib import Path

import pytest
import torch
from conftest import calls, randomize_bn
from torch import nn
from torch.ao.quantization import MinMaxObserver

import fxqbn
from fxqbn.api import convert_laid_out
from fxqbn.backends import BACKENDS
from fxqbn.float_io import FloatIO
from fxqbn.state import CONVERTED_KEY, attached

GOLDEN = Path(__file__).parent / "golden"


class Placements(nn.Module):
    """Every case of where a BN's boundaries go.

    ``between``: conv -> BN -> conv, a FloatIO. ``twin_a``/``twin_b``: two BNs on the same float
    value, one quantize shared (nodes). ``head`` -> ``tail``: a chain handing over quantized values,
    ``head``'s output read by float code too (nodes)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 4, 1)
        self.between, self.twin_a, self.twin_b = nn.BatchNorm2d(4), nn.BatchNorm2d(4), nn.BatchNorm2d(4)
        self.head, self.tail = nn.BatchNorm2d(4), nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv2(torch.relu(self.between(self.conv1(x))))
        z = self.twin_a(y) * self.twin_b(y)
        h = self.head(z)
        return self.tail(h) + h


def converted(backend, float_io=True, seed=0):
    torch.manual_seed(seed)
    model = randomize_bn(Placements()).eval()
    observed = fxqbn.prepare(model, (torch.randn(2, 3, 5, 5),), MinMaxObserver, fold=False)  # between: quantized, not folded
    with torch.no_grad():
        for _ in range(2):
            observed(torch.randn(4, 3, 5, 5))
    return convert_laid_out(observed, False, backend, float_io)


def call_targets(gm):
    return {node.target: node for node in gm.graph.nodes if node.op == "call_module"}


@pytest.mark.parametrize("backend", BACKENDS)
def test_only_a_bn_between_float_code_is_a_float_io(backend):
    q = converted(backend)
    q.graph.lint()
    (io_node,) = calls(q, FloatIO)
    assert io_node.target == "between" and io_node.args[0].target == "conv1"
    assert [user.target for user in io_node.users] == ["conv2"]  # its ReLU fused inside, its output float
    between = q.between
    assert type(between.quantize) is type(BACKENDS[backend].quantize(fxqbn.qparams.QParams(0.1, 0, torch.quint8)))
    assert type(between.dequantize) is type(BACKENDS[backend].dequantize(fxqbn.qparams.QParams(0.1, 0, torch.quint8)))
    targets = call_targets(q)
    # the twins read one quantize node; head hands its codes to tail and to one dequantize node
    assert targets["twin_a"].args[0] is targets["twin_b"].args[0]
    assert targets["twin_a"].args[0].target.startswith("fxqbn_quantize_")
    assert targets["tail"].args[0] is targets["head"]
    assert sorted(str(u.target).rstrip("0123456789") for u in targets["head"].users) == ["fxqbn_dequantize_", "tail"]
    converted_record = attached(q, CONVERTED_KEY)
    assert converted_record.float_io == ("between",)
    assert [rw.qmodule for rw in converted_record.rewrites if rw.match.module == "between"] == ["between.bn"]
    summary = fxqbn.get_report(q).summary  # a FloatIO's boundaries are counted with the nodes
    assert (summary.quantize_nodes, summary.dequantize_nodes) == (1 + 2, 1 + 4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_both_layouts_compute_the_same_bit_for_bit(backend):
    with_io, nodes_only = converted(backend), converted(backend, float_io=False)
    assert not calls(nodes_only, FloatIO) and len(nodes_only.graph.nodes) == len(with_io.graph.nodes) + 2
    for seed in range(3):
        x = torch.randn(3, 3, 5, 5, generator=torch.Generator().manual_seed(seed)) * 3
        assert torch.equal(with_io(x), nodes_only(x))


@pytest.mark.parametrize("backend", BACKENDS)
def test_float_io_modules_take_the_bns_training_flag_and_script(backend):
    q = converted(backend)
    assert not any(m.training for m in q.modules())
    scripted = torch.jit.script(q)
    x = torch.randn(2, 3, 5, 5, generator=torch.Generator().manual_seed(4))
    assert torch.equal(scripted(x), q(x))


@pytest.mark.parametrize("backend", BACKENDS)
def test_compare_measures_a_float_io_bn_as_in_the_nodes_layout(backend):
    torch.manual_seed(0)
    reference = randomize_bn(Placements()).eval()
    batches = [torch.randn(4, 3, 5, 5, generator=torch.Generator().manual_seed(6))]
    with_io, nodes_only = (fxqbn.compare(reference, converted(backend, f), batches) for f in (True, False))
    numbers = [[(row.module, row.sqnr_db, row.max_error_steps) for row in report.rows] for report in (with_io, nodes_only)]
    assert numbers[0] == numbers[1] and all(sqnr is not None and sqnr > 20 for _, sqnr, _ in numbers[0])
    assert with_io.summary.model_sqnr_db == nodes_only.summary.model_sqnr_db


@pytest.mark.parametrize("backend", BACKENDS)
def test_format_1_files_load_in_their_own_layout_and_save_it_as_format_3_nodes(backend, tmp_path):
    """Files written by fxqbn before FloatIO (tests/golden/format1.py wrote them)."""
    from golden.format1 import Format1Model

    path = GOLDEN / f"format1_{backend}.pt"
    assert torch.load(path, weights_only=True)["version"] == 1
    expected = torch.load(GOLDEN / f"format1_{backend}_io.pt", weights_only=True)
    loaded = fxqbn.load(path, Format1Model())  # fresh weights: the file's replace them
    assert not calls(loaded, FloatIO) and calls(loaded, type(BACKENDS[backend].dequantize(fxqbn.qparams.QParams(0.1, 0, torch.quint8))))
    with torch.no_grad():
        assert torch.equal(loaded(expected["input"]), expected["output"])
    buffer = io.BytesIO()
    fxqbn.save(loaded, buffer)  # format 3, in the layout it holds: every boundary a node
    buffer.seek(0)
    assert {k: v for k, v in torch.load(buffer, weights_only=True).items() if k in ("version", "layout")} == {"version": 3, "layout": "nodes"}
    buffer.seek(0)
    again = fxqbn.load(buffer, Format1Model())
    with torch.no_grad():
        assert torch.equal(again(expected["input"]), expected["output"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_float_io_file_round_trips_with_its_float_io(backend, tmp_path):
    q = converted(backend)
    fxqbn.save(q, tmp_path / "m.pt")
    assert torch.load(tmp_path / "m.pt", weights_only=True)["layout"] == "float_io"
    loaded = fxqbn.load(tmp_path / "m.pt", Placements())
    assert [n.target for n in calls(loaded, FloatIO)] == ["between"]
    x = torch.randn(2, 3, 5, 5, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert torch.equal(loaded(x), q(x))
