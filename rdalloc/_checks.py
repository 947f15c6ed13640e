"""Input validation for the models, fits and solvers: each check names the argument and shows the offending value.

Value checks (:func:`check_values`, :func:`check_shape`, ...), measurement checks (:func:`check_measurements`,
:func:`check_menu`, ...) and one ``*_iv`` function per solver (:func:`waterfill_iv`, :func:`allocate_iv`) that checks
and converts all of its arguments, so that the solver body holds only the math. Checks inspect values only on
concrete arrays; inside ``jax.jit`` (traced values) only shapes are checked.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import array_api_compat
import numpy as np

from ._namespace import (
    as_float64,
    concrete,
    device,
    float_dtype,
    index_dtype,
    is_traced,
    namespace,
    segment_sum,
    to_numpy,
)
from .cost import FULL_BITS

MIN_WATERFILL_BETA = 1 + 1e-6  # below it ln(beta) < 1e-6 and the continuous bits carry no precision


def _first_bad(values: np.ndarray, bad: np.ndarray) -> str:
    idx = np.argwhere(bad)[0]
    where = tuple(int(i) for i in idx) if values.ndim > 1 else int(idx[0]) if values.ndim == 1 else ()
    value = values[tuple(idx)].item() if values.ndim else values.item()
    return f"{value!r} at index {where}"


def check_values(name: str, x: Any, *, positive: bool = False, nonnegative: bool = False, greater: float | None = None,
                 at_most: float | None = None, allow_inf: bool = False, why: str = "") -> None:
    """Raise ``ValueError`` naming ``name`` if ``x`` holds NaN, infinities (unless allowed) or out-of-range values.

    The common, valid case costs two reductions where the data lives (min and max propagate NaN), and only those two
    scalars cross to the host: a GPU array is never copied for validation. Invalid input is copied to find the first
    offending element for the message; ``why`` is appended to the requirement of a ``greater`` error.
    """
    if is_traced(x):
        return
    check_real(name, x)
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
        raise ValueError(f"{name} must be > {greater!r}{why}, got {_first_bad(v, v <= greater)}")
    if at_most is not None and (v > at_most).any():
        raise ValueError(f"{name} must be <= {at_most:g}, got {_first_bad(v, v > at_most)}")


def check_real(name: str, x: Any) -> None:
    """``TypeError`` unless ``x`` is a real number or an array (or nested sequence) of real numbers: strings,
    ``None`` and other objects are refused, not converted."""
    dtype = getattr(x, "dtype", None)
    if dtype is not None and not isinstance(x, np.ndarray):  # a device array: ask its namespace
        if array_api_compat.array_namespace(x).isdtype(dtype, ("bool", "real floating", "integral")):
            return
    else:
        try:
            kind = np.asarray(x).dtype.kind
        except (TypeError, ValueError):
            kind = "O"
        if kind in "biuf":
            return
    raise TypeError(f"{name} must be a real number or an array of real numbers, got {type(x).__name__} {x!r:.80}")


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


def check_representable(xp, n: Any, m: Any, n_items: int) -> float | None:
    """``ValueError`` unless the most any allocation can cost, ``16 sum_i n_i + sum_i m_i`` bits, is a finite float64
    (so every budget, cost and sum of the solve is); returns it (concrete arrays only; ``None`` when traced)."""
    if is_traced(n) or is_traced(m):
        return None
    with concrete(xp), np.errstate(over="ignore"):  # (an overflowing sum is what is refused)
        total_n, total_m = (float(xp.sum(x)) if x.ndim else float(x) * n_items for x in (n, m))
        most = FULL_BITS * total_n + total_m
    if not np.isfinite(most):
        raise ValueError(f"sizes and metadata overflow float64: 16 * sum(sizes) + sum(metadata) = "
                         f"{FULL_BITS} * {total_n!r} + {total_m!r} bits; express sizes in larger units")
    return most


LARGEST_SPAN = 1e300
"""The largest rate per element times bits, and metadata bits per element, that :func:`allocate` accepts."""


def _largest_log10_ratio(top: Any, bottom: Any) -> tuple[int, float]:
    """The item with the largest ``top / bottom`` (non-negative, bottom positive) and that ratio's log10."""
    t, b = np.broadcast_arrays(to_numpy(top).astype(np.float64), to_numpy(bottom).astype(np.float64))
    with np.errstate(divide="ignore"):
        r = np.log10(t) - np.log10(b)
    i = int(np.argmax(r))
    return i, float(r[i])


def check_dynamic_range(xp, weights: Any, scale: Any, n: Any, m: Any, most_bits: float | None,
                        scale_name: str) -> None:
    """``ValueError`` unless :func:`allocate`'s rates per element fit float64: ``w_i scale_i`` finite, ``r_i = w_i
    scale_i / n_i`` (``scale`` is ``alpha``, or ``max_b D(b)`` for a table) at most :data:`LARGEST_SPAN` over
    ``most_bits`` (the costliest allocation's bits), and ``m_i / n_i`` at most :data:`LARGEST_SPAN` bits per element.

    The menu solve divides distortion steps by cost steps (rates per element) and multiplies its multiplier, a rate,
    by costs; beyond these bounds either overflows. A common factor of the weights does not change the answer, so the
    message says to scale them. Concrete arrays only; a min/max pass decides the common case, per-item logs run only
    when it exceeds a bound. (Rates far apart are fine: the smallest merely underflow towards weight 0.)"""
    if most_bits is None or any(is_traced(x) for x in (weights, scale, n, m)):
        return
    with concrete(xp), np.errstate(over="ignore"):
        scale = weights * scale
        s_max, n_min, m_max = (float(f(x)) for f, x in ((xp.max, scale), (xp.min, n), (xp.max, m)))
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        if not np.isfinite(s_max):
            s = np.broadcast_to(to_numpy(scale), np.broadcast_shapes(np.shape(scale), np.shape(n)))
            i = int(np.argmax(~np.isfinite(s)))
            raise ValueError(f"{scale_name} overflows float64 at item {i}; scale weights down (the allocation does "
                             f"not depend on their common scale)")
        if m_max / n_min > LARGEST_SPAN:
            i, r = _largest_log10_ratio(m, n)
            if r > np.log10(LARGEST_SPAN):
                raise ValueError(f"metadata / sizes = 10**{r:.1f} bits per element at item {i} exceeds "
                                 f"{LARGEST_SPAN:g}: express sizes in smaller units")
        ceiling = LARGEST_SPAN / max(most_bits, 1.0)
        if s_max / n_min > ceiling:
            i, r = _largest_log10_ratio(scale, n)
            if r > np.log10(ceiling):
                raise ValueError(f"{scale_name} / sizes = 10**{r:.1f} at item {i} exceeds {ceiling:.3g} ("
                                 f"{LARGEST_SPAN:g} over the {most_bits:.3g} bits of the costliest allocation): scale "
                                 f"weights down (the allocation does not depend on their common scale)")


def check_groups(xp, groups: Any, n_items: int, n_groups: int, dev: Any) -> Any:
    """Group ids as an index array on ``dev``: integers of shape ``(n_items,)`` in ``[0, n_groups)`` (one group per
    budget), every group holding at least one item (values checked on concrete arrays, where the data lives)."""
    shape = tuple(getattr(groups, "shape", np.shape(groups)))
    if shape != (n_items,):
        raise ValueError(f"groups must have shape ({n_items},), one group id per item, got shape {shape}")
    dtype = getattr(groups, "dtype", None) or np.asarray(groups).dtype
    integral = np.dtype(dtype).kind in "iu" if isinstance(dtype, np.dtype) else namespace(groups).isdtype(
        dtype, "integral")
    if not integral:
        raise TypeError(f"groups must hold integer group ids, got dtype {dtype}")
    ids = xp.asarray(xp.astype(xp.asarray(groups, device=dev), index_dtype(xp)), device=dev)
    if is_traced(ids):
        return ids
    with concrete(xp):
        lo, hi = (int(v) for v in to_numpy(xp.stack([xp.min(ids), xp.max(ids)])))
        if lo < 0 or hi >= n_groups:
            v = to_numpy(ids)
            raise ValueError(f"groups must hold ids in [0, {n_groups}) (one per budget), got "
                             f"{_first_bad(v, (v < 0) | (v >= n_groups))}")
        counts = group_sizes(xp, ids, n_groups)
    if (counts == 0).any():
        raise ValueError(f"group {int(np.argmin(counts))} has no items: each of the {n_groups} budgets needs at "
                         f"least one item in groups")
    return ids


def group_sizes(xp, ids: Any, n_groups: int) -> np.ndarray:
    """The number of items in each group, a numpy integer array (``ids``: a concrete index array)."""
    if array_api_compat.is_numpy_namespace(xp):
        return np.bincount(ids, minlength=n_groups)
    ones = xp.ones(ids.shape, dtype=float_dtype(xp), device=device(ids))
    return to_numpy(segment_sum(xp, ones, ids, n_groups)).astype(np.int64)


def group_count(budget: Any, average_bits: Any) -> int:
    """The number of groups: the length of the budget vector (exactly one of ``budget`` or ``average_bits``, 1-D);
    static under ``jax.jit``, as shapes are."""
    if (budget is None) == (average_bits is None):
        raise TypeError(f"give exactly one of budget= (total bits per group) or average_bits=, got budget={budget!r}, "
                        f"average_bits={average_bits!r}")
    name, value = ("budget", budget) if budget is not None else ("average_bits", average_bits)
    shape = tuple(getattr(value, "shape", np.shape(value)))
    if len(shape) != 1 or shape[0] == 0:
        raise ValueError(f"{name} must be a vector of one value per group when groups is given, got shape {shape}")
    return shape[0]


def check_group_budgets(xp, budget: Any, average_bits: Any, group_elements: Any, dev: Any) -> Any:
    """The budget of each group in total bits, from ``budget`` (total bits per group) or ``average_bits`` (bits per
    element of each group; ``group_elements`` the elements per group), finite and ``>= 0``."""
    name, value = ("budget", budget) if budget is not None else ("average_bits", average_bits)
    check_values(name, value, nonnegative=True)
    value = as_float64(xp, value, device=dev, name=name)
    return value if budget is not None else value * group_elements


def check_menu(bits: Sequence[float], name: str = "menu") -> tuple[int, ...]:
    """Bit-widths as a tuple of strictly increasing integers in ``[0, 16]``."""
    arr = np.asarray(bits, dtype=np.float64).reshape(-1)
    if arr.size == 0:
        raise ValueError(f"{name} must hold at least one bit-width, got {list(bits)!r}")
    if not np.all(np.isfinite(arr)) or np.any(arr != np.round(arr)) or np.any(arr < 0) or np.any(arr > FULL_BITS):
        raise ValueError(f"{name} must hold integers in [0, {FULL_BITS}], got {arr.tolist()!r}")
    if np.any(np.diff(arr) <= 0):
        raise ValueError(f"{name} must be strictly increasing, got {arr.astype(int).tolist()!r}")
    return tuple(int(b) for b in arr)


def check_bits(bits: Any) -> tuple[int, ...]:
    """Measured bit-widths (a 1-D numeric sequence or array of any backend) as by :func:`check_menu`."""
    if isinstance(bits, (str, bytes)) or bits is None:
        raise TypeError(f"bits must be a sequence of bit-widths, got {bits!r}")
    arr = np.asarray(to_numpy(bits) if hasattr(bits, "shape") else bits)
    if arr.dtype.kind not in "iuf":
        raise TypeError(f"bits must be numeric bit-widths, got {arr.tolist()!r} (dtype {arr.dtype})")
    if arr.ndim != 1:
        raise ValueError(f"bits must be a 1-D sequence of bit-widths, got shape {arr.shape}")
    return check_menu(arr, "bits")


def check_distortion_table(distortions: Any, bits: Any) -> tuple[np.ndarray, tuple[int, ...]]:
    """``(D, bits)``: ``D`` float64 ``(N, K)``, finite and ``>= 0``, matching ``K`` valid widths (else a clear
    error)."""
    bits = check_bits(bits)
    d = np.asarray(to_numpy(distortions) if hasattr(distortions, "shape") else distortions)
    if d.dtype.kind not in "iuf":
        raise TypeError(f"distortions must be a real numeric array, got dtype {d.dtype}")
    if d.ndim != 2 or d.shape[1] != len(bits):
        raise ValueError(f"distortions must have shape (items, {len(bits)}) to match bits={list(bits)}, "
                         f"got shape {d.shape}")
    d = d.astype(np.float64)
    _check_finite_nonnegative("distortions", d, bits)
    return d, bits


def check_measurements(distortions: Any, bits: Any, sample_weights: Any = None,
                       ) -> tuple[np.ndarray, tuple[int, ...], np.ndarray]:
    """Validated ``(D, bits, w)`` for a fit: ``D`` float64 ``(N, K)``, ``bits`` a tuple of ``K`` widths, ``w`` float64
    ``(N, K)``.

    Raises ``TypeError`` for non-numeric input and ``ValueError`` (naming the argument and the offending value) for
    NaN, infinities or negative values, shapes that do not match, bits not strictly increasing integers in
    ``[0, 16]``, or fewer than two quantized widths (``0 < b < 16``).
    """
    d, bits = check_distortion_table(distortions, bits)
    if d.shape[0] == 0:
        raise ValueError("distortions must hold at least one item, got shape (0, ...)")
    q = [b for b in bits if 0 < b < FULL_BITS]
    if len(q) < 2:
        raise ValueError(f"bits must hold at least two quantized widths (0 < b < {FULL_BITS}) to fit a curve, "
                         f"got bits={list(bits)}")
    if sample_weights is None:
        w = np.ones_like(d)
    else:
        w = np.asarray(to_numpy(sample_weights) if hasattr(sample_weights, "shape") else sample_weights)
        if w.dtype.kind not in "iuf":
            raise TypeError(f"sample_weights must be a real numeric array, got dtype {w.dtype}")
        w = w.astype(np.float64)
        try:
            w = np.broadcast_to(w, d.shape).copy()
        except ValueError:
            raise ValueError(f"sample_weights must be a scalar, shape ({len(bits)},) (one per bit-width) or "
                             f"{d.shape} (one per measurement), got shape {w.shape}") from None
        _check_finite_nonnegative("sample_weights", w, bits)
    return d, bits, w


def _check_finite_nonnegative(name: str, x: np.ndarray, bits: tuple[int, ...]) -> None:
    for bad, what in ((~np.isfinite(x), "finite"), (x < 0, ">= 0")):
        if bad.any():
            i, k = (int(v) for v in np.argwhere(bad)[0])
            raise ValueError(f"{name} must be {what}, got {float(x[i, k])!r} at item {i}, bits={bits[k]}")


def check_vector(x: Any, n: int, name: str, positive: bool = False) -> np.ndarray:
    """``x`` (a scalar or ``(n,)``, any backend) as a float64 numpy ``(n,)``, finite and ``> 0`` or ``>= 0``."""
    v = np.asarray(to_numpy(x) if hasattr(x, "shape") else x)
    if v.dtype.kind not in "iuf":
        raise TypeError(f"{name} must be numeric, got dtype {v.dtype}")
    if v.shape not in ((), (n,)):
        raise ValueError(f"{name} must be a scalar or shape ({n},) to match the {n} items, got shape {v.shape}")
    v = np.broadcast_to(v.astype(np.float64), (n,))
    bad = ~np.isfinite(v) | ((v <= 0) if positive else (v < 0))
    if bad.any():
        i = int(np.argmax(bad))
        raise ValueError(f"{name} must be finite and {'> 0' if positive else '>= 0'}, got {float(v[i])!r} at item {i}")
    return v


def check_quantizer_name(quantizer: Any) -> str | None:
    """A quantizer's name: a string or ``None``."""
    if quantizer is not None and not isinstance(quantizer, str):
        raise TypeError(f"quantizer must be a string or None, got {type(quantizer).__name__} {quantizer!r}")
    return quantizer


def check_items(model: Any) -> int:
    """The model's number of items, at least one (``ValueError`` for an empty model: nothing to allocate)."""
    if model.n_items == 0:
        raise ValueError(f"model has no items (its {'alpha' if hasattr(model, 'alpha') else 'distortion'} is "
                         f"empty): nothing to allocate")
    return model.n_items


class WaterfillInputs(NamedTuple):
    """:func:`~rdalloc.waterfill`'s arguments, checked: float arrays of one backend (0-d where a scalar was given),
    the group ids (an index array, ``None`` when not grouped), the total elements ``sum_i n_i`` and the budget ``B``
    in total bits (both one per group when grouped)."""

    xp: Any
    alpha: Any
    beta: Any
    sizes: Any
    weights: Any
    lo: Any
    hi: Any
    metadata: Any
    groups: Any
    elements: Any
    budget: Any


SMALLEST_SIZE = float(np.nextafter(np.finfo(np.float64).smallest_normal, 0.0))
"""Sizes must exceed it; with ``greater`` it is exclusive, so the smallest accepted is float64's smallest normal."""


def named_namespace(**arrays: Any):
    """:func:`namespace` of the arguments, after a ``TypeError`` naming any that is neither ``None``, a Python number,
    list or tuple, nor an array (a string, a dict, ...)."""
    for name, x in arrays.items():
        if not (x is None or isinstance(x, (int, float, bool, list, tuple)) or array_api_compat.is_array_api_obj(x)):
            raise TypeError(f"{name} must be a number or an array, got {type(x).__name__} {x!r:.60}")
    return namespace(*arrays.values())


def waterfill_iv(model: Any, sizes: Any, budget: Any, average_bits: Any, weights: Any, lo: Any, hi: Any,
                 metadata: Any, groups: Any, reducer: Any) -> WaterfillInputs:
    """Check and convert :func:`~rdalloc.waterfill`'s arguments (``lo``/``hi`` default to the model's range;
    ``reducer`` totals the elements over shards, ``None`` for one process). Raises ``TypeError``/``ValueError``
    naming the argument."""
    from .models import ExponentialModel  # (models imports this module)

    if not isinstance(model, ExponentialModel):
        raise TypeError(f"model must be an ExponentialModel, got {type(model).__name__}")
    if groups is not None and reducer is not None:
        raise ValueError("groups cannot be combined with a reducer: a grouped solve runs in one process")
    xp = named_namespace(alpha=model.alpha, sizes=sizes, weights=weights, lo=lo, hi=hi, metadata=metadata,
                         groups=groups)
    dev = device(model.alpha)
    n_items = check_items(model)
    lo = model.lo if lo is None else lo
    hi = model.hi if hi is None else hi
    for name, value in (("sizes", sizes), ("weights", weights), ("lo", lo), ("hi", hi), ("metadata", metadata)):
        check_shape(name, value, n_items)
    check_values("sizes", sizes, positive=True)
    check_values("sizes", sizes, greater=SMALLEST_SIZE, why=" (a subnormal size: budgets per element overflow)")
    check_values("weights", weights, nonnegative=True)
    check_values("metadata", metadata, nonnegative=True)
    check_values("lo", lo, nonnegative=True)
    check_values("hi", hi, nonnegative=True, at_most=FULL_BITS)
    check_values("beta", model.beta, greater=MIN_WATERFILL_BETA, why=" for waterfill: the bits (c - mu) / ln(beta) "
                 "lose all precision as beta nears 1 (use allocate)")
    alpha, beta, n, w, lo, hi, m = (as_float64(xp, v, device=dev, name=name) for name, v in (
        ("alpha", model.alpha), ("beta", model.beta), ("sizes", sizes), ("weights", weights), ("lo", lo), ("hi", hi),
        ("metadata", metadata)))  # scalars stay 0-d
    check_representable(xp, n, m, n_items)  # (waterfill works in logs: no range of rates to check)
    check_ordered(lo, hi, n_items)
    if groups is not None:
        n_groups = group_count(budget, average_bits)
        groups = check_groups(xp, groups, n_items, n_groups, dev)
        elements = segment_sum(xp, n, groups, n_groups)
        return WaterfillInputs(xp, alpha, beta, n, w, lo, hi, m, groups, elements,
                               check_group_budgets(xp, budget, average_bits, elements, dev))
    elements = xp.sum(n) if n.ndim else n * n_items
    elements = elements if reducer is None else reducer.sum((elements,))[0]
    total = check_budget(budget, average_bits, elements if is_traced(elements) else float(elements))
    return WaterfillInputs(xp, alpha, beta, n, w, lo, hi, m, None, elements,
                           xp.asarray(total, dtype=float_dtype(xp), device=dev))


class AllocateInputs(NamedTuple):
    """:func:`~rdalloc.allocate`'s arguments, checked: the menu, per-item ``(N,)`` float arrays of one backend
    (``lo``/``hi`` ``None`` when not given), the group ids (an index array, ``None`` when not grouped), the total
    elements and the budget ``B`` in total bits (both one per group when grouped)."""

    xp: Any
    menu: tuple
    sizes: Any
    weights: Any
    metadata: Any
    lo: Any
    hi: Any
    groups: Any
    elements: Any
    budget: Any


def allocate_iv(model: Any, sizes: Any, budget: Any, average_bits: Any, groups: Any, weights: Any, menu: Any,
                metadata: Any, lo: Any, hi: Any, max_nodes: Any) -> AllocateInputs:
    """Check and convert :func:`~rdalloc.allocate`'s arguments (``menu=None``: the model's default menu). Raises
    ``TypeError``/``ValueError`` naming the argument."""
    from .allocate import default_menu
    from .models import ExponentialModel, TabulatedModel  # (models imports this module)

    if not isinstance(model, (ExponentialModel, TabulatedModel)):
        raise TypeError(f"model must be an ExponentialModel or TabulatedModel, got {type(model).__name__}")
    if isinstance(max_nodes, bool) or not isinstance(max_nodes, (int, np.integer)):
        raise TypeError(f"max_nodes must be an int, got {type(max_nodes).__name__}")
    if max_nodes < 0:
        raise ValueError(f"max_nodes must be >= 0, got {max_nodes}")
    menu = default_menu(model) if menu is None else check_menu(menu)
    data = model.alpha if isinstance(model, ExponentialModel) else model.distortion
    xp = named_namespace(model=data, sizes=sizes, weights=weights, metadata=metadata, lo=lo, hi=hi, groups=groups)
    dev = device(data)
    N = check_items(model)
    for name, value in (("sizes", sizes), ("weights", weights), ("metadata", metadata)):
        check_shape(name, value, N)
    check_values("sizes", sizes, positive=True)
    check_values("sizes", sizes, greater=SMALLEST_SIZE, why=" (a subnormal size: budgets per element overflow)")
    check_values("weights", weights, nonnegative=True)
    check_values("metadata", metadata, nonnegative=True)
    ones = xp.ones((N,), dtype=float_dtype(xp), device=dev)
    n, w, m = (as_float64(xp, v, device=dev, name=name) * ones
               for name, v in (("sizes", sizes), ("weights", weights), ("metadata", metadata)))
    most_bits = check_representable(xp, n, m, N)
    if isinstance(model, ExponentialModel):
        check_dynamic_range(xp, w, as_float64(xp, model.alpha, device=dev, name="alpha"), n, m, most_bits,
                            "weights * distortion")  # (alpha is the distortion at 0 bits)
    elif not any(is_traced(x) for x in (model.distortion, w, n, m)):  # (the table's mask is numpy: check on host)
        d = np.asarray(to_numpy(model.distortion), dtype=np.float64)
        scale = np.max(np.where(model.allowed_mask, d, 0.0), axis=1)
        check_dynamic_range(np, to_numpy(w), scale, to_numpy(n), to_numpy(m), most_bits, "weights * distortion")
    if groups is None:
        elements = xp.sum(n)
        total = xp.asarray(check_budget(budget, average_bits, elements if is_traced(elements) else float(elements)),
                           dtype=float_dtype(xp), device=dev)
    else:
        n_groups = group_count(budget, average_bits)
        groups = check_groups(xp, groups, N, n_groups, dev)
        elements = segment_sum(xp, n, groups, n_groups)
        total = check_group_budgets(xp, budget, average_bits, elements, dev)
    bounds = []
    for name, bound in (("lo", lo), ("hi", hi)):
        if bound is not None:
            check_shape(name, bound, N)
            check_values(name, bound)
        bounds.append(None if bound is None else as_float64(xp, bound, device=dev, name=name) * ones)
    if lo is not None and hi is not None:
        check_ordered(lo, hi, N)
    if isinstance(model, TabulatedModel):
        missing = sorted(set(menu) - set(model.bits))
        if missing:
            raise ValueError(f"menu {list(menu)} asks for bit-widths {missing} that the table does not hold "
                             f"(it has {list(model.bits)})")
    return AllocateInputs(xp, menu, n, w, m, bounds[0], bounds[1], groups, elements, total)
