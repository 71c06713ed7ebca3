"""fxqbn's graph passes (installed as ``fxqbn.passes``).

The pipeline, one module a step, records flowing one way:

* ``patterns``: the rules (BN type, fused ReLU, replacement module) and the ReLU spellings, as data;
* ``match``: graph -> ``Match`` / ``Skip`` records; never edits the graph;
* ``observe``: inserts observers for the matches -> ``Observed`` records;
* ``rewrite``: replaces observed patterns with quantized modules -> ``Rewrite`` records.
"""

from .match import find_patterns
from .observe import insert_observers
from .patterns import RELU_SPELLINGS, RULES, Rule, relu_input, rule_for
from .records import Match, Observed, Prepared, Rewrite, Skip
from .rewrite import read_observers, rewrite_patterns

__all__ = [
    "RELU_SPELLINGS", "RULES", "Rule", "relu_input", "rule_for",
    "Match", "Skip", "Observed", "Prepared", "Rewrite",
    "find_patterns", "insert_observers", "read_observers", "rewrite_patterns",
]
