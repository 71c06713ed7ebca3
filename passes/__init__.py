"""fxqbn's graph passes (installed as ``fxqbn.passes``).

The pipeline, one module a step, records flowing one way:

* ``spellings``: every way a graph spells a BatchNorm, an activation, a pass-through op, as data;
* ``patterns``: the rules (BN kind, dim, activation) and the activations, as data;
* ``match``: graph -> ``Match`` / ``Skip`` records; never edits the graph;
* ``observe``: inserts observers for the matches -> ``Observed`` records;
* ``rewrite``: replaces observed patterns with quantized modules -> ``Rewrite`` records;
* ``adopt``: finds the observed patterns in a graph torch.ao's ``prepare_fx`` observed;
* ``lower`` / ``lower_rewrite``: the same for whole-model int8 graphs (``fxqbn.lower``).
"""

from .adopt import adopt_observers, is_torch_ao_observed
from .match import find_patterns, needs_shapes
from .observe import insert_observers
from .patterns import ACTIVATIONS, RULES, Activation, Rule, activation_for, find_rule, rule_for
from .records import Converted, Dropped, Match, Observed, Prepared, Rewrite, Skip, observer_users
from .rewrite import build_replacements, read_observers, rewrite_patterns
from .spellings import ACTIVATION_SPELLINGS, BN_SPELLINGS, PASSTHROUGH_SPELLINGS, BnCall

__all__ = [
    "RULES", "Rule", "ACTIVATIONS", "Activation", "rule_for", "find_rule", "activation_for",
    "BN_SPELLINGS", "ACTIVATION_SPELLINGS", "PASSTHROUGH_SPELLINGS", "BnCall",
    "Match", "Skip", "Observed", "Dropped", "Prepared", "Rewrite", "Converted", "observer_users",
    "find_patterns", "needs_shapes", "insert_observers", "read_observers", "build_replacements", "rewrite_patterns",
    "adopt_observers", "is_torch_ao_observed",
]
