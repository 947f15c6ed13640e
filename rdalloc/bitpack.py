"""Bit packing: codes of ``b`` bits (``1 <= b <= 8``) as one dense uint8 stream, LSB first, on any array-API backend
(numpy, torch, JAX under ``jax.jit``). :func:`pack_bits` states the stream format; :func:`unpack_bits` inverts it.
"""

from __future__ import annotations

from typing import Any

import array_api_compat
import numpy as np

__all__ = ["pack_bits", "unpack_bits"]


def _byte_map(bits: int) -> list[tuple[int, int, int]]:
    """``(byte k, code j, shift s)`` for 8 codes of ``bits`` bits laid LSB-first over ``bits`` bytes: code ``j``
    holds stream bits ``[bits*j, bits*j + bits)``, byte ``k`` stream bits ``[8k, 8k + 8)``; ``s = bits*j - 8k``."""
    out = []
    for k in range(bits):
        for j in range(8):
            if bits * j < 8 * k + 8 and bits * j + bits > 8 * k:
                out.append((k, j, bits * j - 8 * k))
    return out


def _check_width(bits: Any) -> int:
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or not 1 <= bits <= 8:
        raise ValueError(f"bits must be an integer width in 1..8, got {bits!r}")
    return int(bits)


def pack_bits(codes: Any, bits: int) -> Any:
    """Bit-pack a 1-D uint8 array of codes ``< 2**bits`` into ``ceil(n * bits / 8)`` bytes (uint8), LSB first.

    The stream is the concatenation of the codes' bits, code ``i`` at stream bits ``[i*bits, (i+1)*bits)``, byte ``k``
    holding stream bits ``8k..8k+7`` (bit ``8k`` least significant); the final byte is zero-padded. Every group of 8
    codes becomes ``bits`` bytes through shifts and ors on uint8 (no wider integers, so JAX without x64 works).
    Codes must be in range: higher bits would spill into the neighbours (not checked on the hot path).
    """
    bits = _check_width(bits)
    xp = array_api_compat.array_namespace(codes)
    if codes.ndim != 1 or codes.dtype != xp.uint8:
        raise TypeError(f"codes must be a 1-D uint8 array, got dtype {codes.dtype} shape {tuple(codes.shape)}")
    n = codes.shape[0]
    nbytes = -(-n * bits // 8)
    if bits == 8 or n == 0:
        return codes
    m = -(-n // 8)
    if m * 8 != n:
        codes = xp.concat([codes, xp.broadcast_to(xp.zeros_like(codes[:1]), (m * 8 - n,))])
    cols = xp.reshape(codes, (m, 8))
    out = [None] * bits
    for k, j, s in _byte_map(bits):
        c = cols[:, j]
        part = xp.bitwise_left_shift(c, s) if s >= 0 else xp.bitwise_right_shift(c, -s)
        out[k] = part if out[k] is None else xp.bitwise_or(out[k], part)
    return xp.reshape(xp.stack(out, axis=1), (m * bits,))[:nbytes]


def unpack_bits(packed: Any, bits: int, n: int) -> Any:
    """Inverse of :func:`pack_bits`: the first ``n`` codes (uint8) of a packed stream."""
    bits = _check_width(bits)
    xp = array_api_compat.array_namespace(packed)
    if packed.ndim != 1 or packed.dtype != xp.uint8:
        raise TypeError(f"packed must be a 1-D uint8 array, got dtype {packed.dtype} shape {tuple(packed.shape)}")
    need = -(-n * bits // 8)
    if packed.shape[0] < need:
        raise ValueError(f"a stream of {n} codes at {bits} bits needs {need} bytes, got {packed.shape[0]}")
    if bits == 8 or n == 0:
        return packed[:n]
    m = -(-n // 8)
    data = packed[:need]
    if m * bits != need:
        data = xp.concat([data, xp.broadcast_to(xp.zeros_like(packed[:1]), (m * bits - need,))])
    rows = xp.reshape(data, (m, bits))
    mask = (1 << bits) - 1
    out = [None] * 8
    for k, j, s in _byte_map(bits):
        c = rows[:, k]
        part = xp.bitwise_right_shift(c, s) if s >= 0 else xp.bitwise_left_shift(c, -s)
        out[j] = part if out[j] is None else xp.bitwise_or(out[j], part)
    out = [xp.bitwise_and(o, mask) for o in out]
    return xp.reshape(xp.stack(out, axis=1), (m * 8,))[:n]
