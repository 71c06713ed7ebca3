"""What every graph pass shares, in the manner of torch.fx's ``PassBase``: a pass returns a result
record (``passes.records``: ``Found``, ``Observed``, ``Rewritten``), and ``ensures`` checks the graph it leaves.

``LINT`` is off in production, where checking what the passes build by construction buys nothing
(on the 1,000-BN chain of benchmarks/pass_speed.py a lint took 4 ms of a 281 ms convert), and switched
on for the whole test suite (tests/conftest.py), so that every graph a pass emits is linted there.
"""

from __future__ import annotations

from torch import fx

__all__ = ["LINT", "ensures"]

LINT = False


def ensures(graph: fx.Graph) -> fx.Graph:
    """``graph``, linted when ``LINT`` is on."""
    if LINT:
        graph.lint()
    return graph
