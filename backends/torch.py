"""rdalloc.backends.torch — apply rdalloc plans to torch KV tensors (CPU or CUDA).

Tensors are ``[batch, kv_heads, tokens, head_dim]`` per layer, any floating dtype (computation in float32, results in
the input dtype), on any device. The math is the array-API core (:mod:`rdalloc.packing`, :mod:`rdalloc.quantizers`,
:mod:`rdalloc.measure`); this module validates torch input, runs under ``torch.no_grad()`` and keeps each layer's
index arrays on the tensors' device (:class:`PlanApplier`), so repeated application does no host work, no
host-to-device copies and no host synchronisation (no ``.item()``, no data-dependent shapes: the plan, read on the
host, fixes every shape).

    from rdalloc.backends import torch as rdt
    ap = rdt.PlanApplier(plan, "kivi")                       # once
    k_hat, v_hat, kept = ap.fake_quantize(k, v, layer=3)     # evaluation: dequantized tensors + kept tokens
    packed = ap.pack(k, v, layer=3)                          # storage: bit-packed, packed.nbytes bytes held
    k_hat, v_hat = ap.unpack(packed)                         # == fake_quantize
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from rdalloc.measure import measure_distortion as _measure_distortion
from rdalloc.packing import (FakeQuantized, PackedCache, PackedLayer, PackedTensor, unpack_tensor)
from rdalloc.packing import PlanApplier as _PlanApplier
from rdalloc.packing import check_kv_rank
from rdalloc.plan import Plan
from rdalloc.quantizers import Quantizer, fake_quantize_uniform as _fake_quantize_uniform, get_quantizer

__all__ = ["PlanApplier", "fake_quantize", "pack", "unpack", "measure_distortion", "fake_quantize_uniform",
           "FakeQuantized", "PackedTensor", "PackedLayer", "PackedCache"]


def _check_tensor(x: Any, name: str, ndim: tuple[int, ...] = (4,)) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor (float16, bfloat16, float32 or float64), got {x.dtype}")
    check_kv_rank(x, name, ndim)


class PlanApplier(_PlanApplier):
    """:class:`rdalloc.packing.PlanApplier` for torch tensors: validation, ``torch.no_grad()``, device-resident
    index arrays cached per (layer, shape, device)."""

    def _check(self, x, name):
        _check_tensor(x, name)

    @torch.no_grad()
    def fake_quantize(self, keys, values, *, layer):
        return super().fake_quantize(keys, values, layer=layer)

    @torch.no_grad()
    def pack(self, keys, values, *, layer):
        return super().pack(keys, values, layer=layer)

    @torch.no_grad()
    def unpack(self, packed):
        return super().unpack(packed)


def _layers(x: Any, name: str) -> list:
    if isinstance(x, torch.Tensor):
        _check_tensor(x, name, (5,))
        return list(x.unbind(0))
    if isinstance(x, (list, tuple)):
        return list(x)
    raise TypeError(f"{name} must be a tensor or a sequence of per-layer tensors, got {type(x).__name__}")


def fake_quantize(keys: Any, values: Any, plan: Plan, quantizer: Quantizer | str | None = None, *,
                  layer: int | None = None):
    """Fake-quantize one layer (``layer=i``, 4-D tensors) -> :class:`FakeQuantized` ``(keys, values, kept)``, or every
    layer (``layer=None``; sequences of 4-D tensors or 5-D ``[layers, ...]`` stacks) -> a list of them.

    ``quantizer`` defaults to the one the plan records. Build a :class:`PlanApplier` to apply a plan repeatedly.
    """
    ap = PlanApplier(plan, quantizer)
    if layer is None:
        return ap.fake_quantize_cache(_layers(keys, "keys"), _layers(values, "values"))
    return ap.fake_quantize(keys, values, layer=layer)


def pack(keys: Any, values: Any, plan: Plan, quantizer: Quantizer | str | None = None, *, layer: int | None = None):
    """Packed storage of one layer (:class:`PackedLayer`) or of every layer (:class:`PackedCache`); see
    :func:`fake_quantize` for the arguments. ``.nbytes`` is the bytes held (full precision at 2 bytes/element)."""
    ap = PlanApplier(plan, quantizer)
    if layer is None:
        return ap.pack_cache(_layers(keys, "keys"), _layers(values, "values"))
    return ap.pack(keys, values, layer=layer)


@torch.no_grad()
def unpack(packed: PackedLayer | PackedCache):
    """``(keys, values)`` dequantized from a :class:`PackedLayer` (a list of pairs for a :class:`PackedCache`);
    equal to :func:`fake_quantize` of the packed tensors, evicted entries 0."""
    if isinstance(packed, PackedCache):
        return [unpack(layer) for layer in packed.layers]
    if not isinstance(packed, PackedLayer):
        raise TypeError(f"packed must be a PackedLayer or PackedCache, got {type(packed).__name__}")
    return unpack_tensor(packed.keys), unpack_tensor(packed.values)


@torch.no_grad()
def measure_distortion(x: torch.Tensor, quantizer: Quantizer | str, bits: Sequence[int], *, role: str,
                       granularity: str = "head") -> torch.Tensor:
    """:func:`rdalloc.measure.measure_distortion` for torch: ``(items, len(bits))`` per-item MSE."""
    _check_tensor(x, "x", (4, 5))
    return _measure_distortion(x, quantizer, bits, role=role, granularity=granularity)


@torch.no_grad()
def fake_quantize_uniform(x: torch.Tensor, quantizer: Quantizer | str, bits: int, role: str) -> torch.Tensor:
    """Every element of ``x`` at ``bits``, the uniform baseline (:func:`rdalloc.quantizers.fake_quantize_uniform`)."""
    _check_tensor(x, "x", (4, 5))
    return _fake_quantize_uniform(x, get_quantizer(quantizer), bits, role)
