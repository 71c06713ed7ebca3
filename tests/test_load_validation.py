"""fxqbn.load trusts nothing in the file: every corruption is refused with an FxqbnError naming the
module (or field), and a model that went through pickle or torch.save whole still saves and loads."""

import copy
import io
import math
import os
import pickle
import re
import struct
import zipfile

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


# -- damage to the bytes of a saved file: caught by the digests -----------------------------------


def _records(data: bytes) -> dict[str, tuple[int, int]]:
    """Each zip record of a torch.save file (``data.pkl``, ``data/0``, ...) -> (start, length) of its bytes."""
    records = {}
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        for info in archive.infolist():
            name_length, extra_length = struct.unpack_from("<HH", data, info.header_offset + 26)  # the local header's
            records[info.filename.partition("/")[2]] = (info.header_offset + 30 + name_length + extra_length, info.compress_size)
    return records


def _same_tensor(a, b) -> bool:
    """Same dtype, shape and bytes (NaN patterns included)."""
    flat = lambda t: t.contiguous().reshape(-1).view(torch.uint8)  # noqa: E731
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(flat(a), flat(b))


def _first_changed(damaged: dict, intact: dict, kind: str, same) -> str | None:
    """The first entry of ``damaged`` that differs from ``intact`` (or that it lacks), as the refusal names it."""
    changed = next((k for k, v in damaged.items() if k not in intact or not same(v, intact[k])), None)
    changed = changed if changed is not None else next((k for k in intact if k not in damaged), None)
    return None if changed is None else f"{kind} {changed!r}"


def expected_refusal(damaged, intact: dict) -> str | None:
    """A regex the refusal of ``damaged`` (a torch.load-ed damaged payload) must match, judged by comparing
    it with ``intact``; None when it holds the same data (then it must load, unchanged)."""
    if not isinstance(damaged, dict) or damaged.get("format") != intact["format"]:
        return "is not an fxqbn.save file"
    if damaged.get("version") not in (1, 2, 3):
        return "format version"
    fields = {k: v for k, v in damaged.items() if k not in ("state_dict", "digests")}
    named = _first_changed(fields, {k: v for k, v in intact.items() if k not in ("state_dict", "digests")}, "field",
                           lambda a, b: repr(a) == repr(b))
    if named is None and isinstance(damaged.get("state_dict"), dict):
        named = _first_changed(damaged["state_dict"], intact["state_dict"], "tensor",
                               lambda a, b: isinstance(a, torch.Tensor) and _same_tensor(a, b))
    if named is not None:
        return rf"is damaged: {re.escape(named)}"
    return "is damaged: " if repr(damaged.get("digests")) != repr(intact["digests"]) else None


class Intact(tuple):
    """(the saved file's bytes, its payload, outputs and report of the model loaded from it, probe inputs)."""

    def __repr__(self) -> str:  # hypothesis prints the arguments of a failing example
        return "<intact file>"


@pytest.fixture(scope="module")
def intact(saved):
    quantized, payload, directory = saved
    path = directory / "intact.pt"
    fxqbn.save(quantized, path)
    loaded, probes = fxqbn.load(path, Zoo()), batches(2, seed=4)
    with torch.no_grad():
        outputs = [loaded(x) for x in probes]
    return Intact((path.read_bytes(), torch.load(path, weights_only=True), outputs, fxqbn.get_report(loaded).to_dict(), probes))


@st.composite
def flipped_bit(draw, data: bytes):
    """(the file with one bit flipped, where): anywhere, in the pickled metadata or in one tensor record."""
    records = _records(data)
    region = draw(st.sampled_from(["file", "data.pkl", "tensor record"]))
    if region == "file":
        start, length, region = 0, len(data), "the file"
    else:
        name = "data.pkl" if region == "data.pkl" else draw(st.sampled_from(sorted(r for r in records if r.startswith("data/"))))
        (start, length), region = records[name], name
    at, bit = start + draw(st.integers(0, length - 1)), draw(st.integers(0, 7))
    damaged = bytearray(data)
    damaged[at] ^= 1 << bit
    return bytes(damaged), f"bit {bit} of byte {at} ({region})"


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_one_flipped_bit_is_refused_naming_what_differs_or_changes_nothing(saved, intact, data):
    raw, payload, outputs, report, probes = intact
    damaged, where = data.draw(flipped_bit(raw))
    note(where)
    path = saved[2] / "flipped.pt"
    path.write_bytes(damaged)
    try:
        expected = expected_refusal(torch.load(path, weights_only=True, map_location="cpu"), payload)  # as fxqbn reads it
    except Exception:  # noqa: BLE001 -- torch cannot read it at all: fxqbn must say so
        expected = "cannot read .*flipped\\.pt: "
    note(f"expected: {expected}")
    if expected is not None:
        with pytest.raises(fxqbn.FxqbnError, match=expected):
            fxqbn.load(path, Zoo())
        return
    loaded = fxqbn.load(path, Zoo())  # the bit changed no data: the same model, bit for bit
    with torch.no_grad():
        assert all(torch.equal(loaded(x), y) for x, y in zip(probes, outputs))
    assert fxqbn.get_report(loaded).to_dict() == report


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_a_truncated_file_is_refused(saved, intact, data):
    raw = intact[0]
    path = saved[2] / "cut.pt"
    path.write_bytes(raw[: data.draw(st.integers(0, len(raw) - 1))])
    with pytest.raises(fxqbn.FxqbnError, match=r"cut\.pt: it is not a file written by torch\.save, or it is truncated"):
        fxqbn.load(path, Zoo())


def _mixed(data: bytes, other: bytes, names) -> bytes:
    """``data``'s zip with the records ``names`` taken from ``other`` (as a bad copy might mix them)."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(data)) as mine, zipfile.ZipFile(io.BytesIO(other)) as theirs, zipfile.ZipFile(out, "w") as mixed:
        prefix = theirs.namelist()[0].partition("/")[0]  # the folder torch.save names after the file
        for info in mine.infolist():
            name = info.filename.partition("/")[2]
            mixed.writestr(info, theirs.read(f"{prefix}/{name}") if name in names else mine.read(info))
    return out.getvalue()


def test_records_of_two_files_mixed_up_are_refused_naming_the_tensor(saved, intact, tmp_path):
    raw, payload, *_ = intact
    observed = fxqbn.prepare(zoo(seed=1), (batches()[0],), QCONFIG)  # same architecture, other weights and qparams
    with torch.no_grad():
        observed(batches(1, seed=5)[0])
    fxqbn.save(fxqbn.convert(observed, backend=saved[1]["backend"]), tmp_path / "other.pt")
    other = (tmp_path / "other.pt").read_bytes()
    path = tmp_path / "mixed.pt"
    path.write_bytes(_mixed(raw, raw, ()))  # rewritten by zipfile, nothing mixed: it loads
    fxqbn.load(path, Zoo())
    tensors = sorted(name for name in _records(raw) if name.startswith("data/"))
    refused = []
    for name in tensors:
        path.write_bytes(_mixed(raw, other, {name}))
        expected = expected_refusal(torch.load(path, weights_only=True, map_location="cpu"), payload)
        if expected is not None:  # else both files hold the same bytes there
            assert expected.startswith(r"is damaged: tensor\ ")
            with pytest.raises(fxqbn.FxqbnError, match=rf"mixed\.pt {expected} does not match its SHA-256 digest"):
                fxqbn.load(path, Zoo())
            refused.append(name)
    assert len(refused) > len(tensors) // 2
    path.write_bytes(_mixed(raw, other, {"data.pkl"}))  # the other file's metadata over these tensors
    with pytest.raises(fxqbn.FxqbnError, match=r"mixed\.pt is damaged: tensor '.*' does not match its SHA-256 digest"):
        fxqbn.load(path, Zoo())
