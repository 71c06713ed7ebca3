"""The shortcuts convert takes on large graphs give what the plain ways give: BN statistics checked
and copied together (``fxqbn.nn.own_many``) and observers read together (``fxqbn.qparams.read_many``)."""


import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn
from torch.ao.quantization import HistogramObserver, MinMaxObserver

from fxqbn.backends import BnTensors
from fxqbn.errors import FxqbnError
from fxqbn.nn import _float32_copy, check_many, check_statistics, own_many
from fxqbn.qparams import read_many, read_observer


def _bn(gen: torch.Generator, channels: int, dtype: torch.dtype, affine: bool, bias_only: bool = False) -> BnTensors:
    def t() -> torch.Tensor:
        return torch.randn(channels, generator=gen).to(dtype)

    weight = None if not affine or bias_only else t()
    bias = t() if affine else None
    return BnTensors(t(), t().abs(), weight, bias, 1e-5, 0.1)


def _many(seed: int, n: int) -> list[tuple[str, BnTensors]]:
    gen = torch.Generator().manual_seed(seed)
    dtypes = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
    return [
        (f"bn{i}", _bn(gen, 1 + i % 5, dtypes[i % 4], affine=i % 3 != 1, bias_only=i % 7 == 6))
        for i in range(n)
    ]


def _one_by_one(b: BnTensors) -> tuple:
    weight = torch.ones_like(b.running_mean) if b.weight is None and b.bias is not None else b.weight
    return tuple(None if t is None else _float32_copy(t) for t in (b.running_mean, b.running_var, weight, b.bias))


def test_own_many_copies_as_one_by_one_into_storage_of_their_own():
    items = _many(0, 40)
    owned = own_many(items)
    storages = set()
    for (_, b), got, want in zip(items, owned, [_one_by_one(b) for _, b in items]):
        for g, w, original in zip(got, want, (b.running_mean, b.running_var, b.weight, b.bias)):
            assert (g is None) == (w is None)
            if g is None:
                continue
            assert g.dtype == torch.float32 and g.is_contiguous() and torch.equal(g, w)
            assert g.untyped_storage().nbytes() == g.numel() * 4  # a storage of its own, not a view of a shared one
            storages.add(g.untyped_storage().data_ptr())
            if original is not None:
                assert g.untyped_storage().data_ptr() != original.untyped_storage().data_ptr()
    assert len(storages) == sum(t is not None for tensors in owned for t in tensors)


def test_own_many_takes_uncommon_layouts_one_by_one():
    gen = torch.Generator().manual_seed(1)
    strided = torch.randn(8, generator=gen)[::2]  # not contiguous
    expanded = torch.ones(1).expand(4)
    items = [("a", BnTensors(strided, expanded.abs(), None, None, 1e-5, None)), ("b", _bn(gen, 4, torch.float32, True))]
    for (_, b), got in zip(items, own_many(items)):
        for g, w in zip(got, _one_by_one(b)):
            assert (g is None and w is None) or (g.is_contiguous() and torch.equal(g, w))


CORRUPTIONS = {
    "nan mean": lambda b: b.running_mean.__setitem__(0, float("nan")),
    "inf weight": lambda b: b.weight is not None and b.weight.__setitem__(-1, float("inf")),
    "inf bias": lambda b: b.bias is not None and b.bias.__setitem__(0, float("-inf")),
    "negative var": lambda b: b.running_var.__setitem__(0, -1.0),
    "nan var": lambda b: b.running_var.__setitem__(-1, float("nan")),
    "var + eps zero": "eps0",
    "bad eps": "eps-nan",
    "wrong shape": "shape",
}


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**16), n=st.integers(1, 12), where=st.data(), how=st.sampled_from(sorted(CORRUPTIONS)))
def test_check_and_own_many_name_the_first_offender_as_check_statistics(seed, n, where, how):
    items = _many(seed, n)
    k = where.draw(st.integers(0, n - 1))
    name, b = items[k]
    corrupt = CORRUPTIONS[how]
    if corrupt == "eps0":
        b.running_var.zero_()
        b = BnTensors(b.running_mean, b.running_var, b.weight, b.bias, 0.0, None)
    elif corrupt == "eps-nan":
        b = BnTensors(b.running_mean, b.running_var, b.weight, b.bias, float("nan"), None)
    elif corrupt == "shape":
        b = BnTensors(b.running_mean, b.running_var.repeat(2), b.weight, b.bias, b.eps, None)
    else:
        corrupt(b)
    items[k] = (name, b)
    expected = None
    for other_name, other in items:
        try:
            check_statistics(other_name, other.running_mean, other.running_var, other.weight, other.bias, other.eps)
        except FxqbnError as exc:
            expected = str(exc)
            break
    for run in (check_many, own_many):
        if expected is None:  # this corruption was a no-op (e.g. no weight to corrupt)
            run(items)
            continue
        with pytest.raises(FxqbnError) as caught:
            run(items)
        assert str(caught.value) == expected


def test_read_many_marks_observers_that_saw_no_data():
    gen = torch.Generator().manual_seed(2)
    observers = {"minmax_seen": MinMaxObserver(), "minmax_idle": MinMaxObserver(),
                 "hist_seen": HistogramObserver(), "hist_idle": HistogramObserver()}
    for name in ("minmax_seen", "hist_seen"):
        observers[name](torch.randn(64, generator=gen))
    readings = read_many(observers)
    assert readings["minmax_idle"] is None and readings["hist_idle"] is None
    for name in ("minmax_seen", "hist_seen"):
        assert readings[name] == read_observer(observers[name])


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("backend", ["native", "fused"])
def test_converted_modules_keep_the_float_models_training_flags(backend, inplace):
    import fxqbn

    model = nn.Sequential(nn.Sequential(nn.BatchNorm2d(3), nn.ReLU()), nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)))
    model.eval()
    model[1].train()  # a container (and its conv) in training mode; its BN in eval
    model[1][1].eval()
    x = torch.randn(2, 3, 4, 4)
    observed = fxqbn.prepare(model, (x,), MinMaxObserver)
    with torch.no_grad():
        observed(x)
    q = fxqbn.convert(observed, backend=backend, inplace=inplace)
    flags = {name: m.training for name, m in q.named_modules()}
    io = {f"{bn}{part}": False for bn in ("0.0", "1.1") for part in ("", ".quantize", ".bn", ".dequantize")}  # FloatIOs: the BN's flag
    assert {name: flag for name, flag in flags.items() if not name.startswith("fxqbn_")} == {
        "": False, "0": False, "1": True, "1.0": True, **io}  # 0.1, the ReLU, fused into 0.0
    assert not any(flag for name, flag in flags.items() if name.startswith("fxqbn_"))  # boundaries: the root's flag


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("backend", ["native", "fused"])
def test_boundary_modules_between_bns_take_the_roots_flag(backend, inplace):
    """BN -> BN: the quantize before and the dequantize after are modules of the root's own."""
    import fxqbn

    model = nn.Sequential(nn.BatchNorm2d(3), nn.BatchNorm2d(3)).eval()
    x = torch.randn(2, 3, 4, 4)
    observed = fxqbn.prepare(model, (x,), MinMaxObserver)
    with torch.no_grad():
        observed(x)
    q = fxqbn.convert(observed, backend=backend, inplace=inplace)
    boundaries = {name: m.training for name, m in q.named_modules() if name.startswith("fxqbn_")}
    assert boundaries and not any(boundaries.values())


def _storages(module: nn.Module) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in (*module.parameters(), *module.buffers())}


@pytest.mark.parametrize("hooked", [False, True])
def test_owned_copies_copy_as_deepcopy_does_sharing_what_the_originals_share(hooked):
    from fxqbn.copying import owned_copies

    torch.manual_seed(0)
    shared = nn.Linear(3, 3)
    block = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3), nn.ReLU())
    block[1].running_mean.uniform_()
    frozen = nn.Linear(3, 3).requires_grad_(False)
    values = [block, shared, nn.Sequential(shared, nn.Identity()), frozen, frozen.weight, torch.ones(2)]
    if hooked:  # a registered hook is copied too
        block[0].register_forward_hook(lambda *args: None)
    copies = owned_copies(values)
    for original, copied in zip(values, copies):
        assert type(copied) is type(original) and copied is not original
        if isinstance(original, nn.Module):
            assert _storages(copied).isdisjoint(_storages(original))
            assert all(torch.equal(a, b) for a, b in zip(original.state_dict().values(), copied.state_dict().values()))
            assert [p.requires_grad for p in copied.parameters()] == [p.requires_grad for p in original.parameters()]
            assert vars(copied).keys() == vars(original).keys()
        else:
            assert torch.equal(copied, original) and copied.untyped_storage().data_ptr() != original.untyped_storage().data_ptr()
    assert copies[2][0] is copies[1]  # shared stays shared
    assert copies[4] is copies[3].weight and isinstance(copies[4], nn.Parameter)
    assert bool(copies[0][0]._forward_hooks) == hooked
    x = torch.randn(2, 3, 4, 4)
    block.eval(), copies[0].eval()
    assert torch.equal(copies[0](x), block(x))


def test_inplace_rewrites_the_observed_model_with_copies_of_its_float_parts_and_drops_its_observers():
    import fxqbn

    model = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3), nn.ReLU(), nn.Conv2d(3, 3, 1)).eval()
    x = torch.randn(2, 3, 4, 4)
    observed = fxqbn.prepare(model, (x,), MinMaxObserver)
    with torch.no_grad():
        observed(x)
    conv = observed.get_submodule("0")
    expected = fxqbn.convert(observed)(x)
    q = fxqbn.convert(observed, inplace=True)
    assert q is observed and q.get_submodule("0") is not conv and conv is not model[0]
    assert torch.equal(q.get_submodule("0").weight, conv.weight)
    assert not [name for name, _ in q.named_modules() if "observer" in name]
    assert torch.equal(q(x), expected)


def test_owned_copies_detach_a_non_leaf_tensor():
    """A tensor with autograd history (a forward's cached result) is copied detached, not refused."""
    from fxqbn.copying import owned_copies

    weight = torch.ones(3, requires_grad=True)
    cached = weight * 2
    holder = nn.Module()
    holder.cache = cached
    copy_of_tensor, copy_of_module = owned_copies([cached, holder])
    assert torch.equal(copy_of_tensor, cached) and copy_of_tensor.is_leaf and not copy_of_tensor.requires_grad
    assert torch.equal(copy_of_module.cache, cached) and copy_of_module.cache.is_leaf
