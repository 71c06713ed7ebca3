"""Calibrate on several processes: merge an observed model's observers over torch.distributed ranks.

    observed = fxqbn.prepare(model, example)          # on every rank, the same model and qconfig
    for batch in fxqbn.distributed.shard(batches):    # rank r takes batches r, r + N, ...
        observed(batch)
    fxqbn.sync_observers(observed)                    # every rank now holds the same observers
    quantized = fxqbn.convert(observed)

How each observer merges is the table ``MERGES``. Every rank gathers every rank's state and reduces
it locally in rank order, so the result has the same bits on every rank. A rank whose observer saw
no data adds nothing to it. Before any of that, the ranks swap a description of their observers
and all refuse, naming the first difference, when the models differ (no rank is left waiting).
"""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass
from collections.abc import Sequence
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import fx, nn
from torch.ao.quantization.observer import (
    FixedQParamsObserver,
    HistogramObserver,
    MinMaxObserver,
    MovingAverageMinMaxObserver,
    MovingAveragePerChannelMinMaxObserver,
    NoopObserver,
    PerChannelMinMaxObserver,
    PlaceholderObserver,
    ReuseInputObserver,
)

from .errors import FxqbnError
from .passes.boundaries import observer_nodes
from .passes.records import observer_users
from .qparams import observer_has_data, range_holder
from .state import PREPARED_KEY, attached

__all__ = ["MERGES", "Ranks", "Synced", "sync_observers", "rebinned_histogram", "is_launched", "join_launched", "shard"]

T = TypeVar("T")

# How each observer kind merges over ranks; looked up along the observer's class hierarchy.
# A FakeQuantize merges its activation_post_process, then recomputes its scale and zero point.
MERGES: dict[type, str] = {
    # range: min of mins, max of maxes; each rank's histogram moved onto it by the observer's own
    # re-binning (rebinned_histogram), then summed
    HistogramObserver: "histogram",
    MovingAverageMinMaxObserver: "mean",  # the mean of the calibrated ranks' running averages
    MovingAveragePerChannelMinMaxObserver: "mean",  # the same, channel by channel
    MinMaxObserver: "min_max",  # min of mins, max of maxes: one process over all the batches, exactly
    PerChannelMinMaxObserver: "min_max",  # the same, channel by channel
    FixedQParamsObserver: "none",  # holds nothing learnt from data
    PlaceholderObserver: "none",
    NoopObserver: "none",
    ReuseInputObserver: "none",
}
_RANGED = ("min_max", "mean", "histogram")
SYNCED_KEY = "fxqbn_synced"  # in observed.meta once sync_observers merged its observers


@dataclass(frozen=True)
class Synced:
    """What ``sync_observers`` did."""

    world_size: int  # ranks in the group
    rank: int  # this process's rank in the group
    observers: int  # observers merged (each shared module once)


@dataclass(frozen=True)
class _Entry:
    """One observer of the observed model, as the merge sees it."""

    node: str  # the observer node's name
    observer: nn.Module  # the module holding the state (a FakeQuantize's activation_post_process)
    fake_quant: nn.Module | None  # the FakeQuantize whose scale/zero_point follow the state; else None
    merge: str  # a MERGES value, or "" when fxqbn cannot merge this kind


def _merge_of(observer: Any) -> str:
    for cls in type(observer).__mro__:
        if cls in MERGES:
            return MERGES[cls]
    return ""


def _entries(observed: fx.GraphModule) -> list[_Entry]:
    """The observers of ``observed`` in graph order (torch.ao's and fxqbn's), each module once."""
    modules = dict(observed.named_modules(remove_duplicate=False))
    found = observer_nodes(observed)
    state = attached(observed, PREPARED_KEY)
    ours = observer_users(state.patterns) if state else {}
    entries, seen = [], set()
    for node in observed.graph.nodes:
        if node.name not in found and node.name not in ours:
            continue
        module = found.get(node.name) or modules[str(node.target)]
        if id(module) in seen:
            continue
        seen.add(id(module))
        holder = range_holder(module)
        entries.append(_Entry(node.name, holder, module if holder is not module else None, _merge_of(holder)))
    return entries


def _bn_users(observed: fx.GraphModule) -> dict[str, list[str]]:
    """Observer node name -> the BatchNorm modules whose pattern uses it (fxqbn-prepared graphs)."""
    state = attached(observed, PREPARED_KEY)
    return observer_users(state.patterns) if state else {}


def _signature(observed: fx.GraphModule, entries: Sequence[_Entry]) -> list[dict[str, str]]:
    """What must agree across ranks, one row per observer: where it is and how it is configured."""
    nodes = {node.name: node for node in observed.graph.nodes}
    users = _bn_users(observed)
    rows = []
    for entry in entries:
        obs = entry.observer
        arg = nodes[entry.node].args[0] if nodes[entry.node].args else None
        row = {
            "observer": entry.node,
            "observes": arg.name if isinstance(arg, fx.Node) else repr(arg),
            "BatchNorm": ", ".join(users.get(entry.node, [])),
            "type": type(entry.fake_quant or obs).__name__ + (f"({type(obs).__name__})" if entry.fake_quant else ""),
        }
        for field in ("dtype", "qscheme", "quant_min", "quant_max", "bins", "averaging_constant", "ch_axis", "eps"):
            if hasattr(obs, field):
                value = getattr(obs, field)
                row[field] = repr(value.item() if isinstance(value, torch.Tensor) and value.numel() == 1 else value)
        rows.append(row)
    return rows


def _first_difference(signatures: Sequence[list[dict[str, str]]]) -> str | None:
    """A sentence naming the first observer where some rank differs from rank 0, or None."""
    reference = signatures[0]
    for rank, rows in enumerate(signatures[1:], start=1):
        for i in range(max(len(reference), len(rows))):
            ours = reference[i] if i < len(reference) else None
            theirs = rows[i] if i < len(rows) else None
            if ours == theirs:
                continue
            if ours is None or theirs is None:
                row, has, lacks = (ours, 0, rank) if theirs is None else (theirs, rank, 0)
                return (f"rank {has} has observer '{row['observer']}' ({row['type']} on {row['observes']}) "
                        f"where rank {lacks} has no more observers")
            field = next(k for k in dict.fromkeys([*ours, *theirs]) if ours.get(k) != theirs.get(k))
            return (f"observer {i} is '{ours['observer']}' with {field}={ours.get(field)} on rank 0 but "
                    f"'{theirs['observer']}' with {field}={theirs.get(field)} on rank {rank}")
    return None


def _local_state(entries: Sequence[_Entry]) -> list[tuple[bool, int]]:
    """Per observer: (saw data on this rank, number of range values)."""
    state = []
    for entry in entries:
        lo = getattr(entry.observer, "min_val", None)
        has = entry.merge in _RANGED and isinstance(lo, torch.Tensor) and observer_has_data(entry.observer)
        state.append((has, lo.numel() if has else 0))
    return state


def _check_agreement(entries: Sequence[_Entry], gathered: Sequence[tuple[Any, Any, bool]]) -> list[int]:
    """Refuse (on every rank alike) differing models, models merged before, and unmergeable observers;
    the range size of each observer."""
    difference = _first_difference([signature for signature, _, _ in gathered])
    if difference is not None:
        raise FxqbnError(f"fxqbn.sync_observers: the ranks observe different models: {difference}. "
                         "Prepare the same model with the same qconfig on every rank")
    merged_before = [rank for rank, (_, _, synced) in enumerate(gathered) if synced]
    if merged_before:
        raise FxqbnError(f"fxqbn.sync_observers: the observers on rank {merged_before[0]} were merged already; merging "
                         "again would count the batches of the first merge again. Sync once, after all the calibration")
    if not entries:
        raise FxqbnError("fxqbn.sync_observers: the model has no observers: pass the GraphModule returned by "
                         "fxqbn.prepare (or torch.ao's prepare_fx), before fxqbn.convert")
    sizes = []
    for i, entry in enumerate(entries):
        if not entry.merge:
            raise FxqbnError(
                f"fxqbn.sync_observers cannot merge observer '{entry.node}' ({type(entry.observer).__name__}): "
                f"it merges {', '.join(sorted({c.__name__ for c in MERGES}))} and FakeQuantize around them")
        counts = {state[i][1] for _, state, _ in gathered if state[i][0]}
        if len(counts) > 1:
            raise FxqbnError(f"fxqbn.sync_observers: observer '{entry.node}' holds {sorted(counts)} channels "
                             "on different ranks; feed every rank inputs of the same channel count")
        sizes.append(counts.pop() if counts else 0)
    return sizes


def _gather(tensor: torch.Tensor, world_size: int, group: Any) -> list[torch.Tensor]:
    parts = [torch.empty_like(tensor) for _ in range(world_size)]
    dist.all_gather(parts, tensor, group=group)
    return parts


def _pack_ranges(entries: Sequence[_Entry], sizes: Sequence[int], local: Sequence[tuple[bool, int]]) -> torch.Tensor:
    """This rank's min and max values of every ranged observer, flat, float64; +inf/-inf where it saw no data."""
    parts = []
    for entry, size, (has, _) in zip(entries, sizes, local):
        if entry.merge not in _RANGED:
            continue
        obs = entry.observer
        if has:
            parts += [obs.min_val.detach().reshape(-1).double(), obs.max_val.detach().reshape(-1).double()]
        else:
            parts += [torch.full((size,), float("inf"), dtype=torch.float64, device=obs.min_val.device),
                      torch.full((size,), float("-inf"), dtype=torch.float64, device=obs.min_val.device)]
    return torch.cat(parts)


def _reduce_range(merge: str, lows: torch.Tensor, highs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(ranks that saw data x values) ranges -> the merged range (a NaN stays NaN)."""
    if merge == "mean":
        return lows.mean(dim=0), highs.mean(dim=0)
    return lows.min(dim=0).values, highs.max(dim=0).values


def _set(buffer: torch.Tensor, value: torch.Tensor) -> None:
    with torch.no_grad():
        buffer.resize_(value.shape).copy_(value)


def _merge_ranges(entries, sizes, seen_by: list[list[bool]], ranks: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
    """The merged (min, max) of every observer (None: not ranged, or no rank saw data); ``seen_by[i][r]``:
    rank r's observer i saw data. Refuses, naming the observer and the rank, a range that is not finite."""
    merged, offset = [], 0
    for i, (entry, size) in enumerate(zip(entries, sizes)):
        if entry.merge not in _RANGED:
            merged.append(None)
            continue
        seen = [r for r in range(len(ranks)) if seen_by[i][r]]
        lows = torch.stack([ranks[r][offset:offset + size] for r in seen]) if seen else None
        highs = torch.stack([ranks[r][offset + size:offset + 2 * size] for r in seen]) if seen else None
        offset += 2 * size
        if lows is None or size == 0:
            merged.append(None)
            continue
        bad = [r for r, lo, hi in zip(seen, lows, highs) if not bool(torch.isfinite(lo).all() and torch.isfinite(hi).all())]
        if bad:
            raise FxqbnError(f"fxqbn.sync_observers: observer '{entry.node}' saw NaN or infinite values on rank {bad[0]}: "
                             "check that rank's calibration batches")
        merged.append(_reduce_range(entry.merge, lows, highs))
    return merged


def rebinned_histogram(observer: HistogramObserver, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """The observer's histogram moved onto the wider range [low, high] (pure).

    It is the re-binning the observer itself does when a batch widens its range
    (``_combine_histograms`` with an empty update): counts are kept, split over the new bins.
    """
    if not observer_has_data(observer):
        return torch.zeros_like(observer.histogram)
    empty = torch.zeros_like(observer.histogram)
    return observer._combine_histograms(observer.histogram, observer.min_val, observer.max_val, empty, low, high)


def _exchange(observed: Any, world_size: int, group: Any) -> tuple[list[_Entry], list[tuple[bool, int]], list[Any]]:
    """This rank's observers and local state, and every rank's (signature, local state, merged before).

    A rank that passed something other than a GraphModule still takes part, so that every rank
    refuses it alike instead of waiting for it.
    """
    graph = isinstance(observed, fx.GraphModule)
    entries = _entries(observed) if graph else []
    local = _local_state(entries)
    mine = (None if graph else type(observed).__name__, _signature(observed, entries) if graph else [], local,
            graph and SYNCED_KEY in observed.meta)
    gathered: list[Any] = [None] * world_size
    dist.all_gather_object(gathered, mine, group=group)
    wrong = [(r, kind) for r, (kind, *_) in enumerate(gathered) if kind is not None]
    if wrong:
        raise FxqbnError(f"fxqbn.sync_observers expects the GraphModule returned by fxqbn.prepare; rank {wrong[0][0]} "
                         f"passed {wrong[0][1]}")
    return entries, local, [rest for _, *rest in gathered]


def _merge_histograms(entries: Sequence[_Entry], ranges: Sequence[Any], world_size: int, group: Any) -> None:
    """Every HistogramObserver's histogram: the ranks' histograms re-binned onto the merged range, summed in rank order."""
    histograms = [i for i, e in enumerate(entries) if e.merge == "histogram"]
    if not histograms:
        return
    mine = torch.cat([rebinned_histogram(entries[i].observer, *_as_buffers(entries[i], ranges[i])) for i in histograms])
    summed = _sum_in_rank_order(_gather(mine, world_size, group))
    for i, part in zip(histograms, summed.split([entries[i].observer.bins for i in histograms])):
        if ranges[i] is not None:
            _set(entries[i].observer.histogram, part)


def sync_observers(observed: fx.GraphModule, group: Any = None) -> Synced:
    """Merge every observer of ``observed`` over the ranks of ``group`` (default: the default group).

    Call it on every rank, after each rank ran its calibration batches, on the GraphModule from
    ``fxqbn.prepare`` or torch.ao's ``prepare_fx``. Afterwards every rank holds the same observer
    state (see ``MERGES``), and ``fxqbn.convert`` gives the same model on every rank.

    Raises FxqbnError when no process group is initialized; and, on every rank alike (no rank is
    left waiting), when a rank passed no GraphModule, when the ranks' models or observers differ
    (naming the first difference), when they were merged before (that would count those batches
    twice), for an observer it cannot merge, or for a NaN or infinite range (naming the rank).
    """
    if not (dist.is_available() and dist.is_initialized()):
        raise FxqbnError("fxqbn.sync_observers needs a torch.distributed process group: call "
                         "torch.distributed.init_process_group first (torchrun sets its environment)")
    world_size, rank = dist.get_world_size(group), dist.get_rank(group)
    entries, local, gathered = _exchange(observed, world_size, group)
    sizes = _check_agreement(entries, gathered)
    seen_by = [[state[i][0] for _, state, _ in gathered] for i in range(len(entries))]
    ranged = any(entry.merge in _RANGED and size for entry, size in zip(entries, sizes))
    packed = _gather(_pack_ranges(entries, sizes, local), world_size, group) if ranged else []
    ranges = _merge_ranges(entries, sizes, seen_by, packed)
    _merge_histograms(entries, ranges, world_size, group)
    for entry, merged in zip(entries, ranges):
        if merged is not None:
            _store(entry, *_as_buffers(entry, merged))
    observed.meta[SYNCED_KEY] = world_size
    return Synced(world_size=world_size, rank=rank, observers=len(entries))


def _as_buffers(entry: _Entry, merged: tuple[torch.Tensor, torch.Tensor] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The merged range in the observer's dtype, device and shape (its own range when None)."""
    obs = entry.observer
    if merged is None:
        return obs.min_val, obs.max_val
    low, high = merged
    shape = low.shape if isinstance(obs, PerChannelMinMaxObserver) else ()
    return (low.to(obs.min_val.dtype).to(obs.min_val.device).reshape(shape),
            high.to(obs.max_val.dtype).to(obs.max_val.device).reshape(shape))


def _sum_in_rank_order(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    total = parts[0].clone()
    for part in parts[1:]:
        total += part
    return total


def _store(entry: _Entry, low: torch.Tensor, high: torch.Tensor) -> None:
    """Write the merged range into the observer; a FakeQuantize's scale and zero point follow it."""
    _set(entry.observer.min_val, low)
    _set(entry.observer.max_val, high)
    with torch.no_grad():
        fq = entry.fake_quant
        if fq is not None and isinstance(getattr(fq, "scale", None), torch.Tensor):
            scale, zero_point = fq.calculate_qparams()
            fq.scale.resize_(scale.shape).copy_(scale.to(fq.scale.device))
            fq.zero_point.resize_(zero_point.shape).copy_(zero_point.to(fq.zero_point.device))


# -- under torchrun ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Ranks:
    """This process's place in the default process group."""

    rank: int
    world_size: int
    backend: str

    def batches_per_rank(self, n: int) -> tuple[int, ...]:
        """How many of ``n`` batches ``shard`` gives each rank."""
        return tuple(len(range(r, n, self.world_size)) for r in range(self.world_size))

    def describe(self, n: int) -> str:
        """One line for the report: the world size and the batches each rank calibrated on."""
        counts = ", ".join(map(str, self.batches_per_rank(n)))
        ranks = f"{self.world_size} rank{'s' if self.world_size > 1 else ''}"
        return f"split over {ranks} ({self.backend}): {counts} batches per rank, merged with fxqbn.sync_observers"

    def to_dict(self, n: int) -> dict[str, Any]:
        return {"world_size": self.world_size, "backend": self.backend, "batches_per_rank": list(self.batches_per_rank(n))}


def is_launched() -> bool:
    """Whether torchrun (``torch.distributed.run``) started this process: it sets RANK and WORLD_SIZE."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def join_launched(backend: str = "gloo") -> Ranks | None:
    """Join the default process group torchrun describes (left at exit); None when not launched.

    A default group that is already initialized is used as it is.
    """
    if not dist.is_available() or not (is_launched() or dist.is_initialized()):
        return None
    if not dist.is_initialized():
        try:
            dist.init_process_group(backend)
        except (RuntimeError, ValueError) as exc:
            raise FxqbnError(f"cannot join the torchrun process group ({backend}): {exc}") from exc
        atexit.register(dist.destroy_process_group)
    return Ranks(dist.get_rank(), dist.get_world_size(), str(dist.get_backend()))


def shard(items: Sequence[T], ranks: Ranks | None = None) -> list[T]:
    """The items this rank calibrates with: rank r of N takes items r, r + N, r + 2N, ...

    ``ranks`` defaults to the default group's (all items when there is none).
    """
    if ranks is None:
        if not (dist.is_available() and dist.is_initialized()):
            return list(items)
        ranks = Ranks(dist.get_rank(), dist.get_world_size(), str(dist.get_backend()))
    return list(items[ranks.rank::ranks.world_size])
