"""Input validation shared by the models and solvers: each check names the argument and shows the offending value.

Checks inspect values only on concrete arrays; inside ``jax.jit`` (traced values) only shapes are checked.
"""

from __future__ import annotations

from typing import Any

import array_api_compat
import numpy as np

from ._namespace import concrete, is_traced, to_numpy


def _first_bad(values: np.ndarray, bad: np.ndarray) -> str:
    idx = np.argwhere(bad)[0]
    where = tuple(int(i) for i in idx) if values.ndim > 1 else int(idx[0]) if values.ndim == 1 else ()
    value = values[tuple(idx)].item() if values.ndim else values.item()
    return f"{value!r} at index {where}"


def check_values(name: str, x: Any, *, positive: bool = False, nonnegative: bool = False, greater: float | None = None,
                 at_most: float | None = None, allow_inf: bool = False) -> None:
    """Raise ``ValueError`` naming ``name`` if ``x`` holds NaN, infinities (unless allowed) or out-of-range values.

    The common, valid case costs two reductions where the data lives (min and max propagate NaN), and only those two
    scalars cross to the host: a GPU array is never copied for validation. Invalid input is copied to find the first
    offending element for the message.
    """
    if is_traced(x):
        return
    if getattr(x, "ndim", 0) and not isinstance(x, np.ndarray):  # a device array: reduce it there
        if 0 in tuple(x.shape):  # empty: nothing to check
            return
        xp = array_api_compat.array_namespace(x)
        with concrete(xp):
            lo, hi = (float(v) for v in to_numpy(xp.stack([xp.min(x), xp.max(x)])))
        if _in_range(lo, hi, positive, nonnegative, greater, at_most, allow_inf):
            return
    v = np.asarray(to_numpy(x), dtype=np.float64)
    if v.size and _in_range(v.min(), v.max(), positive, nonnegative, greater, at_most, allow_inf):
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
    if at_most is not None and (v > at_most).any():
        raise ValueError(f"{name} must be <= {at_most:g}, got {_first_bad(v, v > at_most)}")


def _in_range(lo: float, hi: float, positive: bool, nonnegative: bool, greater: float | None, at_most: float | None,
              allow_inf: bool) -> bool:
    """Whether every value lies in range, from the smallest and largest (NaN in either: no)."""
    return (not np.isnan(lo) and not np.isnan(hi) and (allow_inf or np.isfinite(lo) and np.isfinite(hi))
            and not (positive and lo <= 0) and not (nonnegative and lo < 0)
            and not (greater is not None and lo <= greater) and not (at_most is not None and hi > at_most))


def check_ordered(lo: Any, hi: Any, n: int) -> None:
    """``ValueError`` naming the first item with ``lo > hi`` (scalars or ``(n,)`` arrays of any backend; the test
    runs where the data lives and only its answer crosses to the host)."""
    if is_traced(lo) or is_traced(hi):
        return
    arrays = [a for a in (lo, hi) if getattr(a, "ndim", 0)]
    if arrays and not any(isinstance(a, np.ndarray) for a in arrays):
        try:
            xp = array_api_compat.array_namespace(*arrays)
        except TypeError:  # arrays of two backends: compare on the host
            xp = None
        if xp is not None:
            with concrete(xp):
                if not bool(xp.any(lo > hi)):
                    return
    lo_np, hi_np = (np.broadcast_to(np.asarray(to_numpy(a), dtype=np.float64), (n,)) for a in (lo, hi))
    bad = lo_np > hi_np
    if bad.any():
        i = int(np.argmax(bad))
        raise ValueError(f"lo must be <= hi, got lo={float(lo_np[i])!r} > hi={float(hi_np[i])!r} at item {i}")


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
