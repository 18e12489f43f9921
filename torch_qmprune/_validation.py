"""Input validation shared by every public entry point: one place where user input is checked."""

from __future__ import annotations

import math
import numbers

import torch

__all__ = ["check_amount", "check_budget", "check_finite", "check_ratio"]


def check_amount(amount: object, name: str = "amount") -> float | int:
    """Validate a pruning amount the way ``torch.nn.utils.prune`` means it, minus its traps.

    A float must lie in [0, 1] (fraction); an int must be >= 0 (absolute count). ``bool``
    (``True`` would silently mean "one element" in torch) and NaN/inf are rejected.
    """
    if isinstance(amount, bool) or not isinstance(amount, numbers.Real):
        raise TypeError(
            f"{name} must be a float in [0, 1] (fraction) or a non-negative int (count), "
            f"got {amount!r} of type {type(amount).__name__}"
        )
    if isinstance(amount, numbers.Integral):
        if amount < 0:
            raise ValueError(f"{name} must be a non-negative int count, got {amount!r}")
        return int(amount)
    value = float(amount)
    if math.isnan(value) or math.isinf(value):
        raise ValueError(f"{name} must be a finite float in [0, 1], got {amount!r}")
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a float in [0, 1] (fraction), got {amount!r}")
    return value


def check_ratio(ratio: object, name: str = "ratio", *, allow_one: bool = False) -> float:
    """Validate a fraction in [0, 1) (or [0, 1] with ``allow_one``) for structural pruning."""
    if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real):
        raise TypeError(
            f"{name} must be a float in [0, 1), got {ratio!r} of type {type(ratio).__name__}"
        )
    value = float(ratio)
    upper_ok = value <= 1.0 if allow_one else value < 1.0
    if math.isnan(value) or value < 0.0 or not upper_ok:
        bound = "[0, 1]" if allow_one else "[0, 1)"
        raise ValueError(f"{name} must be a float in {bound}, got {ratio!r}")
    return value


def check_budget(budget: object, what: str = "the resource") -> float:
    """Validate a budget: the fraction of ``what`` *kept*, in (0, 1] (``bool`` and NaN are
    rejected)."""
    value = (float(budget) if isinstance(budget, numbers.Real) and not isinstance(budget, bool)
             else math.nan)
    if not 0.0 < value <= 1.0:
        raise ValueError(f"budget is the fraction of {what} kept, in (0, 1]; got {budget!r}")
    return value


def check_finite(tensor: torch.Tensor, name: str = "tensor") -> None:
    """Raise ``ValueError`` naming ``name`` if ``tensor`` holds NaN or Inf."""
    if tensor.is_floating_point() or tensor.is_complex():
        if not bool(torch.isfinite(tensor).all()):
            n_nan = int(torch.isnan(tensor).sum())
            n_inf = int(torch.isinf(tensor).sum())
            raise ValueError(
                f"{name} contains non-finite values ({n_nan} NaN, {n_inf} Inf); "
                "spectral states are only defined for finite weights"
            )
