"""fxqbn's graph passes (installed as ``fxqbn.passes``).

The pipeline, one module a step, records flowing one way:

* ``patterns``: the rules (BN type, fused ReLU, replacement module) and the ReLU spellings, as data;
* ``match``: graph -> ``Match`` / ``Skip`` records; never edits the graph;
* ``observe``: inserts observers for the matches -> ``Observed`` records;
* ``rewrite``: replaces observed patterns with quantized modules -> ``Rewrite`` records;
* ``adopt``: finds the observed patterns in a graph torch.ao's ``prepare_fx`` observed.
"""

from .adopt import adopt_observers, is_torch_ao_observed
from .match import find_patterns
from .observe import insert_observers
from .patterns import RELU_SPELLINGS, RULES, Rule, relu_input, rule_for
from .records import Dropped, Match, Observed, Prepared, Rewrite, Skip
from .rewrite import read_observers, remove_observers, rewrite_patterns

__all__ = [
    "RELU_SPELLINGS", "RULES", "Rule", "relu_input", "rule_for",
    "Match", "Skip", "Observed", "Dropped", "Prepared", "Rewrite",
    "find_patterns", "insert_observers", "read_observers", "rewrite_patterns", "remove_observers",
    "adopt_observers", "is_torch_ao_observed",
]
