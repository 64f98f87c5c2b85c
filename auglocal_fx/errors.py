"""Exceptions raised by auglocal-fx.

Every error a user can cause derives from :class:`ConversionError`, itself a :class:`ValueError`, so that
``except ValueError`` keeps working and the command line can print one readable line for all of them.
"""
from __future__ import annotations

__all__ = ["ConversionError", "TraceError", "PlanMismatchError"]


class ConversionError(ValueError):
    """The model or the conversion options cannot be turned into a LocalModel; the message says how to fix it."""


class TraceError(ConversionError):
    """torch.fx could not trace the model, even after making the failing submodules leaves."""


class PlanMismatchError(ConversionError):
    """A saved plan does not fit the model it is applied to (another architecture, version or input size)."""
