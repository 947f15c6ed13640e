"""Distortion measurement: the mean squared error each item suffers at each bit-width, the input to model fitting.

For a KV tensor, a quantizer and bit-widths ``bits = [b_1, ..., b_K]``, :func:`measure_distortion` returns an
``(items, K)`` array ``D[i, k]`` = the mean over item ``i``'s elements (batch rows included) of
``(x - Q_{b_k}(x))**2``, where ``Q_b`` quantizes **the whole tensor uniformly** at ``b`` bits with the quantizer and
dequantizes it (:func:`rdalloc.quantizers.fake_quantize_uniform`, rotations undone, so the error is in the original
coordinates). ``b = 16`` gives 0 and ``b = 0`` (eviction) gives the item's mean square ``mean(x**2)``, the energy an
evicted item loses.

Items and their order follow the plan axes, flattened row-major:

* ``granularity="head"``: one item per ``(layer, kv_head)``;
* ``"token"``: one per ``(layer, kv_head, token)``;
* ``"channel"``: one per ``(layer, kv_head, channel)``.

so ``D[:, k].reshape(plan.key.shape)`` lines up with a plan's bits (``layer`` is absent for a single-layer tensor).

All widths are quantized at once (a leading axis of ``K'`` quantized widths), over chunks of heads sized so that
the ``K'`` copies stay within about ``2**21`` elements (cache-sized), with the same numbers as one pass over the
whole stack up to the order of float32 sums (each head's items are computed alone). For a quantizer whose transform
is orthogonal per token (``Quantizer.orthogonal``, e.g. QuaRot's Hadamard rotation), per-head and per-token errors
are measured in the rotated coordinates, which skips rotating the ``K'`` copies back; per-channel errors always
rotate back. Pure array-API code: numpy, torch (CPU/CUDA, no host syncs) and ``jax.jit`` (with ``bits``, ``role``,
``granularity`` and the quantizer static) run the same function.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import array_api_compat
import numpy as np

from .models import FULL_BITS
from .quantizers import (
    GRANULARITIES,
    Quantizer,
    check_role,
    compute_dtype,
    from_groups,
    get_quantizer,
    padding_mask,
    to_device,
    to_groups,
)

__all__ = ["measure_distortion"]

_CHUNK_ELEMENTS = 2 ** 21  # quantized copies held at once (all widths of a chunk of heads)


def measured_bits(bits: Any, quantizer: Quantizer) -> tuple[int, ...]:
    """``bits`` as a tuple of integer widths the quantizer supports (``TypeError``/``ValueError`` naming ``bits``)."""
    try:
        seq = [bits] if isinstance(bits, (int, np.integer)) else list(bits)
    except TypeError:
        raise TypeError(f"bits must be a list of integer bit-widths, got {bits!r}") from None
    if not seq:
        raise ValueError("bits must hold at least one bit-width, got []")
    out = []
    for b in seq:
        if isinstance(b, bool) or not isinstance(b, (int, np.integer)) and not (
                isinstance(b, float) and float(b).is_integer()):
            raise TypeError(f"bits must be integers, got {b!r} in {seq!r}")
        out.append(int(b))
    quantizer.check_bits(np.asarray(out), "bits")
    return tuple(out)


def measure_distortion(x: Any, quantizer: Quantizer | str, bits: Sequence[int], *, role: str,
                       granularity: str = "head") -> Any:
    """Per-item MSE at each width: an ``(items, len(bits))`` array of ``x``'s backend (float32; float64 for float64
    input).

    Args:
      x: one layer ``[batch, kv_heads, tokens, head_dim]`` or a stack ``[layers, batch, kv_heads, tokens, head_dim]``.
      quantizer: a :class:`~rdalloc.quantizers.Quantizer` or a registered name.
      bits: widths to measure, each 0, 16 or in the quantizer's range (e.g. ``range(1, 9)``).
      role: ``"key"`` or ``"value"`` (KIVI groups them differently).
      granularity: ``"head"``, ``"token"`` or ``"channel"`` (see the module docstring for the item order).
    """
    quantizer = get_quantizer(quantizer)
    check_role(role)
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    bits = measured_bits(bits, quantizer)
    xp = array_api_compat.array_namespace(x)
    if x.ndim not in (4, 5):
        raise ValueError(f"x must be [batch, kv_heads, tokens, head_dim] or [layers, batch, kv_heads, tokens, "
                         f"head_dim], got shape {tuple(x.shape)}")
    if not xp.isdtype(x.dtype, "real floating"):
        raise TypeError(f"x must be a real floating tensor, got dtype {x.dtype}")
    if x.ndim == 5:  # fold layers into heads: (L, B, H, T, D) -> (B, L*H, T, D), heads ordered (layer, kv_head)
        L, B, H, T, D = x.shape
        x = xp.reshape(xp.permute_dims(x, (1, 0, 2, 3, 4)), (B, L * H, T, D))
    B, H, T, D = x.shape
    if any(0 < b < FULL_BITS for b in bits):
        quantizer.check_range(x, "x")
    cd = compute_dtype(xp, x)
    xf = xp.astype(x, cd, copy=False)
    axes = {"head": (1, 3, 4), "token": (1, 4), "channel": (1, 3)}[granularity]

    def per_item(err):  # (K, B, H, T, D) -> (K, items)
        m = xp.mean(err, axis=axes)
        return xp.reshape(m, (m.shape[0], -1))

    quantized = [b for b in bits if 0 < b < FULL_BITS]
    cols: dict[int, Any] = {}
    if quantized:
        grouping = quantizer.grouping(role, D)
        bk = to_device(np.asarray(quantized, dtype=np.int32).reshape(-1, 1, 1, 1, 1, 1), x)
        valid = padding_mask(grouping, T, D)
        if valid is not None:
            valid = to_device(valid, x)
        rotate_back = granularity == "channel" or not quantizer.orthogonal
        step = max(1, _CHUNK_ELEMENTS // max(1, len(quantized) * B * T * D))
        parts = []
        for h0 in range(0, H, step):  # chunks of whole heads: items never straddle a chunk
            xc = quantizer.transform(xf[:, h0:h0 + step, ...], role)
            xg = to_groups(xc, grouping)
            params = quantizer.fit(xg, bk, valid)
            xh = from_groups(quantizer.decode(quantizer.encode(xg, params, bk), params, bk), grouping, T, D)
            if rotate_back:
                xh, xc = quantizer.inverse_transform(xh, role), xf[:, h0:h0 + step, ...]
            parts.append(per_item((xh - xc[None, ...]) ** 2))
        d = parts[0] if len(parts) == 1 else xp.concat(parts, axis=1)
        for k, b in enumerate(quantized):
            cols[b] = d[k, :]
    if 0 in bits:
        cols[0] = per_item((xf * xf)[None, ...])[0, :]
    if FULL_BITS in bits:
        n_items = {"head": H, "token": H * T, "channel": H * D}[granularity]
        cols[FULL_BITS] = to_device(np.zeros((n_items,), dtype=np.float64 if cd == xp.float64 else np.float32), x)
    return xp.stack([cols[b] for b in bits], axis=1)
