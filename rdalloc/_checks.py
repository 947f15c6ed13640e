"""Input validation shared by the models and solvers: each check names the argument and shows the offending value.

Checks inspect values only on concrete arrays; inside ``jax.jit`` (traced values) only shapes are checked.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ._namespace import is_traced, to_numpy


def _first_bad(values: np.ndarray, bad: np.ndarray) -> str:
    idx = np.argwhere(bad)[0]
    where = tuple(int(i) for i in idx) if values.ndim > 1 else int(idx[0]) if values.ndim == 1 else ()
    value = values[tuple(idx)].item() if values.ndim else values.item()
    return f"{value!r} at index {where}"


def check_values(name: str, x: Any, *, positive: bool = False, nonnegative: bool = False, greater: float | None = None,
                 allow_inf: bool = False) -> None:
    """Raise ``ValueError`` naming ``name`` if ``x`` holds NaN, infinities (unless allowed) or out-of-range values."""
    if is_traced(x):
        return
    v = np.asarray(to_numpy(x), dtype=np.float64)
    if v.size:  # fast path: two reductions (min and max propagate NaN) decide the common, valid case
        lo, hi = v.min(), v.max()
        if (not np.isnan(lo) and not np.isnan(hi) and (allow_inf or np.isfinite(lo) and np.isfinite(hi))
                and not (positive and lo <= 0) and not (nonnegative and lo < 0)
                and not (greater is not None and lo <= greater)):
            return
    if np.isnan(v).any():
        raise ValueError(f"{name} must not contain NaN, got {_first_bad(v, np.isnan(v))}")
    if not allow_inf and np.isinf(v).any():
        raise ValueError(f"{name} must be finite, got {_first_bad(v, np.isinf(v))}")
    if positive and (v <= 0).any():
        raise ValueError(f"{name} must be > 0, got {_first_bad(v, v <= 0)}")
    if nonnegative and (v < 0).any():
        raise ValueError(f"{name} must be >= 0, got {_first_bad(v, v < 0)}")
    if greater is not None and (v <= greater).any():
        raise ValueError(f"{name} must be > {greater:g}, got {_first_bad(v, v <= greater)}")


def check_shape(name: str, x: Any, n: int, *, allow_scalar: bool = True) -> None:
    """``x`` must be a scalar (when allowed) or a vector of ``n`` items."""
    shape = tuple(getattr(x, "shape", np.shape(x)))
    if shape == () and allow_scalar:
        return
    if shape != (n,):
        want = f"a scalar or shape ({n},)" if allow_scalar else f"shape ({n},)"
        raise ValueError(f"{name} must be {want} to match the {n} items, got shape {shape}")


def check_budget(budget: float | None, average_bits: float | None, total_elements: float) -> float:
    """The budget in total bits from exactly one of ``budget`` (total bits) or ``average_bits`` (bits per element)."""
    if (budget is None) == (average_bits is None):
        raise TypeError(f"give exactly one of budget= (total bits) or average_bits=, got budget={budget!r}, "
                        f"average_bits={average_bits!r}")
    if budget is not None:
        if is_traced(budget):
            return budget
        value, name = budget, "budget"
    else:
        if is_traced(average_bits):
            return average_bits * total_elements
        value, name = average_bits, "average_bits"
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a real number, got {value!r}") from None
    if not np.isfinite(f) or f < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return f if budget is not None else f * total_elements
