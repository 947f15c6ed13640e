"""Plans applied to KV tensors: fake quantization, real bit-packed storage, and its exact byte accounting.

A KV tensor of one layer is ``[batch, kv_heads, tokens, head_dim]``; a :class:`rdalloc.Plan` gives every key and value
element a width through its items (a head, a token of a head, a key channel of a head): 16 keeps the original value,
0 evicts it, ``1..8`` quantizes it with the plan's quantizer (:mod:`rdalloc.quantizers`). The same plan applies to
every batch row.

**Layout.** :class:`TensorLayout` is the host-side (numpy) reading of a plan for one layer and role: every group of the
quantizer (:func:`rdalloc.quantizers.to_groups`) gets one width. A group may not mix widths: groups nest inside items
except for a quantizer whose groups span several items (KIVI keys: ``g`` tokens of a channel, so per-token key bits
must be constant over each aligned block of ``g`` tokens; per-channel key bits under a per-token quantizer must be
constant over each block of ``g`` channels); a plan that breaks this gets a ``ValueError`` naming the group. Evicted
elements inside a quantized group (KIVI keys with evicted tokens) are left out of its min/max. The plan is host data,
so layouts, their index arrays and every shape are known before any tensor is touched: the device work is gathers,
reductions and elementwise math with no host synchronisation, and under ``jax.jit`` everything is static.

**Fake quantization** (:func:`fake_quantize_tensor`) returns the dequantized tensor in the input dtype: quantized
elements as the quantizer reconstructs them, 16-bit elements bit for bit, evicted elements as 0 (attention must mask
them: ``Plan.kept()`` gives the kept tokens). What evicted slots hold on input (garbage, NaN) affects nothing.

**Packed storage** (:func:`pack_tensor` -> :class:`PackedTensor`). Per width ``b`` present: the codes of its
elements in group-view order (batch rows one after the other), bit-packed LSB-first into one uint8 stream of
``ceil(n_b b / 8)`` bytes (:func:`pack_bits`, every width 1..8), and each stored group's parameters as float16
(``(n_params, batch, groups_b)``). Full-precision elements are kept as they are (original dtype); evicted elements
are not stored at all. :func:`unpack_tensor` returns exactly what :func:`fake_quantize_tensor` returns.

**Bytes.** ``PackedTensor.nbytes = payload bytes + 2 * parameters + 2 * full-precision elements``: full precision counts
2 bytes per element whatever dtype the tensors compute in (docs/design.md §5), so CPU float32 runs and GPU bfloat16 runs
report the same figures (``storage_nbytes`` is what the arrays really occupy). It equals the cost model's prediction
``sum_i C_i(b_i) = sum_i n_i b_i + m_i [0 < b_i < 16]`` (:func:`item_costs`, :func:`plan_usage`) divided by 8 plus the
padding that rounds each width's stream up to whole bytes (``padding_bits``; zero whenever every stream holds a
multiple of 8 bits, e.g. head and token plans with ``head_dim % 8 == 0``); :func:`predict_nbytes` gives the exact
figure before packing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple, Sequence

import array_api_compat
import numpy as np

from ._namespace import is_traced
from .cost import Usage
from .models import FULL_BITS
from .plan import Plan
from .quantizers import (Grouping, Quantizer, compute_dtype, from_groups, get_quantizer, group_accounting,
                         to_device, to_groups)

__all__ = ["pack_bits", "unpack_bits", "TensorLayout", "tensor_layout", "PackedTensor", "PackedLayer",
           "PackedCache", "FakeQuantized", "fake_quantize_tensor", "pack_tensor", "unpack_tensor", "item_costs",
           "plan_usage", "predict_nbytes", "PlanApplier", "resolve_quantizer", "check_kv_rank"]


# ---- input checks shared by the adapters ----------------------------------------------------------------------
_LAYOUTS = {(4,): "4-D [batch, kv_heads, tokens, head_dim]",
            (5,): "5-D [layers, batch, kv_heads, tokens, head_dim] (or a sequence of 4-D per-layer tensors)",
            (4, 5): "4-D [batch, kv_heads, tokens, head_dim] or 5-D [layers, batch, kv_heads, tokens, head_dim]"}


def check_kv_rank(x: Any, name: str, ndim: tuple[int, ...] = (4,)) -> None:
    """``ValueError`` naming ``name`` unless ``x`` has one of the K/V layouts ``ndim`` allows (the adapters' check)."""
    if x.ndim not in ndim:
        raise ValueError(f"{name} must be {_LAYOUTS[ndim]}, got shape {tuple(x.shape)}")


# ---- bit packing ----------------------------------------------------------------------------------------------------
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


# ---- layouts --------------------------------------------------------------------------------------------------------
def _is_jax(xp) -> bool:
    return array_api_compat.is_jax_namespace(xp)


def _to_device(xp, a: np.ndarray, like: Any) -> Any:
    return to_device(a, like)


def _zeros(xp, shape: tuple, dtype: Any, like: Any) -> Any:
    if _is_jax(xp):
        return xp.zeros(shape, dtype=dtype)
    return xp.zeros(shape, dtype=dtype, device=array_api_compat.device(like))


def _take(xp, a: Any, idx: Any) -> Any:
    """``a[:, idx]``. Indices come from the layout, so they are in range and non-negative: torch gets
    ``index_select`` directly (array-api-compat's ``take`` first wraps negative indices, three extra passes)."""
    if array_api_compat.is_torch_namespace(xp):
        import torch

        return torch.index_select(a, 1, idx)
    return xp.take(a, idx, axis=1)


def _cache_key(xp, like) -> tuple:
    return ("jax",) if _is_jax(xp) else (xp.__name__, str(array_api_compat.device(like)))


class TensorLayout:
    """How a plan lays out one role (``"key"``/``"value"``) of one layer's ``[batch, H, T, D]`` tensor (host numpy).

    Attributes: ``quantizer``, ``role``, ``shape``, ``grouping``; ``elem_bits`` (int8, broadcastable to
    ``(H, T, D)``: each element's width, 0 evicted, 16 full); ``group_bits`` (int8, broadcastable to the group view
    ``(H, P, Q, 1)``: each group's width); ``valid`` (bool broadcastable to ``(H, P, Q, g)`` or ``None``: the stored
    elements of groups that are only partly stored); ``widths`` (the quantized widths present, ascending).
    Device copies of the index arrays are made once per backend and device and cached.
    """

    def __init__(self, quantizer: Quantizer, role: str, elem_bits: np.ndarray, shape: tuple[int, int, int, int],
                 where: str = ""):
        self.quantizer = quantizer
        self.role = role
        self.shape = tuple(int(s) for s in shape)
        B, H, T, D = self.shape
        self.grouping: Grouping = quantizer.grouping(role, D)
        self.elem_bits = np.asarray(elem_bits, dtype=np.int8)
        self.group_bits, self.valid = _group_bits(self.grouping, self.elem_bits, T, D, quantizer, role, where)
        gb = self.group_bits
        self.widths = tuple(int(b) for b in np.unique(gb) if 0 < b < FULL_BITS)
        self.has_full = bool(np.any(self.elem_bits == FULL_BITS))
        self.has_evicted = bool(np.any(self.elem_bits == 0))
        self._host: dict | None = None
        self._device: dict = {}

    @property
    def view_shape(self) -> tuple[int, int, int, int]:
        B, H, T, D = self.shape
        return (H, *self.grouping.view_shape(T, D))

    @property
    def units_are_rows(self) -> bool:
        """Packed data moves whole groups (rows of ``g``) unless some stored group is only partly stored."""
        return self.valid is None

    # -- host index arrays for packing --
    def host_indices(self) -> dict:
        """Per width: the stored rows (groups) and units (rows, or elements when some group is only partly stored)
        of the flattened group view; inverse maps from units and rows to positions in the concatenated streams and
        parameter lists (the last slot is a zero)."""
        if self._host is not None:
            return self._host
        H, P, Q, g = self.view_shape
        gb = np.broadcast_to(self.group_bits[..., 0], (H, P, Q)).reshape(-1)
        out: dict = {"rows": {}, "units": {}}
        if self.units_are_rows:
            n_units = gb.size
            for b in (*self.widths, FULL_BITS):
                rows = np.flatnonzero(gb == b)
                out["rows"][b] = rows
                out["units"][b] = rows
        else:
            stored = np.broadcast_to(self.valid, (H, P, Q, g)).reshape(-1)
            n_units = stored.size
            for b in (*self.widths, FULL_BITS):
                rows = np.flatnonzero(gb == b)
                units = np.flatnonzero(stored & np.repeat(gb == b, g))
                out["rows"][b] = rows
                out["units"][b] = units
        inv_q = np.full(n_units, sum(out["units"][b].size for b in self.widths), dtype=np.int64)
        offset = 0
        for b in self.widths:
            u = out["units"][b]
            inv_q[u] = offset + np.arange(u.size)
            offset += u.size
        inv_rows = np.full(gb.size, sum(out["rows"][b].size for b in self.widths), dtype=np.int64)
        offset = 0
        for b in self.widths:
            r = out["rows"][b]
            inv_rows[r] = offset + np.arange(r.size)
            offset += r.size
        out["inv_rows"] = inv_rows
        u16 = out["units"][FULL_BITS]
        inv_16 = np.full(n_units, u16.size, dtype=np.int64)
        inv_16[u16] = np.arange(u16.size)
        out["inv_q"], out["inv_16"] = inv_q, inv_16
        self._host = out
        return out

    def counts(self) -> dict[int, int]:
        """Stored elements per width (quantized widths and 16), summed over the batch."""
        B = self.shape[0]
        idx = self.host_indices()
        u = self.grouping.size if self.units_are_rows else 1
        return {b: int(idx["units"][b].size) * u * B for b in (*self.widths, FULL_BITS)}

    def groups(self) -> dict[int, int]:
        """Stored groups (carrying metadata) per quantized width, summed over the batch."""
        B = self.shape[0]
        return {b: int(self.host_indices()["rows"][b].size) * B for b in self.widths}

    def padding_bits(self) -> int:
        return sum(-(-n * b // 8) * 8 - n * b for b, n in self.counts().items() if b != FULL_BITS)

    # -- device arrays --
    def device_arrays(self, xp, like: Any, packing: bool = False) -> dict:
        """Device copies (cached per backend and device) of what applying the layout needs."""
        key = _cache_key(xp, like) + (packing,)
        if key in self._device:
            return self._device[key]
        if not packing and key[:-1] + (True,) in self._device:
            return self._device[key[:-1] + (True,)]
        dev = lambda a: _to_device(xp, a, like)  # noqa: E731
        gb = self.group_bits
        d: dict = {}
        if len(self.widths) == 1:  # one quantized width: a Python int, as uniform quantization uses (groups at 0
            d["bits"] = self.widths[0]  # or 16 are computed at it too and replaced by _finish)
        elif self.widths:
            safe = np.where((gb > 0) & (gb < FULL_BITS), gb, self.quantizer.max_bits).astype(np.int32)
            d["bits"] = dev(safe)
        d["valid"] = None if self.valid is None else dev(self.valid)
        d["sel16"] = dev(self.elem_bits == FULL_BITS) if self.has_full else None
        d["sel0"] = dev(self.elem_bits == 0) if self.has_evicted else None
        if packing:
            h = self.host_indices()
            n_units = h["inv_q"].size
            everything = lambda v: v.size == n_units  # sorted and unique: then it is arange(n)  # noqa: E731
            # None marks "every unit, in order": no gather needed (a uniform plan packs without any indexing)
            d["rows"] = {b: None if everything(v) and self.units_are_rows else dev(v) for b, v in h["rows"].items()}
            d["units"] = {b: None if everything(v) else dev(v) for b, v in h["units"].items()}
            d["n_units"] = {b: int(v.size) for b, v in h["units"].items()}
            single = len(self.widths) == 1 and everything(h["units"][self.widths[0]])
            d["inv_q"] = None if single else dev(h["inv_q"])
            all_rows = len(self.widths) == 1 and h["rows"][self.widths[0]].size == h["inv_rows"].size
            d["inv_rows"] = None if all_rows else dev(h["inv_rows"])
            d["inv_16"] = None if everything(h["units"][FULL_BITS]) else dev(h["inv_16"])
        if not is_traced(like):  # arrays made while tracing under jax.jit are tracers: never keep them
            self._device[key] = d
        return d


def _group_bits(grouping: Grouping, eb: np.ndarray, T: int, D: int, q: Quantizer, role: str,
                where: str) -> tuple[np.ndarray, np.ndarray | None]:
    """Each group's width (the one nonzero width among its elements) and the partial-group mask."""
    g = grouping.size
    axis = 1 if grouping.axis == "token" else 2
    varies = eb.shape[axis] != 1 or (grouping.axis == "token" and T % g)
    if not varies:  # one width per row of the view: (H, D|1, 1, 1) for token groups, (H, T|1, 1, 1) for channel
        gb = np.transpose(eb, (0, 2, 1))[..., None] if grouping.axis == "token" else eb[..., None]
        return gb, None
    full_shape = list(eb.shape)
    full_shape[axis] = T if axis == 1 else D
    eg = np.asarray(to_groups(np.ascontiguousarray(np.broadcast_to(eb, full_shape)), grouping))
    gmax = eg.max(axis=-1, keepdims=True)
    gmin = np.where(eg > 0, eg, 127).min(axis=-1, keepdims=True)
    bad = (gmax > 0) & (gmin != gmax)
    if bad.any():
        h, p, qq, _ = (int(i) for i in np.argwhere(bad)[0])
        if grouping.axis == "token":
            span = f"kv_head {h}, channel {p}, tokens {qq * g}..{min(qq * g + g, T) - 1}"
            rule = f"per-token {role} bits must be constant within each aligned block of {g} tokens"
        else:
            span = f"kv_head {h}, token {p}, channels {qq * g}..{qq * g + g - 1}"
            rule = f"per-channel {role} bits must be constant within each aligned block of {g} channels"
        vals = sorted({int(v) for v in eg[h, p, qq] if v > 0})
        raise ValueError(f"quantizer {q.name!r} groups {role}s over {g} consecutive {grouping.axis}s, but the plan "
                         f"gives {role} bits {vals} inside one group ({where}{span}): {rule} (0 = evicted is "
                         f"allowed)")
    # the stored-element mask, kept as small as its broadcast allows (typically the kept tokens, (H, 1, Tg, g) for
    # token groups: the device then reads a mask D times smaller than the tensor)
    st = eb > 0
    other = 2 if axis == 1 else 1
    if st.shape[other] > 1 and np.all(st == st.take([0], axis=other)):
        st = st.take([0], axis=other)
    st_shape = list(st.shape)
    st_shape[axis] = T if axis == 1 else D
    stored = np.asarray(to_groups(np.ascontiguousarray(np.broadcast_to(st, st_shape)), grouping))
    partial = np.any((gmax > 0) & ~stored.all(axis=-1, keepdims=True))
    return gmax, (stored if partial else None)


def resolve_quantizer(plan: Plan, quantizer: Any) -> Quantizer:
    """``quantizer`` as an instance; ``None`` takes ``plan.meta["quantizer_spec"]`` or ``plan.quantizer``."""
    if quantizer is None:
        spec = plan.meta.get("quantizer_spec") if isinstance(plan.meta, dict) else None
        if spec is None and plan.quantizer is None:
            raise ValueError("the plan does not record its quantizer: pass quantizer= (a name or a Quantizer)")
        return get_quantizer(spec if spec is not None else plan.quantizer)
    return get_quantizer(quantizer)


def tensor_layout(plan: Plan, quantizer: Quantizer, role: str, layer: int, shape: Sequence[int]) -> TensorLayout:
    """The :class:`TensorLayout` of ``role`` (``"key"``/``"value"``) in ``layer`` for a tensor of ``shape``
    ``[batch, kv_heads, tokens, head_dim]``; ``ValueError`` if the plan does not fit the tensor or the quantizer."""
    if not isinstance(plan, Plan):
        raise TypeError(f"plan must be an rdalloc.Plan, got {type(plan).__name__}")
    if role not in ("key", "value"):
        raise ValueError(f"role must be 'key' or 'value', got {role!r}")
    if len(shape) != 4:
        raise ValueError(f"a {role} tensor must be [batch, kv_heads, tokens, head_dim], got shape {tuple(shape)}")
    B, H, T, D = (int(s) for s in shape)
    if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)) or not 0 <= layer < plan.layers:
        raise ValueError(f"layer must be an integer in [0, {plan.layers}) for this plan, got {layer!r}")
    plan.check(kv_heads=H, tokens=T, head_dim=D if role == "key" else None, quantizer=quantizer.name)
    bits = (plan.key if role == "key" else plan.value)[layer]
    axes = plan.key_axes if role == "key" else plan.value_axes
    quantizer.check_bits(bits, f"the plan's {role} bits of layer {layer}")
    if axes[-1] == "channel":
        if quantizer.mixes_channels:
            raise ValueError(f"quantizer {quantizer.name!r} rotates all channels of a token together; it cannot "
                             f"apply per-channel {role} bits (use a head or token plan)")
        src = bits[:, None, :]
    elif axes[-1] == "token":
        src = bits[:, :, None]
    else:
        src = bits[:, None, None]
    kept = plan.kept()
    eb = np.where(kept[layer][:, :, None], src, 0) if kept is not None else src
    return TensorLayout(quantizer, role, eb, (B, H, T, D), where=f"layer {layer}, ")


# ---- applying a layout ----------------------------------------------------------------------------------------------
def _encode(x: Any, layout: TensorLayout, arrays: dict):
    xp = array_api_compat.array_namespace(x)
    q, role = layout.quantizer, layout.role
    cd = compute_dtype(xp, x)
    xg = to_groups(q.transform(xp.astype(x, cd, copy=False), role), layout.grouping)
    bits = arrays["bits"]
    params = q.fit(xg, bits, arrays["valid"])
    return xg, params, q.encode(xg, params, bits), bits


def _finish(xp, out: Any, x_full: Any, arrays: dict) -> Any:
    """Evicted elements to 0, full-precision ones to ``x_full``."""
    if arrays["sel0"] is not None:
        out = xp.where(arrays["sel0"], 0.0, out)  # (where, not a product: evicted slots may hold garbage, NaN)
    if arrays["sel16"] is not None:
        out = xp.where(arrays["sel16"], x_full, out)
    return out


def fake_quantize_tensor(x: Any, layout: TensorLayout) -> Any:
    """``x`` (``[batch, H, T, D]``, any array-API backend) quantized as the layout says and dequantized, in ``x``'s
    dtype: widths 1..8 reconstructed, 16 bit for bit, evicted elements 0. Equal to ``unpack_tensor(pack_tensor(x,
    layout))``."""
    xp = array_api_compat.array_namespace(x)
    _check_shape(x, layout)
    arrays = layout.device_arrays(xp, x)
    B, H, T, D = layout.shape
    if layout.widths:
        q = layout.quantizer
        xg, params, codes, bits = _encode(x, layout, arrays)
        xh = from_groups(q.decode(codes, params, bits), layout.grouping, T, D)
        out = xp.astype(q.inverse_transform(xh, layout.role), x.dtype, copy=False)
    else:
        out = xp.zeros_like(x)
    return _finish(xp, out, x, arrays)


def _check_shape(x: Any, layout: TensorLayout) -> None:
    if tuple(x.shape) != layout.shape:
        raise ValueError(f"the {layout.role} tensor has shape {tuple(x.shape)}, but the layout was made for "
                         f"{layout.shape}")


@dataclass(frozen=True, eq=False)
class PackedTensor:
    """One role of one layer in packed storage (see the module docstring for the format).

    ``payload[k]``: uint8 stream of the codes at width ``layout.widths[k]``; ``params[k]``: float16
    ``(n_params, batch, groups)``; ``full``: the full-precision elements in the input dtype, ``(batch, units, u)``.
    """

    layout: TensorLayout
    payload: tuple
    params: tuple
    full: Any
    dtype: Any

    @property
    def payload_bits(self) -> int:
        """Code bits held (without the stream padding)."""
        c = self.layout.counts()
        return sum(c[b] * b for b in self.layout.widths)

    @property
    def padding_bits(self) -> int:
        return 8 * sum(int(p.shape[0]) for p in self.payload) - self.payload_bits

    @property
    def metadata_bits(self) -> int:
        return 16 * sum(_size(p) for p in self.params)

    @property
    def full_elements(self) -> int:
        return _size(self.full)

    @property
    def nbytes(self) -> int:
        """Bytes held: packed payload + 2 per float16 parameter + 2 per full-precision element (docs/design.md §5: 2
        bytes whatever the compute dtype)."""
        return sum(int(p.shape[0]) for p in self.payload) + self.metadata_bits // 8 + 2 * self.full_elements

    @property
    def storage_nbytes(self) -> int:
        """Bytes the arrays really occupy (full-precision elements at their own itemsize)."""
        item = int(self.full.dtype.itemsize)
        return self.nbytes - 2 * self.full_elements + item * self.full_elements

    @property
    def usage(self) -> Usage:
        """Payload (codes and 16-bit elements at 16 bits each) and metadata bits; elements = the full tensor."""
        B, H, T, D = self.layout.shape
        return Usage(payload_bits=float(self.payload_bits + FULL_BITS * self.full_elements),
                     metadata_bits=float(self.metadata_bits), elements=float(B * H * T * D))


def _size(a: Any) -> int:
    n = 1
    for s in a.shape:
        n *= int(s)
    return n


def pack_tensor(x: Any, layout: TensorLayout) -> PackedTensor:
    """Quantize ``x`` as the layout says and store it packed (evicted elements are dropped)."""
    xp = array_api_compat.array_namespace(x)
    _check_shape(x, layout)
    arrays = layout.device_arrays(xp, x, packing=True)
    B = layout.shape[0]
    rows_units = layout.units_are_rows
    H, P, Q, g = layout.view_shape
    R = H * P * Q
    payload, params_out = [], []
    if layout.widths:
        xg, params, codes, _ = _encode(x, layout, arrays)
        codes = xp.astype(codes, xp.uint8)
        codes = xp.reshape(codes, (B, R, g) if rows_units else (B, R * g))
        flat_params = [xp.reshape(xp.broadcast_to(p, (*xg.shape[:-1], 1)), (B, R)) for p in params]
        take = lambda a, idx: a if idx is None else _take(xp, a, idx)  # noqa: E731
        for b in layout.widths:
            payload.append(pack_bits(xp.reshape(take(codes, arrays["units"][b]), (-1,)), b))
            rows = arrays["rows"][b]
            params_out.append(xp.stack([xp.astype(take(p, rows), xp.float16) for p in flat_params]))
    u = g if rows_units else 1
    units16 = arrays["units"][FULL_BITS]
    if layout.has_full:
        xo = xp.reshape(to_groups(x, layout.grouping), (B, R * g // u, u))
        full = xo if units16 is None else _take(xp, xo, units16)
    else:
        full = _zeros(xp, (B, 0, u), x.dtype, x)
    return PackedTensor(layout=layout, payload=tuple(payload), params=tuple(params_out), full=full, dtype=x.dtype)


def unpack_tensor(packed: PackedTensor) -> Any:
    """The dequantized ``[batch, H, T, D]`` tensor of a :class:`PackedTensor` (evicted elements are 0), equal to
    :func:`fake_quantize_tensor` of the packed input.

    The codes (uint8) and the float16 parameters are put back in group-view order by one gather each (the inverse
    maps of the layout; skipped when one width holds everything), then decoded in one elementwise pass with the same
    per-group widths as fake quantization, so both paths compute every value with the same operations.
    """
    layout = packed.layout
    q, role = layout.quantizer, layout.role
    full = packed.full
    xp = array_api_compat.array_namespace(full)
    arrays = layout.device_arrays(xp, full, packing=True)
    B, H, T, D = layout.shape
    _, P, Q, g = layout.view_shape
    u = g if layout.units_are_rows else 1
    vshape = (B, H, P, Q, g)
    if layout.widths:
        cd = xp.float64 if packed.dtype == xp.float64 else xp.float32
        codes = [xp.reshape(unpack_bits(stream, b, B * arrays["n_units"][b] * u), (B, arrays["n_units"][b], u))
                 for b, stream in zip(layout.widths, packed.payload)]
        if arrays["inv_q"] is None:  # one width holds every unit, in order
            codes = codes[0]
        else:
            codes = _take(xp, xp.concat([*codes, _zeros(xp, (B, 1, u), xp.uint8, full)], axis=1), arrays["inv_q"])
        codes = xp.astype(xp.reshape(codes, vshape), cd)
        params = []
        for k in range(len(q.params)):
            cols = [prm[k, ...] for prm in packed.params]
            if arrays["inv_rows"] is None:
                p = cols[0]
            else:
                p = _take(xp, xp.concat([*cols, _zeros(xp, (B, 1), xp.float16, full)], axis=1), arrays["inv_rows"])
            params.append(xp.reshape(xp.astype(p, cd), (B, H, P, Q, 1)))
        deq = q.decode(codes, tuple(params), arrays["bits"])
        out = q.inverse_transform(from_groups(deq, layout.grouping, T, D), role)
        out = xp.astype(out, packed.dtype, copy=False)
    else:
        out = _zeros(xp, (B, H, T, D), packed.dtype, full)
    x16 = None
    if layout.has_full:
        if arrays["inv_16"] is None:
            x16 = from_groups(xp.reshape(full, vshape), layout.grouping, T, D)
        else:
            cat = xp.concat([full, xp.zeros_like(full[:, :1, :])], axis=1)
            x16 = from_groups(xp.reshape(_take(xp, cat, arrays["inv_16"]), vshape), layout.grouping, T, D)
    return _finish(xp, out, x16, arrays)


# ---- containers for a layer and a cache -----------------------------------------------------------------------------
class FakeQuantized(NamedTuple):
    """Fake-quantized keys and values of one layer, and the kept-token mask ``(kv_heads, tokens)`` (``None`` for a
    head plan). Evicted positions hold zeros at full shape; attention must mask them with ``kept``."""

    keys: Any
    values: Any
    kept: Any


@dataclass(frozen=True, eq=False)
class PackedLayer:
    """Packed keys and values of one layer."""

    keys: PackedTensor
    values: PackedTensor
    layer: int

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes

    @property
    def padding_bits(self) -> int:
        return self.keys.padding_bits + self.values.padding_bits


@dataclass(frozen=True, eq=False)
class PackedCache:
    """Packed keys and values of every layer. ``nbytes``: bytes held (docs/design.md §5); ``fp16_nbytes``: what the same
    cache holds at 16 bits; ``retention = nbytes / fp16_nbytes``."""

    layers: tuple

    @property
    def nbytes(self) -> int:
        return sum(layer.nbytes for layer in self.layers)

    @property
    def padding_bits(self) -> int:
        return sum(layer.padding_bits for layer in self.layers)

    @property
    def fp16_nbytes(self) -> int:
        return sum(2 * _size_shape(t.layout.shape) for layer in self.layers for t in (layer.keys, layer.values))

    @property
    def retention(self) -> float:
        return self.nbytes / self.fp16_nbytes if self.fp16_nbytes else 0.0

    @property
    def usage(self) -> Usage:
        us = [t.usage for layer in self.layers for t in (layer.keys, layer.values)]
        return Usage(sum(u.payload_bits for u in us), sum(u.metadata_bits for u in us), sum(u.elements for u in us))

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, i: int) -> PackedLayer:
        return self.layers[i]


def _size_shape(shape) -> int:
    return int(np.prod(shape))


# ---- accounting from the plan alone ---------------------------------------------------------------------------------
def item_costs(plan: Plan, quantizer: Any, role: str, *, batch: int, tokens: int, head_dim: int,
               layout: TensorLayout | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per-item ``(sizes, metadata)`` (float64, shaped like the plan's ``role`` bits) such that
    ``rdalloc.item_cost(bits, sizes, metadata)`` summed over items is exactly the bits a packed cache holds for
    ``role`` (without stream padding).

    ``sizes``: elements the item stores (``batch`` rows; a key channel whose head evicts tokens stores only the kept
    ones). ``metadata``: the item's share of the metadata of the groups its elements sit in (whole groups when
    groups nest in items; a shared group is split by stored elements). Items at 0 bits get their would-be size.
    """
    quantizer = resolve_quantizer(plan, quantizer)
    bits = plan.key if role == "key" else plan.value
    axes = plan.key_axes if role == "key" else plan.value_axes
    L, H = plan.layers, plan.kv_heads
    n_items = int(np.prod(bits.shape[1:]))
    shape_items = {"kv_head": (H, 1, 1), "token": (H, tokens, 1), "channel": (H, 1, head_dim)}[axes[-1]]
    item = np.arange(n_items).reshape(shape_items)
    sizes = np.zeros(bits.shape)
    meta = np.zeros(bits.shape)
    for layer in range(L):
        lay = tensor_layout(plan, quantizer, role, layer, (batch, H, tokens, head_dim))
        eb = np.broadcast_to(lay.elem_bits, (H, tokens, head_dim))
        # would-be sizes for evicted items: count every element of the item as if stored
        s_all, _, _ = group_accounting(quantizer, role, np.ones((1, 1, 1), np.int8), item, n_items, tokens, head_dim)
        s, m, _ = group_accounting(quantizer, role, eb, item, n_items, tokens, head_dim)
        flat_bits = bits[layer].reshape(-1)
        sizes[layer] = (np.where(flat_bits == 0, s_all, s) * batch).reshape(bits.shape[1:])
        meta[layer] = (m * batch).reshape(bits.shape[1:])
    return sizes, meta


def _accounting(plan: Plan, quantizer: Any, batch: int, tokens: int, head_dim: int) -> tuple[Usage, int]:
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


# ---- the applier shared by the backends ------------------------------------------------------------------------------
class PlanApplier:
    """Applies one plan with one quantizer to KV tensors, caching each layer's layout and its device arrays.

    Build it once and reuse it (every decode step, on CUDA): the host work (reading the plan) and the host-to-device
    copies of the index arrays happen on first use of each (layer, shape, backend, device) only. Backends subclass
    it to validate tensors (``_check``) and to wrap the kernels (``jax.jit``).
    """

    def __init__(self, plan: Plan, quantizer: Any = None):
        if not isinstance(plan, Plan):
            raise TypeError(f"plan must be an rdalloc.Plan, got {type(plan).__name__}")
        self.plan = plan
        self.quantizer = resolve_quantizer(plan, quantizer)
        plan.check(quantizer=self.quantizer.name)
        self._layouts: dict = {}
        self._kept: dict = {}

    # hooks
    def _check(self, x: Any, name: str) -> None:
        pass

    def layout(self, role: str, layer: int, shape: Sequence[int]) -> TensorLayout:
        key = (role, int(layer), tuple(int(s) for s in shape))
        if key not in self._layouts:
            self._layouts[key] = tensor_layout(self.plan, self.quantizer, role, layer, shape)
        return self._layouts[key]

    def _pair(self, keys: Any, values: Any, layer: int) -> tuple[TensorLayout, TensorLayout]:
        self._check(keys, "keys")
        self._check(values, "values")
        if tuple(keys.shape[:3]) != tuple(values.shape[:3]):
            raise ValueError(f"keys and values must agree on [batch, kv_heads, tokens], got {tuple(keys.shape)} and "
                             f"{tuple(values.shape)}")
        return self.layout("key", layer, keys.shape), self.layout("value", layer, values.shape)

    def kept(self, layer: int, like: Any) -> Any:
        """``(kv_heads, tokens)`` bool of the kept tokens on ``like``'s backend and device (``None``: head plan)."""
        k = self.plan.kept()
        if k is None:
            return None
        xp = array_api_compat.array_namespace(like)
        key = (int(layer),) + _cache_key(xp, like)
        if key in self._kept:
            return self._kept[key]
        arr = _to_device(xp, np.ascontiguousarray(k[layer]), like)
        if not is_traced(like):
            self._kept[key] = arr
        return arr

    def fake_quantize(self, keys: Any, values: Any, *, layer: int) -> FakeQuantized:
        """Fake-quantized ``(keys, values, kept)`` of one layer (tensors ``[batch, kv_heads, tokens, head_dim]``)."""
        lk, lv = self._pair(keys, values, layer)
        return FakeQuantized(fake_quantize_tensor(keys, lk), fake_quantize_tensor(values, lv), self.kept(layer, keys))

    def pack(self, keys: Any, values: Any, *, layer: int) -> PackedLayer:
        lk, lv = self._pair(keys, values, layer)
        return PackedLayer(pack_tensor(keys, lk), pack_tensor(values, lv), int(layer))

    def unpack(self, packed: PackedLayer | PackedCache):
        """``(keys, values)`` of a :class:`PackedLayer`, or a list of them for a :class:`PackedCache`."""
        if isinstance(packed, PackedCache):
            return [self.unpack(layer) for layer in packed.layers]
        if not isinstance(packed, PackedLayer):
            raise TypeError(f"packed must be a PackedLayer or PackedCache, got {type(packed).__name__}")
        return unpack_tensor(packed.keys), unpack_tensor(packed.values)

    def _layers(self, keys: Sequence, values: Sequence) -> None:
        if len(keys) != self.plan.layers or len(values) != self.plan.layers:
            raise ValueError(f"the plan has {self.plan.layers} layers, got {len(keys)} key and {len(values)} value "
                             f"tensors")

    def fake_quantize_cache(self, keys: Sequence, values: Sequence) -> list[FakeQuantized]:
        """:meth:`fake_quantize` of every layer (sequences of per-layer tensors)."""
        self._layers(keys, values)
        return [self.fake_quantize(k, v, layer=i) for i, (k, v) in enumerate(zip(keys, values))]

    def pack_cache(self, keys: Sequence, values: Sequence) -> PackedCache:
        self._layers(keys, values)
        return PackedCache(tuple(self.pack(k, v, layer=i) for i, (k, v) in enumerate(zip(keys, values))))

    def predict_nbytes(self, *, batch: int, tokens: int, head_dim: int) -> int:
        return predict_nbytes(self.plan, self.quantizer, batch=batch, tokens=tokens, head_dim=head_dim)

    def usage(self, *, batch: int, tokens: int, head_dim: int) -> Usage:
        return plan_usage(self.plan, self.quantizer, batch=batch, tokens=tokens, head_dim=head_dim)
