"""rdalloc.backends.jax — apply rdalloc plans to JAX KV arrays; every function is jittable.

Arrays are ``[batch, kv_heads, tokens, head_dim]`` per layer, any floating dtype (float32 math, input dtype out).
The math is the array-API core shared with torch (:mod:`rdalloc.packing`); this module validates input, compiles each
layer's kernels with ``jax.jit`` (cached per layer, shape and dtype) and registers the packed containers as pytrees.

**Static shapes and eviction.** A plan is host data, so it fixes every shape before tracing: it is closed over (a
Python constant of the traced function), never traced.

* Fake quantization keeps a *fixed capacity*: arrays come back at full ``[batch, kv_heads, tokens, head_dim]`` shape,
  evicted entries 0, plus the boolean ``kept`` mask ``(kv_heads, tokens)`` attention must apply.
* Packed storage holds only what is stored: per width one uint8 stream and float16 parameters whose lengths are
  computed from the plan on the host, so they are static too. Packing and unpacking run under ``jax.jit`` (the
  :class:`~rdalloc.packing.PackedLayer` is a pytree whose layout is static auxiliary data).

Calling these functions inside your own ``jax.jit`` works as well (the plan stays a closure constant).
"""

from __future__ import annotations

from functools import partial
from typing import Any, Sequence

import jax
import jax.numpy as jnp

from rdalloc.measure import measure_distortion as _measure_distortion
from rdalloc.packing import FakeQuantized, PackedCache, PackedLayer, PackedTensor, unpack_tensor
from rdalloc.packing import PlanApplier as _PlanApplier
from rdalloc.packing import check_kv_rank
from rdalloc.plan import Plan
from rdalloc.quantizers import Quantizer, fake_quantize_uniform as _fake_quantize_uniform, get_quantizer

__all__ = ["PlanApplier", "fake_quantize", "pack", "unpack", "measure_distortion", "fake_quantize_uniform",
           "FakeQuantized", "PackedTensor", "PackedLayer", "PackedCache"]


# ---- pytrees --------------------------------------------------------------------------------------------------------
def _flatten_tensor(p: PackedTensor):
    return (p.payload, p.params, p.full), (p.layout, p.dtype)


def _unflatten_tensor(aux, children):
    payload, params, full = children
    return PackedTensor(layout=aux[0], payload=payload, params=params, full=full, dtype=aux[1])


def _register() -> None:
    reg = jax.tree_util.register_pytree_node
    for cls, flat, unflat in (
            (PackedTensor, _flatten_tensor, _unflatten_tensor),
            (PackedLayer, lambda p: ((p.keys, p.values), p.layer), lambda a, c: PackedLayer(c[0], c[1], a)),
            (PackedCache, lambda p: (p.layers, None), lambda a, c: PackedCache(tuple(c)))):
        try:
            reg(cls, flat, unflat)
        except ValueError:  # already registered (module reloaded)
            pass


_register()


def _check_array(x: Any, name: str, ndim: tuple[int, ...] = (4,)) -> None:
    if not isinstance(x, jax.Array):
        raise TypeError(f"{name} must be a jax.Array, got {type(x).__name__}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{name} must be a floating array (float16, bfloat16, float32 or float64), got {x.dtype}")
    check_kv_rank(x, name, ndim)


class PlanApplier(_PlanApplier):
    """:class:`rdalloc.packing.PlanApplier` for JAX: validation and one ``jax.jit``-compiled kernel per layer and
    operation (recompiled only for a new shape or dtype)."""

    def __init__(self, plan: Plan, quantizer: Any = None):
        super().__init__(plan, quantizer)
        self._jitted: dict = {}

    def _check(self, x, name):
        _check_array(x, name)

    def _jit(self, op: str, layer: int):
        key = (op, int(layer))
        if key not in self._jitted:
            base = getattr(_PlanApplier, op)
            self._jitted[key] = jax.jit(partial(base, self, layer=int(layer)))
        return self._jitted[key]

    def fake_quantize(self, keys, values, *, layer):
        self._pair(keys, values, layer)  # validate eagerly, with readable errors
        return self._jit("fake_quantize", layer)(keys, values)

    def pack(self, keys, values, *, layer):
        self._pair(keys, values, layer)
        return self._jit("pack", layer)(keys, values)

    def unpack(self, packed):
        if isinstance(packed, PackedCache):
            return [self.unpack(layer) for layer in packed.layers]
        return unpack(packed)


@jax.jit
def _unpack_layer(packed: PackedLayer):
    return unpack_tensor(packed.keys), unpack_tensor(packed.values)


def _layers(x: Any, name: str) -> list:
    if isinstance(x, jax.Array):
        _check_array(x, name, (5,))
        return [x[i] for i in range(x.shape[0])]
    if isinstance(x, (list, tuple)):
        return list(x)
    raise TypeError(f"{name} must be an array or a sequence of per-layer arrays, got {type(x).__name__}")


def fake_quantize(keys: Any, values: Any, plan: Plan, quantizer: Quantizer | str | None = None, *,
                  layer: int | None = None):
    """Fake-quantize one layer (``layer=i``) -> :class:`FakeQuantized` ``(keys, values, kept)``, or every layer
    (``layer=None``; sequences or 5-D stacks) -> a list. Jittable with ``plan`` closed over."""
    ap = PlanApplier(plan, quantizer)
    if layer is None:
        return ap.fake_quantize_cache(_layers(keys, "keys"), _layers(values, "values"))
    return ap.fake_quantize(keys, values, layer=layer)


def pack(keys: Any, values: Any, plan: Plan, quantizer: Quantizer | str | None = None, *, layer: int | None = None):
    """Packed storage of one layer (:class:`PackedLayer`) or every layer (:class:`PackedCache`)."""
    ap = PlanApplier(plan, quantizer)
    if layer is None:
        return ap.pack_cache(_layers(keys, "keys"), _layers(values, "values"))
    return ap.pack(keys, values, layer=layer)


def unpack(packed: PackedLayer | PackedCache):
    """``(keys, values)`` of a :class:`PackedLayer` (a list of pairs for a :class:`PackedCache`), jit-compiled."""
    if isinstance(packed, PackedCache):
        return [unpack(layer) for layer in packed.layers]
    if not isinstance(packed, PackedLayer):
        raise TypeError(f"packed must be a PackedLayer or PackedCache, got {type(packed).__name__}")
    return _unpack_layer(packed)


@partial(jax.jit, static_argnames=("quantizer", "bits", "role", "granularity"))
def _measure_jit(x, quantizer, bits, role, granularity):
    return _measure_distortion(x, quantizer, bits, role=role, granularity=granularity)


def measure_distortion(x: jax.Array, quantizer: Quantizer | str, bits: Sequence[int], *, role: str,
                       granularity: str = "head") -> jax.Array:
    """:func:`rdalloc.measure.measure_distortion` for JAX, jit-compiled: ``(items, len(bits))`` per-item MSE."""
    _check_array(x, "x", (4, 5))
    q = get_quantizer(quantizer)
    bits_t = tuple(int(b) for b in bits) if not isinstance(bits, int) else (int(bits),)
    return _measure_jit(x, q, bits_t, role, granularity)


@partial(jax.jit, static_argnames=("quantizer", "bits", "role"))
def _uniform_jit(x, quantizer, bits, role):
    return _fake_quantize_uniform(x, quantizer, bits, role)


def fake_quantize_uniform(x: jax.Array, quantizer: Quantizer | str, bits: int, role: str) -> jax.Array:
    """Every element of ``x`` at ``bits`` (the uniform baseline), jit-compiled."""
    _check_array(x, "x", (4, 5))
    return _uniform_jit(x, get_quantizer(quantizer), int(bits), role)
