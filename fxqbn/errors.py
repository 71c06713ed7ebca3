"""The one exception type fxqbn raises for every refusal."""

__all__ = ["FxqbnError"]


class FxqbnError(ValueError):
    """A refusal: the message names the node or module at fault and what to do about it."""
