"""``BatchNormQuantizer``: a torchao PT2E ``Quantizer`` that makes standalone BatchNorms int8.

No torchao quantizer annotates a standalone BN (X86InductorQuantizer's op lists have no batch_norm;
XNNPACK's patterns are conv-BN only), so the BNs that cannot fold stay float in PT2E graphs. This one
annotates every BN pattern fxqbn quantizes (``passes.registry``: a BN of any spelling and dim, then
Identity / eval Dropout, then ReLU, ReLU6 or a constant clamp of the rules) on its input and output,
with the activation spec the graph's other quantizer uses next to it, so that where the producer is
already quantized one quantize serves both (torchao shares a quantize only between equal specs).
Compose it after your quantizer::

    quantizer = ComposableQuantizer([X86InductorQuantizer().set_global(config), BatchNormQuantizer()])

It cannot correct torchao's fold: ``torchao``'s ``prepare_pt2e`` folds every conv -> BN before any
quantizer runs, also where the conv's output has other users, which changes the model's outputs.
Use ``fxqbn.pt2e.prepare_pt2e``, which folds only where that keeps the outputs, and composes this
quantizer for you (``bn="int8"``).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

import torch
from torch import fx
from torchao.quantization.pt2e.observer import HistogramObserver
from torchao.quantization.pt2e.quantizer import QuantizationAnnotation, QuantizationSpec, Quantizer

from fxqbn.passes import find_patterns
from fxqbn.passes.boundaries import PREPARED
from fxqbn.passes.records import Match

__all__ = ["BatchNormQuantizer", "DEFAULT_SPEC", "annotated_bns"]

KEY = "quantization_annotation"  # torchao's Q_ANNOTATION_KEY
# X86InductorQuantizer's default activation spec: what a BN gets when nothing in the graph is quantized.
DEFAULT_SPEC = QuantizationSpec(
    dtype=torch.uint8, quant_min=0, quant_max=255, qscheme=torch.per_tensor_affine, is_dynamic=False,
    observer_or_fake_quant_ctr=HistogramObserver.with_args(eps=2**-12),
)
_SCHEMES = (torch.per_tensor_affine, torch.per_tensor_symmetric)


def _usable(spec: object) -> bool:
    """A static 8-bit per-tensor activation spec: what an int8 BN reads and writes."""
    return (isinstance(spec, QuantizationSpec) and spec.dtype in (torch.uint8, torch.int8) and spec.qscheme in _SCHEMES
            and not spec.is_dynamic)


def _annotation(node: fx.Node) -> QuantizationAnnotation | None:
    found = node.meta.get(KEY)
    return found if isinstance(found, QuantizationAnnotation) and found._annotated else None


def _spec_at(value: fx.Node) -> QuantizationSpec | None:
    """The spec another quantizer gave ``value``: its producer's output spec, or a reader's input spec for it."""
    made = _annotation(value)
    if made is not None and _usable(made.output_qspec):
        return made.output_qspec
    for user in value.users:
        read = _annotation(user)
        if read is not None and _usable(read.input_qspec_map.get(value)):
            return read.input_qspec_map[value]
    return None


def _common_spec(graph: fx.Graph) -> QuantizationSpec | None:
    """The activation spec used most often in the graph's annotations (inputs and outputs)."""
    seen: Counter = Counter()
    specs: dict[int, QuantizationSpec] = {}
    for node in graph.nodes:
        found = _annotation(node)
        if found is None:
            continue
        for spec in (*found.input_qspec_map.values(), found.output_qspec):
            if _usable(spec) and spec.observer_or_fake_quant_ctr is not None:
                seen[id(spec)] += 1
                specs[id(spec)] = spec
    return specs[seen.most_common(1)[0][0]] if seen else None


def annotated_bns(graph: fx.Graph) -> set[str]:
    """Names of the BN nodes a BatchNormQuantizer annotated."""
    return {n.name for n in graph.nodes if n.meta.get("fxqbn_bn_quantizer")}


class BatchNormQuantizer(Quantizer):
    """Annotates each standalone BN pattern's input and output for int8 (see the module docstring).

    It cannot correct torchao's fold: torchao's own ``prepare_pt2e`` folds every conv -> BN before any
    quantizer runs, also where that changes the model. Use ``fxqbn.pt2e.prepare_pt2e``, which folds
    only where the outputs keep and composes this quantizer itself (``bn="int8"``).

    Args:
        spec: the activation spec of every BN's input and output; ``None`` (default): the spec the
            graph's other quantizer gave the BN's producer or readers, else the one it uses most, else
            X86InductorQuantizer's default (uint8, per tensor, histogram observer).
        skip: BN names (the module owning the statistics, e.g. ``"features.norm0"``) to leave float.
    """

    def __init__(self, spec: QuantizationSpec | None = None, skip: Iterable[str] = ()) -> None:
        super().__init__()
        if spec is not None and not _usable(spec):
            raise ValueError(f"BatchNormQuantizer needs a static 8-bit per-tensor activation spec, got {spec}")
        self.spec, self.skip = spec, frozenset(skip)

    def annotate(self, model: fx.GraphModule) -> fx.GraphModule:
        common = self.spec or _common_spec(model.graph) or DEFAULT_SPEC
        nodes = {n.name: n for n in model.graph.nodes}
        for match in find_patterns(model.graph, model, PREPARED).matches:
            if match.module not in self.skip:
                self._annotate(nodes, match, common)
        return model

    def _annotate(self, nodes: dict[str, fx.Node], match: Match, common: QuantizationSpec) -> None:
        bn, value = nodes[match.bn.node], nodes[match.bn.input]
        chain = [nodes[name] for name in match.chain]
        end = chain[-1] if chain else nodes[match.bn.output]
        pattern = [bn, *(n for n in (nodes[match.bn.output], *chain) if n is not bn)]
        if any(_annotation(n) is not None for n in pattern):
            return  # another quantizer took this BN
        spec_in = self.spec or _spec_at(value) or common
        spec_out = self.spec or next((s for u in end.users for s in [_read_spec(u, end)] if s is not None), spec_in)
        for node in pattern:
            node.meta[KEY] = QuantizationAnnotation(_annotated=True)
        bn.meta[KEY].input_qspec_map[value] = spec_in
        end.meta[KEY].output_qspec = spec_out
        bn.meta["fxqbn_bn_quantizer"] = True

    def validate(self, model: fx.GraphModule) -> None:
        pass


def _read_spec(user: fx.Node, value: fx.Node) -> QuantizationSpec | None:
    read = _annotation(user)
    spec = read.input_qspec_map.get(value) if read is not None else None
    return spec if _usable(spec) else None
