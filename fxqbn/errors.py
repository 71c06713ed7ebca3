"""The one exception type fxqbn raises for every refusal, and the warning it gives when accuracy collapses."""

__all__ = ["FxqbnError", "AccuracyWarning", "no_batch_norm"]


class FxqbnError(ValueError):
    """A refusal: the message names the node or module at fault and what to do about it."""


def no_batch_norm(what: str) -> FxqbnError:
    """The refusal of a model in which fxqbn finds no BatchNorm (``what`` names it)."""
    return FxqbnError(
        f"{what} holds no BatchNorm: nothing to quantize (fxqbn quantizes BatchNorm1d/2d/3d, SyncBatchNorm and "
        "F.batch_norm on module statistics, alone or followed by an activation)"
    )


class AccuracyWarning(UserWarning):
    """A quantized model whose outputs are mostly error (output SQNR against float under 10 dB)."""
