"""fxqbn.sync_observers over 2 gloo ranks on 127.0.0.1, against one process calibrating on all the batches.

Spawning costs seconds on a small machine, so one spawn runs every scenario on both ranks and saves
what each rank holds afterwards; the tests compare that with the same scenario run here in one process.
"""

from __future__ import annotations

import datetime
import io
import json
import os
import socket
import subprocess
import sys
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hypothesis import given, settings
from hypothesis import strategies as st
from models import BNChain, ConvPool, randomize_batchnorms
from torch import nn
from torch.ao.quantization import (
    FakeQuantize,
    HistogramObserver,
    MinMaxObserver,
    MovingAverageMinMaxObserver,
    ObserverBase,
    PerChannelMinMaxObserver,
    QConfig,
    QConfigMapping,
    default_weight_observer,
)
from torch.ao.quantization.quantize_fx import prepare_fx

import fxqbn
from fxqbn import cli, distributed
from fxqbn.progress import Progress
from fxqbn.qparams import qparams_from_observer

WORLD = 2
JOIN_TIMEOUT_S = 240  # a hung collective fails the test instead of hanging CI
PG_TIMEOUT = datetime.timedelta(seconds=60)


def _batches(kind: str, n: int = 6) -> list[torch.Tensor]:
    """Calibration batches whose range differs from batch to batch (so the ranks' ranges differ)."""
    gen = torch.Generator().manual_seed(7)
    shape = (2, 4, 8, 8)
    if kind == "normal":
        return [torch.randn(shape, generator=gen) * (1 + i / 3) + 0.2 * i for i in range(n)]
    if kind == "skewed":  # heavy right tail: exponential, with rare large values
        return [torch.empty(shape).exponential_(1.0, generator=gen) ** 1.5 * (1 + i % 3) - 0.5 for i in range(n)]
    raise ValueError(kind)


def _model(kind: str) -> nn.Module:
    torch.manual_seed(3)
    return randomize_batchnorms(ConvPool() if kind == "conv_pool" else BNChain())


def _torch_ao(model: nn.Module, example: tuple) -> nn.Module:
    """BNs observed with MinMax (as torch.ao's convert wants), the convs with Histogram (dropped at convert)."""
    bn_q = QConfig(activation=MinMaxObserver, weight=default_weight_observer)
    mapping = QConfigMapping().set_object_type(nn.BatchNorm2d, bn_q).set_object_type(nn.ReLU, bn_q)
    mapping.set_object_type(nn.Conv2d, QConfig(activation=HistogramObserver, weight=default_weight_observer))
    return prepare_fx(model, mapping, example)


_FAKE_QUANT = FakeQuantize.with_args(observer=MovingAverageMinMaxObserver, quant_min=0, quant_max=255, dtype=torch.quint8)

# name -> (model, qconfig or "torch.ao", data, batches)
SCENARIOS = {
    "minmax": ("conv_pool", MinMaxObserver, "normal", 6),
    "histogram_normal": ("conv_pool", None, "normal", 6),
    "histogram_skewed": ("bn_chain", None, "skewed", 6),
    "torch_ao": ("conv_pool", "torch.ao", "normal", 6),
    "moving_average": ("bn_chain", MovingAverageMinMaxObserver, "normal", 6),
    "fake_quant": ("bn_chain", _FAKE_QUANT, "normal", 6),
    "one_batch": ("conv_pool", None, "normal", 1),  # rank 1 gets no batch: its observers saw nothing
}


def _prepare(name: str, model_kind: str | None = None) -> tuple[nn.Module, list[torch.Tensor]]:
    kind, qconfig, data, n = SCENARIOS[name]
    batches = _batches(data, n)
    model = _model(model_kind or kind)
    example = (batches[0],)
    observed = _torch_ao(model, example) if qconfig == "torch.ao" else fxqbn.prepare(model, example, qconfig)
    return observed, batches


def _calibrate(observed: nn.Module, batches) -> None:
    with torch.no_grad():
        for batch in batches:
            observed(batch)


def _outcome(observed: nn.Module) -> dict:
    """What a rank holds after calibration: observer state, qparams, the converted model's output."""
    observers = {name: m for name, m in observed.named_modules() if hasattr(m, "calculate_qparams")}
    probe = _batches("normal", 1)[0] * 1.3
    with torch.no_grad():
        output = fxqbn.convert(observed)(probe)
    return {
        "state": {k: v.clone() for k, v in observed.state_dict().items() if "observer" in k or "post_process" in k},
        "qparams": {name: qparams_from_observer(m) for name, m in observers.items() if name.count(".") == 0},
        "output": output,
    }


def _one_process(name: str) -> dict:
    observed, batches = _prepare(name)
    _calibrate(observed, batches)
    return _outcome(observed)


def _per_rank_unsynced(name: str) -> list[nn.Module]:
    """Each rank's observed model before the merge, rebuilt here (for the merges defined per rank)."""
    models = []
    for rank in range(WORLD):
        observed, batches = _prepare(name)
        _calibrate(observed, distributed.shard(batches, distributed.Ranks(rank, WORLD, "gloo")))
        models.append(observed)
    return models


def _refusal(call) -> object:
    try:
        call()
    except fxqbn.FxqbnError as exc:
        return exc
    return "no error"


def _refusals(rank: int) -> dict:
    """Syncs that every rank must refuse alike (each after one all_gather_object, so no rank waits)."""
    results = {}
    observed, batches = _prepare("minmax", "bn_chain" if rank else "conv_pool")
    _calibrate(observed, distributed.shard(batches))
    results["different_model"] = _refusal(lambda: fxqbn.sync_observers(observed))
    observed, _ = _prepare("histogram_normal")
    if rank:  # a different bin count on rank 1
        observed = fxqbn.prepare(_model("conv_pool"), (_batches("normal", 1)[0],), HistogramObserver.with_args(bins=1024))
    _calibrate(observed, _batches("normal", 2))
    results["different_bins"] = _refusal(lambda: fxqbn.sync_observers(observed))
    observed, batches = _prepare("minmax")
    _calibrate(observed, distributed.shard(batches))
    fxqbn.sync_observers(observed)
    results["second_sync"] = _refusal(lambda: fxqbn.sync_observers(observed))
    results["no_observers"] = _refusal(lambda: fxqbn.sync_observers(fxqbn.convert(observed)))
    observed, batches = _prepare("moving_average")
    _calibrate(observed, batches[:1])
    if rank:  # fxqbn's observers refuse NaN input during calibration: a NaN range set by hand (e.g. a loaded state)
        observed.get_submodule("fxqbn_observer_0").min_val.fill_(float("nan"))
    results["nan_on_rank_1"] = _refusal(lambda: fxqbn.sync_observers(observed))
    observed, _ = _prepare("minmax")  # rank 1 passes the float model instead
    results["not_a_graph"] = _refusal(lambda: fxqbn.sync_observers(_model("conv_pool") if rank else observed))
    return results


def _rank_main(rank: int, port: int, out_dir: str) -> None:
    """One rank: every scenario, then the refusals; results saved to out_dir/rank{rank}.pt."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD, timeout=PG_TIMEOUT)
    results: dict = {}
    try:
        for name in SCENARIOS:
            observed, batches = _prepare(name)
            _calibrate(observed, distributed.shard(batches))
            synced = fxqbn.sync_observers(observed)
            results[name] = {**_outcome(observed), "synced": synced}
        results.update(_refusals(rank))
    except BaseException:
        results["crash"] = traceback.format_exc()
    finally:
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    """Both ranks' results, from one spawn of 2 gloo processes."""
    out = tmp_path_factory.mktemp("ranks")
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_rank_main, args=(rank, port, str(out))) for rank in range(WORLD)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(JOIN_TIMEOUT_S)
    hung = [p for p in procs if p.is_alive()]
    for p in hung:
        p.kill()
    assert not hung, f"ranks still running after {JOIN_TIMEOUT_S} s: a collective hung"
    assert [p.exitcode for p in procs] == [0] * WORLD
    results = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    for r, result in enumerate(results):
        assert "crash" not in result, f"rank {r}:\n{result['crash']}"
    return results


def _assert_same(a: dict, b: dict) -> None:
    assert a["state"].keys() == b["state"].keys()
    for key in a["state"]:
        assert torch.equal(a["state"][key], b["state"][key]), key
    assert a["qparams"] == b["qparams"]
    assert torch.equal(a["output"], b["output"])


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_every_rank_holds_the_same_observers(ranks, name):
    _assert_same(ranks[0][name], ranks[1][name])
    assert ranks[0][name]["synced"].world_size == WORLD and ranks[1][name]["synced"].rank == 1


@pytest.mark.parametrize("name", ["minmax", "torch_ao"])
def test_min_max_equals_one_process_on_all_batches(ranks, name):
    """Every range is one process's (the Histogram observers' too); MinMax qparams and outputs are the same."""
    reference, merged = _one_process(name), ranks[0][name]
    for key, value in reference["state"].items():
        if not key.endswith("histogram"):
            assert torch.equal(merged["state"][key], value), key
    minmax = [n for n in reference["qparams"] if f"{n}.histogram" not in reference["state"]]
    assert minmax and all(merged["qparams"][n] == reference["qparams"][n] for n in minmax)
    assert torch.equal(merged["output"], reference["output"])


@pytest.mark.parametrize("name", ["histogram_normal", "histogram_skewed", "torch_ao", "one_batch"])
def test_histogram_is_within_one_step_and_two_percent_of_one_process(ranks, name):
    reference = _one_process(name)
    merged = ranks[0][name]
    assert merged["qparams"].keys() == reference["qparams"].keys()
    for observer, ours in merged["qparams"].items():
        theirs = reference["qparams"][observer]
        assert abs(ours.zero_point - theirs.zero_point) <= 1, observer
        assert abs(ours.scale / theirs.scale - 1) <= 0.02, observer
    histograms = [k for k in merged["state"] if k.endswith("histogram")]
    assert histograms
    for key in histograms:  # every element counted once: mass is conserved
        assert torch.isclose(merged["state"][key].sum(), reference["state"][key].sum(), rtol=1e-5), key


def test_a_rank_that_saw_no_data_adds_nothing(ranks):
    """With one batch, rank 1 calibrates on nothing: the merge is rank 0's observers, unchanged."""
    reference = _one_process("one_batch")
    for key, value in reference["state"].items():
        assert torch.equal(ranks[1]["one_batch"]["state"][key], value), key


def test_moving_average_is_the_mean_of_the_ranks_averages(ranks):
    per_rank = _per_rank_unsynced("moving_average")
    state = ranks[0]["moving_average"]["state"]
    for key in (k for k in state if k.endswith(("min_val", "max_val"))):
        expected = torch.stack([m.state_dict()[key] for m in per_rank]).double().mean(dim=0).float()
        assert torch.equal(state[key], expected), key


def test_fake_quant_follows_its_merged_observer(ranks):
    per_rank = _per_rank_unsynced("fake_quant")
    state = ranks[0]["fake_quant"]["state"]
    prefixes = sorted({k.rsplit(".", 1)[0] for k in state if k.endswith(".scale")})
    assert prefixes
    for prefix in prefixes:
        for field in ("min_val", "max_val"):
            key = f"{prefix}.activation_post_process.{field}"
            assert torch.equal(state[key], torch.stack([m.state_dict()[key] for m in per_rank]).double().mean(0).float())
        merged = MovingAverageMinMaxObserver(quant_min=0, quant_max=255)
        merged.min_val.copy_(state[f"{prefix}.activation_post_process.min_val"])
        merged.max_val.copy_(state[f"{prefix}.activation_post_process.max_val"])
        scale, zero_point = merged.calculate_qparams()
        assert torch.equal(state[f"{prefix}.scale"], scale) and torch.equal(state[f"{prefix}.zero_point"], zero_point.int())


def test_ranks_with_different_models_all_refuse_naming_the_difference(ranks):
    for r in range(WORLD):
        exc = ranks[r]["different_model"]
        assert isinstance(exc, fxqbn.FxqbnError), exc
        assert "ranks observe different models: observer 0 is 'fxqbn_observer_0' with observes=" in str(exc)
        assert "on rank 0 but 'fxqbn_observer_0' with observes=" in str(exc) and "on rank 1" in str(exc)
        assert str(exc) == str(ranks[0]["different_model"])  # the same sentence on every rank
        exc = ranks[r]["different_bins"]
        assert isinstance(exc, fxqbn.FxqbnError), exc
        assert "with bins=2048 on rank 0" in str(exc) and "bins=1024 on rank 1" in str(exc)


def test_a_second_sync_and_a_model_without_observers_are_refused_on_every_rank(ranks):
    for r in range(WORLD):
        assert isinstance(ranks[r]["second_sync"], fxqbn.FxqbnError)
        assert "were merged already" in str(ranks[r]["second_sync"])
        assert isinstance(ranks[r]["no_observers"], fxqbn.FxqbnError)
        assert "the model has no observers" in str(ranks[r]["no_observers"])


def test_a_rank_passing_the_float_model_is_refused_on_every_rank(ranks):
    for r in range(WORLD):
        exc = ranks[r]["not_a_graph"]
        assert isinstance(exc, fxqbn.FxqbnError), exc
        assert "expects the GraphModule returned by fxqbn.prepare; rank 1 passed ConvPool" in str(exc)


def test_nan_on_one_rank_is_refused_on_every_rank_naming_it(ranks):
    for r in range(WORLD):  # a mean over the ranks that saw data must not drop it silently
        exc = ranks[r]["nan_on_rank_1"]
        assert isinstance(exc, fxqbn.FxqbnError), exc
        assert "observer 'fxqbn_observer_0' saw NaN or infinite values on rank 1" in str(exc)


# -- without processes ----------------------------------------------------------------------------


def test_sync_observers_without_a_process_group_is_refused():
    observed, _ = _prepare("minmax")
    with pytest.raises(fxqbn.FxqbnError, match="needs a torch.distributed process group"):
        fxqbn.sync_observers(observed)


class _Observers(nn.Module):
    """Observers of every merge kind, called in forward (traced as call_module leaves)."""

    def __init__(self) -> None:
        super().__init__()
        self.hist = HistogramObserver(bins=64)
        self.channels = PerChannelMinMaxObserver(ch_axis=1)
        self.idle = MinMaxObserver()  # never called: no data
        self.fq = _FAKE_QUANT()

    def forward(self, x):
        return self.fq(self.channels(self.hist(x))), self.idle(x[:0])


class _LeafObservers(torch.fx.Tracer):
    def is_leaf_module(self, m, name):
        return isinstance(m, (ObserverBase, FakeQuantize)) or super().is_leaf_module(m, name)


@pytest.fixture
def one_rank_group():
    """A default process group of one rank in this process (destroyed after, so no other test sees it)."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1, timeout=PG_TIMEOUT)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_one_rank_sync_leaves_every_observer_as_it_was(one_rank_group):
    root = _Observers()
    gm = torch.fx.GraphModule(root, _LeafObservers().trace(root))
    with torch.no_grad():
        for batch in _batches("skewed", 3):
            gm(batch)
    before = {k: v.clone() for k, v in gm.state_dict().items()}
    assert fxqbn.sync_observers(gm) == distributed.Synced(world_size=1, rank=0, observers=4)
    after = gm.state_dict()
    assert after.keys() == before.keys()
    for key, value in before.items():
        assert torch.equal(after[key], value), key
    assert after["channels.min_val"].shape == (4,)  # per-channel ranges keep their shape


def test_shard_takes_every_nth_batch_from_the_rank():
    ranks = distributed.Ranks(rank=1, world_size=3, backend="gloo")
    assert distributed.shard(list(range(8)), ranks) == [1, 4, 7]
    assert ranks.batches_per_rank(8) == (3, 3, 2)
    assert distributed.shard(list(range(3))) == [0, 1, 2]  # no process group: everything


_shards = st.lists(
    st.lists(st.floats(-1e3, 1e3, allow_nan=False, width=32), min_size=1, max_size=40), min_size=1, max_size=4
)


def _observed(values: list[float], bins: int = 64) -> HistogramObserver:
    observer = HistogramObserver(bins=bins)
    observer(torch.tensor(values))
    return observer


@settings(max_examples=40, deadline=None)
@given(_shards)
def test_rebinning_keeps_every_count_within_two_bins_of_its_place(shards):
    """Each shard's histogram re-binned onto the common range and summed: the merge sync_observers does."""
    observers = [_observed(values) for values in shards]
    low = torch.stack([o.min_val for o in observers]).min()
    high = torch.stack([o.max_val for o in observers]).max()
    merged = sum(distributed.rebinned_histogram(o, low, high) for o in observers)
    everything = torch.tensor([v for values in shards for v in values])
    assert torch.isclose(merged.sum(), torch.tensor(float(everything.numel())), rtol=1e-5)
    if low == high:
        return
    exact = torch.histc(everything, bins=64, min=float(low), max=float(high)).cumsum(0)
    ours = merged.cumsum(0)
    slack = 1e-3 * everything.numel()
    for k in range(64):  # the merged CDF at bin k lies between the exact CDF two bins either side
        below = exact[k - 2] if k >= 2 else 0.0
        assert below - slack <= ours[k] <= exact[min(k + 2, 63)] + slack, k


@settings(max_examples=20, deadline=None)
@given(_shards)
def test_shards_over_the_same_range_merge_exactly_into_one_process(shards):
    ends = [-3.0, 5.0]  # every shard spans the same range: no re-binning anywhere
    observers = [_observed(ends + values) for values in ([min(max(v, -3.0), 5.0) for v in values] for values in shards)]
    alone = HistogramObserver(bins=64)
    for values in shards:
        alone(torch.tensor(ends + [min(max(v, -3.0), 5.0) for v in values]))
    low, high = alone.min_val, alone.max_val
    merged = distributed.rebinned_histogram(observers[0], low, high)
    for observer in observers[1:]:
        merged = merged + distributed.rebinned_histogram(observer, low, high)
    assert torch.equal(merged, alone.histogram)


# -- the command under torchrun ------------------------------------------------------------------


def _qparams_rows(document: dict) -> list[dict]:
    fields = ("node", "input_scale", "input_zero_point", "output_scale", "output_zero_point")
    return [{k: row[k] for k in fields} for row in document["report"]["rows"]]


def test_convert_under_torchrun_rank_0_reports_and_writes_once(tmp_path, capsys, monkeypatch):
    gen = torch.Generator().manual_seed(0)
    torch.save([torch.randn(2, 3, 32, 32, generator=gen) for _ in range(5)], tmp_path / "calib.pt")
    args = ["convert", "--calib", "calib.pt", "--observer", "minmax", "--format", "json"]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(WORLD),
               "-m", "fxqbn", *args, "--out", "q.pt", "--report", "r.json"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=JOIN_TIMEOUT_S, env=env)
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)  # one report on stdout: rank 0's
    assert document["calibration"]["ranks"] == {"world_size": 2, "backend": "gloo", "batches_per_rank": [3, 2]}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib.pt", "q.pt", "r.json"]
    assert json.loads((tmp_path / "r.json").read_text()) == document
    # MinMax over 2 ranks: the qparams of one process on all 5 batches
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks ran (OMP_NUM_THREADS=1): the float convs between BNs round alike
    try:
        assert cli.main(args) == 0
    finally:
        torch.set_num_threads(threads)
    alone = json.loads(capsys.readouterr().out)
    assert "ranks" not in alone["calibration"]
    assert _qparams_rows(document) == _qparams_rows(alone) and len(_qparams_rows(alone)) == 21


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("env, shown", [({}, True), ({"RANK": "0"}, True), ({"RANK": "1"}, False)])
def test_progress_shows_on_rank_0_only(monkeypatch, env, shown):
    monkeypatch.delenv("RANK", raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(sys, "stderr", _Terminal())
    progress = Progress.for_terminal(quiet=False)
    with progress.step("tracing"):
        pass
    assert progress.enabled is shown and sys.stderr.getvalue().startswith("tracing...") is shown
