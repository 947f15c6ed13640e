"""rdalloc.backends.torch — one-shot functions that apply rdalloc plans to torch KV tensors (CPU or CUDA).

Tensors are ``[batch, kv_heads, tokens, head_dim]`` per layer, any floating dtype (computation in float32, results in
the input dtype), on any device. The math is the array-API core (:mod:`rdalloc.apply`, :mod:`rdalloc.quantizers`,
:mod:`rdalloc.measure`); these functions check that they are given torch tensors, take whole caches as sequences or
5-D stacks, and run without gradients; :func:`unpack` is :func:`rdalloc.apply.unpack`. To apply a plan repeatedly
(every decode step), build one :class:`rdalloc.PlanApplier`: on torch tensors it runs under ``torch.no_grad()`` and
keeps each layer's index arrays on the tensors' device, so repeated application does no host work, no host-to-device
copies and no host synchronisation.

    from rdalloc import PlanApplier
    from rdalloc.backends import torch as rdt
    k_hat, v_hat, kept = rdt.fake_quantize(k, v, plan, "kivi", layer=3)  # once: dequantized tensors + kept tokens
    ap = PlanApplier(plan, "kivi")                                       # repeatedly
    packed = ap.pack(k, v, layer=3)                                      # storage: packed.nbytes bytes held
    k_hat, v_hat = ap.unpack(packed)                                     # == fake_quantize
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from rdalloc.apply import PlanApplier, unpack
from rdalloc.layout import check_kv
from rdalloc.measure import measure_distortion as _measure_distortion
from rdalloc.plan import Plan
from rdalloc.quantizers import Quantizer, get_quantizer
from rdalloc.quantizers import fake_quantize_uniform as _fake_quantize_uniform

__all__ = ["fake_quantize", "pack", "unpack", "measure_distortion", "fake_quantize_uniform"]


def _check_tensor(x: Any, name: str, ndim: tuple[int, ...] = (4,)) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    check_kv(x, name, ndim)


def _layers(x: Any, name: str) -> list:
    if isinstance(x, torch.Tensor):
        _check_tensor(x, name, (5,))
        return list(x.unbind(0))
    if isinstance(x, (list, tuple)):
        for i, t in enumerate(x):
            _check_tensor(t, f"{name}[{i}]")
        return list(x)
    raise TypeError(f"{name} must be a tensor or a sequence of per-layer tensors, got {type(x).__name__}")


def fake_quantize(keys: Any, values: Any, plan: Plan, quantizer: Quantizer | str | None = None, *,
                  layer: int | None = None):
    """Fake-quantize one layer (``layer=i``, 4-D tensors) -> :class:`~rdalloc.apply.FakeQuantized`
    ``(keys, values, kept)``, or every layer (``layer=None``; sequences of 4-D tensors or 5-D ``[layers, ...]``
    stacks) -> a list of them.

    ``quantizer`` defaults to the one the plan records. Build a :class:`rdalloc.PlanApplier` to apply a plan
    repeatedly.
    """
    ap = PlanApplier(plan, quantizer)
    if layer is None:
        return ap.fake_quantize_cache(_layers(keys, "keys"), _layers(values, "values"))
    _check_tensor(keys, "keys")
    _check_tensor(values, "values")
    return ap.fake_quantize(keys, values, layer=layer)


def pack(keys: Any, values: Any, plan: Plan, quantizer: Quantizer | str | None = None, *, layer: int | None = None):
    """Packed storage of one layer (:class:`~rdalloc.apply.PackedLayer`) or of every layer
    (:class:`~rdalloc.apply.PackedCache`); see :func:`fake_quantize` for the arguments. ``.nbytes`` is the bytes held
    (full precision at 2 bytes/element)."""
    ap = PlanApplier(plan, quantizer)
    if layer is None:
        return ap.pack_cache(_layers(keys, "keys"), _layers(values, "values"))
    _check_tensor(keys, "keys")
    _check_tensor(values, "values")
    return ap.pack(keys, values, layer=layer)


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
