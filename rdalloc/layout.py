"""Tensor layouts: how a plan lays out one role of one layer's KV tensor, read on the host before any tensor is seen.

A KV tensor of one layer is ``[batch, kv_heads, tokens, head_dim]``; a :class:`rdalloc.Plan` gives every key and value
element a width through its items (a head, a token of a head, a key channel of a head): 16 keeps the original value,
0 evicts it, ``1..8`` quantizes it with the plan's quantizer (:mod:`rdalloc.quantizers`). The same plan applies to
every batch row.

:class:`TensorLayout` is the host-side (numpy) reading of a plan for one layer and role: every group of the quantizer
(:func:`rdalloc.quantizers.to_groups`) gets one width. A group may not mix widths: groups nest inside items except for
a quantizer whose groups span several items (KIVI keys: ``g`` tokens of a channel, so per-token key bits must be
constant over each aligned block of ``g`` tokens; per-channel key bits under a per-token quantizer must be constant
over each block of ``g`` channels); a plan that breaks this gets a ``ValueError`` naming the group. Evicted elements
inside a quantized group (KIVI keys with evicted tokens) are left out of its min/max. The plan is host data, so
layouts, their index arrays and every shape are known before any tensor is touched: the device work is gathers,
reductions and elementwise math with no host synchronisation, and under ``jax.jit`` everything is static.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import array_api_compat
import numpy as np

from ._namespace import is_traced
from .models import FULL_BITS
from .plan import Plan
from .quantizers import Grouping, Quantizer, get_quantizer, to_device, to_groups

__all__ = ["TensorLayout", "tensor_layout"]


# ---- checks and helpers shared with plan application and the adapters --------------------------------------------
_LAYOUTS = {(4,): "4-D [batch, kv_heads, tokens, head_dim]",
            (5,): "5-D [layers, batch, kv_heads, tokens, head_dim] (or a sequence of 4-D per-layer tensors)",
            (4, 5): "4-D [batch, kv_heads, tokens, head_dim] or 5-D [layers, batch, kv_heads, tokens, head_dim]"}


def check_kv(x: Any, name: str, ndim: tuple[int, ...] = (4,)) -> None:
    """``TypeError`` unless ``x`` is a real floating array, ``ValueError`` unless it has one of the K/V layouts
    ``ndim`` allows; both name ``name``."""
    xp = array_api_compat.array_namespace(x)
    if not xp.isdtype(x.dtype, "real floating"):
        noun = "tensor" if array_api_compat.is_torch_namespace(xp) else "array"
        raise TypeError(f"{name} must be a floating {noun} (float16, bfloat16, float32 or float64), got {x.dtype}")
    if x.ndim not in ndim:
        raise ValueError(f"{name} must be {_LAYOUTS[ndim]}, got shape {tuple(x.shape)}")


def resolve_quantizer(plan: Plan, quantizer: Any) -> Quantizer:
    """``quantizer`` as an instance; ``None`` takes ``plan.meta["quantizer_spec"]`` or ``plan.quantizer``."""
    if quantizer is None:
        spec = plan.meta.get("quantizer_spec") if isinstance(plan.meta, dict) else None
        if spec is None and plan.quantizer is None:
            raise ValueError("the plan does not record its quantizer: pass quantizer= (a name or a Quantizer)")
        return get_quantizer(spec if spec is not None else plan.quantizer)
    return get_quantizer(quantizer)


def device_key(xp, like: Any) -> tuple:
    """The key under which arrays made for ``like``'s backend and device are cached."""
    return ("jax",) if array_api_compat.is_jax_namespace(xp) else (xp.__name__, str(array_api_compat.device(like)))


# ---- layouts -----------------------------------------------------------------------------------------------------
_PER_ELEMENT = ("elem_bits", "group_bits", "valid")  # what release_caches drops and __getattr__ rebuilds


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
        self._recipe: tuple | None = None  # (plan, quantizer, role, layer, shape), set by tensor_layout

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

    def release_caches(self) -> None:
        """Drop what is per element or per stored unit — the cached index arrays (host and device, int64 per unit)
        and, for a layout made by :func:`tensor_layout`, ``elem_bits``, ``group_bits`` and ``valid`` — which together
        hold several times the packed bytes. A holder of packed data that no longer packs or unpacks through this
        layout then keeps only its payload; everything is rebuilt from the plan on the next use."""
        self._host = None
        self._device = {}
        if self._recipe is not None:
            for name in _PER_ELEMENT:
                self.__dict__.pop(name, None)

    def __getattr__(self, name: str) -> Any:
        """The per-element arrays of a released layout, rebuilt from its plan on first access."""
        recipe = self.__dict__.get("_recipe")
        if name not in _PER_ELEMENT or recipe is None:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        fresh = tensor_layout(*recipe)
        for n in _PER_ELEMENT:
            self.__dict__[n] = fresh.__dict__[n]
        return self.__dict__[name]

    # -- device arrays --
    def device_arrays(self, xp, like: Any, packing: bool = False) -> dict:
        """Device copies (cached per backend and device) of what applying the layout needs."""
        key = device_key(xp, like) + (packing,)
        if key in self._device:
            return self._device[key]
        if not packing and key[:-1] + (True,) in self._device:
            return self._device[key[:-1] + (True,)]
        dev = lambda a: to_device(a, like)  # noqa: E731
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
    layout = TensorLayout(quantizer, role, eb, (B, H, T, D), where=f"layer {layer}, ")
    layout._recipe = (plan, quantizer, role, int(layer), (B, H, T, D))
    return layout
