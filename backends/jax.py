"""rdalloc.backends.jax — one-shot functions that apply rdalloc plans to JAX KV arrays; every one is jittable.

Arrays are ``[batch, kv_heads, tokens, head_dim]`` per layer, any floating dtype (float32 math, input dtype out).
The math is the array-API core shared with torch (:mod:`rdalloc.apply`); these functions check that they are given
JAX arrays, take whole caches as sequences or 5-D stacks, and run compiled: plan application through
:class:`rdalloc.PlanApplier` (one ``jax.jit`` kernel per layer and operation; build one applier to apply a plan
repeatedly), distortion measurement and uniform quantization through ``jax.jit`` with their settings static;
:func:`unpack` is :func:`rdalloc.apply.unpack`.

**Static shapes and eviction.** A plan is host data, so it fixes every shape before tracing: it is closed over (a
Python constant of the traced function), never traced.

* Fake quantization keeps a *fixed capacity*: arrays come back at full ``[batch, kv_heads, tokens, head_dim]`` shape,
  evicted entries 0, plus the boolean ``kept`` mask ``(kv_heads, tokens)`` attention must apply.
* Packed storage holds only what is stored: per width one uint8 stream and float16 parameters whose lengths are
  computed from the plan on the host, so they are static too. Packing and unpacking run under ``jax.jit`` (the
  :class:`~rdalloc.apply.PackedLayer` is a pytree whose layout is static auxiliary data).

Calling these functions inside your own ``jax.jit`` works as well (the plan stays a closure constant).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any

import jax

from rdalloc.apply import PlanApplier, unpack
from rdalloc.layout import check_kv
from rdalloc.measure import measure_distortion as _measure_distortion
from rdalloc.measure import measured_bits
from rdalloc.plan import Plan
from rdalloc.quantizers import Quantizer, get_quantizer
from rdalloc.quantizers import fake_quantize_uniform as _fake_quantize_uniform

__all__ = ["fake_quantize", "pack", "unpack", "measure_distortion", "fake_quantize_uniform"]


def _check_array(x: Any, name: str, ndim: tuple[int, ...] = (4,)) -> None:
    if not isinstance(x, jax.Array):
        raise TypeError(f"{name} must be a jax.Array, got {type(x).__name__}")
    check_kv(x, name, ndim)


def _layers(x: Any, name: str) -> list:
    if isinstance(x, jax.Array):
        _check_array(x, name, (5,))
        return [x[i] for i in range(x.shape[0])]
    if isinstance(x, (list, tuple)):
        for i, a in enumerate(x):
            _check_array(a, f"{name}[{i}]")
        return list(x)
    raise TypeError(f"{name} must be an array or a sequence of per-layer arrays, got {type(x).__name__}")


def fake_quantize(keys: Any, values: Any, plan: Plan, quantizer: Quantizer | str | None = None, *,
                  layer: int | None = None):
    """Fake-quantize one layer (``layer=i``) -> :class:`~rdalloc.apply.FakeQuantized` ``(keys, values, kept)``, or
    every layer (``layer=None``; sequences or 5-D stacks) -> a list. Jittable with ``plan`` closed over."""
    ap = PlanApplier(plan, quantizer)
    if layer is None:
        return ap.fake_quantize_cache(_layers(keys, "keys"), _layers(values, "values"))
    _check_array(keys, "keys")
    _check_array(values, "values")
    return ap.fake_quantize(keys, values, layer=layer)


def pack(keys: Any, values: Any, plan: Plan, quantizer: Quantizer | str | None = None, *, layer: int | None = None):
    """Packed storage of one layer (:class:`~rdalloc.apply.PackedLayer`) or every layer
    (:class:`~rdalloc.apply.PackedCache`)."""
    ap = PlanApplier(plan, quantizer)
    if layer is None:
        return ap.pack_cache(_layers(keys, "keys"), _layers(values, "values"))
    _check_array(keys, "keys")
    _check_array(values, "values")
    return ap.pack(keys, values, layer=layer)


@partial(jax.jit, static_argnames=("quantizer", "bits", "role", "granularity"))
def _measure_jit(x, quantizer, bits, role, granularity):
    return _measure_distortion(x, quantizer, bits, role=role, granularity=granularity)


def measure_distortion(x: jax.Array, quantizer: Quantizer | str, bits: Sequence[int], *, role: str,
                       granularity: str = "head") -> jax.Array:
    """:func:`rdalloc.measure.measure_distortion` for JAX, jit-compiled: ``(items, len(bits))`` per-item MSE."""
    _check_array(x, "x", (4, 5))
    q = get_quantizer(quantizer)
    return _measure_jit(x, q, measured_bits(bits, q), role, granularity)


@partial(jax.jit, static_argnames=("quantizer", "bits", "role"))
def _uniform_jit(x, quantizer, bits, role):
    return _fake_quantize_uniform(x, quantizer, bits, role)


def fake_quantize_uniform(x: jax.Array, quantizer: Quantizer | str, bits: int, role: str) -> jax.Array:
    """Every element of ``x`` at ``bits`` (the uniform baseline), jit-compiled."""
    _check_array(x, "x", (4, 5))
    return _uniform_jit(x, get_quantizer(quantizer), int(bits), role)
