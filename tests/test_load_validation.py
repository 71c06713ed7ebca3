"""fxqbn.load trusts nothing in the file: every corruption is refused with an FxqbnError naming the
module (or field), and a model that went through pickle or torch.save whole still saves and loads."""

import copy
import math
import os
import pickle

import pytest
import torch
from hypothesis import HealthCheck, given, note, settings, strategies as st
from test_serialize import QCONFIG, Zoo, batches, zoo

import fxqbn
from fxqbn.digests import field_digests, tensor_digests


def converted(backend):
    observed = fxqbn.prepare(zoo(), (batches()[0],), QCONFIG)
    with torch.no_grad():
        for x in batches():
            observed(x)
    return fxqbn.convert(observed, backend=backend)


@pytest.fixture(scope="module", params=["native", "fused"])
def saved(request, tmp_path_factory):
    quantized = converted(request.param)
    path = tmp_path_factory.mktemp(request.param) / "zoo.pt"
    fxqbn.save(quantized, path)
    return quantized, torch.load(path, weights_only=True), tmp_path_factory.mktemp("bad")


def rewritten(payload):
    return [row for row in payload["patterns"] if row["status"] == "rewritten"]


def reseal(payload):
    """New digests for an edited payload: what a deliberate edit does, so the checks behind the digests
    (the ones that judge a file by its contents) are what refuses it."""
    state = payload.get("state_dict")
    payload["digests"] = {"fields": field_digests(payload), "tensors": tensor_digests(state) if isinstance(state, dict) else {}}
    return payload


def write(payload, directory, name="bad.pt"):
    path = directory / name
    torch.save(reseal(payload), path)
    return path


BAD_SCALES = [0.0, math.nan, -0.05, math.inf, 1e-45]
BAD_ZERO_POINTS = [300, -1000, 256]


def _boundary(module: str) -> bool:
    """A quantize boundary: a node's module (fxqbn_quantize_<k>), or a FloatIO's."""
    return module.startswith("fxqbn_quantize_") or module.endswith(".quantize")


def _owner(module: str) -> str:
    """The BN a quantized module's errors name: a FloatIO's bn is its parent; a BN called twice
    has its second module at twice_1."""
    return module.removesuffix(".bn").removesuffix("_1")


@st.composite
def corruption(draw, payload):
    """(a corrupted copy of payload, a regex the refusal must match)."""
    bad = copy.deepcopy(payload)
    state = bad["state_dict"]
    owners = {key.rpartition(".")[0] for key in state if key.endswith(("zero_point", "alpha"))}
    bn_modules = sorted(m for m in owners if not _boundary(m))
    module = draw(st.sampled_from(bn_modules))
    kind = draw(st.sampled_from(["statistic", "qparams-buffer", "boundary", "record-scale", "record-zero-point",
                                 "missing-field", "mistyped-field", "row-field", "report-row"]))
    if kind == "statistic":
        name = draw(st.sampled_from([k.rpartition(".")[2] for k in state if k.rpartition(".")[0] == module and state[k].is_floating_point() and state[k].numel() > 1]))
        tensor = state[f"{module}.{name}"]
        channel = draw(st.integers(0, tensor.numel() - 1))
        tensor.view(-1)[channel] = draw(st.sampled_from([math.nan, math.inf, -1.0] if name == "running_var" else [math.nan, math.inf, -math.inf]))
        return bad, rf"bad\.pt.*'({module}|{_owner(module)})'"
    if kind == "qparams-buffer":
        keys = [k for k in state if k.rpartition(".")[0] == module and k.rpartition(".")[2] in ("scale", "zero_point")]
        if not keys:  # fused modules keep qparams off the state_dict: corrupt a table code instead
            codes = state[f"{module}.table"].view(torch.uint8).view(-1)  # int8 tables too: flip bits of the byte
            entry = draw(st.integers(0, codes.numel() - 1))
            codes[entry] = int(codes[entry]) ^ draw(st.sampled_from([0x80, 0x40, 0x10]))
            return bad, rf"bad\.pt: BatchNorm '({module}|{_owner(module)})': its table disagrees with its constants alpha and beta at channel {entry // 256} "
        key = draw(st.sampled_from(keys))
        state[key].view(-1)[0] = draw(st.sampled_from(BAD_SCALES if state[key].is_floating_point() else BAD_ZERO_POINTS))
        return bad, rf"bad\.pt is inconsistent: its state_dict's '{key}'.*module '{module}'"
    if kind == "boundary":
        keys = [k for k in state if _boundary(k.rpartition(".")[0])]
        if not keys:
            return bad, None  # fused boundaries hold no tensors
        key = draw(st.sampled_from(keys))
        state[key].view(-1)[0] = draw(st.sampled_from(BAD_SCALES + [0.5] if key.endswith("scale") else BAD_ZERO_POINTS + [7]))
        return bad, rf"bad\.pt is inconsistent: its state_dict's '{key}'.*module '{key.rpartition('.')[0]}'"
    row = draw(st.sampled_from(rewritten(bad)))
    if kind == "report-row":  # a report that tells other qparams than the file replays
        shown = next(r for r in bad["report"]["rows"] if r["node"] == row["node"])
        shown["output_scale"] = row["output"][0] * draw(st.sampled_from([2.0, 0.5]))
        return bad, rf"bad\.pt is inconsistent: its report says BatchNorm '{row['module']}'"
    if kind == "record-scale":
        row[draw(st.sampled_from(["input", "output"]))][0] = draw(st.sampled_from(BAD_SCALES))
        return bad, rf"bad\.pt: BatchNorm '{row['module']}' has bad (input|output) qparams: scale"
    if kind == "record-zero-point":
        row[draw(st.sampled_from(["input", "output"]))][1] = draw(st.sampled_from(BAD_ZERO_POINTS))
        return bad, rf"bad\.pt: BatchNorm '{row['module']}' has bad (input|output) qparams: zero point"
    if kind == "row-field":
        key = draw(st.sampled_from(["node", "pattern", "status", "dtype", "input", "output"]))
        row[key] = draw(st.sampled_from([None, 3, ["x"]]))
        return bad, rf"bad\.pt is damaged: .*'{row['module']}'.* {key}"
    key = draw(st.sampled_from(["torch", "patterns", "state_dict", "training", "code", "report"]))
    if kind == "missing-field":
        del bad[key]
        return bad, rf"bad\.pt is damaged: field '{key}' is missing; write it again"
    bad[key] = draw(st.sampled_from([3, None, 1.5, True]))
    return bad, rf"bad\.pt is damaged: field '{key}' is a "


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_every_corruption_is_refused_naming_the_module(saved, data):
    _, payload, directory = saved
    bad, message = data.draw(corruption(payload))
    note(f"expected refusal: {message}")
    if message is None:
        return
    path = write(bad, directory)
    with pytest.raises(fxqbn.FxqbnError, match=message):
        fxqbn.load(path, Zoo())


def test_an_intact_file_loads_bit_identical_on_both_backends(saved):
    quantized, payload, directory = saved
    loaded = fxqbn.load(write(payload, directory, "intact.pt"), Zoo())
    for x in batches(3, seed=2):
        assert torch.equal(loaded(x), quantized(x))


# -- models that went through pickle -----------------------------------------------------------------


@pytest.mark.parametrize(
    "roundtrip",
    [
        lambda q, d: pickle.loads(pickle.dumps(q)),
        lambda q, d: (torch.save(q, d / "whole.pt"), torch.load(d / "whole.pt", weights_only=False))[1],
        lambda q, d: copy.deepcopy(q),
    ],
    ids=["pickle", "torch.save-whole", "deepcopy"],
)
def test_a_model_that_was_pickled_still_saves_a_file_that_loads(roundtrip, tmp_path):
    quantized = converted("native")
    again = roundtrip(quantized, tmp_path)
    fxqbn.save(again, tmp_path / "again.pt")
    loaded = fxqbn.load(tmp_path / "again.pt", Zoo())
    for x in batches(2, seed=3):
        assert torch.equal(loaded(x), quantized(x))


class Evil:
    def __reduce__(self):
        return (os.system, ("true",))


@pytest.mark.parametrize("payload", [{"format": "fxqbn.quantized", "version": 1, "x": Evil()}, Evil()], ids=["inside", "whole"])
def test_a_file_holding_a_blocked_global_says_it_holds_pickled_objects(payload, tmp_path):
    torch.save(payload, tmp_path / "evil.pt")
    with pytest.raises(fxqbn.FxqbnError, match=r"evil\.pt: it holds pickled Python objects \(found (posix|nt)\.system\)"):
        fxqbn.load(tmp_path / "evil.pt", Zoo())
