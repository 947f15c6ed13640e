"""Plans applied to KV tensors: one :class:`PlanApplier` for numpy, torch and JAX arrays, fake quantization and
bit-packed storage.

A KV tensor of one layer is ``[batch, kv_heads, tokens, head_dim]``; how a plan gives its elements widths (16 full, 0
evicted, ``1..8`` quantized) and why a group may not mix widths is :mod:`rdalloc.layout`.

**Fake quantization** (:func:`fake_quantize_tensor`) returns the dequantized tensor in the input dtype: quantized
elements as the quantizer reconstructs them, 16-bit elements bit for bit, evicted elements as 0 (attention must mask
them: ``Plan.kept()`` gives the kept tokens). What evicted slots hold on input (garbage, NaN) affects nothing.

**Packed storage** (:func:`pack_tensor` -> :class:`PackedTensor`). Per width ``b`` present: the codes of its
elements in group-view order (batch rows one after the other), bit-packed into one uint8 stream of
``ceil(n_b b / 8)`` bytes (:func:`rdalloc.bitpack.pack_bits`), and each stored group's parameters as float16
(``(n_params, batch, groups_b)``). Full-precision elements are kept as they are (original dtype); evicted elements
are not stored at all. :func:`unpack_tensor` returns exactly what :func:`fake_quantize_tensor` returns.
``PackedTensor.nbytes`` (full precision at 2 bytes per element, docs/design.md §5) equals
:func:`rdalloc.accounting.predict_nbytes` of the plan.

**One applier for every backend.** :class:`PlanApplier` reads the plan on the host once per layer and shape and
runs the same array-API code on whatever arrays it is given; what a backend needs beyond that is chosen from the
arrays' namespace on each call, so there is one class (the adapters :mod:`rdalloc.backends.torch` and
:mod:`rdalloc.backends.jax` keep only one-shot functions):

* torch: runs under ``torch.no_grad()``, with the layout's index arrays kept on the tensors' device (cached per
  device), so repeated application does no host work, no host-to-device copies and no host synchronisation (no
  ``.item()``, no data-dependent shapes: the plan, read on the host, fixes every shape);
* JAX: each operation of each layer is compiled once with ``jax.jit`` (again only for a new shape or dtype), the plan
  a closure constant; :class:`PackedTensor`, :class:`PackedLayer` and :class:`PackedCache` are pytrees whose layout
  is static auxiliary data (registered on first use), so packing and unpacking run compiled, inside a user's
  ``jax.jit`` too;
* any other array-API backend (numpy, ...): the same code, eagerly.

torch and JAX are imported only once their arrays arrive: ``import rdalloc`` imports neither.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import array_api_compat
import numpy as np

from ._namespace import is_traced
from .accounting import plan_usage, predict_nbytes
from .bitpack import pack_bits, unpack_bits
from .cost import Usage
from .layout import TensorLayout, check_kv, device_key, resolve_quantizer, tensor_layout
from .models import FULL_BITS
from .plan import Plan
from .quantizers import compute_dtype, from_groups, to_device, to_groups

__all__ = ["PlanApplier", "FakeQuantized", "PackedTensor", "PackedLayer", "PackedCache", "fake_quantize_tensor",
           "pack_tensor", "unpack_tensor", "unpack"]


# ---- applying a layout ----------------------------------------------------------------------------------------------
def _zeros(xp, shape: tuple, dtype: Any, like: Any) -> Any:
    """Zeros of ``shape`` on ``like``'s device."""
    if array_api_compat.is_jax_namespace(xp):
        return xp.zeros(shape, dtype=dtype)
    return xp.zeros(shape, dtype=dtype, device=array_api_compat.device(like))


def _take(xp, a: Any, idx: Any) -> Any:
    """``a[:, idx]``. Indices come from the layout, so they are in range and non-negative: torch gets
    ``index_select`` directly (array-api-compat's ``take`` first wraps negative indices, three extra passes)."""
    if array_api_compat.is_torch_namespace(xp):
        import torch

        return torch.index_select(a, 1, idx)
    return xp.take(a, idx, axis=1)


def _check_shape(x: Any, layout: TensorLayout) -> None:
    if tuple(x.shape) != layout.shape:
        raise ValueError(f"the {layout.role} tensor has shape {tuple(x.shape)}, but the layout was made for "
                         f"{layout.shape}")


def _encode(x: Any, layout: TensorLayout, arrays: dict) -> tuple:
    """``(group view, parameters, codes, widths)`` of ``x`` quantized as the layout says (in the compute dtype)."""
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


# ---- packed storage -------------------------------------------------------------------------------------------------
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
        return 16 * sum(math.prod(p.shape) for p in self.params)

    @property
    def full_elements(self) -> int:
        return math.prod(self.full.shape)

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
    """Packed keys and values of every layer. ``nbytes``: bytes held (docs/design.md §5); ``fp16_nbytes``: what the
    same cache holds at 16 bits; ``retention = nbytes / fp16_nbytes``."""

    layers: tuple

    @property
    def nbytes(self) -> int:
        return sum(layer.nbytes for layer in self.layers)

    @property
    def padding_bits(self) -> int:
        return sum(layer.padding_bits for layer in self.layers)

    @property
    def fp16_nbytes(self) -> int:
        return sum(2 * math.prod(t.layout.shape) for layer in self.layers for t in (layer.keys, layer.values))

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


def _unpack_layer(packed: PackedLayer) -> tuple:
    return unpack_tensor(packed.keys), unpack_tensor(packed.values)


def unpack(packed: PackedLayer | PackedCache):
    """``(keys, values)`` dequantized from a :class:`PackedLayer` (a list of pairs for a :class:`PackedCache`),
    equal to fake quantization of the packed tensors, evicted entries 0; compiled on JAX, without gradients on
    torch."""
    if isinstance(packed, PackedCache):
        return [unpack(layer) for layer in packed.layers]
    if not isinstance(packed, PackedLayer):
        raise TypeError(f"packed must be a PackedLayer or PackedCache, got {type(packed).__name__}")
    xp = array_api_compat.array_namespace(packed.keys.full)
    if array_api_compat.is_jax_namespace(xp):
        return _jax_unpack_layer()(packed)
    with _no_grad(xp):
        return _unpack_layer(packed)


# ---- what differs between backends ----------------------------------------------------------------------------------
def _no_grad(xp) -> contextlib.AbstractContextManager:
    """``torch.no_grad()`` for torch (nothing here is differentiated); for numpy, no warnings about lanes that are
    computed and then not selected (elements kept at 16 bits may hold values no float16 scale can reach); else
    nothing."""
    if array_api_compat.is_torch_namespace(xp):
        import torch

        return torch.no_grad()
    if array_api_compat.is_numpy_namespace(xp):
        return np.errstate(over="ignore", invalid="ignore")
    return contextlib.nullcontext()


@functools.cache
def _jax_jit():
    """``jax.jit``, once the packed containers are registered as pytrees (arrays as leaves; layout, dtype and layer
    number as static auxiliary data)."""
    import jax

    register = jax.tree_util.register_pytree_node
    register(PackedTensor, lambda p: ((p.payload, p.params, p.full), (p.layout, p.dtype)),
             lambda aux, c: PackedTensor(layout=aux[0], payload=c[0], params=c[1], full=c[2], dtype=aux[1]))
    register(PackedLayer, lambda p: ((p.keys, p.values), p.layer), lambda layer, c: PackedLayer(c[0], c[1], layer))
    register(PackedCache, lambda p: (p.layers, None), lambda _, c: PackedCache(tuple(c)))
    return jax.jit


@functools.cache
def _jax_unpack_layer():
    return _jax_jit()(_unpack_layer)


def _array_type(x: Any) -> str:
    if array_api_compat.is_torch_array(x):
        return "torch.Tensor"
    if array_api_compat.is_jax_array(x):
        return "jax.Array"
    return type(x).__name__


def _check_pair(keys: Any, values: Any) -> None:
    """``TypeError`` unless keys and values are floating arrays of one backend, ``ValueError`` unless both are 4-D."""
    for name, x in (("keys", keys), ("values", values)):
        if not array_api_compat.is_array_api_obj(x):
            raise TypeError(f"{name} must be an array (numpy, torch or JAX), got {type(x).__name__}")
    if _array_type(keys) != _array_type(values):  # name the odd one out: a numpy array next to a device array
        name, x, other = ("keys", keys, values) if array_api_compat.is_numpy_array(keys) else ("values", values, keys)
        raise TypeError(f"{name} must be a {_array_type(other)}, got {type(x).__name__}: keys and values must be "
                        f"arrays of one backend")
    check_kv(keys, "keys")
    check_kv(values, "values")


# ---- the applier ----------------------------------------------------------------------------------------------------
class FakeQuantized(NamedTuple):
    """Fake-quantized keys and values of one layer, and the kept-token mask ``(kv_heads, tokens)`` (``None`` for a
    head plan). Evicted positions hold zeros at full shape; attention must mask them with ``kept``."""

    keys: Any
    values: Any
    kept: Any


class PlanApplier:
    """Applies one plan with one quantizer to the KV tensors of any array backend, caching each layer's layout and
    its device arrays (module docstring: what torch and JAX get).

    Build it once and reuse it (every decode step, on CUDA): the host work (reading the plan) and the host-to-device
    copies of the index arrays happen on first use of each (layer, shape, backend, device) only. ``quantizer`` is a
    :class:`~rdalloc.quantizers.Quantizer`, a registered name or spec, or ``None`` for the one the plan records.

    >>> import numpy as np
    >>> from rdalloc import Plan, PlanApplier
    >>> plan = Plan(key=np.array([[16, 4]]), value=np.array([[2, 0]]), quantizer="per_token")  # 1 layer, 2 kv heads
    >>> ap = PlanApplier(plan)  # with the quantizer the plan records; numpy arrays here, torch or JAX alike
    >>> x = np.tile(np.array([0.0, 1.0, 2.0, 4.0], np.float32), (1, 2, 3, 1))  # [batch, kv_heads, tokens, head_dim]
    >>> keys, values, kept = ap.fake_quantize(x, x, layer=0)
    >>> keys[0, 0, 0].tolist(), values[0, 0, 0].tolist()  # 16 bits as they are; 2 bits: scale 4/3 rounded up
    ([0.0, 1.0, 2.0, 4.0], [0.0, 1.333984375, 1.333984375, 4.001953125])
    >>> float(np.abs(values[0, 1]).max()), kept  # head 1's values evicted; a head plan evicts no single token
    (0.0, None)
    >>> packed = ap.pack(x, x, layer=0)  # keys 24 (16 bits) + 6 + 12 (4 bits, scales and zeros), values 3 + 12
    >>> packed.nbytes, ap.predict_nbytes(batch=1, tokens=3, head_dim=4)
    (57, 57)
    >>> all(np.array_equal(a, b) for a, b in zip(ap.unpack(packed), (keys, values)))
    True
    """

    def __init__(self, plan: Plan, quantizer: Any = None):
        if not isinstance(plan, Plan):
            raise TypeError(f"plan must be an rdalloc.Plan, got {type(plan).__name__}")
        self.plan = plan
        self.quantizer = resolve_quantizer(plan, quantizer)
        plan.check(quantizer=self.quantizer.name)
        self._layouts: dict = {}
        self._kept: dict = {}
        self._compiled: dict = {}

    def layout(self, role: str, layer: int, shape: Sequence[int]) -> TensorLayout:
        """The :class:`~rdalloc.layout.TensorLayout` of ``role`` in ``layer`` for tensors of ``shape`` (cached)."""
        key = (role, int(layer), tuple(int(s) for s in shape))
        if key not in self._layouts:
            self._layouts[key] = tensor_layout(self.plan, self.quantizer, role, layer, shape)
        return self._layouts[key]

    def kept(self, layer: int, like: Any) -> Any:
        """``(kv_heads, tokens)`` bool of the kept tokens on ``like``'s backend and device (``None``: head plan)."""
        k = self.plan.kept()
        if k is None:
            return None
        xp = array_api_compat.array_namespace(like)
        key = (int(layer),) + device_key(xp, like)
        if key in self._kept:
            return self._kept[key]
        arr = to_device(np.ascontiguousarray(k[layer]), like)
        if not is_traced(like):
            self._kept[key] = arr
        return arr

    def fake_quantize(self, keys: Any, values: Any, *, layer: int) -> FakeQuantized:
        """Fake-quantized ``(keys, values, kept)`` of one layer (tensors ``[batch, kv_heads, tokens, head_dim]``)."""
        return self._run(self._fake_quantize, keys, values, layer)

    def pack(self, keys: Any, values: Any, *, layer: int) -> PackedLayer:
        """Packed storage of one layer; ``.nbytes`` is the bytes held."""
        return self._run(self._pack, keys, values, layer)

    def unpack(self, packed: PackedLayer | PackedCache):
        """``(keys, values)`` of a :class:`PackedLayer`, or a list of them for a :class:`PackedCache`
        (:func:`unpack`)."""
        return unpack(packed)

    def fake_quantize_cache(self, keys: Sequence, values: Sequence) -> list[FakeQuantized]:
        """:meth:`fake_quantize` of every layer (sequences of per-layer tensors)."""
        self._check_layers(keys, values)
        return [self.fake_quantize(k, v, layer=i) for i, (k, v) in enumerate(zip(keys, values))]

    def pack_cache(self, keys: Sequence, values: Sequence) -> PackedCache:
        """:meth:`pack` of every layer (sequences of per-layer tensors)."""
        self._check_layers(keys, values)
        return PackedCache(tuple(self.pack(k, v, layer=i) for i, (k, v) in enumerate(zip(keys, values))))

    def predict_nbytes(self, *, batch: int, tokens: int, head_dim: int) -> int:
        """:func:`rdalloc.accounting.predict_nbytes` of this plan and quantizer."""
        return predict_nbytes(self.plan, self.quantizer, batch=batch, tokens=tokens, head_dim=head_dim)

    def usage(self, *, batch: int, tokens: int, head_dim: int) -> Usage:
        """:func:`rdalloc.accounting.plan_usage` of this plan and quantizer."""
        return plan_usage(self.plan, self.quantizer, batch=batch, tokens=tokens, head_dim=head_dim)

    # -- one layer: validated eagerly (readable errors before any tracing), then run as the backend wants --
    def _run(self, kernel, keys: Any, values: Any, layer: int):
        _check_pair(keys, values)
        if tuple(keys.shape[:3]) != tuple(values.shape[:3]):
            raise ValueError(f"keys and values must agree on [batch, kv_heads, tokens], got {tuple(keys.shape)} and "
                             f"{tuple(values.shape)}")
        for name, x, role in (("keys", keys, "key"), ("values", values, "value")):
            lay = self.layout(role, layer, x.shape)
            if lay.widths:  # finite and within float16's reach where quantized (traced values: not inspected)
                self.quantizer.check_range(x, name, where=(lay.elem_bits > 0) & (lay.elem_bits < FULL_BITS))
        xp = array_api_compat.array_namespace(keys)
        if array_api_compat.is_jax_namespace(xp):
            key = (kernel.__name__, int(layer))
            if key not in self._compiled:
                self._compiled[key] = _jax_jit()(functools.partial(kernel, layer=int(layer)))
            return self._compiled[key](keys, values)
        with _no_grad(xp):
            return kernel(keys, values, layer=layer)

    def _fake_quantize(self, keys: Any, values: Any, *, layer: int) -> FakeQuantized:
        lk, lv = self.layout("key", layer, keys.shape), self.layout("value", layer, values.shape)
        return FakeQuantized(fake_quantize_tensor(keys, lk), fake_quantize_tensor(values, lv), self.kept(layer, keys))

    def _pack(self, keys: Any, values: Any, *, layer: int) -> PackedLayer:
        lk, lv = self.layout("key", layer, keys.shape), self.layout("value", layer, values.shape)
        return PackedLayer(pack_tensor(keys, lk), pack_tensor(values, lv), int(layer))

    def _check_layers(self, keys: Sequence, values: Sequence) -> None:
        if len(keys) != self.plan.layers or len(values) != self.plan.layers:
            raise ValueError(f"the plan has {self.plan.layers} layers, got {len(keys)} key and {len(values)} value "
                             f"tensors")
