"""Decode attention read straight from a :class:`~.packed_cache.PackedHeadCache`'s packed storage, without
dequantizing the stored tokens: ``with PackedAttention(model): model.generate(ids, cache=cache)``.

Without it the cache's ``update`` hands attention every stored token dequantized (one float copy of the whole
prefix per layer and step, then the model's attention over it). Under :class:`PackedAttention` a layer only stores
the new tokens and the attention reads the codes, per width, with the scale/zero algebra (the same as the joint
cache's :mod:`.fused_decode`, on the head plan's regular layout: every head at one width holds the same tokens).

For kv head ``h`` at width ``b`` and its ``G`` query heads times ``q`` queries as ``R = G q`` rows (GQA: query head
``j`` reads kv head ``j // G``), with ``x_hat = code * s + z`` (symmetric absmax: ``z = -c s``):

* keys grouped along tokens (KIVI: ``s_jc``, ``z_jc`` per channel ``c`` and block ``j`` of ``g`` tokens):
  ``q . k_t = sum_c (q_c s_j(t)c) code_tc + sum_c q_c z_j(t)c`` — the query folded into the block's scales once
  per block, the codes entering one batched matmul as small integers;
* keys grouped within a token (channel groups ``u``: ``s_tu``, ``z_tu``):
  ``q . k_t = sum_u s_tu (q_u . code_tu) + z_tu sum(q_u)``;
* values within a token: ``sum_t p_t v_t = sum_t (p_t s_tu) code_tu + sum_t p_t z_tu`` (the probabilities folded
  into the per-token scales); values along tokens: ``sum_j s_jc sum_{t in j} p_t code_tc + z_jc sum_{t in j} p_t``;
* QuaRot stores ``H x`` (normalized Hadamard, symmetric and orthogonal): the quantized heads' scores use ``H q`` and
  their output is rotated back once, ``H sum_t p_t (H v)_t``;
* heads at 16 bits and the full-precision residual enter the same softmax as plain dot products; heads at 0 bits
  read as zero vectors (score 0, output 0), as the dequantizing path hands them to attention.

The attention mask the model built (boolean, additive, or ``None`` for plain causal) is applied to each set of rows
that share their left padding over its real tokens (the last ``n`` of the mask's columns). The result equals the
model's attention over :meth:`~.packed_cache.PackedHeadLayer.update`'s dequantized tokens within float rounding
(``tests/test_packed_attention.py``); ``generate`` gives the same tokens. Work per step is the unpacking of the
bytes held plus matmuls over the codes; the prefix is never materialized in floats.
"""

from __future__ import annotations

from typing import Any

import torch

from rdalloc.quantizers import (
    AsymmetricQuantizer,
    Quantizer,
    QuaRot,
    SymmetricAbsmax,
    fake_quantize_uniform,
    hadamard_transform,
)

from .attention import CacheAttention
from .fused_decode import unpack_codes

__all__ = ["PackedAttention", "packed_attention", "supports_packed_attention"]


def supports_packed_attention(q: Quantizer) -> str | None:
    """``None`` when :func:`packed_attention` can read storage of quantizer ``q``, else why not."""
    if not isinstance(q, (AsymmetricQuantizer, SymmetricAbsmax)):
        return f"quantizer {q.name!r}: only the affine decoding of the asymmetric quantizers and absmax is folded"
    if type(q).transform is not Quantizer.transform and not isinstance(q, QuaRot):
        return f"quantizer {q.name!r} transforms the vectors; only QuaRot's rotation is folded into the query"
    return None


def _affine(q: Quantizer, params: torch.Tensor, bits: int, cd: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale, zero)`` in ``cd`` from the stored float16 parameters ``[n_params, ...]``: ``x_hat = code * scale +
    zero``."""
    p = params.to(cd)
    if isinstance(q, SymmetricAbsmax):
        c = 0.5 if bits == 1 else float(2 ** (bits - 1) - 1)
        return p[0], -c * p[0]
    return p[0], p[1]


def _codes(spec, packed: torch.Tensor, bits: int, cd: torch.dtype) -> torch.Tensor:
    """Unpacked codes in ``cd``: token groups ``[rows, heads, K, D, g]`` (unit-major, as stored); channel groups
    ``[rows, heads, T, D/g, g]``."""
    rows, heads, K, _ = packed.shape
    g = spec.quantizer.grouping(spec.role, spec.head_dim).size
    n = rows * heads * K * spec.unit * spec.head_dim
    c = unpack_codes(packed.reshape(-1), bits, n).to(cd)
    if spec.unit > 1:
        return c.view(rows, heads, K, spec.head_dim, g)
    return c.view(rows, heads, K, spec.head_dim // g, g)


def _key_scores(spec, packed, params, bits, q, cd) -> torch.Tensor:
    """``[rows, heads, R, T]``: the stored tokens' scores for queries ``q`` ``[rows, heads, R, D]``."""
    codes = _codes(spec, packed, bits, cd)
    s, z = _affine(spec.quantizer, params, bits, cd)
    if spec.unit > 1:  # s, z [rows, heads, K, D]; codes [rows, heads, K, D, g]
        qs = q[:, :, None] * s[:, :, :, None]  # [rows, heads, K, R, D]
        dots = (qs @ codes).transpose(2, 3)  # [rows, heads, R, K, g]
        bias = q @ z.transpose(2, 3)  # [rows, heads, R, K]
        return (dots + bias[..., None]).flatten(3)
    rows, heads, T, U, g = codes.shape  # s, z [rows, heads, T, U]
    qg = q.view(rows, heads, -1, U, g)
    dots = torch.einsum("bhrug,bhtug->bhrtu", qg, codes)
    return (dots * s[:, :, None]).sum(-1) + qg.sum(-1) @ z.transpose(2, 3)


def _value_sum(spec, packed, params, bits, p, cd) -> torch.Tensor:
    """``[rows, heads, R, D]``: ``sum_t p_t v_t`` over the stored tokens (``p`` ``[rows, heads, R, T]``)."""
    codes = _codes(spec, packed, bits, cd)
    s, z = _affine(spec.quantizer, params, bits, cd)
    if spec.unit > 1:  # codes [rows, heads, K, D, g]: sum over each block's tokens, then the block's scale
        rows, heads, K, D, g = codes.shape
        pb = p.view(rows, heads, -1, K, g)
        inner = torch.einsum("bhrkg,bhkdg->bhrkd", pb, codes)
        return (inner * s[:, :, None]).sum(3) + pb.sum(-1) @ z
    rows, heads, T, U, g = codes.shape
    ps = p[..., None] * s[:, :, None]  # [rows, heads, R, T, U]
    out = torch.einsum("bhrtu,bhtug->bhrug", ps, codes)
    return (out + (p @ z)[..., None]).flatten(3)


def _index(heads, device) -> torch.Tensor:
    return torch.as_tensor(heads, dtype=torch.int64, device=device)


def _role_residual(spec, state, cd, quantize: bool) -> torch.Tensor:
    """``[rows, kept heads, r, D]`` in ``cd``: the residual as attention sees it (fake-quantized when ``quantize``)."""
    res = state.residual
    if not quantize or not res.shape[2]:
        return res.to(cd)
    parts, start = [], 0
    for b, heads in spec.widths:
        parts.append(fake_quantize_uniform(res[:, start:start + heads.size], spec.quantizer, b, spec.role))
        start += heads.size
    parts.append(res[:, start:])
    return torch.cat(parts, dim=1).to(cd)


def _group_attention(layer, group, q: torch.Tensor, mask: torch.Tensor | None, scaling: float,
                     cd: torch.dtype) -> torch.Tensor:
    """``[rows, H, R, D]`` for one set of rows sharing their padding (``q`` ``[rows, H, R, D]`` in ``cd``; ``mask``
    ``[rows, 1, nq, n]`` additive over the rows' real tokens, or ``None``)."""
    kspec, vspec = layer.specs
    kst, vst = group.states
    rows, H, R, D = q.shape
    dev = q.device
    n = kst.stored + kst.residual.shape[2]  # the two roles split the same tokens differently (their units)
    rotate = isinstance(kspec.quantizer, QuaRot)
    qr = hadamard_transform(q) if rotate else q
    scores = q.new_zeros(rows, H, R, n)
    ks = kst.stored
    for k, (b, heads) in enumerate(kspec.widths):
        if ks:
            idx = _index(heads, dev)
            scores[:, idx, :, :ks] = _key_scores(kspec, kst.codes[k], kst.params[k], b, qr[:, idx], cd)
    if kspec.full_heads.size and ks:
        idx = _index(kspec.full_heads, dev)
        scores[:, idx, :, :ks] = q[:, idx] @ kst.full.to(cd).transpose(2, 3)
    if n > ks and kspec.kept_heads.size:
        idx = _index(kspec.kept_heads, dev)
        res = _role_residual(kspec, kst, cd, layer.quantize_residual)
        scores[:, idx, :, ks:] = q[:, idx] @ res.transpose(2, 3)
    scores = scores * scaling
    if mask is not None:
        nq = mask.shape[2]
        scores = (scores.view(rows, H, -1, nq, n) + mask[:, :, None]).view(rows, H, R, n)
    p = torch.softmax(scores, dim=-1)
    if mask is not None and R > 1:
        p = torch.nan_to_num(p, nan=0.0)  # a padding query sees no real token: its (unused) output is 0
    out = q.new_zeros(rows, H, R, D)
    out_rot = q.new_zeros(rows, H, R, D) if rotate else out
    vs = vst.stored
    for k, (b, heads) in enumerate(vspec.widths):
        if vs:
            idx = _index(heads, dev)
            out_rot[:, idx] += _value_sum(vspec, vst.codes[k], vst.params[k], b, p[:, idx, :, :vs], cd)
    if vspec.full_heads.size and vs:
        idx = _index(vspec.full_heads, dev)
        out[:, idx] += p[:, idx, :, :vs] @ vst.full.to(cd)
    if n > vs and vspec.kept_heads.size:
        idx = _index(vspec.kept_heads, dev)
        res = _role_residual(vspec, vst, cd, layer.quantize_residual)
        out[:, idx] += p[:, idx, :, vs:] @ res
    if rotate:
        out = out + hadamard_transform(out_rot)
    return out


def _additive(mask: Any, nq: int, n: int, rows: torch.Tensor, cd: torch.dtype, device) -> torch.Tensor | None:
    """The model's mask for ``rows`` over their last ``n`` columns, as an additive ``[rows, 1, nq, n]`` float mask;
    ``None`` (the model's ``None``: causal) builds causality among the last ``nq`` tokens."""
    if mask is None:
        if nq == 1:
            return None
        future = torch.arange(n, device=device)[None, :] > (n - nq + torch.arange(nq, device=device))[:, None]
        return torch.zeros(nq, n, dtype=cd, device=device).masked_fill(future, float("-inf"))[None, None]
    m = mask[..., -n:]
    m = m.index_select(0, rows) if m.shape[0] > 1 else m.expand(rows.numel(), *m.shape[1:])
    if m.dtype == torch.bool:
        return torch.zeros(m.shape, dtype=cd, device=device).masked_fill(~m, float("-inf"))
    return m.to(cd)


@torch.no_grad()
def packed_attention(layer, query: torch.Tensor, attention_mask: Any = None,
                     scaling: float | None = None) -> torch.Tensor:
    """Attention of ``query`` (``[batch, q_heads, q, head_dim]``, the newest ``q`` tokens) over everything ``layer``
    (a :class:`~.packed_cache.PackedHeadLayer`) holds, read from its packed storage (module docstring).
    ``attention_mask``: the model's mask ``[batch or 1, 1, q, kv]`` (boolean: ``True`` attends; float: additive) or
    ``None`` (causal). Returns ``[batch, q, q_heads, head_dim]`` in the query's dtype."""
    B, Hq, nq, D = query.shape
    kspec = layer.specs[0]
    H = kspec.n_heads
    if Hq % H:
        raise ValueError(f"layer {layer.layer_idx}: {Hq} query heads do not share {H} kv heads evenly")
    if B != layer.batch:
        raise ValueError(f"layer {layer.layer_idx}: the query has batch {B}, the cache holds {layer.batch} rows")
    s = D ** -0.5 if scaling is None else float(scaling)
    cd = torch.float64 if query.dtype == torch.float64 else torch.float32
    G = Hq // H
    qh = query.to(cd).reshape(B, H, G * nq, D)
    out = torch.zeros(B, H, G * nq, D, dtype=cd, device=query.device)
    for group in layer.groups:
        st = group.states[0]
        n = st.stored + st.residual.shape[2]
        if n == 0:
            continue
        mask = _additive(attention_mask, nq, n, group.rows, cd, query.device)
        q_rows = qh if group.rows.numel() == B else qh.index_select(0, group.rows)
        o = _group_attention(layer, group, q_rows, mask, s, cd)
        if group.rows.numel() == B:
            out = o
        else:
            out[group.rows] = o
    return out.view(B, H, G, nq, D).reshape(B, Hq, nq, D).transpose(1, 2).to(query.dtype)


class PackedAttention(CacheAttention):
    """Context manager: run ``model`` with attention read from the packed storage of every
    :class:`~.packed_cache.PackedHeadCache` handed to it (``model(...)`` and ``model.generate(...)`` inside the
    block); other caches and layers run the model's own attention. A cache whose quantizer the fused read cannot fold
    (:func:`supports_packed_attention`) is refused on attaching, by name."""

    def cache_layers(self, cache: Any) -> list:
        from .packed_cache import PackedHeadLayer

        layers = [layer for layer in (getattr(cache, "layers", None) or []) if isinstance(layer, PackedHeadLayer)]
        if layers:
            why = supports_packed_attention(layers[0].specs[0].quantizer)
            if why is not None:
                raise ValueError(f"PackedAttention cannot read this cache: {why}; run it without PackedAttention")
        return layers

    def attention(self, module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        layer = self.pending.pop(module.layer_idx, None)
        if layer is None:
            return self.original_attention(module, query, key, value, attention_mask, scaling=scaling,
                                           dropout=dropout, **kwargs)
        return packed_attention(layer, query, attention_mask, scaling), None
