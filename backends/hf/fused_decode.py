"""Decode attention read straight from a compressed cache's packed storage (docs/design.md §8), without rebuilding
the full-precision prefix.

**Layout, fixed at compression** (:func:`fused_layout`, one :class:`FusedLayout` per :class:`~.compress.CompressedRow`).
The packed streams of :mod:`rdalloc.apply` already hold, per width, each kv head's codes contiguously, head after
head, with their float16 group parameters in the same order; for the plans a compressed cache holds (a width per
head, per key channel or per token) the codes of one (head, width) pair form a product of a token set and a unit set
(channels, or channel groups), laid out channel-major for token groups (KIVI keys, ``[units, tokens]``) and
token-major for channel groups (values, per-token quantizers, ``[tokens, units, g]``). So the fused layout is index
metadata only: for every (role, kv head, width) a :class:`Segment` with the offset of its codes and parameters in the
width's stream, the units it covers, the head slots of its tokens (the head's kept middle tokens, in position order)
and, for token groups, each token's parameter block. Nothing is copied: the bytes held stay the packed bytes
(``nbytes == predicted_nbytes``). Full-precision middle elements (width 16) are a segment whose codes are the values
themselves (scale 1, zero 0, not rotated). A layout that is not such a product (a custom quantizer grouping values
along tokens, a width varying along both axes) raises :class:`FusedUnsupported` at compression and the row keeps the
dequantize-and-gather path.

**One step** (:func:`fused_attention`), per batch row and kv head, its ``G`` query heads (GQA) and ``q`` queries as
``G q`` rows:

* each width's stream is unpacked once per layer and row (:func:`unpack_codes`: 8 codes per ``b`` bytes read as one
  little-endian word; cost in proportion to the bytes held), never dequantized;
* scores ``q . k`` from the codes with the scale/zero algebra. Token groups (KIVI keys; scale ``s_cj`` and zero
  ``z_cj`` per channel ``c`` and token block ``j``): ``q . k_t = sum_c (q_c s_cj(t)) code_ct + sum_c q_c z_cj(t)``.
  Channel groups (per-token scale ``s_tu`` and zero ``z_tu`` per channel group ``u``):
  ``q . k_t = sum_u s_tu (q_u . code_tu) + z_tu sum(q_u)``. Symmetric absmax is the same with ``z = -c s``.
  QuaRot rotates the query (``H q``) instead of the stored keys;
* the sink, the head's kept middle tokens (every width), the window and the appended tokens (read from a
  preallocated buffer up to its valid length, causal among themselves) enter one softmax;
* the output from the probabilities folded into the value scales: ``sum_t p_t v_t = sum_u (p_t s_tu) code_tu +
  sum_t p_t z_tu`` per channel group; QuaRot's rotated part is rotated back once (``H`` is its own inverse).

**Implementation.** Two paths with the same algebra. This module's plain PyTorch one (a fixed handful of ops per
(kv head, width) segment; any device torch runs on, no compiler) is the oracle and the fallback. On CPU
:func:`fused_attention` runs, by default (:data:`KERNEL_DEFAULT`), the compiled kernel of :mod:`.fused_kernel`: one
call per row and layer over a segment table laid out at compression (``RoleLayout.kernel``), decoding each code once
into a small buffer; why a C++ loop rather than ``torch.compile`` or numba is in that module's docstring. The plain
path's cost is the unpacking of the bytes held plus matmuls over the kept codes (transient float copies of one
segment's codes at a time, never the prefix) and, at short context, the per-op overhead of its many small ops; both
paths grow with the bytes held, not with the tokens seen. :func:`~.compress.reference_attention` (explicit per-head
gathers of the dequantized prefix) is the oracle both are tested against.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from rdalloc.apply import PackedTensor
from rdalloc.bitpack import unpack_bits
from rdalloc.models import FULL_BITS
from rdalloc.quantizers import AsymmetricQuantizer, Quantizer, QuaRot, SymmetricAbsmax, hadamard_transform

__all__ = ["KERNEL_DEFAULT", "FusedUnsupported", "Segment", "RoleLayout", "FusedLayout", "fused_layout", "unpack_codes",
           "fused_attention"]


class FusedUnsupported(ValueError):
    """The packed storage of a row cannot be read by the fused path (the reason is the message)."""


@dataclass(frozen=True)
class Segment:
    """The codes of one (kv head, width) pair: ``n_units * n_tokens`` codes from element ``code_start`` of the width's
    unpacked stream (16: of the full-precision elements); parameters (widths 1..8) from group ``param_start``.
    ``units``: channel (token groups) or channel-group (channel groups) indices, ``None`` = all in order; ``slots``:
    the tokens' positions among the head's kept middle tokens, ``None`` = all in order; ``blocks`` (token groups): each
    token's parameter block among the segment's ``n_blocks``."""

    width: int
    code_start: int
    n_units: int
    n_tokens: int
    param_start: int
    n_blocks: int
    units: torch.Tensor | None
    slots: torch.Tensor | None
    blocks: torch.Tensor | None


@dataclass(frozen=True)
class RoleLayout:
    """Keys or values of one row and layer: ``axis`` (``"token"``/``"channel"``: the quantizer's grouping), group
    size ``g``, ``widths`` (the streams, as :attr:`PackedTensor.payload`), ``counts`` (codes per stream),
    ``segments[h]`` (kv head ``h``'s :class:`Segment` list); ``merged`` (channel groups): per width whose segments
    cover every unit, one :class:`Segment` over every head's tokens (the stream holds them head after head) and the
    ``(head, segment)`` pairs it joins, so that one matmul serves all kv heads; ``kernel``: the segment table of the
    compiled kernel (:func:`_kernel_table`)."""

    axis: str
    g: int
    widths: tuple
    counts: tuple
    segments: tuple
    merged: tuple = ()
    kernel: tuple = ()


@dataclass(frozen=True)
class FusedLayout:
    """Both roles of one :class:`~.compress.CompressedRow`; ``kept[h]``: head ``h``'s kept middle tokens; ``rotate``:
    queries and rotated outputs go through the normalized Hadamard transform (QuaRot); ``lossless``: nothing
    quantized and nothing evicted (the row is the original prefix); ``kept_counts``: int64 ``[kv_heads]``, the kept
    counts (for the compiled kernel)."""

    keys: RoleLayout
    values: RoleLayout
    kept: tuple
    rotate: bool
    quantizer: Quantizer
    lossless: bool = False
    kept_counts: torch.Tensor | None = None


def _affine_kind(q: Quantizer) -> str:
    if isinstance(q, SymmetricAbsmax):
        return "absmax"
    if isinstance(q, AsymmetricQuantizer):
        return "asymmetric"
    raise FusedUnsupported(f"quantizer {q.name!r}: the fused path knows the affine decoding of the asymmetric "
                           f"quantizers and symmetric absmax only")


def _rotates(q: Quantizer) -> bool:
    if isinstance(q, QuaRot):
        return True
    if type(q).transform is not Quantizer.transform:
        raise FusedUnsupported(f"quantizer {q.name!r} transforms the vectors; the fused path can fold only QuaRot's "
                               f"Hadamard rotation into the query")
    return False


def _product(first: np.ndarray, second: np.ndarray, where: str) -> tuple[np.ndarray, np.ndarray]:
    """``(A, B)`` when the pairs ``(first, second)`` are exactly ``A x B`` in ``first``-major order."""
    a, b = np.unique(first), np.unique(second)
    if first.size != a.size * b.size or not (np.array_equal(first, np.repeat(a, b.size))
                                              and np.array_equal(second, np.tile(b, a.size))):
        raise FusedUnsupported(f"{where}: the stored elements are not a (units x tokens) block")
    return a, b


def _index(values: np.ndarray, n: int, device) -> torch.Tensor | None:
    if values.size == n and np.array_equal(values, np.arange(n)):
        return None
    return torch.from_numpy(values.astype(np.int64)).to(device)


def _role_layout(packed: PackedTensor, kept: list[np.ndarray], device) -> RoleLayout:
    layout = packed.layout
    B, H, T, D = layout.shape
    if B != 1:
        raise FusedUnsupported(f"a compressed row packs one sequence, got batch {B}")
    _, P, Qv, g = layout.view_shape
    axis = layout.grouping.axis
    if axis == "token" and layout.role == "value":
        raise FusedUnsupported("values grouped along tokens")
    if axis == "channel" and not layout.units_are_rows:
        raise FusedUnsupported(f"{layout.role}s: channel groups only partly stored")
    idx = layout.host_indices()
    segments: list[list[Segment]] = [[] for _ in range(H)]
    for b in (*layout.widths, FULL_BITS):
        units = idx["units"][b]
        if b == FULL_BITS and not layout.has_full:
            continue
        if axis == "token":  # group view (H, D, Tg, g): elements ((h D + c) Tg + j) g + i, token j g + i
            el = (units[:, None] * g + np.arange(g)).reshape(-1) if layout.units_are_rows else units
            h, rem = np.divmod(el, P * Qv * g)
            unit, tok = np.divmod(rem, Qv * g)
        else:  # group view (H, T, Q, g): rows (h T + t) Q + u
            h, rem = np.divmod(units, T * Qv)
            tok, unit = np.divmod(rem, Qv)
        rows = idx["rows"].get(b)
        if b != FULL_BITS:
            rh, rrem = np.divmod(rows, P * Qv)
            r1, r2 = np.divmod(rrem, Qv)  # token groups: (channel, block); channel groups: (token, unit)
        start = pstart = 0
        for head in range(H):
            sel = h == head
            n = int(sel.sum())
            if not n:
                continue
            where = f"{layout.role}s, kv head {head}, width {b}"
            if axis == "token":
                us, ts = _product(unit[sel], tok[sel], where)
            else:
                ts, us = _product(tok[sel], unit[sel], where)
            slots = np.searchsorted(kept[head], ts)
            if slots.max(initial=-1) >= kept[head].size or not np.array_equal(kept[head][slots], ts):
                raise FusedUnsupported(f"{where}: stored tokens outside the head's kept tokens")
            n_blocks, blocks, n_params = ts.size, None, 0
            if b != FULL_BITS:
                rsel = rh == head
                n_params = int(rsel.sum())
                if axis == "token":
                    cs, js = _product(r1[rsel], r2[rsel], where + " (parameters)")
                    if not np.array_equal(cs, us):
                        raise FusedUnsupported(f"{where}: parameters and codes cover different channels")
                    n_blocks = js.size
                    blk = np.searchsorted(js, ts // g)
                    if not np.array_equal(js[np.minimum(blk, js.size - 1)], ts // g):
                        raise FusedUnsupported(f"{where}: a token without its group's parameters")
                    blocks = torch.from_numpy(blk.astype(np.int64)).to(device)
                elif not (np.array_equal(r1[rsel], tok[sel]) and np.array_equal(r2[rsel], unit[sel])):
                    raise FusedUnsupported(f"{where}: parameters not in the codes' order")
            segments[head].append(Segment(width=b, code_start=start, n_units=us.size, n_tokens=ts.size,
                                          param_start=pstart, n_blocks=n_blocks,
                                          units=_index(us, D if axis == "token" else Qv, device),
                                          slots=_index(slots, kept[head].size, device), blocks=blocks))
            start += n if axis == "token" else n * g
            pstart += n_params
    counts = tuple(int(idx["units"][b].size) * (g if layout.units_are_rows else 1) for b in layout.widths)
    merged = []
    if axis == "channel":
        for b in (*layout.widths, FULL_BITS):
            parts = [(h, seg) for h in range(H) for seg in segments[h] if seg.width == b]
            if parts and all(seg.units is None for _, seg in parts):
                first = parts[0][1]
                n = sum(seg.n_tokens for _, seg in parts)
                merged.append((Segment(width=b, code_start=first.code_start, n_units=first.n_units, n_tokens=n,
                                       param_start=first.param_start, n_blocks=n, units=None, slots=None,
                                       blocks=None), tuple(parts)))
    return RoleLayout(axis=axis, g=g, widths=tuple(layout.widths), counts=counts,
                      segments=tuple(tuple(s) for s in segments), merged=tuple(merged),
                      kernel=_kernel_table(segments, tuple(layout.widths), device))


def _kernel_table(segments, widths: tuple, device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(meta, idx)``: int64 ``[segments, 11]`` rows ``(head, width, code_start, n_units, n_tokens, param_start,
    n_blocks, units, slots, blocks, stream)`` (``units``/``slots``/``blocks``: offsets into ``idx``, the
    concatenated index vectors, ``-1`` for ``None``; ``stream``: position of the width in the packed payload, ``-1``
    for full-precision elements), built once at compression for :mod:`.fused_kernel`."""
    rows, parts, at = [], [], 0
    for head, segs in enumerate(segments):
        for seg in segs:
            offs = []
            for t in (seg.units, seg.slots, seg.blocks):
                if t is None:
                    offs.append(-1)
                else:
                    offs.append(at)
                    parts.append(t.cpu())
                    at += t.numel()
            rows.append([head, seg.width, seg.code_start, seg.n_units, seg.n_tokens, seg.param_start, seg.n_blocks,
                         *offs, widths.index(seg.width) if seg.width != FULL_BITS else -1])
    meta = torch.tensor(rows, dtype=torch.int64).reshape(-1, 11)
    idx = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64)
    return meta.to(device), idx.to(device)


def fused_layout(packed_layer, kept: np.ndarray, middle: int | None = None) -> FusedLayout:
    """The :class:`FusedLayout` of a row's packed middle (``packed_layer``: a :class:`rdalloc.apply.PackedLayer`,
    batch 1; ``kept`` ``[kv_heads, tokens]`` bool: the kept, unprotected tokens; ``middle``: how many tokens are
    unprotected, to recognise a lossless row). Raises :class:`FusedUnsupported` when the storage is not laid out as
    the module docstring says."""
    q = packed_layer.keys.layout.quantizer
    _affine_kind(q)
    rotate = _rotates(q)
    device = packed_layer.keys.full.device
    kept_pos = [np.flatnonzero(k) for k in np.asarray(kept, dtype=bool)]
    lossless = (middle is not None and not (packed_layer.keys.layout.widths or packed_layer.values.layout.widths)
                and all(k.size == middle for k in kept_pos))
    return FusedLayout(keys=_role_layout(packed_layer.keys, kept_pos, device),
                       values=_role_layout(packed_layer.values, kept_pos, device),
                       kept=tuple(kept_pos), rotate=rotate, quantizer=q, lossless=lossless,
                       kept_counts=torch.tensor([k.size for k in kept_pos], dtype=torch.int64))


_SHIFTS: dict = {}


def _shifts(bits: int, device) -> torch.Tensor:
    key = (bits, device)
    if key not in _SHIFTS:
        _SHIFTS[key] = torch.arange(0, 8, bits, dtype=torch.uint8, device=device)
    return _SHIFTS[key]


def unpack_codes(stream: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """The first ``n`` codes (uint8) of a stream packed by :func:`rdalloc.bitpack.pack_bits`: every 8 codes are
    ``bits`` bytes, read as one little-endian integer and split by shifts (two passes over the bytes)."""
    if bits == 8 or n == 0:
        return stream[:n]
    mask = (1 << bits) - 1
    if 8 % bits == 0:
        per = 8 // bits
        shifts = _shifts(bits, stream.device)
        m = -(-n // per)
        return ((stream[:m, None] >> shifts) & mask).reshape(-1)[:n]
    m = n // 8
    out = []
    if m:
        rows = stream[:m * bits].reshape(m, bits).to(torch.int64)
        word = (rows << (8 * torch.arange(bits, device=stream.device))).sum(1)
        out.append(((word[:, None] >> (bits * torch.arange(8, device=stream.device))) & mask).to(torch.uint8)
                   .reshape(-1))
    if n - 8 * m:
        out.append(unpack_bits(stream[m * bits:], bits, n - 8 * m))
    return out[0] if len(out) == 1 else torch.cat(out)


def _decode_params(q: Quantizer, params: torch.Tensor, bits: int, cd) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale, zero)`` ``[groups]`` in ``cd``: ``x_hat = code * scale + zero``."""
    p = params[:, 0].to(cd)
    if isinstance(q, SymmetricAbsmax):
        c = 0.5 if bits == 1 else float(2 ** (bits - 1) - 1)
        return p[0], -c * p[0]
    return p[0], p[1]


class _Streams:
    """One role's codes (uint8; width 16: the values as floats) and parameters per width, unpacked once per step
    for the whole stream (every head); segments are views of them."""

    def __init__(self, packed: PackedTensor, role: RoleLayout, q: Quantizer, cd):
        self.codes, self.scale, self.zero = {}, {}, {}
        for b, stream, params, n in zip(role.widths, packed.payload, packed.params, role.counts):
            self.codes[b] = unpack_codes(stream, b, n)
            self.scale[b], self.zero[b] = _decode_params(q, params, b, cd)
        self.codes[FULL_BITS] = packed.full.reshape(-1).to(cd)

    def block(self, seg: Segment, shape: tuple) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """The segment's codes viewed as ``shape`` and its scales and zeros (``None`` at width 16)."""
        n = seg.n_units * seg.n_tokens * (shape[-1] if len(shape) == 3 else 1)
        codes = self.codes[seg.width][seg.code_start:seg.code_start + n].view(shape)
        if seg.width == FULL_BITS:
            return codes, None, None
        m = seg.n_units * seg.n_blocks
        return (codes, self.scale[seg.width][seg.param_start:seg.param_start + m],
                self.zero[seg.width][seg.param_start:seg.param_start + m])


def _key_scores(st: _Streams, role: RoleLayout, seg: Segment, q: torch.Tensor) -> torch.Tensor:
    """``[rows, n_tokens]``: ``q . k_t`` of the segment's tokens (``q`` ``[rows, D]``, rotated for quantized
    segments of a rotating quantizer)."""
    if role.axis == "token":  # codes [units, tokens]; scale, zero [units, blocks]
        codes, s, z = st.block(seg, (seg.n_units, seg.n_tokens))
        qs = q if seg.units is None else q.index_select(1, seg.units)  # [rows, units]
        if s is None:
            return qs @ codes
        s = s.view(seg.n_units, seg.n_blocks)
        z = z.view(seg.n_units, seg.n_blocks)
        # the token's block selects its scale: one transient product over this segment's codes
        return qs @ (codes * s.index_select(1, seg.blocks)) + (qs @ z).index_select(1, seg.blocks)  # uint8 * float
    g = role.g  # codes [tokens, units, g]; scale, zero [tokens, units]
    codes, s, z = st.block(seg, (seg.n_tokens, seg.n_units, g))
    codes = codes.to(q.dtype)
    qg = q.view(q.shape[0], -1, g)
    if seg.units is not None:
        qg = qg.index_select(1, seg.units)  # [rows, units, g]
    if seg.n_units == 1:
        dots = qg[:, 0] @ codes[:, 0].T
        return dots if s is None else dots * s + qg[:, 0].sum(-1, keepdim=True) * z
    dots = torch.bmm(qg.transpose(0, 1), codes.permute(1, 2, 0))  # [units, rows, tokens]
    if s is None:
        return dots.sum(0)
    s = s.view(seg.n_tokens, seg.n_units)
    z = z.view(seg.n_tokens, seg.n_units)
    return (dots * s.T[:, None, :]).sum(0) + qg.sum(-1) @ z.T


def _value_sum(st: _Streams, role: RoleLayout, seg: Segment, p: torch.Tensor) -> torch.Tensor:
    """``[rows, units, g]``: ``sum_t p_t v_t`` over the segment's tokens (``p`` ``[rows, n_tokens]``): the
    probabilities folded into the per-token scales, ``sum_t (p_t s_tu) code_tu + sum_t p_t z_tu``."""
    g = role.g
    codes, s, z = st.block(seg, (seg.n_tokens, seg.n_units, g))
    codes = codes.to(p.dtype)
    if seg.n_units == 1:
        if s is None:
            return (p @ codes[:, 0])[:, None]
        return ((p * s) @ codes[:, 0] + (p @ z)[:, None])[:, None]
    if s is None:
        return (p @ codes.view(seg.n_tokens, -1)).view(p.shape[0], seg.n_units, g)
    s = s.view(seg.n_tokens, seg.n_units)
    z = z.view(seg.n_tokens, seg.n_units)
    ps = (p[:, :, None] * s).permute(2, 0, 1)  # [units, rows, tokens]
    return torch.bmm(ps, codes.transpose(0, 1)).transpose(0, 1) + (p @ z)[:, :, None]


def _row_attention(layer, b: int, row, query: torch.Tensor, scaling: float, cd, streams) -> torch.Tensor:
    """``[q_heads, q, D]`` for batch row ``b`` (its compressed row ``row``) of a layer. The dense parts (sink, window,
    appended) of every kv head at once; the middle head by head, width by width."""
    fl: FusedLayout = row.fused
    ks, vs = streams
    Hq, nq, D = query.shape
    H = len(fl.kept)
    R = Hq // H * nq  # query rows per kv head: (query head in the group, query)
    T = layer.keys.shape[-2]
    qa = query.to(cd).reshape(H, R, D)
    qr = hadamard_transform(qa) if fl.rotate else qa
    dk, dv = row.dense_kv  # [1, H, sink + window, D]
    dk, dv = dk[0].to(cd), dv[0].to(cd)
    ak, av = layer.keys[b, :, :T].to(cd), layer.values[b, :, :T].to(cd)
    s_app = qa @ ak.transpose(1, 2)
    if nq > 1:  # causality among the appended tokens (the queries are the last nq)
        future = (torch.arange(T, device=query.device)[None, :]
                  > (T - nq + torch.arange(nq, device=query.device))[:, None])
        s_app = s_app.view(H, -1, nq, T).masked_fill(future, float("-inf")).view(H, R, T)
    counts = [k.size for k in fl.kept]
    n_max = max(counts, default=0)
    mid = torch.full((H, R, n_max), float("-inf"), dtype=cd, device=query.device)
    for h in range(H):
        if not counts[h]:
            continue
        m = mid[h, :, :counts[h]]
        m.zero_()
        for seg in fl.keys.segments[h]:
            part = _key_scores(ks, fl.keys, seg, qa[h] if seg.width == FULL_BITS else qr[h])
            if seg.slots is None:
                m += part
            else:
                m.index_add_(1, seg.slots, part)
    scores = torch.cat([qa @ dk.transpose(1, 2), mid, s_app], dim=2)
    p = torch.softmax(scores * scaling, dim=2)
    n_d = dk.shape[1]
    p_dense, p_mid, p_app = torch.split(p, [n_d, n_max, T], dim=2)
    o = p_dense @ dv + p_app @ av  # [H, R, D]
    o_rot = torch.zeros_like(o) if fl.rotate else o
    g = fl.values.g
    done = set()
    for seg, parts in fl.values.merged:  # one width, every kv head: p placed block-diagonally, one matmul
        p_all = torch.zeros(H, R, seg.n_tokens, dtype=cd, device=query.device)
        at = 0
        for h, part in parts:
            ph = p_mid[h, :, :counts[h]]
            p_all[h, :, at:at + part.n_tokens] = ph if part.slots is None else ph.index_select(1, part.slots)
            at += part.n_tokens
        target = (o if seg.width == FULL_BITS else o_rot).view(H * R, -1, g)
        target += _value_sum(vs, fl.values, seg, p_all.view(H * R, seg.n_tokens))
        done.add(seg.width)
    for h in range(H):
        if not counts[h]:
            continue
        ph = p_mid[h, :, :counts[h]]
        for seg in fl.values.segments[h]:
            if seg.width in done:
                continue
            part = _value_sum(vs, fl.values, seg, ph if seg.slots is None else ph.index_select(1, seg.slots))
            target = (o if seg.width == FULL_BITS else o_rot)[h].view(R, -1, g)
            if seg.units is None:
                target += part
            else:
                target.index_add_(1, seg.units, part)
    if fl.rotate:
        o = o + hadamard_transform(o_rot)
    return o.view(Hq, nq, D)


KERNEL_DEFAULT = True
"""Whether :func:`fused_attention` runs the compiled CPU kernel (:mod:`.fused_kernel`) unless told otherwise; the
plain PyTorch path answers where the kernel does not apply (GPU, float64 queries) or cannot be built."""


def _use_kernel(kernel: bool | None, query: torch.Tensor):
    if kernel is not None and not isinstance(kernel, bool):
        raise TypeError(f"kernel must be None (KERNEL_DEFAULT), True or False, got {kernel!r}")
    if not (KERNEL_DEFAULT if kernel is None else kernel):
        return None
    if query.device.type != "cpu" or query.dtype == torch.float64:
        return None
    from .fused_kernel import load

    return load()


@torch.no_grad()
def fused_attention(layer, query: torch.Tensor, scaling: float | None = None, *,
                    kernel: bool | None = None) -> torch.Tensor:
    """Attention of ``query`` (``[batch, q_heads, q, head_dim]``, the last ``q`` appended tokens) over every batch row
    of ``layer`` (a :class:`~.compress.CompressedLayer` whose rows have a fused layout), read from the packed storage
    (module docstring). Returns ``[batch, q, q_heads, head_dim]`` in the query's dtype, equal to
    :func:`~.compress.reference_attention` within float rounding. ``kernel`` (default :data:`KERNEL_DEFAULT`): run
    the compiled CPU kernel (:mod:`.fused_kernel`; float32 arithmetic) for CPU queries other than float64; where it
    cannot be built, one warning and this plain PyTorch path."""
    B, Hq, nq, D = query.shape
    if B != len(layer.rows):
        raise ValueError(f"layer {layer.layer_idx}: the query has batch {B}, the cache holds {len(layer.rows)} rows")
    s = D ** -0.5 if scaling is None else float(scaling)
    op = _use_kernel(kernel, query)
    if op is not None:
        from .fused_kernel import row_attention

        out = torch.empty(B, nq, Hq, D, dtype=query.dtype, device=query.device)
        for b, row in enumerate(layer.rows):
            if row.fused is None:
                raise FusedUnsupported(f"layer {layer.layer_idx}, row {b}: no fused layout ({row.fused_reason})")
            out[b] = row_attention(op, layer, b, row, query[b], s).transpose(0, 1)
        return out
    cd = torch.float64 if query.dtype == torch.float64 else torch.float32
    decoded: dict[int, tuple] = {}
    out = torch.empty(B, nq, Hq, D, dtype=query.dtype, device=query.device)
    for b, row in enumerate(layer.rows):
        fl = row.fused
        if fl is None:
            raise FusedUnsupported(f"layer {layer.layer_idx}, row {b}: no fused layout ({row.fused_reason})")
        if id(row) not in decoded:  # rows shared by several batch slots (beams) are unpacked once
            q = fl.quantizer
            decoded[id(row)] = (_Streams(row.packed.keys, fl.keys, q, cd),
                                _Streams(row.packed.values, fl.values, q, cd))
        out[b] = _row_attention(layer, b, row, query[b], s, cd, decoded[id(row)]).transpose(0, 1)
    return out
