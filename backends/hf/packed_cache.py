"""A transformers ``Cache`` that *stores* K/V at each head's planned width, bit-packed (a head plan applied for real).

:class:`PackedHeadCache` is the storing counterpart of the simulated ``TransformCache`` (:mod:`.cache`): built from
a head plan (one width per (layer, kv_head) for keys and one for values, :mod:`.head_plans`), one
:class:`PackedHeadLayer` per decoder layer. Tokens are quantized as they arrive, KIVI's scheme:

* **Units.** A role whose quantizer groups run along tokens (KIVI keys: ``g`` tokens of one channel) is quantized
  one *block* of ``g`` aligned tokens at a time, from the block's true members once it is complete; a role whose
  groups lie within one token (KIVI values, QuaRot, per-token) is quantized token by token.
* **Residual.** New tokens enter a full-precision residual; when it holds ``residual_length`` tokens or more, every
  complete unit in it is quantized and packed (so a role holds fewer than ``residual_length`` residual tokens between
  calls, and a token-grouped role's residual always starts on a group boundary). ``residual_length=None`` (default):
  the key group ``g`` for token-grouped roles, 0 (quantize on arrival) for per-token roles; an integer applies to
  both roles and must be a multiple of ``g`` for a token-grouped one.
* **Storage.** Per role and width ``b`` the heads at ``b`` share one stream: uint8 codes ``[batch, heads_b, units,
  unit_codes * b / 8]`` (:func:`rdalloc.bitpack.pack_bits`, LSB first; ``head_dim % 8 == 0`` keeps each unit on
  whole bytes, so units append without repacking) and float16 parameters ``[n_params, batch, heads_b, units,
  groups_per_unit]``. Heads at 16 bits are kept as they are (bit for bit); heads at 0 bits (evicted) store nothing
  and read as zeros: attention gives such a head's keys score 0 and values 0, exactly what the simulation
  (``head_plans.plan_transform``) hands attention for a 0-bit head.
* **Read.** ``update`` returns the dequantized stored tokens followed by the residual (as transformers'
  ``QuantizedCache`` does: a float copy of the prefix per layer and step). Under
  :class:`~.packed_attention.PackedAttention` it returns nothing new and the attention reads the codes themselves
  (:mod:`.packed_attention`: the scale/zero algebra, no dequantized prefix). ``quantize_residual=True`` hands
  attention the residual fake-quantized from its own members instead, so what attention sees equals
  ``TransformCache(plan_transform(plan))`` (docs/design.md §5), in one forward and in ``generate``.

Quantization reuses :mod:`rdalloc.quantizers` (``transform``, ``to_groups``, ``fit``, ``encode``, ``decode``) in the
compute dtype of :func:`rdalloc.apply.fake_quantize_tensor`, so a stored token dequantizes to the value the simulation
gives it.

**Memory.** :attr:`PackedHeadCache.nbytes` sums the tensors held (codes, 2 bytes per float16 parameter, 2 bytes per
full-precision element of 16-bit heads and residual: docs/design.md §5); :attr:`PackedHeadCache.predicted_nbytes`
computes the same figure from the plan alone (:func:`rdalloc.accounting.item_costs` for the stored tokens, plus the
residual) given how many tokens are stored and in the residual.

**Left padding.** Pass the batch's ``attention_mask`` (``[batch, seq]``, 1 real, 0 pad, pads on the left) at
construction (:meth:`PackedHeadCache.for_inputs` does it for a tokenized batch). Each row then stores only its real
tokens, with its groups aligned to its own first token, exactly as that sequence alone would be stored; pad positions
read as zeros (attention masks them). Rows with equal padding share tensors. A batch that arrives ``k`` times larger
than the mask (``generate(num_beams=k)`` expands inputs with ``repeat_interleave``) repeats the mask's rows alike.
Without a mask every position is a real token.

Beam search and batch edits (``reorder_cache``, ``batch_select_indices``, ``batch_repeat_interleave``) select rows of
the stored tensors. Only full-attention layers are supported. ``crop`` is refused (packed units cannot be cut).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from transformers.cache_utils import Cache, DynamicLayer

from rdalloc.accounting import item_costs
from rdalloc.bitpack import pack_bits, unpack_bits
from rdalloc.cost import item_cost
from rdalloc.layout import resolve_quantizer
from rdalloc.models import FULL_BITS
from rdalloc.plan import Plan
from rdalloc.quantizers import Quantizer, compute_dtype, fake_quantize_uniform, from_groups, to_groups

__all__ = ["PackedHeadCache", "PackedHeadLayer", "left_padding"]

ROLES = ("key", "value")


# ---- static facts of one role of one layer ------------------------------------------------------------------------
@dataclass(frozen=True)
class _RoleSpec:
    """How one role of one layer is stored: the heads at each quantized width, at 16, and evicted."""

    role: str
    quantizer: Quantizer
    head_dim: int
    unit: int  # tokens per quantization unit: g for token-grouped roles, 1 for per-token ones
    residual: int  # residual_length for this role
    widths: tuple  # ((b, heads ndarray), ...) quantized widths, ascending
    full_heads: np.ndarray  # heads at 16 bits
    kept_heads: np.ndarray  # heads at > 0 bits, in residual order
    inverse: np.ndarray  # position of each head in cat([*widths' heads, full heads, evicted heads])
    n_heads: int


def _role_spec(bits: np.ndarray, role: str, q: Quantizer, head_dim: int, residual: int | None) -> _RoleSpec:
    grouping = q.grouping(role, head_dim)
    unit = grouping.size if grouping.axis == "token" else 1
    if residual is None:
        r = unit if grouping.axis == "token" else 0
    else:
        r = residual
        if grouping.axis == "token" and (r < unit or r % unit):
            raise ValueError(f"residual_length must be a positive multiple of quantizer {q.name!r}'s {role} group "
                             f"size {unit} (its {role} groups run along tokens), got {residual}")
    bits = np.asarray(bits).astype(int)
    widths = tuple((int(b), np.flatnonzero(bits == b)) for b in np.unique(bits) if 0 < b < FULL_BITS)
    full = np.flatnonzero(bits == FULL_BITS)
    evicted = np.flatnonzero(bits == 0)
    order = np.concatenate([*(h for _, h in widths), full, evicted]).astype(np.int64)
    inverse = np.empty_like(order)
    inverse[order] = np.arange(order.size)
    kept = np.concatenate([*(h for _, h in widths), full]).astype(np.int64)
    return _RoleSpec(role, q, head_dim, unit, r, widths, full, kept, inverse, int(bits.size))


# ---- the state of one role for rows that share their padding --------------------------------------------------------
@dataclass(frozen=True)
class _RoleState:
    """What one role holds for a set of rows: packed codes and float16 parameters per width, 16-bit heads, residual.

    ``codes[k]``: uint8 ``[rows, heads_b, units, bytes_per_unit]``; ``params[k]``: float16 ``[n_params, rows, heads_b,
    units, groups_per_unit]``; ``full``: ``[rows, heads_16, stored, head_dim]``; ``residual``: ``[rows, kept heads,
    r, head_dim]``; ``stored``: tokens packed (a multiple of the unit).
    """

    codes: tuple
    params: tuple
    full: torch.Tensor
    residual: torch.Tensor
    stored: int

    @property
    def nbytes(self) -> int:
        return (sum(c.numel() for c in self.codes) + 2 * sum(p.numel() for p in self.params)
                + 2 * self.full.numel() + 2 * self.residual.numel())

    def select(self, idx: torch.Tensor) -> _RoleState:
        return _RoleState(tuple(c.index_select(0, idx) for c in self.codes),
                          tuple(p.index_select(1, idx) for p in self.params),
                          self.full.index_select(0, idx), self.residual.index_select(0, idx), self.stored)


def _empty_state(spec: _RoleSpec, rows: int, like: torch.Tensor) -> _RoleState:
    D, dev = spec.head_dim, like.device
    codes, params = [], []
    for b, heads in spec.widths:
        L = spec.unit * D
        codes.append(torch.empty((rows, heads.size, 0, L * b // 8), dtype=torch.uint8, device=dev))
        params.append(torch.empty((len(spec.quantizer.params), rows, heads.size, 0, _groups_per_unit(spec)),
                                  dtype=torch.float16, device=dev))
    full = torch.empty((rows, spec.full_heads.size, 0, D), dtype=like.dtype, device=dev)
    residual = torch.empty((rows, spec.kept_heads.size, 0, D), dtype=like.dtype, device=dev)
    return _RoleState(tuple(codes), tuple(params), full, residual, 0)


def _groups_per_unit(spec: _RoleSpec) -> int:
    g = spec.quantizer.grouping(spec.role, spec.head_dim)
    return spec.head_dim if g.axis == "token" else spec.head_dim // g.size


def _heads(x: torch.Tensor, heads: np.ndarray) -> torch.Tensor:
    if heads.size == x.shape[1] and np.array_equal(heads, np.arange(heads.size)):
        return x
    return x.index_select(1, torch.as_tensor(heads, device=x.device))


def _quantize_units(spec: _RoleSpec, x: torch.Tensor, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes (packed, ``[rows, heads, units, bytes]``) and float16 parameters of ``x`` (``[rows, heads, units *
    unit, D]``, complete units), quantized as :func:`rdalloc.apply.fake_quantize_tensor` would."""
    q, role, D = spec.quantizer, spec.role, spec.head_dim
    grouping = q.grouping(role, D)
    rows, heads, T, _ = x.shape
    K = T // spec.unit
    cd = compute_dtype(torch, x)
    xg = to_groups(q.transform(x.to(cd), role), grouping)  # token: (r, h, D, K, g); channel: (r, h, T, D/g, g)
    params = q.fit(xg, b)
    codes = q.encode(xg, params, b).to(torch.uint8)
    if grouping.axis == "token":  # unit-major: (r, h, K, D, g) so a block's codes are contiguous
        codes = codes.permute(0, 1, 3, 2, 4)
        params = [p[..., 0].permute(0, 1, 3, 2) for p in params]  # (r, h, K, D)
    else:
        params = [p[..., 0] for p in params]  # (r, h, T, D/g)
    packed = pack_bits(codes.reshape(-1), b).reshape(rows, heads, K, -1)
    return packed, torch.stack([p.to(torch.float16) for p in params])


def _dequantize_units(spec: _RoleSpec, codes: torch.Tensor, params: torch.Tensor, b: int,
                      dtype: torch.dtype) -> torch.Tensor:
    """``[rows, heads, units * unit, D]`` in ``dtype`` from packed codes and float16 parameters."""
    q, role, D = spec.quantizer, spec.role, spec.head_dim
    grouping = q.grouping(role, D)
    rows, heads, K, _ = codes.shape
    cd = torch.float64 if dtype == torch.float64 else torch.float32
    L = spec.unit * D
    c = unpack_bits(codes.reshape(-1), b, rows * heads * K * L).reshape(rows, heads, K, -1).to(cd)
    p = params.to(cd)
    if grouping.axis == "token":
        cg = c.reshape(rows, heads, K, D, grouping.size).permute(0, 1, 3, 2, 4)  # (r, h, D, K, g)
        pg = tuple(pp.permute(0, 1, 3, 2)[..., None] for pp in p)  # (r, h, D, K, 1)
    else:
        cg = c.reshape(rows, heads, K, D // grouping.size, grouping.size)
        pg = tuple(pp[..., None] for pp in p)
    x = from_groups(q.decode(cg, pg, b), grouping, K * spec.unit, D)
    return q.inverse_transform(x, role).to(dtype)


def _append(spec: _RoleSpec, state: _RoleState, x: torch.Tensor) -> _RoleState:
    """``state`` with the real tokens ``x`` (``[rows, all heads, t, D]``) appended and complete units flushed."""
    residual = torch.cat([state.residual, _heads(x, spec.kept_heads)], dim=2) if x.shape[2] else state.residual
    r = residual.shape[2]
    if r == 0 or r < spec.residual:
        return _RoleState(state.codes, state.params, state.full, residual, state.stored)
    n = (r // spec.unit) * spec.unit
    if n == 0:
        return _RoleState(state.codes, state.params, state.full, residual, state.stored)
    flush, rest = residual[:, :, :n], residual[:, :, n:].clone()  # (a view would keep the flushed tokens alive)
    codes, params, start = [], [], 0
    for k, (b, heads) in enumerate(spec.widths):
        c, p = _quantize_units(spec, flush[:, start:start + heads.size], b)
        start += heads.size
        codes.append(torch.cat([state.codes[k], c], dim=2))
        params.append(torch.cat([state.params[k], p], dim=3))
    full = torch.cat([state.full, flush[:, start:]], dim=2)
    return _RoleState(tuple(codes), tuple(params), full, rest, state.stored + n)


def _read(spec: _RoleSpec, state: _RoleState, quantize_residual: bool) -> torch.Tensor:
    """``[rows, H, stored + residual, D]``: stored tokens dequantized, then the residual (fake-quantized from its own
    members when ``quantize_residual``); evicted heads zeros."""
    res = state.residual
    rows, _, r, D = res.shape
    dtype = res.dtype
    parts, start = [], 0
    for k, (b, heads) in enumerate(spec.widths):
        tail = res[:, start:start + heads.size]
        start += heads.size
        if quantize_residual and r:
            tail = fake_quantize_uniform(tail, spec.quantizer, b, spec.role)
        parts.append(torch.cat([_dequantize_units(spec, state.codes[k], state.params[k], b, dtype), tail], dim=2)
                     if state.stored else tail)
    parts.append(torch.cat([state.full, res[:, start:]], dim=2))
    n_evicted = spec.n_heads - spec.kept_heads.size
    if n_evicted:
        parts.append(torch.zeros((rows, n_evicted, state.stored + r, D), dtype=dtype, device=res.device))
    out = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
    return _heads(out, spec.inverse)


# ---- padding ---------------------------------------------------------------------------------------------------------
def left_padding(attention_mask: Any) -> np.ndarray:
    """The number of left pads of each row of ``attention_mask`` (``[batch, seq]``, 1 real token, 0 pad); raises
    ``ValueError`` unless every row is pads followed by real tokens."""
    if not isinstance(attention_mask, torch.Tensor):
        raise TypeError(f"attention_mask must be a torch.Tensor [batch, seq], got {type(attention_mask).__name__}")
    if attention_mask.ndim != 2:
        raise ValueError(f"attention_mask must be [batch, seq], got shape {tuple(attention_mask.shape)}")
    m = attention_mask.detach().cpu().numpy()
    if not np.all((m == 0) | (m == 1)):
        raise ValueError(f"attention_mask must hold 0 (pad) and 1 (real token) only, got values {np.unique(m)[:5]}")
    m = m.astype(bool)
    pads = (~m).cumprod(axis=1).sum(axis=1)
    bad = np.flatnonzero((~m).sum(axis=1) != pads)
    if bad.size:
        raise ValueError(f"attention_mask row {int(bad[0])} is not left-padded (a 0 after a 1: "
                         f"{m[bad[0]].astype(int).tolist()}); only left padding is supported")
    return pads.astype(np.int64)


@dataclass(frozen=True)
class _Rows:
    """Rows of the batch that share their left padding, and their state per role."""

    pad: int
    rows: torch.Tensor  # positions in the batch (long, on the device)
    states: tuple  # one _RoleState per role


# ---- one layer -----------------------------------------------------------------------------------------------------
class PackedHeadLayer(DynamicLayer):
    """One decoder layer of a :class:`PackedHeadCache` (module docstring). ``keys``/``values`` stay ``None``: the
    layer holds packed streams, not full tensors."""

    is_croppable = False

    def __init__(self, layer_idx: int, key_spec: _RoleSpec, value_spec: _RoleSpec, pads: np.ndarray | None,
                 quantize_residual: bool):
        super().__init__()
        self.layer_idx = int(layer_idx)
        self.specs = (key_spec, value_spec)
        self.pads = pads
        self.quantize_residual = bool(quantize_residual)
        self.groups: tuple = ()
        self.seen = 0  # positions seen (pads included): what get_seq_length reports
        self.batch = 0
        self.attention = None  # a PackedAttention while one runs this cache: it reads the storage itself

    # -- checks (before any state changes) --
    def _check(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        where = f"at layer {self.layer_idx}"
        for name, x in (("key_states", key_states), ("value_states", value_states)):
            if not isinstance(x, torch.Tensor) or not torch.is_floating_point(x) or x.ndim != 4:
                shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
                raise ValueError(f"{name} must be a floating tensor [batch, kv_heads, seq, head_dim], got {shape} "
                                 f"{where}")
            spec = self.specs[0]
            if x.shape[1] != spec.n_heads or x.shape[3] != spec.head_dim:
                raise ValueError(f"{name} has shape {tuple(x.shape)} {where}, but the plan is for {spec.n_heads} "
                                 f"kv heads of head_dim {spec.head_dim}")
        if key_states.shape != value_states.shape or key_states.dtype != value_states.dtype:
            raise ValueError(f"key_states and value_states must agree in shape and dtype, got {tuple(key_states.shape)}"
                             f" {key_states.dtype} and {tuple(value_states.shape)} {value_states.dtype} {where}")
        if self.is_initialized:
            if key_states.shape[0] != self.batch:
                raise ValueError(f"key_states has batch {key_states.shape[0]} {where}, but the cache holds batch "
                                 f"{self.batch}")
            if key_states.dtype != self.dtype or key_states.device != self.device:
                raise ValueError(f"key_states is {key_states.dtype} on {key_states.device} {where}, but the cache "
                                 f"holds {self.dtype} on {self.device}")
        elif self.pads is not None and key_states.shape[0] % self.pads.size:
            raise ValueError(f"key_states has batch {key_states.shape[0]} {where}, but the attention_mask given to "
                             f"the cache has {self.pads.size} rows, and the batch is not a multiple of it")
        for spec, name, x in zip(self.specs, ("key_states", "value_states"), (key_states, value_states)):
            quantized = np.zeros((1, spec.n_heads, 1, 1), dtype=bool)
            for _, heads in spec.widths:
                quantized[0, heads] = True
            if quantized.any():
                spec.quantizer.check_range(x, name, where=quantized)

    def _initial_groups(self, key_states: torch.Tensor) -> tuple:
        B = key_states.shape[0]
        pads = np.zeros(B, np.int64) if self.pads is None else np.repeat(self.pads, B // self.pads.size)
        groups = []
        for p in np.unique(pads):
            rows = torch.as_tensor(np.flatnonzero(pads == p), device=key_states.device)
            groups.append(_Rows(int(p), rows, tuple(_empty_state(s, rows.numel(), key_states) for s in self.specs)))
        return tuple(groups), pads

    # -- the Cache API --
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device, self.dtype = key_states.device, key_states.dtype
        self.batch = int(key_states.shape[0])
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        self._check(key_states, value_states)
        with torch.no_grad():
            groups, pads = self._initial_groups(key_states) if not self.is_initialized else (self.groups, None)
            B, _, t, _ = key_states.shape
            whole = len(groups) == 1 and groups[0].rows.numel() == B
            fused = self.attention is not None
            new_groups, outs = [], []
            for g in groups:
                start = min(max(0, g.pad - self.seen), t)
                xs = [x if whole else x.index_select(0, g.rows) for x in (key_states, value_states)]
                states = tuple(_append(spec, st, x[:, :, start:])
                               for spec, st, x in zip(self.specs, g.states, xs))
                new_groups.append(_Rows(g.pad, g.rows, states))
                if not fused:
                    outs.append(tuple(_read(spec, st, self.quantize_residual) for spec, st in zip(self.specs, states)))
            total = self.seen + t
            if fused:  # the attention reads the packed storage (.packed_attention); hand it this layer
                k_out, v_out = key_states, value_states
            elif whole and groups[0].pad == 0:
                k_out, v_out = outs[0]
            else:
                k_out, v_out = (key_states.new_zeros((B, key_states.shape[1], total, key_states.shape[3]))
                                for _ in range(2))
                for g, (k, v) in zip(new_groups, outs):
                    n = k.shape[2]
                    if n:
                        k_out[g.rows, :, total - n:] = k
                        v_out[g.rows, :, total - n:] = v
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            self.pads = pads
        self.groups, self.seen = tuple(new_groups), total
        if fused:
            self.attention.pending[self.layer_idx] = self
        return k_out, v_out

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen + query_length, 0

    def reset(self) -> None:
        self.groups, self.seen, self.batch = (), 0, 0
        self.is_initialized = False
        self.keys = self.values = None

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("PackedHeadCache cannot crop: its tokens are packed in quantization units")

    def offload(self) -> None:  # the base class moves self.keys/values, which this layer does not hold
        return None

    def prefetch(self) -> None:
        return None

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._take_rows(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._take_rows(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        n = self.batch if self.is_initialized else (None if self.pads is None else self.pads.size)
        if n is not None:
            self._take_rows(torch.arange(n).repeat_interleave(int(repeats)))

    def _take_rows(self, indices: Any) -> None:
        """New row ``i`` is old row ``indices[i]`` (a bool mask selects its true rows)."""
        idx = torch.as_tensor(indices).detach().cpu()
        if idx.dtype == torch.bool:
            idx = torch.nonzero(idx).reshape(-1)
        idx = idx.to(torch.int64).numpy()
        if not self.is_initialized:
            if self.pads is not None:
                self.pads = self.pads[idx]
            return
        if idx.ndim != 1 or (idx.size and (idx.min() < 0 or idx.max() >= self.batch)):
            raise ValueError(f"batch indices must be a 1-D selection of rows in [0, {self.batch}), got {idx.tolist()}")
        pads = self.pads[idx]
        local = {}  # old row -> (group, position within the group)
        for gi, g in enumerate(self.groups):
            for j, row in enumerate(g.rows.cpu().tolist()):
                local[row] = (gi, j)
        groups = []
        for p in np.unique(pads):
            new_rows = np.flatnonzero(pads == p)
            gi = local[int(idx[new_rows[0]])][0]
            sel = torch.as_tensor([local[int(idx[r])][1] for r in new_rows], device=self.device)
            old = self.groups[gi]
            groups.append(_Rows(int(p), torch.as_tensor(new_rows, device=self.device),
                                tuple(st.select(sel) for st in old.states)))
        self.groups, self.pads, self.batch = tuple(groups), pads, int(idx.size)

    # -- memory --
    @property
    def nbytes(self) -> int:
        """Bytes held, from the tensors stored (module docstring)."""
        return sum(st.nbytes for g in self.groups for st in g.states)

    def token_counts(self) -> list[tuple[int, int, int, int]]:
        """``(rows, role index, stored tokens, residual tokens)`` for each set of rows sharing their padding."""
        return [(g.rows.numel(), k, st.stored, st.residual.shape[2]) for g in self.groups
                for k, st in enumerate(g.states)]


# ---- the cache -------------------------------------------------------------------------------------------------------
def _config_facts(config: Any) -> tuple[int, int, int]:
    """``(layers, kv_heads, head_dim)`` of a full-attention decoder config; ``ValueError`` naming a layer of another
    type."""
    if not hasattr(config, "num_hidden_layers"):
        raise TypeError(f"config must be a transformers model config, got {type(config).__name__}")
    if hasattr(config, "get_text_config"):
        config = config.get_text_config(decoder=True)
    types = getattr(config, "layer_types", None) or ["full_attention"] * int(config.num_hidden_layers)
    for i, t in enumerate(types):
        if t != "full_attention":
            raise ValueError(f"PackedHeadCache supports full-attention layers only; layer {i} of this model is "
                             f"{t!r}")
    heads = int(config.num_attention_heads)
    kv = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = getattr(config, "head_dim", None) or int(config.hidden_size) // heads
    return len(types), kv, int(head_dim)


class PackedHeadCache(Cache):
    """A ``transformers.Cache`` storing each (layer, kv_head)'s keys and values bit-packed at the head plan's widths.

    Args:
      plan: a head :class:`rdalloc.Plan` (one width per (layer, kv_head) per role; 0 evicts a head, 16 keeps it).
      config: the model's config (checked against the plan: layers, kv heads, head_dim; full attention only).
      quantizer: a :class:`~rdalloc.quantizers.Quantizer`, name or spec; ``None``: the one the plan records.
      residual_length: full-precision residual in tokens (module docstring); ``None``: the key group for
        token-grouped roles, 0 for per-token roles.
      quantize_residual: hand attention the residual fake-quantized (the simulation's view) instead of as is.
      attention_mask: ``[batch, seq]`` of a left-padded batch; each row is then stored as it would be alone.

    Use ``model.generate(ids, attention_mask=m, past_key_values=cache)`` (the keyword the installed transformers
    takes: :func:`.compat.cache_keyword`), or :func:`.compat.generate`. One cache per batch: a fresh one per call.
    """

    def __init__(self, plan: Plan, config: Any, *, quantizer: Any = None, residual_length: int | None = None,
                 quantize_residual: bool = False, attention_mask: Any = None):
        if not isinstance(plan, Plan):
            raise TypeError(f"plan must be an rdalloc.Plan (a head plan), got {type(plan).__name__}")
        if plan.granularity != "head":
            raise ValueError(f"plan must be a head plan (one width per layer and kv_head for keys and values), got a "
                             f"{plan.granularity!r} plan with key axes {plan.key_axes} and value axes "
                             f"{plan.value_axes}")
        if residual_length is not None and (isinstance(residual_length, bool)
                                            or not isinstance(residual_length, (int, np.integer))
                                            or residual_length < 0):
            raise ValueError(f"residual_length must be None or a non-negative integer, got {residual_length!r}")
        if not isinstance(quantize_residual, bool):
            raise TypeError(f"quantize_residual must be a bool, got {type(quantize_residual).__name__}")
        layers, kv_heads, head_dim = _config_facts(config)
        plan.check_config(config)
        q = resolve_quantizer(plan, quantizer)
        plan.check(quantizer=q.name)
        if head_dim % 8:
            raise ValueError(f"PackedHeadCache needs head_dim to be a multiple of 8 (each token's codes fill whole "
                             f"bytes), got head_dim={head_dim}")
        for role, bits in (("key", plan.key), ("value", plan.value)):
            q.check_bits(bits, f"the plan's {role} bits")
        pads = None if attention_mask is None else left_padding(attention_mask)
        self.plan, self.quantizer, self.head_dim = plan, q, head_dim
        self.quantize_residual = quantize_residual
        self.residual_length = residual_length
        rl = None if residual_length is None else int(residual_length)
        specs = [(_role_spec(plan.key[i], "key", q, head_dim, rl), _role_spec(plan.value[i], "value", q, head_dim, rl))
                 for i in range(layers)]
        super().__init__(layers=[PackedHeadLayer(i, k, v, pads, quantize_residual) for i, (k, v) in enumerate(specs)])

    @classmethod
    def from_model(cls, plan: Plan, model: Any, **kwargs: Any) -> PackedHeadCache:
        """A cache for ``model``, its config checked against the plan (:meth:`rdalloc.Plan.check_config`)."""
        config = getattr(model, "config", None)
        if config is None:
            raise TypeError(f"model must be a transformers model with a config, got {type(model).__name__}")
        return cls(plan, config, **kwargs)

    @classmethod
    def for_inputs(cls, plan: Plan, model: Any, inputs: Any, **kwargs: Any) -> PackedHeadCache:
        """A cache for a tokenized batch (a mapping with ``attention_mask``, e.g. a tokenizer's output with
        ``padding_side="left"``): :meth:`from_model` with that mask."""
        mask = inputs.get("attention_mask") if hasattr(inputs, "get") else None
        return cls.from_model(plan, model, attention_mask=mask, **kwargs)

    @property
    def nbytes(self) -> int:
        """Bytes held, from the tensors stored: packed codes + 2 per float16 parameter + 2 per full-precision
        element (16-bit heads and residual), docs/design.md §5."""
        return sum(layer.nbytes for layer in self.layers)

    @property
    def predicted_nbytes(self) -> int:
        """The bytes the plan predicts for the tokens this cache holds, from the plan alone: the cost model
        ``sum_i C_i(b_i) / 8`` (:func:`rdalloc.accounting.item_costs`) of the stored tokens of each set of rows, plus
        2 bytes per residual element of the heads the plan keeps."""
        costs: dict = {}
        total_bits = 0
        for layer_idx, layer in enumerate(self.layers):
            for rows, k, stored, residual in layer.token_counts():
                role = ROLES[k]
                bits = (self.plan.key if role == "key" else self.plan.value)[layer_idx]
                if stored:
                    key = (role, rows, stored)
                    if key not in costs:
                        sizes, meta = item_costs(self.plan, self.quantizer, role, batch=rows, tokens=stored,
                                                 head_dim=self.head_dim)
                        costs[key] = item_cost(self.plan.key if role == "key" else self.plan.value, sizes,
                                               meta).sum(axis=1)
                    total_bits += int(costs[key][layer_idx])
                total_bits += 16 * rows * int(np.count_nonzero(bits)) * residual * self.head_dim
        return total_bits // 8  # whole bytes: head_dim % 8 == 0 (checked at construction)

    @property
    def fp16_nbytes(self) -> int:
        """What a 16-bit cache of the same real tokens holds."""
        return sum(2 * rows * (stored + residual) * self.head_dim * self.plan.kv_heads
                   for layer in self.layers for rows, _, stored, residual in layer.token_counts())

