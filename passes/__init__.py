"""fxqbn's graph passes (installed as ``fxqbn.passes``): one pipeline for every kind of graph.

    graph --match--> Match / Skip --observe (fxqbn.prepare)--> Match + Boundary
          --plan--> Plan --rewrite (with the backend's modules)--> new graph + Rewrite --> report rows

One module a step, frozen records flowing one way:

* ``registry``: every spelling of a BatchNorm, an activation, a pass-through, and the rules, as data;
* ``reading``: one call of a spelling, normalised into a ``BnCall`` (or why it cannot be);
* ``boundaries``: the kinds of graph (traced by fxqbn.prepare, observed by torch.ao, int8 by torch.ao
  or PT2E) and how each marks a pattern's edges (``Boundary``): the one thing that differs;
* ``match``: graph -> ``Match`` / ``Skip`` records, for every kind; never edits the graph;
* ``observe``: puts observers around the matches (fxqbn.prepare), or finds torch.ao's;
* ``plan``: each match with its qparams -> ``Plan`` (kernel variant, clamp, op name);
* ``rewrite``: a new graph, each planned pattern one call of its int8 module;
* ``fold``: which BNs fold into the conv / linear before them (``FOLDS``, ``decide``), and the fold itself.

The passes import no backend: a backend (``fxqbn.backends``) is handed to them.
"""

from .base import ensures
from .boundaries import AO_INT8, AO_OBSERVED, PREPARED, PT2E_INT8, GraphKind, int8_kind
from .match import find_patterns, needs_shapes, shapes_needed_by
from .observe import adopt_observers, insert_observers, is_torch_ao_observed
from .plan import plan_patterns
from .reading import BnCall
from .records import (
    CODES, FLOAT, QUANTIZED, Boundary, Converted, Dropped, Folded, Found, Match, Observed, Plan, Prepared, Rewrite, Rewritten, Skip,
    observer_users,
)
from .registry import (
    ACTIVATIONS, BN_SPELLINGS, CLAMP_SPELLINGS, NO_ACTIVATION, PASSTHROUGH_SPELLINGS, RELU, RELU6, RULES, Activation,
    BnSpelling, Rule, find_rule, passthrough_input, read_activation, read_bn,
)
from .rewrite import rewrite_patterns

__all__ = [
    "RULES", "Rule", "ACTIVATIONS", "Activation", "NO_ACTIVATION", "RELU", "RELU6", "find_rule",
    "BN_SPELLINGS", "BnSpelling", "CLAMP_SPELLINGS", "PASSTHROUGH_SPELLINGS", "BnCall", "read_bn", "read_activation",
    "passthrough_input", "GraphKind", "PREPARED", "AO_OBSERVED", "AO_INT8", "PT2E_INT8", "int8_kind",
    "FLOAT", "QUANTIZED", "CODES", "Boundary", "Match", "Skip", "Folded", "Dropped", "Prepared", "Plan", "Rewrite", "Converted",
    "observer_users", "Found", "Observed", "Rewritten", "find_patterns", "needs_shapes", "shapes_needed_by", "insert_observers", "adopt_observers", "is_torch_ao_observed",
    "plan_patterns", "rewrite_patterns", "ensures",
]
