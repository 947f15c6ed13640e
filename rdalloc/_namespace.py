"""The array-API glue every solver shares: one namespace, float64 accumulation, loops that also run under ``jax.jit``.

Solvers call :func:`namespace` once, convert inputs with :func:`as_float64`, and drive their iterations with
:func:`while_loop`, which is a Python loop on eager backends (numpy, torch, array_api_strict) and
``jax.lax.while_loop`` on JAX, so the same body runs under ``jax.jit`` with no host synchronisation.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import array_api_compat
import numpy as np

__all__ = ["namespace", "as_float64", "is_jax", "is_traced", "while_loop", "cond", "to_numpy", "device",
           "register_pytree", "jax_compiled", "masked", "positive_or_one", "segment_sum", "segment_max"]


def namespace(*arrays: Any):
    """The array-API namespace of ``arrays`` (python scalars and lists count as numpy)."""
    arrays = [a for a in arrays if a is not None and not isinstance(a, (int, float, bool, list, tuple))]
    if not arrays:
        return array_api_compat.array_namespace(np.zeros(0))
    return array_api_compat.array_namespace(*arrays)


def is_jax(xp) -> bool:
    return array_api_compat.is_jax_namespace(xp)


def is_traced(x: Any) -> bool:
    """True for a JAX tracer (inside ``jax.jit``): its values cannot be inspected, so value checks are skipped."""
    try:
        import jax
    except ImportError:  # pragma: no cover - jax is optional
        return False
    return isinstance(x, jax.core.Tracer)


def float_dtype(xp):
    """float64 where the backend has it (JAX without ``jax_enable_x64`` falls back to float32)."""
    if is_jax(xp):
        import jax

        return xp.float64 if jax.config.jax_enable_x64 else xp.float32
    return xp.float64


def index_dtype(xp):
    """int64 for gathers (torch requires it); int32 on JAX without ``jax_enable_x64``."""
    if is_jax(xp):
        import jax

        return xp.int64 if jax.config.jax_enable_x64 else xp.int32
    return xp.int64


def as_float64(xp, x: Any, device=None, name: str = "array"):
    """``x`` as a float array of the solver dtype on ``device``; python scalars and lists are accepted."""
    host = isinstance(x, (int, float, list, tuple))
    if host or isinstance(x, np.ndarray) and not array_api_compat.is_numpy_namespace(xp):
        x = np.asarray(x, dtype=np.float64)
        if x.dtype.kind not in "fiub":
            raise TypeError(f"{name} must be numeric, got dtype {x.dtype}")
        return xp.asarray(x, dtype=float_dtype(xp), device=device)
    dtype = getattr(x, "dtype", None)
    if dtype is not None and not (xp.isdtype(dtype, ("real floating", "integral")) or dtype == xp.bool):
        raise TypeError(f"{name} must be a real numeric array, got dtype {dtype}")
    return xp.asarray(xp.astype(x, float_dtype(xp), copy=False), device=device)  # no copy if already float64


def device(x: Any):
    """The device ``x`` lives on (``None`` for python scalars and anything without one)."""
    try:
        return array_api_compat.device(x)
    except Exception:
        return None


def register_pytree(cls: type) -> None:
    """Let instances of the dataclass ``cls`` enter and leave ``jax.jit`` (every field is data); idempotent, and
    called on first use with JAX arrays so that ``import rdalloc`` does not import JAX."""
    if cls not in _registered:
        import jax

        jax.tree_util.register_dataclass(cls, data_fields=[f.name for f in dataclasses.fields(cls)], meta_fields=[])
        _registered.add(cls)


_registered: set = set()


def jax_compiled(fn: Callable, model: Any, *arrays: Any, **settings: Any) -> Any:
    """``fn(model, *arrays, **settings)`` under a ``jax.jit`` that is compiled once per function, shapes and settings.

    For eager JAX calls: a solver's ``lax.while_loop`` bodies are fresh closures on every call, so JAX would trace
    and compile them again each time. Here the model's array fields and ``arrays`` are traced, and its other fields
    (floats, strings, bit tuples) and ``settings`` are static, part of the cache key (they must be hashable).
    """
    fields = {f.name: getattr(model, f.name) for f in dataclasses.fields(model) if f.init}
    traced = {k: v for k, v in fields.items() if getattr(v, "shape", None) is not None}
    fixed = tuple((k, v) for k, v in fields.items() if k not in traced)
    return _jitted(fn, tuple(sorted(settings)))(traced, *arrays, model_type=type(model), fixed=fixed, **settings)


@functools.cache
def _jitted(fn: Callable, setting_names: tuple[str, ...]) -> Callable:
    import jax

    def run(traced, *arrays, model_type, fixed, **settings):
        return fn(model_type(**traced, **dict(fixed)), *arrays, **settings)

    return jax.jit(run, static_argnames=("model_type", "fixed", *setting_names))


def masked(xp, mask, x):
    """``x`` where ``mask`` else 0, for finite ``x`` (numpy's ``where`` on a random mask costs several passes, a
    multiply by the mask one)."""
    if array_api_compat.is_numpy_namespace(xp):
        return x * xp.astype(mask, x.dtype)
    return xp.where(mask, x, xp.zeros_like(x))


def positive_or_one(xp, x):
    """``x`` where ``x > 0`` else 1: a divisor that is safe where the quotient is not used."""
    return xp.where(x > 0, x, xp.ones_like(x))


def segment_sum(xp, x, groups, n_groups: int):
    """``out[g] = sum_i x_i [groups_i = g]`` for ``g < n_groups`` (``groups`` an index array; ``x`` per item or 0-d):
    ``np.bincount`` on numpy, ``index_add`` on torch, ``jax.ops.segment_sum`` on JAX (``n_groups`` static)."""
    x = x * xp.ones(groups.shape, dtype=x.dtype, device=device(groups)) if x.ndim == 0 else x
    if array_api_compat.is_numpy_namespace(xp):
        return np.bincount(groups, weights=x, minlength=n_groups)
    if array_api_compat.is_torch_namespace(xp):
        return xp.zeros((n_groups,), dtype=x.dtype, device=x.device).index_add_(0, groups, x)
    if is_jax(xp):
        import jax

        return jax.ops.segment_sum(x, groups, num_segments=n_groups)
    return xp.sum(xp.where(_one_hot(xp, groups, n_groups), x, xp.zeros_like(x)), axis=1)


def segment_max(xp, x, groups, n_groups: int):
    """``out[g] = max_i x_i [groups_i = g]`` for ``g < n_groups`` (``-inf`` for a group without items)."""
    if array_api_compat.is_numpy_namespace(xp):
        out = np.full(n_groups, -np.inf)
        np.maximum.at(out, groups, x)
        return out
    if array_api_compat.is_torch_namespace(xp):
        out = xp.full((n_groups,), -xp.inf, dtype=x.dtype, device=x.device)
        return out.scatter_reduce_(0, groups, x, reduce="amax")
    if is_jax(xp):
        import jax

        return jax.ops.segment_max(x, groups, num_segments=n_groups)
    return xp.max(xp.where(_one_hot(xp, groups, n_groups), x, xp.full_like(x, -xp.inf)), axis=1)


def _one_hot(xp, groups, n_groups: int):
    """The ``(n_groups, N)`` membership mask (the fallback of other array-API backends)."""
    ids = xp.reshape(xp.arange(n_groups, dtype=groups.dtype, device=device(groups)), (-1, 1))
    return xp.reshape(groups, (1, -1)) == ids


def concrete(xp):
    """A context in which operations on concrete arrays give concrete results: ``jax.ensure_compile_time_eval`` on
    JAX (so input checks inside a ``jax.jit`` trace still see the values of arrays that are not traced), nothing
    elsewhere."""
    if is_jax(xp):
        import jax

        return jax.ensure_compile_time_eval()
    return contextlib.nullcontext()


def to_numpy(x: Any) -> np.ndarray:
    """A host numpy copy of any array-API array (torch on CUDA, JAX, array_api_strict)."""
    if isinstance(x, np.ndarray):
        return x
    if hasattr(x, "detach"):  # torch
        return x.detach().cpu().numpy()
    try:
        return np.asarray(x)
    except Exception:  # array_api_strict refuses __array__ in recent versions
        return np.from_dlpack(x)


def while_loop(xp, cond: Callable[[tuple], Any], body: Callable[[tuple], tuple], state: tuple) -> tuple:
    """``while cond(state): state = body(state)`` — ``jax.lax.while_loop`` on JAX, a Python loop elsewhere.

    ``cond`` returns a 0-d boolean array; ``body`` must keep every array's shape and dtype (JAX requires it).
    """
    if is_jax(xp):
        import jax

        return jax.lax.while_loop(lambda s: cond(s), body, state)
    while bool(cond(state)):
        state = body(state)
    return state


def cond(xp, pred: Any, true_fn: Callable[..., Any], false_fn: Callable[..., Any], operands: tuple) -> Any:
    """``true_fn(*operands) if pred else false_fn(*operands)`` — ``jax.lax.cond`` on JAX (both branches traced, one
    run; they must return the same shapes and dtypes), a Python branch elsewhere."""
    if is_jax(xp):
        import jax

        return jax.lax.cond(pred, true_fn, false_fn, *operands)
    return true_fn(*operands) if bool(pred) else false_fn(*operands)
