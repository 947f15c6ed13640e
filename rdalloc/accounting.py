"""Byte accounting from the plan alone: the exact bits and bytes a packed cache of a plan holds, before packing.

A packed tensor (:mod:`rdalloc.apply`) holds ``payload bytes + 2 * parameters + 2 * full-precision elements``: full
precision counts 2 bytes per element whatever dtype the tensors compute in (docs/design.md §5), so CPU float32 runs
and GPU bfloat16 runs report the same figures. That equals the cost model's prediction
``sum_i C_i(b_i) = sum_i n_i b_i + m_i [0 < b_i < 16]`` (:func:`item_costs`, :func:`plan_usage`) divided by 8, plus
the padding that rounds each width's stream up to whole bytes (zero whenever every stream holds a multiple of 8 bits,
e.g. head and token plans with ``head_dim % 8 == 0``); :func:`predict_nbytes` gives the exact figure. Everything here
is host integer arithmetic on the plan (numpy), exact. ``quantizer`` is a :class:`~rdalloc.quantizers.Quantizer`, a
registered name or spec, or ``None`` for the one the plan records; ``batch``, ``tokens`` and ``head_dim`` are positive
integers (anything else is refused naming the argument).
"""

from __future__ import annotations

import numbers
from typing import Any

import numpy as np

from .cost import Usage
from .layout import resolve_quantizer, tensor_layout
from .plan import Plan
from .quantizers import group_accounting

__all__ = ["item_costs", "plan_usage", "predict_nbytes"]


def _check_dims(plan: Plan, batch: Any, tokens: Any, head_dim: Any) -> None:
    if not isinstance(plan, Plan):
        raise TypeError(f"plan must be an rdalloc.Plan, got {type(plan).__name__}")
    for name, x in (("batch", batch), ("tokens", tokens), ("head_dim", head_dim)):
        if isinstance(x, bool) or not isinstance(x, numbers.Integral):
            raise TypeError(f"{name} must be a positive integer, got {type(x).__name__} {x!r}")
        if x < 1:
            raise ValueError(f"{name} must be a positive integer, got {x!r}")


def item_costs(plan: Plan, quantizer: Any, role: str, *, batch: int, tokens: int,
               head_dim: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-item ``(sizes, metadata)`` (float64, shaped like the plan's ``role`` bits) such that
    ``rdalloc.cost.item_cost(bits, sizes, metadata)`` summed over items is exactly the bits a packed cache holds for
    ``role`` (without stream padding).

    ``sizes``: elements the item stores (``batch`` rows; a key channel whose head evicts tokens stores only the kept
    ones). ``metadata``: the item's share of the metadata of the groups its elements sit in (whole groups when
    groups nest in items; a shared group is split by stored elements). Items at 0 bits get their would-be size.
    """
    _check_dims(plan, batch, tokens, head_dim)
    quantizer = resolve_quantizer(plan, quantizer)
    bits = plan.key if role == "key" else plan.value
    axes = plan.key_axes if role == "key" else plan.value_axes
    L, H = plan.layers, plan.kv_heads
    n_items = int(np.prod(bits.shape[1:]))
    shape_items = {"kv_head": (H, 1, 1), "token": (H, tokens, 1), "channel": (H, 1, head_dim)}[axes[-1]]
    item = np.arange(n_items).reshape(shape_items)
    # would-be sizes for evicted items: count every element of the item as if stored
    s_all, _, _ = group_accounting(quantizer, role, np.ones((1, 1, 1), np.int8), item, n_items, tokens, head_dim)
    sizes = np.zeros(bits.shape)
    meta = np.zeros(bits.shape)
    for layer in range(L):
        lay = tensor_layout(plan, quantizer, role, layer, (batch, H, tokens, head_dim))
        eb = np.broadcast_to(lay.elem_bits, (H, tokens, head_dim))
        s, m, _ = group_accounting(quantizer, role, eb, item, n_items, tokens, head_dim)
        flat_bits = bits[layer].reshape(-1)
        sizes[layer] = (np.where(flat_bits == 0, s_all, s) * batch).reshape(bits.shape[1:])
        meta[layer] = (m * batch).reshape(bits.shape[1:])
    return sizes, meta


def _accounting(plan: Plan, quantizer: Any, batch: int, tokens: int, head_dim: int) -> tuple[Usage, int]:
    """``(usage, padding bits)`` of the packed cache, summed over layers and roles from their layouts."""
    _check_dims(plan, batch, tokens, head_dim)
    quantizer = resolve_quantizer(plan, quantizer)
    payload = meta = pad = 0
    for layer in range(plan.layers):
        for role in ("key", "value"):
            lay = tensor_layout(plan, quantizer, role, layer, (batch, plan.kv_heads, tokens, head_dim))
            payload += sum(n * b for b, n in lay.counts().items())
            meta += sum(lay.groups().values()) * quantizer.metadata_bits_per_group
            pad += lay.padding_bits()
    usage = Usage(float(payload), float(meta), float(2 * plan.layers * batch * plan.kv_heads * tokens * head_dim))
    return usage, pad


def plan_usage(plan: Plan, quantizer: Any, *, batch: int, tokens: int, head_dim: int) -> Usage:
    """Exact bits a packed cache of this plan holds (keys and values, every layer): payload (codes, and 16 bits per
    full-precision element) and metadata (``metadata_bits_per_group`` per stored group); ``elements`` is every element
    of the uncompressed cache, so ``average_bits / 16`` is the retention versus FP16. Computed from the plan alone
    (integers, exact)."""
    return _accounting(plan, quantizer, batch, tokens, head_dim)[0]


def predict_nbytes(plan: Plan, quantizer: Any, *, batch: int, tokens: int, head_dim: int) -> int:
    """Exact ``PackedCache.nbytes`` of this plan before packing: ``(plan_usage().total_bits + padding_bits) / 8``,
    the padding rounding each width's stream of each layer and role up to whole bytes."""
    usage, pad = _accounting(plan, quantizer, batch, tokens, head_dim)
    return (int(usage.total_bits) + pad) // 8
