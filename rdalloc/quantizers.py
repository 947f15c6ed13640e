"""Quantizers: how a group of KV elements becomes ``b``-bit codes plus 16-bit metadata, and back.

Every quantizer here splits one head's ``[tokens, head_dim]`` block of a KV tensor into **groups** of ``g`` elements
along one axis and gives each group its own parameters:

* ``grouping(role, head_dim).axis == "token"``: a group is ``g`` consecutive tokens of one channel (KIVI keys);
* ``axis == "channel"``: a group is ``g`` consecutive channels of one token (KIVI values, per-token quantizers).

**Asymmetric uniform** (reference semantics, docs/design.md §3). Over a group with extremes ``lo, hi``::

    zero  = f16_down(lo)                          # largest float16 <= lo
    scale = f16_up((hi - zero) / (2**b - 1))      # smallest float16 with scale * (2**b - 1) >= hi - zero
    q     = clip(round((x - zero) / scale), 0, 2**b - 1)
    x_hat = q * scale + zero

(``round`` is round-half-even; ``/ scale`` is computed as ``* (1 / scale)``: one correctly rounded reciprocal per
group, then an IEEE product per element. XLA rewrites ``a / broadcast(s)`` into ``a * broadcast(1 / s)`` on its own,
which moved a code at exact ties such as ``(x - zero) / scale = 14.5`` (a KIVI group holding one token); writing the
reciprocal everywhere makes numpy, torch and JAX compute the same product. The scale is found by exact
multiplication, :func:`f16_ceil_div`, not by rounding a quotient, for the same reason. ``q * scale`` is exact in
float32 (an 8-bit integer times an 11-bit significand), so a fused multiply-add in decoding changes nothing.)

``scale`` and ``zero`` are stored as 16-bit floats, so they are rounded through float16 on every path (fake-quant and
packed storage give the same numbers). Rounding ``zero`` down and ``scale`` up keeps ``[zero, zero + (2**b-1) scale]``
over the whole group, so ``|x - x_hat| <= scale / 2`` for every element (up to one float32 rounding); the reference
``s = (hi - lo) / (2**b - 1)`` differs from ``scale`` by at most one float16 ulp. ``hi == lo`` gives ``scale = 0``,
``q = 0`` and ``x_hat = zero`` (no division by zero, no NaN). Metadata: 32 bits per group.

**Symmetric absmax** (int8/int4 style). ``c = 2**(b-1) - 1``, ``scale = f16_up(max|x| / c)``,
``q = clip(round(x / scale), -c, c) + c``, ``x_hat = q * scale - c * scale``: ``2c + 1`` levels around an exact zero
(``+0.0``: XLA folds ``(r + c) - c`` into ``r``, which kept the sign of ``round(-0.3) = -0.0``; the difference of
two exact products does not fold). At
``b = 1`` it is sign quantization: ``c = 1/2``, ``scale = f16_up(2 max|x|)``, ``q = [x >= 0]`` (a subnormal ``x``
counts as 0), ``x_hat = +-scale/2``.
Stores one 16-bit scale per group: 16 bits of metadata.

Built-in quantizers (registry names):

* ``"kivi"`` — :class:`KIVI`: keys per channel over ``g`` tokens, values per token over ``g`` channels, asymmetric.
* ``"quarot"`` — :class:`QuaRot`: normalized Hadamard rotation over ``head_dim`` (queries must be rotated alike:
  :func:`hadamard_transform`), then per-token asymmetric; fake-quant rotates back.
* ``"per_token"`` — :class:`PerTokenAsymmetric`: per-token asymmetric over ``head_dim`` (or groups of ``g`` channels).
* ``"absmax"`` — :class:`SymmetricAbsmax`: per-token symmetric absmax.

Every quantizer takes ``b`` in ``[min_bits, max_bits]`` (1..8 for the built-ins), plus 16 (the original values, bit for
bit, no metadata) and 0 (evicted). Values must lie in the float16 range (``|x| < 65504``): the metadata is float16.

**Writing your own.** Subclass :class:`Quantizer` as a frozen dataclass, give it a ``name`` and ``params`` and
implement ``grouping``, ``fit``, ``encode`` and ``decode`` (``transform``/``inverse_transform`` if it rotates), then
``register_quantizer(MyQuantizer)``. ``fit``/``encode``/``decode`` receive a group view ``x`` whose last axis holds one
group's elements, ``bits`` as a Python int or an integer array broadcastable to ``x[..., :1]`` (use
:func:`exp2`, never ``2.0 ** bits`` on a device), and must be pure array-API code (no in-place writes, no host
syncs) so the same quantizer runs under torch, JAX (``jax.jit``) and numpy. The registry, plan application, packing
(each parameter stored as float16), byte accounting and distortion measurement then work unchanged.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any, ClassVar

import array_api_compat
import numpy as np

from ._namespace import is_traced, to_numpy
from .models import FULL_BITS

__all__ = ["Quantizer", "AsymmetricQuantizer", "KIVI", "QuaRot", "PerTokenAsymmetric", "SymmetricAbsmax",
           "Grouping", "get_quantizer", "register_quantizer", "available_quantizers", "hadamard_transform",
           "to_groups", "from_groups", "exp2", "f16_up", "f16_down", "f16_ceil_div", "round_quotient",
           "flush_subnormal",
           "fake_quantize_uniform", "ROLES", "GRANULARITIES"]

ROLES = ("key", "value")
GRANULARITIES = ("head", "token", "channel")


# ---- group views ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Grouping:
    """Groups of ``size`` consecutive elements along ``axis`` (``"token"`` or ``"channel"``) of one head."""

    axis: str
    size: int

    def __post_init__(self):
        if self.axis not in ("token", "channel"):
            raise ValueError(f"grouping axis must be 'token' or 'channel', got {self.axis!r}")
        if not isinstance(self.size, (int, np.integer)) or self.size < 1:
            raise ValueError(f"group size must be a positive integer, got {self.size!r}")

    def view_shape(self, tokens: int, head_dim: int) -> tuple[int, int, int]:
        """``(P, Q, g)``: one head's group view. Token axis: ``(head_dim, ceil(tokens/g), g)`` (a row is a channel's
        block of ``g`` tokens; the last block is padded). Channel axis: ``(tokens, head_dim/g, g)``."""
        g = self.size
        if self.axis == "token":
            return (head_dim, -(-tokens // g), g)
        return (tokens, head_dim // g, g)

    def groups_per_head(self, tokens: int, head_dim: int) -> int:
        p, q, _ = self.view_shape(tokens, head_dim)
        return p * q


def to_groups(x: Any, grouping: Grouping) -> Any:
    """``(*lead, H, T, D) -> (*lead, H, P, Q, g)``: the group view, one group per row of the last axis.

    Token grouping pads ``T`` up to a multiple of ``g`` with zeros (``False`` for boolean masks) and moves the token
    axis last (one copy); channel grouping is a reshape. :func:`from_groups` inverts it.
    """
    xp = array_api_compat.array_namespace(x)
    *lead, H, T, D = x.shape
    g = grouping.size
    if grouping.axis == "channel":
        return xp.reshape(x, (*lead, H, T, D // g, g))
    Tp = -(-T // g) * g
    if Tp != T:
        pad = xp.broadcast_to(xp.zeros_like(x[..., :1, :]), (*lead, H, Tp - T, D))
        x = xp.concat([x, pad], axis=-2)
    n = len(lead)
    x = xp.permute_dims(x, (*range(n), n, n + 2, n + 1))
    return xp.reshape(x, (*lead, H, D, Tp // g, g))


def from_groups(xg: Any, grouping: Grouping, tokens: int, head_dim: int) -> Any:
    """Inverse of :func:`to_groups`: ``(*lead, H, P, Q, g) -> (*lead, H, tokens, head_dim)``."""
    xp = array_api_compat.array_namespace(xg)
    *lead, H, P, Q, g = xg.shape
    if grouping.axis == "channel":
        return xp.reshape(xg, (*lead, H, tokens, head_dim))
    x = xp.reshape(xg, (*lead, H, head_dim, Q * g))
    n = len(lead)
    x = xp.permute_dims(x, (*range(n), n, n + 2, n + 1))
    return x[..., :tokens, :]


# ---- small numeric helpers ------------------------------------------------------------------------------------------
def exp2(bits: Any, like: Any) -> Any:
    """``2**bits`` exactly, in ``like``'s dtype: a Python float for int ``bits``, else an integer shift on the device
    (``2.0 ** array`` may go through ``exp(b log 2)`` and be off by an ulp, which would shift codes)."""
    if isinstance(bits, (int, np.integer)):
        return float(2 ** int(bits))
    xp = array_api_compat.array_namespace(bits)
    return xp.astype(xp.bitwise_left_shift(xp.ones_like(bits), bits), like.dtype)


def _quiet(xp):
    """numpy warns when a neighbour of the largest float16 overflows to inf (computed, then not selected)."""
    if array_api_compat.is_numpy_namespace(xp):
        return np.errstate(over="ignore")
    return contextlib.nullcontext()


def _f16(xp, v: Any, direction: float) -> Any:
    """``v`` rounded to a float16 value toward ``direction`` (``-inf`` or ``+inf``), returned in ``v``'s dtype."""
    with _quiet(xp):
        h = xp.astype(v, xp.float16)
        back = xp.astype(h, v.dtype)
        wrong = back > v if direction < 0 else back < v
        h = xp.where(wrong, xp.nextafter(h, xp.full_like(h, direction)), h)
    return xp.astype(h, v.dtype)


def f16_down(v: Any) -> Any:
    """The largest float16 value ``<= v`` (in ``v``'s dtype)."""
    return _f16(array_api_compat.array_namespace(v), v, -math.inf)


def f16_up(v: Any) -> Any:
    """The smallest float16 value ``>= v`` (in ``v``'s dtype)."""
    return _f16(array_api_compat.array_namespace(v), v, math.inf)


def f16_ceil_div(num: Any, den: Any) -> Any:
    """The smallest float16 value ``s`` with ``s * den >= num`` (in ``num``'s dtype), for ``num >= 0`` and ``den`` a
    positive integer below ``2**8`` or ``1/2`` (so ``s * den`` is exact in float32).

    This is ``f16_up(num / den)`` made independent of how the division rounds: XLA compiles division by a constant
    as multiplication by its reciprocal (one ulp off at times), and one ulp can move a quotient across a float16 grid
    point. The float16 neighbours of the quotient are tested by exact multiplication instead, so every backend picks
    the same scale.
    """
    xp = array_api_compat.array_namespace(num)
    with _quiet(xp):
        h0 = xp.astype(num / den, xp.float16)
        down = xp.nextafter(h0, xp.full_like(h0, -math.inf))
        up = xp.nextafter(h0, xp.full_like(h0, math.inf))
        ok = lambda h: xp.astype(h, num.dtype) * den >= num  # noqa: E731
        return xp.astype(xp.where(ok(down), down, xp.where(ok(h0), h0, up)), num.dtype)


def flush_subnormal(v: Any) -> Any:
    """``v`` with its subnormal values replaced by ``+0.0``. XLA on CPU (and GPU) treats subnormal operands as zero,
    numpy and torch do not; every value a quantizer's result depends on through a comparison or a float16 rounding
    (a group's extremes, a sign) is flushed, so all backends see the same numbers. Subnormal float32 values lie far
    below float16's smallest step (``2**-24``), so this moves no code."""
    xp = array_api_compat.array_namespace(v)
    return xp.where(xp.abs(v) < xp.finfo(v.dtype).smallest_normal, 0.0, v)


def round_quotient(t: Any, scale: Any) -> Any:
    """``round(t / scale)`` (half to even) as every backend computes it alike: ``t * (1 / scale)``, the reciprocal
    correctly rounded once per group (``scale = 0`` divides by 1). XLA turns ``t / broadcast(scale)`` into this product
    by itself, so the quotient is written this way everywhere; it is within one float32 ulp of ``t / scale``, so for
    ``0 <= t <= k * scale`` with ``k <= 2**8`` the result stays in ``[0, k]`` (no clip needed)."""
    xp = array_api_compat.array_namespace(t)
    return xp.round(t * (1.0 / xp.where(scale > 0, scale, 1.0)))


def hadamard_transform(x: Any) -> Any:
    """``x @ H / sqrt(d)`` over the last axis, ``H`` the Sylvester Hadamard matrix of order ``d`` (a power of two).

    A fast Walsh–Hadamard transform: ``log2(d)`` butterfly stages of additions and subtractions, then one scaling, so
    torch and JAX give bit-identical results (no matmul precision modes) in ``O(d log d)`` per vector. A sum that
    falls below the smallest normal float is flushed to zero at every stage, as XLA does, so numpy and torch agree
    with it there too (:func:`flush_subnormal`; skipped when no input is small enough, :func:`_may_underflow`).
    The normalized matrix is symmetric and orthogonal, hence its own inverse: apply it to queries and keys alike and
    ``q_rot . k_rot == q . k``.
    """
    xp = array_api_compat.array_namespace(x)
    d = x.shape[-1]
    if d < 1 or d & (d - 1):
        raise ValueError(f"the Hadamard rotation needs head_dim to be a power of two, got head_dim={d}")
    lead = tuple(x.shape[:-1])
    h = 1
    y = x
    flush = flush_subnormal if _may_underflow(xp, x, d) else (lambda v: v)
    while h < d:
        y = xp.reshape(y, (*lead, d // (2 * h), 2, h))
        a, b = y[..., 0, :], y[..., 1, :]
        y = flush(xp.reshape(xp.stack([a + b, a - b], axis=-2), (*lead, d)))
        h *= 2
    return flush(y * (1.0 / math.sqrt(d)))


def _may_underflow(xp, x: Any, d: int) -> bool:
    """Whether a butterfly sum or the final scaling of :func:`hadamard_transform` can fall below the smallest normal.

    Every value the transform forms is a signed sum of inputs, so a multiple of the finest input's ulp: when every
    nonzero ``|x| >= 2 d tiny / eps`` (``tiny`` the smallest normal), each is 0 or at least ``2 d tiny``, and stays
    normal after the scaling by ``1 / sqrt(d)``. Only then is flushing skipped (one reduction instead of ``log2 d``
    passes); JAX is always flushed (traced values cannot be inspected, and XLA fuses the passes)."""
    if array_api_compat.is_jax_namespace(xp) or not xp.isdtype(x.dtype, "real floating") or getattr(x, "is_meta", 0):
        return True  # (meta tensors hold no values to inspect)
    info = xp.finfo(x.dtype)
    a = xp.abs(x)
    return bool(xp.any((a > 0) & (a < 2.0 * d * float(info.smallest_normal) / float(info.eps))))


def to_device(a: np.ndarray, like: Any) -> Any:
    """A host numpy array as an array of ``like``'s backend and device (a constant under ``jax.jit``; JAX gets
    int32 indices, as it has no int64 without ``jax_enable_x64``)."""
    xp = array_api_compat.array_namespace(like)
    if not a.flags.writeable:  # (a broadcast view: torch wants its own copy)
        a = np.array(a)
    if array_api_compat.is_jax_namespace(xp):
        return xp.asarray(a.astype(np.int32) if a.dtype == np.int64 else a)
    return xp.asarray(a, device=array_api_compat.device(like))


def compute_dtype(xp, x):
    """The dtype ``x`` is computed in: float64 stays float64; every other float dtype (float16, bfloat16, float32)
    computes in float32."""
    return xp.float64 if x.dtype == xp.float64 else xp.float32


MAX_MAGNITUDE = 32752.0
"""Largest magnitude a quantized coordinate may have: half of float16's largest value, so that a group's range
(at most twice it) divided by ``2**bits - 1 >= 1`` stays a finite float16 scale, and its zero one too."""


# ---- the protocol ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Quantizer:
    """Base class and protocol of a group quantizer (see the module docstring for the contract).

    Class attributes: ``name`` (registry key, also the name plans record), ``params`` (names of the per-group
    parameters, each stored as a 16-bit float), ``min_bits``/``max_bits`` (the quantized widths it takes; 0 and 16
    are always allowed), ``mixes_channels`` (True when ``transform`` mixes a token's channels, so per-channel key
    bits cannot be applied), ``orthogonal`` (True when ``transform`` is an orthogonal map of each token's channels,
    so a token's squared error is the same before and after ``inverse_transform``; the default claims nothing).
    """

    name: ClassVar[str] = "quantizer"
    params: ClassVar[tuple[str, ...]] = ("scale", "zero")
    min_bits: ClassVar[int] = 1
    max_bits: ClassVar[int] = 8
    mixes_channels: ClassVar[bool] = False
    orthogonal: ClassVar[bool] = False

    # -- to implement --
    def grouping(self, role: str, head_dim: int) -> Grouping:
        """How ``role`` (``"key"``/``"value"``) tensors with ``head_dim`` channels split into groups."""
        raise NotImplementedError

    def fit(self, x: Any, bits: Any, valid: Any = None) -> tuple:
        """Per-group parameters, one array shaped ``x[..., :1]`` per name in ``params``, each a float16 value held
        in ``x``'s dtype. ``valid`` (bool, broadcastable to ``x``, or ``None``) marks the elements that count; a
        group with no valid element must still give finite parameters."""
        raise NotImplementedError

    def encode(self, x: Any, params: tuple, bits: Any) -> Any:
        """Codes: integers in ``[0, 2**bits - 1]`` held as floats of ``x``'s dtype."""
        raise NotImplementedError

    def decode(self, codes: Any, params: tuple, bits: Any) -> Any:
        """The reconstruction of ``encode``'s codes (elementwise; ``codes`` may be any shape the params broadcast
        against)."""
        raise NotImplementedError

    def transform(self, x: Any, role: str) -> Any:
        """Applied to ``(..., tokens, head_dim)`` before grouping; identity by default."""
        return x

    def inverse_transform(self, x: Any, role: str) -> Any:
        return x

    def magnitude(self, x: Any) -> Any:
        """An upper bound, per element of ``x``, on the magnitude of the values it turns into after ``transform``:
        ``|x|`` by default (a transform that mixes channels overrides it)."""
        xp = array_api_compat.array_namespace(x)
        return xp.abs(x)

    # -- provided --
    @property
    def metadata_bits_per_group(self) -> int:
        """Bits of metadata a stored group carries: 16 per parameter (32 for asymmetric, 16 for absmax)."""
        return 16 * len(self.params)

    def spec(self) -> dict:
        """``{"name": ..., **fields}``: enough to rebuild the quantizer with :func:`get_quantizer`."""
        return {"name": self.name, **{f.name: getattr(self, f.name) for f in fields(self)}}

    def check_range(self, x: Any, name: str, where: np.ndarray | None = None) -> None:
        """``ValueError`` naming ``name`` and the first offending element unless every value of ``x``
        (``(..., tokens, head_dim)``) is finite and, after ``transform``, at most :data:`MAX_MAGNITUDE` in magnitude;
        ``where`` (host bools broadcastable to ``x``) limits the check to the elements that will be quantized.

        Scale and zero are stored as float16: a value beyond that bound (or NaN, or infinite) would overflow them
        and turn its whole group into NaN. One reduction where ``x`` lives and one boolean to the host: the only
        host synchronisation of a quantizing call. Values that cannot be inspected are not: traced ones (inside
        ``jax.jit``) and torch meta tensors.
        """
        if is_traced(x) or 0 in tuple(x.shape) or getattr(x, "is_meta", False):
            return
        xp = array_api_compat.array_namespace(x)
        m = self.magnitude(x)
        if where is not None:
            m = xp.where(to_device(np.broadcast_to(where, tuple(x.shape)), x), m, xp.zeros_like(m))
        if bool(to_numpy(xp.all(m <= MAX_MAGNITUDE))):  # NaN compares False (a max may drop NaN on some backends)
            return
        v, mm = to_numpy(x), to_numpy(m)
        over = ~(mm <= MAX_MAGNITUDE)
        nonfinite = over & ~np.isfinite(v)  # name a NaN or infinity itself, else the largest offending value
        flat = np.argmax(nonfinite) if nonfinite.any() else np.argmax(np.where(over, np.abs(v), -1.0))
        idx = tuple(int(i) for i in np.unravel_index(flat, v.shape))
        bad = v[idx]
        raise ValueError(f"{name} holds {float(bad)!r} at index {idx}: quantizer {self.name!r} needs finite values "
                         f"of magnitude at most {MAX_MAGNITUDE:g} after its transform (scale and zero are float16)"
                         + (f"; this element's bound there is {float(mm[idx]):.6g}" if np.isfinite(bad) else ""))

    def supports(self, bits: int) -> bool:
        return bits == 0 or bits == FULL_BITS or self.min_bits <= bits <= self.max_bits

    def check_bits(self, bits: Any, name: str = "bits") -> None:
        """``ValueError`` naming ``name`` if any width is not 0, 16 or in ``[min_bits, max_bits]``."""
        a = np.asarray(bits)
        ok = (a == 0) | (a == FULL_BITS) | ((a >= self.min_bits) & (a <= self.max_bits))
        if not np.all(ok):
            bad = a[~ok].ravel()[0] if a.ndim else a
            where = tuple(int(i) for i in np.argwhere(~ok)[0]) if a.ndim else ()
            raise ValueError(f"{name} holds {int(bad)} bits{f' at index {where}' if where else ''}, but quantizer "
                             f"{self.name!r} supports {self.min_bits}..{self.max_bits} bits, {FULL_BITS} (full "
                             f"precision) and 0 (evicted)")

    def item_metadata_bits(self, role: str, granularity: str, tokens: int, head_dim: int, batch: int = 1) -> np.ndarray:
        """Metadata bits ``m_i`` each item of one head carries when quantized, for the cost model
        ``C_i(b) = n_i b + m_i [0 < b < 16]``, with nothing evicted.

        Returns shape ``()`` for ``granularity="head"``, ``(tokens,)`` for ``"token"`` and ``(head_dim,)`` for
        ``"channel"``. A group spanning several items (e.g. KIVI keys, ``g`` tokens per group, with per-token items)
        is shared in proportion to the elements each item holds in it, so the sum over items is exactly
        ``metadata_bits_per_group * groups``. ``n_i`` is ``batch * tokens * head_dim``, ``batch * head_dim`` or
        ``batch * tokens``.
        """
        check_role(role)
        if granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
        item = {"head": np.zeros((1, 1, 1), np.int64), "token": np.arange(tokens).reshape(1, tokens, 1),
                "channel": np.arange(head_dim).reshape(1, 1, head_dim)}[granularity]
        n_items = {"head": 1, "token": tokens, "channel": head_dim}[granularity]
        _, meta, _ = group_accounting(self, role, np.ones((1, 1, 1), np.int8), item, n_items, tokens, head_dim)
        out = meta * batch
        return out.reshape(()) if granularity == "head" else out

    def fake_quantize(self, x: Any, bits: int, role: str) -> Any:
        """Uniform fake quantization of ``x`` (``(..., H, T, D)``) at ``bits``; see :func:`fake_quantize_uniform`."""
        return fake_quantize_uniform(x, self, bits, role)


def check_role(role: str) -> None:
    """``ValueError`` unless ``role`` is ``"key"`` or ``"value"``."""
    if role not in ROLES:
        raise ValueError(f"role must be 'key' or 'value', got {role!r}")


def _check_divides(quantizer: Quantizer, g: int, head_dim: int, role: str) -> None:
    if head_dim % g:
        raise ValueError(f"quantizer {quantizer.name!r} groups {role}s over {g} channels, which does not divide "
                         f"head_dim={head_dim}")


@dataclass(frozen=True)
class AsymmetricQuantizer(Quantizer):
    """Asymmetric uniform quantization over each group (module docstring); 32 bits of metadata per group."""

    params: ClassVar[tuple[str, ...]] = ("scale", "zero")

    def fit(self, x, bits, valid=None):
        xp = array_api_compat.array_namespace(x)
        if valid is None:
            lo = xp.min(x, axis=-1, keepdims=True)
            hi = xp.max(x, axis=-1, keepdims=True)
        else:
            lo = xp.min(xp.where(valid, x, math.inf), axis=-1, keepdims=True)
            hi = xp.max(xp.where(valid, x, -math.inf), axis=-1, keepdims=True)
            empty = lo > hi
            lo = xp.where(empty, 0.0, lo)
            hi = xp.where(empty, 0.0, hi)
        lo, hi = flush_subnormal(lo), flush_subnormal(hi)
        zero = f16_down(lo)
        scale = f16_ceil_div(hi - zero, exp2(bits, x) - 1.0)
        return scale, zero

    def encode(self, x, params, bits):
        # No clip needed: zero <= min and scale * (2**b - 1) >= max - zero exactly (f16_down, f16_ceil_div), and
        # IEEE subtraction is monotone and the product by the rounded reciprocal exceeds the quotient by under 2**-22
        # relative, so 0 <= (x - zero) * (1 / scale) < 2**b - 1/2 and the rounded code lies in [0, 2**b - 1].
        # (Elements outside the group's valid mask may land anywhere; they are never stored or returned.)
        scale, zero = params
        return round_quotient(x - zero, scale)

    def decode(self, codes, params, bits):
        scale, zero = params
        return codes * scale + zero


@dataclass(frozen=True)
class KIVI(AsymmetricQuantizer):
    """KIVI: keys per channel over groups of ``group_size`` consecutive tokens, values per token over groups of
    ``group_size`` consecutive channels (which must divide head_dim); asymmetric."""

    group_size: int = 32
    name: ClassVar[str] = "kivi"

    def __post_init__(self):
        if not isinstance(self.group_size, (int, np.integer)) or self.group_size < 1:
            raise ValueError(f"KIVI group_size must be a positive integer, got {self.group_size!r}")

    def grouping(self, role, head_dim):
        check_role(role)
        if role == "key":
            return Grouping("token", int(self.group_size))
        _check_divides(self, self.group_size, head_dim, role)
        return Grouping("channel", int(self.group_size))


def _per_token_grouping(q: Quantizer, group_size: int | None, role: str, head_dim: int) -> Grouping:
    check_role(role)
    g = head_dim if group_size is None else int(group_size)
    _check_divides(q, g, head_dim, role)
    return Grouping("channel", g)


def _check_group_size(name: str, group_size: Any) -> None:
    if group_size is not None and (not isinstance(group_size, (int, np.integer)) or group_size < 1):
        raise ValueError(f"{name} group_size must be None (the whole head_dim) or a positive integer, got "
                         f"{group_size!r}")


@dataclass(frozen=True)
class PerTokenAsymmetric(AsymmetricQuantizer):
    """Per-token asymmetric quantization over ``head_dim`` (or groups of ``group_size`` channels)."""

    group_size: int | None = None
    name: ClassVar[str] = "per_token"

    def __post_init__(self):
        _check_group_size("PerTokenAsymmetric", self.group_size)

    def grouping(self, role, head_dim):
        return _per_token_grouping(self, self.group_size, role, head_dim)


@dataclass(frozen=True)
class QuaRot(AsymmetricQuantizer):
    """QuaRot-style: rotate each vector by the normalized Hadamard matrix over ``head_dim`` (a power of two), then
    per-token asymmetric over ``head_dim`` (or ``group_size`` channels); the reconstruction is rotated back. Keys
    and queries rotated alike keep attention unchanged (:func:`hadamard_transform` rotates queries)."""

    group_size: int | None = None
    name: ClassVar[str] = "quarot"
    mixes_channels: ClassVar[bool] = True
    orthogonal: ClassVar[bool] = True

    def __post_init__(self):
        _check_group_size("QuaRot", self.group_size)

    def grouping(self, role, head_dim):
        if head_dim < 1 or head_dim & (head_dim - 1):
            raise ValueError(f"quantizer 'quarot' rotates by a Hadamard matrix, which needs head_dim to be a power of "
                             f"two, got head_dim={head_dim}")
        return _per_token_grouping(self, self.group_size, role, head_dim)

    def transform(self, x, role):
        return hadamard_transform(flush_subnormal(x))

    def inverse_transform(self, x, role):
        return hadamard_transform(x)

    def magnitude(self, x):
        """``||x_token||_2`` for every element of a token: each rotated value is a dot product with a unit row."""
        xp = array_api_compat.array_namespace(x)
        xf = xp.astype(x, compute_dtype(xp, x))
        return xp.broadcast_to(xp.sqrt(xp.sum(xf * xf, axis=-1, keepdims=True)), x.shape)


@dataclass(frozen=True)
class SymmetricAbsmax(Quantizer):
    """Symmetric absmax (int8/int4 style) per token over ``head_dim`` (or ``group_size`` channels).

    ``c = 2**(b-1) - 1``, ``scale = f16_up(max|x| / c)``, codes ``clip(round(x/scale), -c, c) + c`` in ``[0, 2c]``,
    ``x_hat = (q - c) * scale``; at ``b = 1``, ``c = 1/2``, ``scale = f16_up(2 max|x|)`` and the code is ``x >= 0``
    (sign quantization to ``+-max|x|``). Error ``<= scale/2``. Stores one float16 scale per group: 16 bits.
    """

    group_size: int | None = None
    name: ClassVar[str] = "absmax"
    params: ClassVar[tuple[str, ...]] = ("scale",)

    def __post_init__(self):
        _check_group_size("SymmetricAbsmax", self.group_size)

    def grouping(self, role, head_dim):
        return _per_token_grouping(self, self.group_size, role, head_dim)

    @staticmethod
    def _center(bits, like):
        xp = array_api_compat.array_namespace(like)
        if isinstance(bits, (int, np.integer)):
            return 0.5 if bits == 1 else float(2 ** (int(bits) - 1) - 1)
        return xp.where(bits == 1, 0.5, exp2(bits, like) / 2.0 - 1.0)

    def fit(self, x, bits, valid=None):
        xp = array_api_compat.array_namespace(x)
        a = xp.abs(x) if valid is None else xp.where(valid, xp.abs(x), 0.0)
        amax = flush_subnormal(xp.max(a, axis=-1, keepdims=True))
        return (f16_ceil_div(amax, self._center(bits, x)),)

    def encode(self, x, params, bits):
        xp = array_api_compat.array_namespace(x)
        (scale,) = params
        c = self._center(bits, x)
        q = round_quotient(x, scale) + c  # in [0, 2c]: |x| <= scale * c exactly (no clip)
        sign = xp.astype(x > -xp.finfo(x.dtype).smallest_normal, x.dtype)  # x >= 0, a subnormal x read as 0
        if isinstance(bits, (int, np.integer)):
            return sign if bits == 1 else q
        return xp.where(bits == 1, sign, q)

    def decode(self, codes, params, bits):
        (scale,) = params
        return codes * scale - self._center(bits, codes) * scale  # both products exact; code c gives +0.0


# ---- uniform application (the plain baseline) -----------------------------------------------------------------------
def fake_quantize_uniform(x: Any, quantizer: Quantizer, bits: int, role: str) -> Any:
    """Every element of ``x`` (``(..., H, T, D)``, any array-API backend) quantized at ``bits`` and dequantized.

    ``bits = 16`` returns ``x`` itself; ``bits = 0`` returns zeros. Computes in float32 (float64 stays float64) and
    returns ``x``'s dtype. This is the uniform baseline plan application is measured against.
    """
    xp = array_api_compat.array_namespace(x)
    check_role(role)
    quantizer.check_bits(np.asarray(bits), "bits")
    if bits == FULL_BITS:
        return x
    if bits == 0:
        return xp.zeros_like(x)
    quantizer.check_range(x, "x")
    *_, T, D = x.shape
    cd = compute_dtype(xp, x)
    grouping = quantizer.grouping(role, D)
    valid = padding_mask(grouping, T, D)
    xt = quantizer.transform(xp.astype(x, cd, copy=False), role)
    xg = to_groups(xt, grouping)
    if valid is not None:
        valid = to_device(valid, x)
    params = quantizer.fit(xg, bits, valid)
    xh = quantizer.decode(quantizer.encode(xg, params, bits), params, bits)
    out = quantizer.inverse_transform(from_groups(xh, grouping, T, D), role)
    return xp.astype(out, x.dtype, copy=False)


def padding_mask(grouping: Grouping, tokens: int, head_dim: int) -> np.ndarray | None:
    """``(1, P, Q, g)`` bool marking real (not padding) elements of a token-grouped view, or ``None`` if no padding."""
    if grouping.axis != "token" or tokens % grouping.size == 0:
        return None
    return np.asarray(to_groups(np.ones((1, tokens, 1), dtype=bool), grouping))[:, :1] | np.zeros(
        (1, head_dim, 1, 1), dtype=bool)


# ---- metadata accounting --------------------------------------------------------------------------------------------
def group_accounting(quantizer: Quantizer, role: str, bits: np.ndarray, item: np.ndarray, n_items: int, tokens: int,
                     head_dim: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Exact storage facts of one layer's ``role`` tensor for one batch row (host numpy).

    ``bits`` (broadcastable to ``(H, tokens, head_dim)``) is each element's width, 0 evicted, 16 full; ``item`` (same
    broadcast) its item index in ``[0, n_items)``. A group stores its metadata when it holds an element at
    ``0 < b < 16``; that metadata is shared by the group's stored elements equally. Returns ``(sizes, metadata,
    groups)``: per-item stored elements and metadata bits (float64, ``n_items``) and the number of groups that carry
    metadata (so the exact metadata total is ``groups * metadata_bits_per_group``).
    """
    grouping = quantizer.grouping(role, head_dim)
    H = max(np.shape(bits)[0], np.shape(item)[0])
    shape = (H, tokens, head_dim)
    e = np.asarray(to_groups(np.ascontiguousarray(np.broadcast_to(bits, shape)), grouping))
    it = np.asarray(to_groups(np.ascontiguousarray(np.broadcast_to(item, shape)), grouping))
    mpg = quantizer.metadata_bits_per_group
    quant = (e > 0) & (e < FULL_BITS)
    count = quant.sum(axis=-1, keepdims=True)
    # a group whose stored elements all belong to one item charges it whole (exact sums); others split by element
    lo = np.where(quant, it, np.iinfo(np.int64).max).min(axis=-1, keepdims=True)
    hi = np.where(quant, it, -1).max(axis=-1, keepdims=True)
    single = (count > 0) & (lo == hi)
    share = np.where(quant & ~single, mpg / np.maximum(count, 1), 0.0)
    sizes = np.bincount(it.ravel(), weights=(e > 0).ravel().astype(np.float64), minlength=n_items)
    meta = np.bincount(it.ravel(), weights=share.ravel(), minlength=n_items)
    meta = meta + np.bincount(np.where(single, lo, 0).ravel(), weights=(single * float(mpg)).ravel(),
                              minlength=n_items)
    return sizes, meta, int(np.count_nonzero(count))


# ---- registry -------------------------------------------------------------------------------------------------------
_REGISTRY: dict[str, Callable[..., Quantizer]] = {}


def register_quantizer(factory: Callable[..., Quantizer], name: str | None = None, *, overwrite: bool = False) -> None:
    """Make ``get_quantizer(name, **kwargs)`` build ``factory(**kwargs)``.

    ``factory`` is a :class:`Quantizer` subclass (``name`` defaults to its ``name`` attribute) or any callable that
    returns a :class:`Quantizer`. Registering a taken name raises ``ValueError`` unless ``overwrite=True``.
    """
    if name is None:
        name = getattr(factory, "name", None)
    if not isinstance(name, str) or not name:
        raise ValueError(f"a quantizer needs a non-empty string name, got {name!r}")
    if not callable(factory):
        raise TypeError(f"factory must be a Quantizer subclass or a callable returning one, got {factory!r}")
    if name in _REGISTRY and not overwrite and _REGISTRY[name] is not factory:
        raise ValueError(f"quantizer name {name!r} is already registered (pass overwrite=True to replace it)")
    _REGISTRY[name] = factory


def get_quantizer(quantizer: str | Quantizer | dict, **kwargs: Any) -> Quantizer:
    """A quantizer instance from a registry name (with constructor keywords), a :meth:`Quantizer.spec` dict, or an
    instance (returned as is)."""
    if isinstance(quantizer, Quantizer):
        if kwargs:
            raise TypeError(f"keyword arguments {sorted(kwargs)} apply to a quantizer name, not an instance")
        return quantizer
    if isinstance(quantizer, dict):
        spec = dict(quantizer)
        quantizer = spec.pop("name", None)
        kwargs = {**spec, **kwargs}
    if not isinstance(quantizer, str):
        raise TypeError(f"quantizer must be a name, a spec dict or a Quantizer, got {type(quantizer).__name__}")
    if quantizer not in _REGISTRY:
        raise ValueError(f"unknown quantizer {quantizer!r}; registered: {sorted(_REGISTRY)}")
    q = _REGISTRY[quantizer](**kwargs)
    if not isinstance(q, Quantizer):
        raise TypeError(f"the factory registered as {quantizer!r} returned {type(q).__name__}, not a Quantizer")
    return q


def available_quantizers() -> tuple[str, ...]:
    return tuple(sorted(_REGISTRY))


for _cls in (KIVI, QuaRot, PerTokenAsymmetric, SymmetricAbsmax):
    register_quantizer(_cls)
