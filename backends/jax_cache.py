"""rdalloc.backends.jax_cache — a fixed-capacity packed KV cache for a head plan that a jitted decode step compiles
against once.

:mod:`rdalloc.backends.jax` fixes every shape from the plan and the token count on the host, so each new length
recompiles, the layer index must be a Python int, and packed streams lose the input's sharding. Here every shape is
fixed at construction (``capacity`` tokens, ``batch``, ``head_dim``) and everything that changes during decoding is an
array: the per-layer valid ``length`` and the widths (``(layers, kv_heads)`` int32 arrays). So ``jax.jit`` of a
decode step compiles once for every length, the layer index may be traced (``lax.scan`` over layers), and the cache
is a pytree (a carry of ``jax.jit``, ``lax.scan``, ``lax.while_loop``).

**Storage of one role** (keys or values), every array with a leading layer axis and a head-ordered axis next (kv
heads, or pool entries laid out shard by shard), so sharding the input over kv heads shards the storage the same way
(widths are static, so where each head's data lies is a static table, indexed by the traced layer):

* ``codes``: uint8 **bit-planes** ``(layers, planes, batch, ceil(tokens / 8), head_dim)`` (``tokens``: the
  capacity, rounded up to whole groups for token grouping): plane ``p`` of a head
  holds bit ``p`` of each of its tokens' codes, 8 consecutive tokens of one channel per byte (bit ``t % 8`` of byte
  ``(t // 8, c)``), so one shift-and-mask over a whole plane yields one token of every byte, with no shuffle within
  a row (measured faster to unpack than 8 channels per byte); a head at width ``b`` owns ``b`` planes, so a layer
  holds exactly its heads' bits, and the pool is as long as the layer (per shard) that needs the most planes: layers
  pad to the widest layer, never to the widest head (:attr:`PackedKVCache.plan_nbytes` is what the plan itself
  needs). Under head sharding each shard's heads own one contiguous part of the plane axis, which shards with them.
  Absent when no head of the role is quantized.
* ``params``: float16 group parameters (``quantizer.params``, e.g. scale and zero) per group at its place: per-token
  groups ``(layers, kv_heads, batch, capacity, head_dim / g, n_params)``; per-channel token groups (KIVI keys)
  ``(layers, kv_heads, batch, ceil(capacity / g), head_dim, n_params)``.
* ``full``: the original values of width-16 heads, in the cache dtype ``(layers, slots, batch, capacity, head_dim)``
  (bit for bit), one slot per 16-bit head, as many slots as the layer (per shard) with the most; absent when no
  head of the role is at 16.
* ``residual`` (token-grouped roles only): the last ``length % g`` tokens at full precision (float32),
  ``(layers, kv_heads, batch, g, head_dim)``. When ``g`` tokens have gathered they are quantized as one group,
  exactly as :mod:`rdalloc.quantizers` quantizes that group of ``g`` tokens (same ``fit``/``encode``), and written to
  storage: the residual plus the new chunk is encoded as candidate groups and the full ones written by a masked
  scatter, under a ``lax.cond`` that skips the encoding on the calls where no group fills (``g - 1`` decode steps
  in ``g``).

Quantization is the quantizer's own ``fit``/``encode``/``decode`` with the head's width as a traced integer array
(``transform`` first: QuaRot's rotation), so dequantized storage equals :func:`rdalloc.apply.fake_quantize_tensor` of
the same tokens (full groups; the residual is returned as stored).

**Widths.** 1..8 quantized; 16 stored at full precision bit for bit; 0 **evicts the head**: nothing is written and
:func:`attend` gives its query heads an output of zeros (no token to attend to). Key and value widths must be 0
together (a head is evicted whole).

A traced ``layer`` must be in range (checked only when it is a Python int). **Writes** go at traced offsets by
scatter with ``mode="drop"`` (a position outside storage is dropped, never clamped onto valid data).
**Capacity**: appending past ``capacity`` raises ``ValueError`` when the length is concrete (eager calls); under
``jax.jit`` the chunk that does not fit is not written, ``length`` stays, and the sticky boolean
``overflow`` turns True (check it after the loop).

:func:`attend` reads the bit-planes without dequantizing (the algebra in its docstring; :func:`attend_dequantized`,
the former path, is its oracle). CPU time per token of a jitted 30-layer step (3 kv heads, 9 query heads, head_dim
64, one XLA thread), against a full float16 cache of the same capacity, ``benchmarks/results/jax_decode_fused.md``:
uniform 4 bits 1.30x / 1.42x / 1.53x at 1K / 4K / 8K (the dequantizing oracle 7.7-8.0x), widths 2..8 1.8-2.0x
(every head unpacks as many planes as the widest head), 4 bits with eviction to 10 % of the bytes 0.89-0.93x,
eviction alone to 10 % 0.51-0.66x; at 25 % some layer still keeps all 3 heads, so a step computes 3 heads per layer
(static shapes under ``lax.scan``) and costs as much as the full cache or more.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from rdalloc._namespace import is_traced
from rdalloc.layout import resolve_quantizer
from rdalloc.models import FULL_BITS
from rdalloc.plan import Plan
from rdalloc.quantizers import (
    AsymmetricQuantizer,
    Grouping,
    Quantizer,
    QuaRot,
    SymmetricAbsmax,
    exp2,
    from_groups,
    hadamard_transform,
    to_groups,
)

__all__ = ["CacheSpec", "RoleStorage", "PackedKVCache", "create_cache", "append", "attend", "attend_dequantized",
           "dequantize", "fusable"]


# ---- static description ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CacheSpec:
    """Static facts of a cache (hashable: pytree auxiliary data). ``key_bits``/``value_bits``: tuples of per-layer
    tuples of head widths."""

    quantizer: Quantizer
    key_bits: tuple
    value_bits: tuple
    batch: int
    capacity: int
    head_dim: int
    dtype: str
    sharding: Any = None

    @property
    def layers(self) -> int:
        return len(self.key_bits)

    @property
    def kv_heads(self) -> int:
        return len(self.key_bits[0])

    def bits(self, role: str) -> np.ndarray:
        return np.asarray(self.key_bits if role == "key" else self.value_bits, dtype=np.int32)

    def grouping(self, role: str) -> Grouping:
        return self.quantizer.grouping(role, self.head_dim)

    def slot_bits(self, role: str) -> int:
        """``W``: the widest quantized width of ``role`` (0 when no head of the role is quantized)."""
        b = self.bits(role)
        q = b[(b > 0) & (b < FULL_BITS)]
        return int(q.max()) if q.size else 0

    def has_full(self, role: str) -> bool:
        return bool(np.any(self.bits(role) == FULL_BITS))

    @property
    def shards(self) -> int:
        """How many devices the kv-head axis is split over (1 without sharding)."""
        if self.sharding is None or len(self.sharding.spec) < 2 or self.sharding.spec[1] is None:
            return 1
        axes = self.sharding.spec[1]
        return math.prod(self.sharding.mesh.shape[a] for a in (axes if isinstance(axes, tuple) else (axes,)))

    def planes(self, role: str) -> tuple[int, np.ndarray]:
        """``(pool size, plane index (layers, kv_heads, W))``: where each head's bit-planes lie in the role's plane
        pool. Head ``h`` of layer ``l`` at width ``w`` owns ``w`` consecutive planes, heads packed one after the
        other within their shard's part of the pool; each shard's part is as long as the most planes one layer puts
        on one shard. Planes ``p >= w`` (and 0/16-bit heads) get the pool size (an index past the end)."""
        return _slots(self.bits(role), self.shards, lambda b: np.where((b > 0) & (b < FULL_BITS), b, 0),
                      self.slot_bits(role))

    def compute_slots(self, role: str, full: bool) -> tuple[int, np.ndarray, np.ndarray]:
        """``(S, head (layers, S), slot (layers, kv_heads))`` for the fused read: the quantized heads of ``role``
        (``full``: its 16-bit heads) of each layer in head order, ``S`` the most one layer has. ``head`` is
        ``kv_heads`` for an empty slot, ``slot`` is ``S`` for a head not in the set. So a step computes ``S`` heads
        of that kind, not ``kv_heads``: evicted heads cost nothing where every layer evicts alike."""
        b = self.bits(role)
        sel = (b == FULL_BITS) if full else ((b > 0) & (b < FULL_BITS))
        L, H = b.shape
        S = int(sel.sum(1).max()) if sel.size else 0
        head = np.full((L, S), H, np.int32)
        slot = np.full((L, H), S, np.int32)
        for layer in range(L):
            hs = np.flatnonzero(sel[layer])
            head[layer, :hs.size] = hs
            slot[layer, hs] = np.arange(hs.size)
        return S, head, slot

    def full_slots(self, role: str) -> tuple[int, np.ndarray]:
        """``(pool size, slot (layers, kv_heads, 1))``: each 16-bit head's slot in the full-precision pool."""
        return _slots(self.bits(role), self.shards, lambda b: (b == FULL_BITS).astype(np.int64), 1)


def _slots(bits: np.ndarray, shards: int, need, depth: int) -> tuple[int, np.ndarray]:
    L, H = bits.shape
    per = H // shards
    n = need(bits.astype(np.int64))  # slots each head takes
    used = n.reshape(L, shards, per)
    part = int(used.sum(-1).max()) if n.size else 0
    offset = np.cumsum(used, -1) - used + (np.arange(shards) * part)[None, :, None]
    idx = offset.reshape(L, H)[..., None] + np.arange(depth)
    return shards * part, np.where(np.arange(depth) < n[..., None], idx, shards * part).astype(np.int32)


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class RoleStorage:
    """One role's storage (see the module docstring); absent parts are ``None``."""

    codes: Any
    params: Any
    full: Any
    residual: Any


@dataclass(frozen=True)
class PackedKVCache:
    """The cache: ``keys``/``values`` storage, ``length`` int32 ``(layers,)`` (valid tokens per layer), ``overflow``
    (bool, sticky: a chunk did not fit under jit), the widths as int32 ``(layers, kv_heads)`` arrays, and the static
    :class:`CacheSpec`."""

    keys: RoleStorage
    values: RoleStorage
    length: Any
    overflow: Any
    key_bits: Any
    value_bits: Any
    spec: CacheSpec

    @property
    def nbytes(self) -> int:
        """Bytes the storage arrays occupy (widths and lengths excluded)."""
        leaves = jax.tree_util.tree_leaves((self.keys, self.values))
        return int(sum(a.size * a.dtype.itemsize for a in leaves))

    @property
    def plan_nbytes(self) -> int:
        """Bytes the plan needs at full capacity without padding to the widest width: codes at each head's width,
        2 per group parameter of a quantized head, 2 per full-precision element (docs/design.md §5)."""
        s = self.spec
        total = 0
        for role in ("key", "value"):
            g = s.grouping(role)
            groups = g.groups_per_head(s.capacity, s.head_dim)
            for b in s.bits(role).ravel():
                n = s.batch * s.capacity * s.head_dim
                if b == FULL_BITS:
                    total += 2 * n
                elif b > 0:
                    total += -(-n * int(b) // 8) + 2 * len(s.quantizer.params) * s.batch * groups
        return total


jax.tree_util.register_dataclass(PackedKVCache, data_fields=["keys", "values", "length", "overflow", "key_bits",
                                                             "value_bits"], meta_fields=["spec"])


# ---- construction ---------------------------------------------------------------------------------------------------
def _positive(name: str, x: Any) -> int:
    if isinstance(x, bool) or not isinstance(x, (int, np.integer)) or x < 1:
        raise ValueError(f"{name} must be a positive integer, got {x!r}")
    return int(x)


def _storage_sharding(sharding: Any, ndim: int) -> Any:
    """The storage sharding for a K/V sharding ``(batch, kv_heads, tokens, head_dim)``: its kv-head axis on storage
    axis 1, everything else replicated."""
    if sharding is None:
        return None
    from jax.sharding import NamedSharding, PartitionSpec

    spec = tuple(sharding.spec) + (None,) * (4 - len(sharding.spec))
    return NamedSharding(sharding.mesh, PartitionSpec(None, spec[1], *([None] * (ndim - 2))))


def _zeros(shape: tuple, dtype: Any, sharding: Any) -> Any:
    s = _storage_sharding(sharding, len(shape))
    return jnp.zeros(shape, dtype) if s is None else jax.device_put(jnp.zeros(shape, dtype), s)


def create_cache(plan: Plan, *, batch: int, capacity: int, head_dim: int, dtype: Any = jnp.float32,
                 quantizer: Quantizer | str | None = None, sharding: Any = None) -> PackedKVCache:
    """An empty cache for a head plan: ``capacity`` tokens per layer, storage allocated now (shapes never change).

    ``sharding``: the ``jax.sharding.NamedSharding`` of the K/V arrays ``[batch, kv_heads, tokens, head_dim]`` that
    will be appended; its kv-head axis (only that one may be sharded) shards every storage array on its head axis.
    """
    if not isinstance(plan, Plan):
        raise TypeError(f"plan must be an rdalloc.Plan, got {type(plan).__name__}")
    if plan.granularity != "head":
        raise ValueError(f"plan must be a head plan (granularity 'head'), got granularity {plan.granularity!r}")
    batch, capacity, head_dim = _positive("batch", batch), _positive("capacity", capacity), _positive("head_dim",
                                                                                                      head_dim)
    if head_dim % 8:
        raise ValueError(f"head_dim must be a multiple of 8 (each token's codes fill whole bytes), got {head_dim}")
    dtype = jnp.dtype(dtype)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"dtype must be a floating dtype, got {dtype}")
    q = resolve_quantizer(plan, quantizer)
    for role, bits in (("key", plan.key), ("value", plan.value)):
        q.check_bits(bits, f"plan.{role}")
        q.grouping(role, head_dim)  # raises when the grouping does not fit head_dim
    if np.any((plan.key == 0) != (plan.value == 0)):
        idx = tuple(int(i) for i in np.argwhere((plan.key == 0) != (plan.value == 0))[0])
        raise ValueError(f"a head is evicted whole: plan key bits {int(plan.key[idx])} and value bits "
                         f"{int(plan.value[idx])} at (layer, kv_head) = {idx}")
    if sharding is not None:
        from jax.sharding import NamedSharding

        if not isinstance(sharding, NamedSharding):
            raise TypeError(f"sharding must be a jax.sharding.NamedSharding or None, got {type(sharding).__name__}")
        spec = tuple(sharding.spec)
        if any(s is not None for i, s in enumerate(spec) if i != 1):
            raise ValueError(f"sharding may shard only the kv-head axis (axis 1 of [batch, kv_heads, tokens, "
                             f"head_dim]), got spec {sharding.spec}")
    spec = CacheSpec(q, tuple(map(tuple, plan.key.tolist())), tuple(map(tuple, plan.value.tolist())), batch,
                     capacity, head_dim, dtype.name, sharding)
    L, H = plan.layers, plan.kv_heads
    if H % spec.shards:
        raise ValueError(f"sharding splits kv heads over {spec.shards} devices, which does not divide the plan's "
                         f"kv_heads={H}")
    stores = [_empty_role(spec, role, L, H) for role in ("key", "value")]
    return PackedKVCache(stores[0], stores[1], jnp.zeros((L,), jnp.int32), jnp.zeros((), bool),
                         jnp.asarray(spec.bits("key")), jnp.asarray(spec.bits("value")), spec)


def _empty_role(spec: CacheSpec, role: str, L: int, H: int) -> RoleStorage:
    B, T, D, sh = spec.batch, spec.capacity, spec.head_dim, spec.sharding
    g = spec.grouping(role)
    n_params = len(spec.quantizer.params)
    codes = params = full = residual = None
    n_planes, _ = spec.planes(role)
    if n_planes:
        # token groups: planes cover whole groups, so the fused read needs no padding copy (measured 3x slower
        # per layer when capacity is not a multiple of g)
        tokens = -(-T // g.size) * g.size if g.axis == "token" else T
        codes = _zeros((L, n_planes, B, _bytes_axis(tokens), D), jnp.uint8, sh)
        if g.axis == "channel":
            params = _zeros((L, H, B, T, D // g.size, n_params), jnp.float16, sh)
        else:
            params = _zeros((L, H, B, -(-T // g.size), D, n_params), jnp.float16, sh)
            residual = _zeros((L, H, B, g.size, D), jnp.float32, sh)
    n_full, _ = spec.full_slots(role)
    if n_full:
        full = _zeros((L, n_full, B, T, D), spec.dtype, sh)
    return RoleStorage(codes, params, full, residual)


# ---- quantizing a block ---------------------------------------------------------------------------------------------
def _quant_bits(bits: Any) -> Any:
    """Per-head widths for the quantizer: 0/16 heads quantize at 1 bit (their codes are never read) so every code
    fits its slot."""
    return jnp.where((bits == 0) | (bits == FULL_BITS), 1, bits)


def _encode(spec: CacheSpec, role: str, x: Any, bits: Any) -> tuple[Any, Any]:
    """``x`` ``[B, H, n, D]`` (float32; for token grouping ``n`` a multiple of ``g``) -> ``(codes uint8 [B, H, n, D],
    params float16 [B, H, P, Q, n_params])`` in the group view ``(P, Q)``."""
    q, g = spec.quantizer, spec.grouping(role)
    B, H, n, D = x.shape
    xg = to_groups(q.transform(x, role), g)
    b = _quant_bits(bits).reshape(1, H, 1, 1, 1)
    params = q.fit(xg, b)
    codes = from_groups(q.encode(xg, params, b), g, n, D)
    return codes.astype(jnp.uint8), jnp.stack([p[..., 0] for p in params], -1).astype(jnp.float16)


def _decode(spec: CacheSpec, role: str, codes: Any, params: Any, bits: Any) -> Any:
    """Inverse of :func:`_encode`: codes ``[B, H, n, D]``, params ``[B, H, P, Q, n_params]`` -> ``[B, H, n, D]``."""
    q, g = spec.quantizer, spec.grouping(role)
    B, H, n, D = codes.shape
    cg = to_groups(codes.astype(jnp.float32), g)
    ps = tuple(params[..., i:i + 1].astype(jnp.float32) for i in range(params.shape[-1]))
    b = _quant_bits(bits).reshape(1, H, 1, 1, 1)
    return q.inverse_transform(from_groups(q.decode(cg, ps, b), g, n, D), role)


def _bytes_axis(capacity: int) -> int:
    """Bytes along the token axis of a bit-plane: 8 tokens per byte."""
    return -(-capacity // 8)


def _write_codes(spec: CacheSpec, role: str, pool: Any, layer: Any, pos: Any, codes: Any) -> Any:
    """Codes ``[B, H, n, D]`` of tokens at ``pos`` (``n``; a position ``>= capacity`` is dropped) written into their
    heads' bit-planes: bit ``p`` of the code of token ``t``, channel ``c`` goes to bit ``t % 8`` of byte
    ``(t // 8, c)`` of the head's plane ``p``. Those bits are 0 until written (each position is written once), so
    the write is a scatter-add (tokens of one chunk sharing a byte add distinct bits)."""
    W = spec.slot_bits(role)
    _, index = spec.planes(role)
    slot = jnp.asarray(index)[layer]  # [H, W]; past the end for planes a head does not own: dropped
    shift = (pos % 8).astype(jnp.uint8)[None, None, :, None]
    planes = jnp.stack([((codes >> p) & 1) << shift for p in range(W)])  # [W, B, H, n, D]
    byte = jnp.where(pos < spec.capacity, pos // 8, pool.shape[3])  # past the end: dropped
    upd = jnp.transpose(planes, (2, 0, 3, 1, 4))  # [H, W, n, B, D]
    return pool.at[layer, slot[:, :, None], :, byte[None, None, :]].add(upd, mode="drop")


def _slot_codes(spec: CacheSpec, role: str, pool: Any, layer: Any, index: Any) -> Any:
    """uint8 codes ``[S, B, 8 ceil(capacity / 8), D]`` of ``S`` heads whose planes lie at ``index`` ``[S, W]`` (an
    index past the pool: no plane, bit 0). Each plane is read once by a dynamic slice and unpacked with one
    shift-and-mask per token of a byte over the whole plane (no gather, no shuffle within a row)."""
    W = spec.slot_bits(role)
    n_planes = pool.shape[1]
    lp = lax.dynamic_index_in_dim(pool, layer, keepdims=False)  # [P, B, T8, D]
    shift = jnp.arange(8, dtype=jnp.uint8)[:, None]
    heads = []
    for s in range(index.shape[0]):
        code = None
        for p in range(W):
            plane = lax.dynamic_index_in_dim(lp, jnp.minimum(index[s, p], n_planes - 1), keepdims=False)
            plane = jnp.where(index[s, p] < n_planes, plane, jnp.uint8(0))  # [B, T8, D]
            bit = ((plane[:, :, None, :] >> shift) & 1) << p  # [B, T8, 8, D]
            code = bit if code is None else code | bit
        heads.append(code.reshape(code.shape[0], -1, code.shape[-1]))
    return jnp.stack(heads)


def _read_codes(spec: CacheSpec, role: str, pool: Any, layer: Any) -> Any:
    """Codes ``[B, H, capacity, D]`` of every head of ``layer`` from the plane pool (0 where a head owns no plane)."""
    _, index = spec.planes(role)
    codes = _slot_codes(spec, role, pool, layer, jnp.asarray(index)[layer])
    return jnp.swapaxes(codes[:, :, :spec.capacity], 0, 1)


# ---- append ---------------------------------------------------------------------------------------------------------
def _check_layer(cache: PackedKVCache, layer: Any) -> Any:
    if isinstance(layer, (int, np.integer)) and not isinstance(layer, bool):
        if not 0 <= layer < cache.spec.layers:
            raise ValueError(f"layer must be in [0, {cache.spec.layers}), got {layer}")
        return jnp.int32(layer)
    if isinstance(layer, jax.Array) and layer.shape == () and jnp.issubdtype(layer.dtype, jnp.integer):
        return layer.astype(jnp.int32)
    raise TypeError(f"layer must be an int or a scalar integer array, got {layer!r}")


def _check_kv(cache: PackedKVCache, x: Any, name: str) -> None:
    s = cache.spec
    if not isinstance(x, jax.Array) or x.ndim != 4 or not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{name} must be a floating jax.Array [batch, kv_heads, tokens, head_dim], got "
                        f"{getattr(x, 'dtype', type(x).__name__)} shape {getattr(x, 'shape', None)}")
    B, H, n, D = x.shape
    if (B, H, D) != (s.batch, s.kv_heads, s.head_dim) or n < 1:
        raise ValueError(f"{name} has shape {tuple(x.shape)}, but the cache holds [batch={s.batch}, "
                         f"kv_heads={s.kv_heads}, tokens>=1, head_dim={s.head_dim}]")


def _scatter_tokens(store: Any, layer: Any, pos: Any, upd: Any) -> Any:
    """``store[layer, :, :, pos[j]] = upd[:, :, j]`` (``upd`` ``[H, B, n, ...]``); positions out of range dropped."""
    return store.at[layer, :, :, pos].set(jnp.moveaxis(upd, 2, 0), mode="drop")


def append(cache: PackedKVCache, layer: Any, keys: Any, values: Any) -> PackedKVCache:
    """``cache`` with ``keys``/``values`` ``[batch, kv_heads, n, head_dim]`` appended to ``layer`` (an int or a traced
    int32 scalar) at its current length, which grows by ``n``. Jittable; shapes never change."""
    if not isinstance(cache, PackedKVCache):
        raise TypeError(f"cache must be a PackedKVCache, got {type(cache).__name__}")
    layer = _check_layer(cache, layer)
    _check_kv(cache, keys, "keys")
    _check_kv(cache, values, "values")
    if keys.shape != values.shape:
        raise ValueError(f"keys and values must have the same shape, got {tuple(keys.shape)} and "
                         f"{tuple(values.shape)}")
    s = cache.spec
    n = keys.shape[2]
    start = cache.length[layer]
    if not is_traced(start):
        if int(start) + n > s.capacity:
            raise ValueError(f"appending {n} tokens to layer {int(layer)} holding {int(start)} would exceed the "
                             f"capacity of {s.capacity} tokens")
    fits = start + n <= s.capacity
    new_keys = _append_role(cache, "key", cache.keys, cache.key_bits[layer], layer, start, fits, keys)
    new_values = _append_role(cache, "value", cache.values, cache.value_bits[layer], layer, start, fits, values)
    length = cache.length.at[layer].add(jnp.where(fits, n, 0))
    return PackedKVCache(new_keys, new_values, length, cache.overflow | ~fits, cache.key_bits, cache.value_bits, s)


def _constrain(spec: CacheSpec, a: Any) -> Any:
    if a is None or spec.sharding is None:
        return a
    return lax.with_sharding_constraint(a, _storage_sharding(spec.sharding, a.ndim))


def _append_role(cache: PackedKVCache, role: str, st: RoleStorage, bits: Any, layer: Any, start: Any, fits: Any,
                 x: Any) -> RoleStorage:
    s = cache.spec
    B, H, n, D = x.shape
    W, g = s.slot_bits(role), s.grouping(role)
    big = s.capacity + 2 * g.size + n  # an index past every storage axis: scatter drops it
    codes, params, full, residual = st.codes, st.params, st.full, st.residual
    if full is not None:
        pos = jnp.where(fits, start + jnp.arange(n), big)
        _, slots = s.full_slots(role)
        slot = jnp.asarray(slots[..., 0])[layer]  # [H]; past the end for heads not at 16: dropped
        full = full.at[layer, slot[:, None], :, pos[None, :]].set(jnp.swapaxes(x.astype(full.dtype), 0, 1)
                                                                   .swapaxes(1, 2), mode="drop")
    if W and g.axis == "channel":
        c, p = _encode(s, role, x.astype(jnp.float32), bits)  # p: [B, H, n, D/g, n_params]
        pos = jnp.where(fits, start + jnp.arange(n), big)
        codes = _write_codes(s, role, codes, layer, pos, c)
        params = _scatter_tokens(params, layer, pos, jnp.swapaxes(p, 0, 1))
    elif W:
        G = g.size
        r = start % G
        base = start - r
        m = -(-(G + n) // G)  # candidate groups in residual + chunk
        res = jnp.swapaxes(lax.dynamic_index_in_dim(residual, layer, keepdims=False), 0, 1)  # [B, H, G, D]
        buf = jnp.zeros((B, H, (m + 1) * G, D), jnp.float32)
        buf = lax.dynamic_update_slice(buf, res, (0, 0, 0, 0))
        buf = lax.dynamic_update_slice(buf, x.astype(jnp.float32), (0, 0, r, 0))
        total = r + n
        nfull = total // G

        def write(stores):  # quantize the candidate groups, write the full ones
            codes, params = stores
            c, p = _encode(s, role, buf[:, :, :m * G], bits)  # p: [B, H, D, m, n_params]
            tok = jnp.arange(m * G)
            pos = jnp.where(fits & (tok < nfull * G), base + tok, big)
            codes = _write_codes(s, role, codes, layer, pos, c)
            grp = jnp.arange(m)
            gpos = jnp.where(fits & (grp < nfull), base // G + grp, big)
            return codes, _scatter_tokens(params, layer, gpos, jnp.swapaxes(jnp.swapaxes(p, 2, 3), 0, 1))

        # a group fills once every g tokens: the other steps skip the encoding (lax.cond runs one branch)
        codes, params = lax.cond(fits & (nfull > 0), write, lambda stores: stores, (codes, params))
        new_res = lax.dynamic_slice_in_dim(buf, nfull * G, G, axis=2)
        new_res = jnp.where(fits, new_res, res)
        residual = lax.dynamic_update_index_in_dim(residual, jnp.swapaxes(new_res, 0, 1), layer, 0)
    return RoleStorage(*(_constrain(s, a) for a in (codes, params, full, residual)))


# ---- reading --------------------------------------------------------------------------------------------------------
def _layer_of(a: Any, layer: Any) -> Any:
    return jnp.swapaxes(lax.dynamic_index_in_dim(a, layer, keepdims=False), 0, 1)  # [B, H, ...]


def _dequantize_role(cache: PackedKVCache, role: str, layer: Any) -> Any:
    """``[B, H, capacity, D]`` float32: stored tokens as the quantizer reconstructs them (16-bit heads exact; the
    residual of a token-grouped role as stored); positions at or past the length hold unspecified values."""
    s = cache.spec
    st = cache.keys if role == "key" else cache.values
    bits = (cache.key_bits if role == "key" else cache.value_bits)[layer]
    W, g = s.slot_bits(role), s.grouping(role)
    B, H, T, D = s.batch, s.kv_heads, s.capacity, s.head_dim
    out = jnp.zeros((B, H, T, D), jnp.float32)
    if W:
        codes = _read_codes(s, role, st.codes, layer)
        params = _layer_of(st.params, layer)
        if g.axis == "token":
            # decode in token order: codes [B, H, groups, g, D] against parameters [B, H, groups, 1, D] (no
            # transposes), then the residual written over its place (positions past the length are unspecified)
            G, n_groups = g.size, params.shape[2]
            codes = jnp.pad(codes, ((0, 0), (0, 0), (0, n_groups * G - T), (0, 0))).astype(jnp.float32)
            ps = tuple(params[:, :, :, None, :, i].astype(jnp.float32) for i in range(params.shape[-1]))
            b = _quant_bits(bits).reshape(1, H, 1, 1, 1)
            xh = s.quantizer.decode(codes.reshape(B, H, n_groups, G, D), ps, b).reshape(B, H, n_groups * G, D)
            xh = s.quantizer.inverse_transform(xh, role)
            length = cache.length[layer]
            xh = jnp.pad(xh, ((0, 0), (0, 0), (0, G), (0, 0)))  # the residual holds untransformed tokens
            out = lax.dynamic_update_slice(xh, _layer_of(st.residual, layer), (0, 0, length - length % G, 0))[:, :, :T]
        else:
            out = _decode(s, role, codes, params, bits)
    if st.full is not None:
        n_full, slots = s.full_slots(role)
        slot = jnp.minimum(jnp.asarray(slots[..., 0])[layer], n_full - 1)
        full = jnp.take(_layer_of(st.full, layer), slot, axis=1)
        out = jnp.where((bits == FULL_BITS)[None, :, None, None], full.astype(jnp.float32), out)
    return out


def dequantize(cache: PackedKVCache, layer: Any) -> tuple[Any, Any]:
    """``(keys, values)`` of ``layer`` as ``[batch, kv_heads, capacity, head_dim]`` in the cache dtype; only the
    first ``cache.length[layer]`` tokens are meaningful; evicted heads are 0."""
    if not isinstance(cache, PackedKVCache):
        raise TypeError(f"cache must be a PackedKVCache, got {type(cache).__name__}")
    layer = _check_layer(cache, layer)
    out = []
    for role, bits in (("key", cache.key_bits[layer]), ("value", cache.value_bits[layer])):
        x = _dequantize_role(cache, role, layer)
        out.append(jnp.where((bits == 0)[None, :, None, None], 0.0, x).astype(cache.spec.dtype))
    return tuple(out)


def _check_attend(cache: PackedKVCache, layer: Any, q: Any, scale: float | None) -> tuple[Any, float]:
    if not isinstance(cache, PackedKVCache):
        raise TypeError(f"cache must be a PackedKVCache, got {type(cache).__name__}")
    layer = _check_layer(cache, layer)
    s = cache.spec
    if not isinstance(q, jax.Array) or q.ndim != 4 or q.shape[2] != 1 or q.shape[0] != s.batch \
            or q.shape[3] != s.head_dim or q.shape[1] % s.kv_heads:
        raise ValueError(f"q must be [batch={s.batch}, q_heads (a multiple of kv_heads={s.kv_heads}), 1, "
                         f"head_dim={s.head_dim}], got shape {getattr(q, 'shape', type(q).__name__)}")
    return layer, 1.0 / math.sqrt(s.head_dim) if scale is None else float(scale)


def _softmax(scores: Any, kept: Any) -> Any:
    """Probabilities over the last axis where ``kept`` (0 elsewhere; all 0 when nothing is kept)."""
    scores = jnp.where(kept, scores, -jnp.inf)
    mx = jnp.max(scores, axis=-1, keepdims=True)
    w = jnp.where(kept, jnp.exp(scores - jnp.where(jnp.isfinite(mx), mx, 0.0)), 0.0)
    den = jnp.sum(w, axis=-1, keepdims=True)
    return w / jnp.where(den > 0, den, 1.0)


def attend_dequantized(cache: PackedKVCache, layer: Any, q: Any, *, scale: float | None = None) -> Any:
    """The oracle of :func:`attend`: the same contract, computed by dequantizing the layer's whole storage
    (:func:`dequantize`'s values, float32) and attending over it."""
    layer, scale = _check_attend(cache, layer, q, scale)
    s = cache.spec
    B, Hq, _, D = q.shape
    H, r = s.kv_heads, q.shape[1] // s.kv_heads
    k = _dequantize_role(cache, "key", layer)
    v = _dequantize_role(cache, "value", layer)
    qf = q.astype(jnp.float32).reshape(B, H, r, D)
    scores = jnp.einsum("bhrd,bhtd->bhrt", qf, k) * scale
    kept = (cache.key_bits[layer] > 0)[None, :, None, None] & (jnp.arange(s.capacity) < cache.length[layer])
    out = jnp.einsum("bhrt,bhtd->bhrd", _softmax(scores, kept), v)
    return out.reshape(B, Hq, 1, D).astype(q.dtype)


def fusable(quantizer: Quantizer) -> bool:
    """Whether :func:`attend` reads ``quantizer``'s storage directly: affine decoding (the asymmetric quantizers'
    ``code * scale + zero``, symmetric absmax's ``code * scale - c * scale``) and no transform but QuaRot's
    rotation. Other quantizers attend through :func:`attend_dequantized`."""
    t = type(quantizer)
    affine = t.decode in (AsymmetricQuantizer.decode, SymmetricAbsmax.decode)
    plain = (t.transform is Quantizer.transform and t.inverse_transform is Quantizer.inverse_transform)
    rotation = isinstance(quantizer, QuaRot) and t.transform is QuaRot.transform \
        and t.inverse_transform is QuaRot.inverse_transform
    return affine and (plain or rotation)


def _affine(q: Quantizer, params: Any, bits: Any) -> tuple[Any, Any]:
    """float32 ``(scale, zero)`` with ``decode(code) = code * scale + zero`` from float16 ``params [..., n_params]``
    (``bits`` broadcast against ``params[..., 0]``): converted once per group."""
    scale = params[..., 0].astype(jnp.float32)
    if type(q).decode is SymmetricAbsmax.decode:
        center = jnp.where(bits == 1, 0.5, exp2(bits, scale) / 2.0 - 1.0)
        return scale, -(center * scale)
    return scale, params[..., 1].astype(jnp.float32)


def _to_heads(x: Any, slot: Any, n: int) -> Any:
    """``[S, ...]`` per compute slot -> ``[H, ...]`` per head by the head -> slot table (0 for a head in no slot)."""
    y = jnp.take(x, jnp.minimum(slot, n - 1), axis=0)
    return jnp.where((slot < n).reshape(-1, *([1] * (x.ndim - 1))), y, 0.0)


class _Role:
    """One role's quantized slots of one layer, read for the fused algebra (see :func:`attend`)."""

    def __init__(self, cache: PackedKVCache, role: str, layer: Any):
        s = cache.spec
        st = cache.keys if role == "key" else cache.values
        bits = (cache.key_bits if role == "key" else cache.value_bits)[layer]
        self.g = s.grouping(role)
        self.S, head, slot = s.compute_slots(role, full=False)
        self.head = jnp.minimum(jnp.asarray(head)[layer], s.kv_heads - 1)  # [S]
        self.slot = jnp.asarray(slot)[layer]  # [H]
        if not self.S:
            return
        n_planes, index = s.planes(role)
        planes = np.concatenate([index, np.full((index.shape[0], 1, index.shape[2]), n_planes, np.int32)], 1)
        rows = jnp.asarray(planes)[layer][jnp.asarray(head)[layer]]  # [S, W]; empty slots own no plane
        codes = _slot_codes(s, role, st.codes, layer, rows).astype(jnp.float32)  # [S, B, Tp, D]
        params = jnp.take(lax.dynamic_index_in_dim(st.params, layer, keepdims=False), self.head, axis=0)
        sbits = jnp.take(bits, self.head)
        B, T, D, g = s.batch, s.capacity, s.head_dim, self.g.size
        if self.g.axis == "token":
            n_blocks = params.shape[2]
            if codes.shape[2] != n_blocks * g:  # planes cover whole groups, rounded up to whole bytes
                codes = codes[:, :, :n_blocks * g]
            self.codes = codes.reshape(self.S, B, n_blocks, g, D)  # [S, B, blocks, g, D]
            self.residual = _layer_of(st.residual, layer)  # [B, H, g, D] float32 (untransformed)
        else:
            self.codes = codes[:, :, :T].reshape(self.S, B, T, D // g, g)  # [S, B, T, U, g]
        self.scale, self.zero = _affine(s.quantizer, params, sbits.reshape(-1, *([1] * (params.ndim - 2))))


def _full_role(cache: PackedKVCache, role: str, layer: Any) -> tuple[int, Any, Any, Any]:
    """``(F, head [F], slot [H], full [F, B, T, D] float32)``: the 16-bit heads' slots of ``layer``."""
    s = cache.spec
    F, head, slot = s.compute_slots(role, full=True)
    if not F:
        return 0, None, None, None
    st = cache.keys if role == "key" else cache.values
    n_full, slots = s.full_slots(role)
    pool_slot = jnp.asarray(slots[..., 0])[layer][jnp.minimum(jnp.asarray(head)[layer], s.kv_heads - 1)]  # [F]
    full = jnp.take(lax.dynamic_index_in_dim(st.full, layer, keepdims=False), jnp.minimum(pool_slot, n_full - 1),
                    axis=0).astype(jnp.float32)
    return F, jnp.minimum(jnp.asarray(head)[layer], s.kv_heads - 1), jnp.asarray(slot)[layer], full


def attend(cache: PackedKVCache, layer: Any, q: Any, *, scale: float | None = None) -> Any:
    """Decode attention of ``q`` ``[batch, q_heads, 1, head_dim]`` over ``layer``'s valid tokens, read from the
    packed storage without dequantizing it.

    ``out[b, h] = softmax(scale * q[b, h] . K[b, h // r, :length]) @ V[b, h // r, :length]`` with ``r = q_heads /
    kv_heads`` (GQA: consecutive query heads share a kv head), ``scale = 1/sqrt(head_dim)`` by default, ``K``/``V``
    as :func:`dequantize` holds them; query heads of an evicted kv head (and a layer with no token) get 0. Computes
    in float32, returns ``q``'s dtype; equals :func:`attend_dequantized` up to float rounding (sums reordered).

    The codes enter the matmuls as small integers (float32) and the float16 parameters are converted once per
    group: with ``x = code * s + z`` per group,

    * keys grouped along tokens (KIVI; ``s_cj``, ``z_cj`` per channel ``c`` and block ``j`` of ``g`` tokens):
      ``q . k_t = sum_c (q_c s_cj) code_ct + sum_c q_c z_cj``; the last ``length % g`` tokens come from the
      full-precision residual; keys grouped along channels (``s_tu``, ``z_tu`` per token and channel group
      ``u``): ``q . k_t = sum_u s_tu (q_u . code_tu) + z_tu sum(q_u)``;
    * values, with the probabilities ``p``: channel groups ``sum_t p_t v_t = sum_t (p_t s_tu) code_tu +
      sum_t p_t z_tu``; token groups ``sum_j s_cj (sum_{t in j} p_t code_tc) + z_cj sum_{t in j} p_t``;
    * QuaRot rotates the query (``H q``) instead of the stored keys and the quantized values' output back once
      (``H`` is its own inverse); 16-bit heads attend over their stored values.

    A step computes only each layer's quantized heads and 16-bit heads (as many slots as the layer with the most:
    :meth:`CacheSpec.compute_slots`), each reading its bit-planes once. Quantizers this algebra does not cover
    (:func:`fusable`) go through :func:`attend_dequantized`.
    """
    layer, scale = _check_attend(cache, layer, q, scale)
    s = cache.spec
    if not fusable(s.quantizer):
        return attend_dequantized(cache, layer, q, scale=scale)
    B, Hq, _, D = q.shape
    H, r, T = s.kv_heads, Hq // s.kv_heads, s.capacity
    rotate = isinstance(s.quantizer, QuaRot)
    qf = jnp.swapaxes(q.astype(jnp.float32).reshape(B, H, r, D), 0, 1) * scale  # [H, B, r, D]
    qr = hadamard_transform(qf) if rotate else qf
    length = cache.length[layer]
    kb, vb = cache.key_bits[layer], cache.value_bits[layer]
    # ---- scores [H, B, r, T]
    scores = jnp.zeros((H, B, r, T), jnp.float32)
    k = _Role(cache, "key", layer)
    if k.S:
        qs = jnp.take(qr, k.head, axis=0)  # [S, B, r, D]
        if k.g.axis == "token":
            qsc = qs[:, :, :, None, :] * k.scale[:, :, None]  # [S, B, r, blocks, D]
            sc = jnp.einsum("sbrjd,sbjid->sbrji", qsc, k.codes) + jnp.einsum("sbrd,sbjd->sbrj", qs, k.zero)[..., None]
            sc = _to_heads(sc.reshape(*sc.shape[:3], -1), k.slot, k.S)
            G = k.g.size
            base = length - length % G
            res = jnp.einsum("hbrd,bhid->hbri", qf, k.residual)  # the residual holds untransformed tokens
            sc = jnp.pad(sc, ((0, 0), (0, 0), (0, 0), (0, max(0, T + G - sc.shape[-1]))))
            sc = lax.dynamic_update_slice(sc, res, (0, 0, 0, base))[..., :T]
        else:
            S, U, g = k.S, k.codes.shape[3], k.g.size
            qg = qs.reshape(S, B, r, U, g)
            # one plain matmul per slot: the query's channel groups on a block diagonal [(r, U), D]
            qd = (qg[:, :, :, :, None, :] * jnp.eye(U, dtype=jnp.float32)[:, :, None]).reshape(S, B, r * U, D)
            inner = jnp.einsum("sbkd,sbtd->sbkt", qd, k.codes.reshape(S, B, T, D)).reshape(S, B, r, U, T)
            sc = jnp.einsum("sbrut,sbtu->sbrt", inner, k.scale) + jnp.einsum("sbtu,sbru->sbrt", k.zero, qg.sum(-1))
            sc = _to_heads(sc, k.slot, k.S)
        scores = sc
    F, fhead, fslot, kfull = _full_role(cache, "key", layer)
    if F:
        sf = _to_heads(jnp.einsum("fbrd,fbtd->fbrt", jnp.take(qf, fhead, axis=0), kfull), fslot, F)
        scores = jnp.where((kb == FULL_BITS)[:, None, None, None], sf, scores)
    kept = (kb > 0)[:, None, None, None] & (jnp.arange(T) < length)
    p = _softmax(scores, kept)  # [H, B, r, T]
    # ---- output [H, B, r, D]
    out = jnp.zeros((H, B, r, D), jnp.float32)
    v = _Role(cache, "value", layer)
    if v.S:
        ps = jnp.take(p, v.head, axis=0)  # [S, B, r, T]
        if v.g.axis == "token":
            G = v.g.size
            base = length - length % G
            n_blocks = v.codes.shape[2]
            pq = jnp.where(jnp.arange(T) < base, ps, 0.0)
            pq = jnp.pad(pq, ((0, 0), (0, 0), (0, 0), (0, n_blocks * G - T))).reshape(*ps.shape[:3], n_blocks, G)
            inner = jnp.einsum("sbrji,sbjid->sbrjd", pq, v.codes)
            oq = jnp.einsum("sbrjd,sbjd->sbrd", inner, v.scale) + jnp.einsum("sbrj,sbjd->sbrd", pq.sum(-1), v.zero)
        else:
            S, U, g = v.S, v.codes.shape[3], v.g.size
            pss = (jnp.swapaxes(ps, 2, 3)[..., None] * v.scale[:, :, :, None, :]).reshape(S, B, T, r * U)
            # one plain matmul per slot over all channels, then each channel group's own block (the diagonal)
            o = jnp.einsum("sbtk,sbtd->sbkd", pss, v.codes.reshape(S, B, T, D)).reshape(S, B, r, U, U, g)
            oq = jnp.einsum("sbruug->sbrug", o).reshape(S, B, r, D) + jnp.repeat(
                jnp.einsum("sbrt,sbtu->sbru", ps, v.zero), g, axis=-1)
        oq = _to_heads(oq, v.slot, v.S)
        out = hadamard_transform(oq) if rotate else oq
        if v.g.axis == "token":  # the residual's tokens, untransformed, after the rotation
            pr = lax.dynamic_slice_in_dim(jnp.pad(p, ((0, 0), (0, 0), (0, 0), (0, G))), base, G, axis=3)
            out = out + jnp.einsum("hbri,bhid->hbrd", pr, v.residual)
    F, fhead, fslot, vfull = _full_role(cache, "value", layer)
    if F:
        of = _to_heads(jnp.einsum("fbrt,fbtd->fbrd", jnp.take(p, fhead, axis=0), vfull), fslot, F)
        out = jnp.where((vb == FULL_BITS)[:, None, None, None], of, out)
    return jnp.swapaxes(out, 0, 1).reshape(B, Hq, 1, D).astype(q.dtype)
