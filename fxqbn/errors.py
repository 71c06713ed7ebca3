"""The one exception type fxqbn raises for every refusal, and the warning it gives when accuracy collapses."""

__all__ = ["FxqbnError", "AccuracyWarning"]


class FxqbnError(ValueError):
    """A refusal: the message names the node or module at fault and what to do about it."""


class AccuracyWarning(UserWarning):
    """A quantized model whose outputs are mostly error (output SQNR against float under 10 dB)."""
