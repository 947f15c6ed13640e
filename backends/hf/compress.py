"""Compress a prefilled KV cache once (RDKV setting): attention-derived weights, packed storage, per-head eviction.

Three pieces, used in this order by :mod:`.joint`:

1. :func:`observe_prefill` runs the prefill of ``C`` tokens through an observing attention function and keeps the
   post-RoPE keys and values ``[layers, kv_heads, C, head_dim]`` plus, for the last ``window`` prefill queries (the
   observation window), their queries, their attention probabilities ``a[q_head, i, t]`` and their attention outputs
   ``o[q_head, i]`` (per head, before ``o_proj``).
2. :func:`token_weights` turns them into the weights of the joint problem, per ``(layer, kv_head)`` (the query heads
   of a GQA group ``G(h)`` pooled by summation), for three kinds of error (``scale = head_dim**-0.5``):

   * a token's value quantized with error ``dv_t``: distortion ``u_t * |dv_t|^2``;
   * a token evicted: distortion ``e_t``;
   * a token's key channel ``c`` quantized with error ``dk_tc``: distortion ``K_tc * dk_tc^2``.

   ``method="mse"`` is the first-order expected squared error of
   the attention outputs of the observation queries. Value noise: ``do_i = sum_t a_it dv_t``, so with independent
   errors ``u_t = sum_{g,i} a_git^2``. Eviction renormalizes the softmax: ``do_i = a_it (o_i - v_t) / (1 - a_it)``,
   so ``e_t = sum_{g,i} a_git^2 |v_t - o_gi|^2``. Key noise moves the logit by ``scale * q_i . dk_t`` and
   ``do_i = a_it (v_t - o_i) dlogit``, so ``K_tc = scale^2 sum_{g,i} a_git^2 |v_t - o_gi|^2 q_gic^2``.

   ``method="rdkv"`` (the default) follows RDKV/SnapKV: the token score is the attention it receives from the
   observation queries, normalized by how many of them can see it (``min(W, C - t)``) and average-pooled over
   ``pool`` neighbouring tokens, ``s_t``; then ``u_t = s_t``, ``e_t = s_t * nu`` and
   ``K_tc = s_t * nu * scale^2 * Q_c`` where ``Q_c = sum_g mean_i q_gic^2`` is the query energy of channel ``c`` (the
   key energy enters through ``dk``, measured on the keys) and ``nu = mean_t |v_t - mean o|^2`` puts keys, values
   and eviction in the same units.

   ``method="hybrid"`` (the default before issue #20) is ``mse`` plus 0.1 times ``rdkv`` rescaled to ``mse``'s
   per-head totals: ``mse`` tends to win at low retention and ``rdkv`` at high retention, and the hybrid was meant to
   track the better of the two. On two texts with paired intervals (``experiments/results/joint_default/``, 6
   windows each) ``rdkv`` with the Fisher head scale (:func:`scale_heads`) was never significantly beaten, and the
   hybrid with the same scale was beaten at 2, 5 and 25 % retention on both texts (undecided at 10 and 50 %): the
   pooled, smoothed score predicts the continuation's attention better than the observation window's own squared
   attention, so ``rdkv`` is the default. Without a head scale the hybrid measured better than ``rdkv`` (its
   ``mse`` part carries each head's level; ``compress_after_prefill`` uses it when given no importance).

   ``method="calibrated"`` estimates the blend instead of fixing it. What the evaluation measures is the loss of
   the *continuation's* queries; per head, its first-order part is ``sum_{future i} a_it^2 |v_t - o_i|^2`` for an
   evicted token (and ``sum_i a_it^2`` per unit of value error). ``mse`` is the plug-in estimate of that sum from the
   ``W`` observed queries (unbiased for queries like them, but noisy: a token the few observed queries ignore gets
   ~0), ``rdkv`` a smoothed one (linear, pooled: biased, low variance). The mixture
   ``w(alpha) = S_mse [(1 - alpha) mse / S_mse + alpha rdkv / S_rdkv]`` (``S`` the head's totals, per kind of weight)
   is a shrinkage estimator, and its coefficient is chosen per ``(layer, kv_head)`` by held-out prediction inside the
   prefill, as a disjoint calibration window: the weights are built from the earlier half ``A`` of the observation
   queries and scored against the plug-in ``mse`` weights of the later half ``B`` (the queries closest to the
   continuation), on the tokens every observed query sees (``t < C - W``). Two coefficients per head, because the
   weights are used in two regimes:

   * ``alpha_e`` for the eviction weights ``e``, by the low-rate criterion: the fraction of ``B``'s eviction
     distortion on the tokens outside those ``A``'s weights rank highest, averaged over keep fractions
     ``{5, 10, 20, 40} %`` (:data:`KEEP_FRACTIONS`): the modelled loss of ``B`` after keeping what ``A`` would keep.
   * ``alpha_q`` for the quantization weights ``u`` and ``K``, by the high-rate criterion: with bits
     ``b_t = R + 1/2 log2(w_t / G(w))`` from weights ``w`` (reverse water-filling at high rate, ``G`` the geometric
     mean), the distortion under the true weights ``w*`` is ``4^-R G(w) sum_t w*_t / w_t``; its log,
     ``log sum_t w*_t / w_t + mean_t log w_t``, is scored with ``w`` from ``A`` (floored at ``1e-12`` of its largest)
     and ``w*`` the ``u`` of ``B``. It is least when ``w`` is proportional to ``w*`` and punishes a near-zero weight on
     a token the later queries use, the failure of ``mse`` at high retention.

   The ``alpha`` of least score (grid :data:`BLEND_GRID`; ``0`` is ``mse``, ``1`` is ``rdkv``, ``0.1/1.1`` the
   fixed hybrid) then blends the weights of all ``W`` queries. With ``W/2`` queries the best ``alpha`` is, if
   anything, larger than with ``W``: the choice errs towards smoothing.

   These weights measure each head's error at its own attention output, so they compare tokens *within* a head
   but not heads with each other: a unit of output error costs the loss more in some layers than in others. One
   global budget needs a common unit, and :func:`scale_heads` gives it: per head, the weights are rescaled so that
   i.i.d. noise of per-element variance ``m`` on the head's whole cache costs what the Fisher importance
   (:func:`~.capture.fisher_importance`, calibrated once per model on other text) says it costs, ``F_h m`` nats
   per token.

3. :class:`CompressedCache` holds a compressed prefix per batch row (:class:`CompressedRow`: one sequence's plan,
   its own token count, no padding): the plan's middle tokens packed (:mod:`rdalloc.apply`, real bit-packed bytes,
   evicted tokens not stored), the first ``sink`` and last ``window`` tokens at full precision; and every token
   appended afterwards at full precision (in preallocated buffers whose capacity doubles when full). By default
   (``JointAttention(model, fused=True)``) the attention reads the packed storage itself (:mod:`.fused_decode`: scores
   and outputs from the codes by the scale/zero algebra, no dequantized prefix). With ``fused=False`` (or storage the
   fused read cannot take), on each ``update`` a layer dequantizes each row's packed part, gathers each
   kv head's kept tokens into ``[batch, kv_heads, P, head_dim]`` (``P`` the largest prefix of the layer over rows and
   heads; shorter ones padded) and hands attention the prefix followed by the appended tokens. The attention of
   :class:`JointAttention` (a context manager, :class:`~.attention.CacheAttention`, that always restores the model's
   own implementation) masks, per row, kv head and its query heads, the padding slots (``-inf``: an evicted token is
   out of its own head's softmax and nobody else's) and applies causality within the appended tokens (which every
   row has in common: the attention mask of left padding concerns the prefix only, and the pads are not stored).
   ``get_seq_length`` is the number of tokens seen (with left padding, the padded length, as transformers counts
   it); new tokens get their true rotary positions (``generate`` derives them from the attention mask). Beam search
   and the other row moves (``reorder_cache``, ``batch_select_indices``, ``batch_repeat_interleave``) move whole
   rows; rows may share one :class:`CompressedRow`. :func:`reference_attention` computes the same attention by
   explicit per-head gathers.

Bytes: ``CompressedCache.nbytes`` = packed bytes (payload + 16-bit metadata, :attr:`PackedCache.nbytes`) + 2 bytes
per full-precision element (sink, window, appended), whatever dtype the model computes in (docs/design.md §5),
summed over batch rows. :mod:`.oneshot` runs all of this in one call (``compress_after_prefill``).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

from rdalloc.accounting import predict_nbytes
from rdalloc.apply import PackedLayer, PlanApplier, unpack_tensor
from rdalloc.plan import Plan

from .attention import AttentionSwap, CacheAttention
from .compat import forward
from .fused_decode import FusedUnsupported, fused_attention, fused_layout

__all__ = ["Prefill", "observe_prefill", "observe_row", "PrefillObserver", "CompressedRow", "compress_row",
           "TokenWeights", "token_weights", "WEIGHTINGS", "BLEND_GRID", "blend_weights", "calibrate_blend",
           "CompressedCache", "CompressedLayer", "JointAttention", "reference_attention", "storage_plan",
           "protected_mask", "compressed_nbytes", "scale_heads"]

WEIGHTINGS = ("hybrid", "mse", "rdkv", "calibrated")
BLEND_GRID = (0.0, 0.03, 0.09, 0.2, 0.35, 0.5, 0.7, 1.0)
"""The mixture coefficients ``alpha`` ``method="calibrated"`` chooses among, per head (module docstring)."""
KEEP_FRACTIONS = (0.05, 0.1, 0.2, 0.4)
"""Keep fractions at which a blend's held-out prediction is scored (``method="calibrated"``)."""


# ---- 1. observing the prefill --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Prefill:
    """What the prefill left: ``keys``/``values`` ``[layers, kv_heads, C, head_dim]`` (float32, post-RoPE), and for
    the last ``window`` queries ``queries`` ``[layers, q_heads, window, head_dim]``, ``probs`` ``[layers, q_heads,
    window, C]``, ``outputs`` ``[layers, q_heads, window, head_dim]``; ``scaling`` (the softmax scale)."""

    keys: torch.Tensor
    values: torch.Tensor
    queries: torch.Tensor
    probs: torch.Tensor
    outputs: torch.Tensor
    scaling: float
    window: int

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return tuple(int(s) for s in self.keys.shape)


@torch.no_grad()
def observe_row(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, window: int,
                scaling: float | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """One sequence's observation: ``query`` ``[q_heads, T, head_dim]`` (its last ``window`` rows are observed),
    ``key``/``value`` ``[kv_heads, T, head_dim]`` (the sequence's own tokens, no padding). Returns float32
    ``(queries [q_heads, window, D], probs [q_heads, window, T], outputs [q_heads, window, D], scaling)``; the causal
    mask is built on the tensors' device."""
    w = int(window)
    g = query.shape[0] // key.shape[0]
    s = query.shape[-1] ** -0.5 if scaling is None else float(scaling)
    q = query[:, -w:].float()
    k = key.float().repeat_interleave(g, 0)
    v = value.float().repeat_interleave(g, 0)
    T = k.shape[1]
    scores = torch.matmul(q, k.transpose(1, 2)) * s
    pos = torch.arange(T - w, T, device=q.device)
    scores = scores.masked_fill(torch.arange(T, device=q.device)[None, :] > pos[:, None], float("-inf"))
    p = torch.softmax(scores, dim=-1)
    return q, p, torch.matmul(p, v), s


class PrefillObserver(AttentionSwap):
    """The model's own attention that also records, per layer, the last ``window`` queries of a one-sequence prefill,
    their attention probabilities and outputs (``self.layers[layer] = (queries, probs, outputs, scaling)``, by
    :func:`observe_row`); see :func:`observe_prefill`."""

    mask = None

    def __init__(self, model: Any, window: int):
        super().__init__(model)
        self.window = int(window)
        self.layers: dict[int, tuple] = {}

    def attention(self, module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        out = self.original_attention(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
        self.layers[module.layer_idx] = observe_row(query[0], key[0], value[0], self.window, scaling)
        return out

    def reset(self) -> None:
        pass  # the observations are the result; a new observer is made per prefill


def _facts(model) -> tuple[int, int, int, int]:
    c = model.config.get_text_config(decoder=True) if hasattr(model.config, "get_text_config") else model.config
    hd = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return int(c.num_hidden_layers), int(c.num_key_value_heads), int(c.num_attention_heads), int(hd)


@torch.no_grad()
def observe_prefill(model: Any, input_ids: Any, *, window: int = 32) -> Prefill:
    """Prefill ``input_ids`` (``[C]`` or ``[1, C]``) and observe the last ``window`` queries (see the module doc)."""
    ids = torch.as_tensor(input_ids, dtype=torch.long)
    if ids.ndim == 1:
        ids = ids[None]
    if ids.ndim != 2 or ids.shape[0] != 1:
        raise ValueError(f"input_ids must be one sequence, [C] or [1, C], got shape {tuple(ids.shape)}")
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be a positive integer, got {window!r}")
    C = int(ids.shape[1])
    if C <= window:
        raise ValueError(f"the context has {C} tokens, not more than the observation window of {window}: a context "
                         f"must be longer than the window it is scored by")
    L, _, _, _ = _facts(model)
    cache = DynamicCache(config=model.config)
    with PrefillObserver(model, window) as observer:
        forward(model, cache, ids)
    observed = observer.layers
    if len(observed) != L:
        raise ValueError(f"observed {len(observed)} of {L} layers: every layer must route through transformers' "
                         f"AttentionInterface")
    keys = torch.stack([cache.layers[i].keys[0].float() for i in range(L)])
    values = torch.stack([cache.layers[i].values[0].float() for i in range(L)])
    q, p, o = (torch.stack([observed[i][j] for i in range(L)]) for j in range(3))
    s = observed[0][3]
    return Prefill(keys=keys, values=values, queries=q, probs=p, outputs=o, scaling=s, window=window)


# ---- 2. weights -----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TokenWeights:
    """Weights of the joint problem (numpy float64): ``token`` ``u`` ``[L, H, C]`` (value error), ``eviction`` ``e``
    ``[L, H, C]``, ``key`` ``K`` ``[L, H, C, D]`` (key error per token and channel); ``method``; ``blend``: the
    ``[3, L, H]`` mixture coefficients of a blended weighting for ``token``, ``eviction``, ``key`` (``None``
    otherwise)."""

    token: np.ndarray
    eviction: np.ndarray
    key: np.ndarray
    method: str
    blend: np.ndarray | None = None

    @property
    def channel(self) -> np.ndarray:
        """Key-channel weights ``[L, H, D]``: ``K`` summed over tokens."""
        return self.key.sum(axis=2)


@torch.no_grad()
def token_weights(prefill: Prefill, *, method: str = "rdkv", pool: int = 7,
                  evicted: np.ndarray | None = None, floor: float = 0.1) -> TokenWeights:
    """Attention-derived weights from an observed prefill (formulas in the module docstring).

    ``evicted`` (``method="mse"`` only; bool ``[L, H, C]``, e.g. ``~plan.kept()`` of a first solve) re-linearizes the
    eviction distortion around that eviction set ``S``: evictions add up coherently, ``dO_i = sum_{s in S} a_is (o_i -
    v_s)``, so the marginal cost of evicting ``t`` is ``a_it^2 |o_i - v_t|^2 + 2 a_it (o_i - v_t) . dO_i^{(-t)}``
    (``dO`` without ``t``), summed over the observation queries and clamped at 0, instead of the independent-error
    ``a_it^2 |o_i - v_t|^2``.

    ``method="rdkv"`` is the default (module docstring). ``method="hybrid"``: ``mse`` plus ``floor`` times ``rdkv``
    rescaled, per ``(layer, kv_head)`` and per kind of weight, to the same total as ``mse``; see :func:`_hybrid`."""
    if method not in WEIGHTINGS:
        raise ValueError(f"method must be one of {WEIGHTINGS}, got {method!r}")
    if method == "calibrated":
        if evicted is not None:
            raise ValueError("evicted= re-linearizes method='mse' only; method='calibrated' takes no evicted")
        alpha = calibrate_blend(prefill, pool=pool)
        return blend_weights(token_weights(prefill, method="mse", pool=pool),
                             token_weights(prefill, method="rdkv", pool=pool), alpha, method="calibrated")
    if method == "hybrid":
        return _hybrid(token_weights(prefill, method="mse", pool=pool, evicted=evicted),
                       token_weights(prefill, method="rdkv", pool=pool), floor)
    if isinstance(pool, bool) or not isinstance(pool, int) or pool < 1 or pool % 2 == 0:
        raise ValueError(f"pool must be a positive odd integer (tokens averaged around each token), got {pool!r}")
    L, H, C, D = prefill.shape
    Hq = prefill.queries.shape[1]
    G = Hq // H
    W = prefill.window
    s2 = prefill.scaling ** 2
    a = prefill.probs.double().reshape(L, H, G, W, C)
    q = prefill.queries.double().reshape(L, H, G, W, D)
    o = prefill.outputs.double().reshape(L, H, G, W, D)
    v = prefill.values.double()
    if method == "mse":
        # |v_t - o_gi|^2 = |v_t|^2 - 2 v_t.o_gi + |o_gi|^2  ->  [L, H, G, W, C]
        dist = ((v * v).sum(-1)[:, :, None, None, :] - 2 * torch.einsum("lhtd,lhgid->lhgit", v, o)
                + (o * o).sum(-1)[..., None]).clamp_min(0)
        a2 = a * a
        token = a2.sum(dim=(2, 3))
        eviction = (a2 * dist).sum(dim=(2, 3))
        if evicted is not None:
            S = torch.as_tensor(np.asarray(evicted), dtype=torch.float64, device=a.device)
            if S.shape != (L, H, C):
                raise ValueError(f"evicted must be bool [layers, kv_heads, tokens] = {(L, H, C)}, got {tuple(S.shape)}")
            aS = a * S[:, :, None, None, :]
            delta = aS.sum(-1)[..., None] * o - torch.einsum("lhgit,lhtd->lhgid", aS, v)  # [L, H, G, W, D]
            od = (o * delta).sum(-1)  # [L, H, G, W]
            cross = 2 * ((a * od[..., None]).sum(dim=(2, 3)) - torch.einsum("lhgit,lhtd,lhgid->lht", a, v, delta))
            eviction = (eviction * (1 - 2 * S) + cross).clamp_min(0) + 1e-3 * eviction
        key = s2 * torch.einsum("lhgit,lhgic->lhtc", a2 * dist, q * q)
    else:
        visible = torch.clamp(C - torch.arange(C, dtype=torch.float64, device=a.device), max=W)
        score = a.sum(dim=(2, 3)) / visible
        score = torch.nn.functional.avg_pool1d(score.reshape(L * H, 1, C), pool, stride=1, padding=pool // 2,
                                               count_include_pad=False).reshape(L, H, C)
        obar = o.mean(dim=(2, 3))
        nu = ((v - obar[:, :, None, :]) ** 2).sum(-1).mean(-1)  # [L, H]
        Q = (q * q).mean(dim=3).sum(dim=2)  # [L, H, D]
        token = score
        eviction = score * nu[..., None]
        key = s2 * score[..., None] * (nu[..., None] * Q)[:, :, None, :]
    return TokenWeights(token=token.cpu().numpy(), eviction=eviction.cpu().numpy(), key=key.cpu().numpy(),
                        method=method)


def _hybrid(mse: TokenWeights, rdkv: TokenWeights, floor: float) -> TokenWeights:
    """``mse + floor * (sum mse / sum rdkv) * rdkv`` per (layer, kv_head), for ``token``, ``eviction`` and ``key``.

    Why: the squared-attention weights of ``mse`` follow the observation queries closely, which wins at low
    retention, but they give near-zero weight to tokens those queries ignore and later queries may need; the linear,
    pooled ``rdkv`` score is a floor under them."""
    if not (isinstance(floor, (int, float)) and floor >= 0):
        raise ValueError(f"floor must be a non-negative number, got {floor!r}")
    out = {}
    for f in ("token", "eviction", "key"):
        a, b = getattr(mse, f), getattr(rdkv, f)
        ax = tuple(range(2, a.ndim))
        sa, sb = a.sum(axis=ax, keepdims=True), b.sum(axis=ax, keepdims=True)
        out[f] = a + floor * np.divide(sa, sb, out=np.zeros_like(sa), where=sb > 0) * b
    return TokenWeights(token=out["token"], eviction=out["eviction"], key=out["key"], method="hybrid")


def blend_weights(mse: TokenWeights, rdkv: TokenWeights, alpha: Any, *, method: str = "blend") -> TokenWeights:
    """``S_mse [(1 - alpha) mse / S_mse + alpha rdkv / S_rdkv]`` per ``(layer, kv_head)`` and kind of weight (``S``
    the head's total of that kind); ``alpha`` a number or ``[L, H]`` in ``[0, 1]`` for every kind, or ``[3, L, H]``
    for ``token``, ``eviction`` and ``key`` in this order. A head whose ``rdkv`` total is 0 keeps ``(1 - alpha) mse``.
    The ``[3, L, H]`` coefficients are stored in the result's ``blend``."""
    L, H = mse.token.shape[:2]
    a = np.asarray(alpha, dtype=np.float64)
    a = np.broadcast_to(a, (3, L, H)).copy() if a.ndim == 3 else np.broadcast_to(a, (L, H))[None].repeat(3, 0)
    if not (np.isfinite(a).all() and a.min() >= 0 and a.max() <= 1):
        raise ValueError(f"alpha must lie in [0, 1], got values in [{a.min()}, {a.max()}]")
    out = {}
    for j, f in enumerate(("token", "eviction", "key")):
        x, y = getattr(mse, f), getattr(rdkv, f)
        ax = tuple(range(2, x.ndim))
        sx, sy = x.sum(axis=ax, keepdims=True), y.sum(axis=ax, keepdims=True)
        aa = a[j].reshape(L, H, *([1] * len(ax)))
        out[f] = (1 - aa) * x + aa * np.divide(sx, sy, out=np.zeros_like(sx), where=sy > 0) * y
    return TokenWeights(token=out["token"], eviction=out["eviction"], key=out["key"], method=method, blend=a)


def _high_rate_cost(w: np.ndarray, target: np.ndarray) -> np.ndarray:
    """``log sum_t target_t / w_t + mean_t log w_t`` over the last axis (``w`` floored at 1e-12 of its largest): the
    log distortion, up to a constant, of high-rate bits allocated by ``w`` and paid at ``target``."""
    w = np.maximum(w, 1e-12 * w.max(axis=-1, keepdims=True) + 1e-300)
    return np.log((target / w).sum(-1) + 1e-300) + np.log(w).mean(-1)


def _missed(score: np.ndarray, target: np.ndarray, fractions) -> np.ndarray:
    """``[..., len(fractions)]``: the fraction of ``target``'s total (last axis) on the tokens outside the top
    ``ceil(f n)`` of ``score``."""
    n = score.shape[-1]
    order = np.argsort(-score, axis=-1, kind="stable")
    cum = np.cumsum(np.take_along_axis(target, order, axis=-1), axis=-1)
    total = np.maximum(cum[..., -1:], 1e-300)
    ks = [min(n, max(1, math.ceil(f * n))) - 1 for f in fractions]
    return 1 - cum[..., ks] / total


@torch.no_grad()
def calibrate_blend(prefill: Prefill, *, pool: int = 7, grid=BLEND_GRID, fractions=KEEP_FRACTIONS) -> np.ndarray:
    """``[3, L, H]`` the mixture coefficients of ``method="calibrated"`` per head for the ``token``, ``eviction`` and
    ``key`` weights (the first and last the same, ``alpha_q``; the middle ``alpha_e``), chosen on the observation
    queries themselves: weights from the earlier half, scored against the later half (module docstring). Needs an
    observation window of at least 4 queries."""
    W = prefill.window
    if W < 4:
        raise ValueError(f"method='calibrated' splits the observation window in two halves and needs window >= 4, "
                         f"got {W}")
    grid = np.asarray(grid, dtype=np.float64)
    half = W // 2
    L, H, C, D = prefill.shape

    def part(lo, hi):
        return Prefill(keys=prefill.keys, values=prefill.values, queries=prefill.queries[:, :, lo:hi],
                       probs=prefill.probs[:, :, lo:hi], outputs=prefill.outputs[:, :, lo:hi],
                       scaling=prefill.scaling, window=hi - lo)

    early, late = part(0, half), part(half, W)
    mse_a, rdkv_a = token_weights(early, method="mse", pool=pool), token_weights(early, method="rdkv", pool=pool)
    target = token_weights(late, method="mse", pool=pool)
    seen = C - W  # tokens every observed query sees
    low, high = np.zeros((len(grid), L, H)), np.zeros((len(grid), L, H))
    for j, a in enumerate(grid):
        b = blend_weights(mse_a, rdkv_a, float(a))
        low[j] = _missed(b.eviction[..., :seen], target.eviction[..., :seen], fractions).mean(-1)
        high[j] = _high_rate_cost(b.token[..., :seen], target.token[..., :seen])
    alpha_e, alpha_q = grid[np.argmin(low, axis=0)], grid[np.argmin(high, axis=0)]
    return np.stack([alpha_q, alpha_e, alpha_q])


def scale_heads(weights: TokenWeights, importance: Any) -> TokenWeights:
    r"""The weights in the loss's units: per ``(layer, kv_head)``, values and evictions times ``s^V``, keys times
    ``s^K``, where

        s^V_h = F^V_h / (D sum_t u_t),     s^K_h = F^K_h / sum_{t,c} K_tc,

    ``F`` the head importance (``importance.value``/``.key``, ``[L, H]``, e.g. :func:`~.capture.fisher_importance`
    in nats per token per unit MSE) and ``D`` the head dimension. Then i.i.d. noise of per-element variance ``m``
    on all of head ``h``'s values has modelled distortion ``s^V_h sum_t u_t D m = F^V_h m``, the Fisher prediction
    (the same for keys); the split among tokens and channels within the head is the attention's. A head whose
    weights sum to 0 keeps zeros. ``method`` gains the suffix ``"+fisher"`` (or ``"+" + importance.method``)."""
    L, H, C, D = weights.key.shape
    fk, fv = (np.asarray(getattr(importance, r), dtype=np.float64) for r in ("key", "value"))
    if fk.shape != (L, H) or fv.shape != (L, H):
        raise ValueError(f"importance must have key and value shaped (layers, kv_heads) = {(L, H)}, got "
                         f"{fk.shape} and {fv.shape}")
    if not (np.isfinite(fk).all() and np.isfinite(fv).all() and fk.min() >= 0 and fv.min() >= 0):
        raise ValueError("importance must be finite and non-negative")
    u, k = weights.token.sum(-1), weights.key.sum(axis=(2, 3))
    sv = np.divide(fv, D * u, out=np.zeros_like(fv), where=u > 0)
    sk = np.divide(fk, k, out=np.zeros_like(fk), where=k > 0)
    return TokenWeights(token=weights.token * sv[..., None], eviction=weights.eviction * sv[..., None],
                        key=weights.key * sk[..., None, None],
                        method=f"{weights.method}+{getattr(importance, 'method', 'scaled')}", blend=weights.blend)


# ---- 3. the compressed cache ----------------------------------------------------------------------------------------
def protected_mask(tokens: int, sink: int, window: int) -> np.ndarray:
    """``[tokens]`` bool: the first ``sink`` and last ``window`` tokens (kept at full precision, outside packing)."""
    m = np.zeros(tokens, dtype=bool)
    m[:sink] = True
    if window:
        m[tokens - window:] = True
    return m


def storage_plan(plan: Plan) -> Plan:
    """The plan the packed part stores: ``plan`` with its protected tokens (``meta["sink"]``, ``meta["window"]``)
    left out (value bits 0); those are held at full precision beside the packed storage."""
    sink, window = int(plan.meta.get("sink", 0)), int(plan.meta.get("window", 0))
    prot = protected_mask(plan.tokens, sink, window)
    value = np.where(prot[None, None, :], 0, plan.value)
    return Plan(key=plan.key, value=value, key_axes=plan.key_axes, value_axes=plan.value_axes,
                quantizer=plan.quantizer, meta=plan.meta)


def compressed_nbytes(plan: Plan, quantizer: Any = None, *, head_dim: int, batch: int = 1) -> int:
    """Exact bytes a :class:`CompressedCache` of ``plan`` holds right after compression: the packed middle
    (:func:`rdalloc.accounting.predict_nbytes` of :func:`storage_plan`) + 2 bytes per element of the protected tokens
    (keys and values). Computed from the plan alone."""
    sink, window = int(plan.meta.get("sink", 0)), int(plan.meta.get("window", 0))
    protected = int(protected_mask(plan.tokens, sink, window).sum())
    full = 2 * 2 * batch * plan.layers * plan.kv_heads * protected * head_dim
    return predict_nbytes(storage_plan(plan), quantizer, batch=batch, tokens=plan.tokens, head_dim=head_dim) + full


class CompressedRow:
    """One sequence's compressed prefix in one layer: the packed middle (``packed``, batch 1), the full-precision
    ``sink_kv``/``window_kv`` (``[1, kv_heads, s, head_dim]``), and per kv head the positions of its kept middle tokens
    (``gather_index``/``gather_valid`` ``[kv_heads, P]``, ``P`` the largest kept count; shorter heads padded);
    ``dense_kv``: sink and window in one tensor per role (``sink_kv``/``window_kv`` are views of it); ``fused``: the
    index metadata of :mod:`.fused_decode` (``None`` when that path cannot read the storage: ``fused_reason``).
    Immutable once built: beam reordering shares rows between batch slots."""

    def __init__(self, packed: PackedLayer, sink: tuple, window: tuple, kept: np.ndarray):
        self.packed = packed
        # sink and window in one tensor per role (one read per step); sink_kv and window_kv are views of it
        self.dense_kv = (torch.cat([sink[0], window[0]], dim=2), torch.cat([sink[1], window[1]], dim=2))
        s = sink[0].shape[2]
        self.sink_kv = (self.dense_kv[0][:, :, :s], self.dense_kv[1][:, :, :s])
        self.window_kv = (self.dense_kv[0][:, :, s:], self.dense_kv[1][:, :, s:])
        H = kept.shape[0]
        counts = kept.sum(axis=1)
        P = int(counts.max()) if H else 0
        idx = np.zeros((H, P), dtype=np.int64)
        valid = np.zeros((H, P), dtype=bool)
        for h in range(H):
            pos = np.flatnonzero(kept[h])
            idx[h, :pos.size] = pos
            valid[h, :pos.size] = True
        device = sink[0].device
        self.gather_index = torch.from_numpy(idx).to(device)
        self.gather_valid = torch.from_numpy(valid).to(device)
        self.kept_counts = counts
        try:  # the fused read's index metadata, laid out once (no bytes copied)
            middle = packed.keys.layout.shape[2] - sink[0].shape[2] - window[0].shape[2]
            self.fused, self.fused_reason = fused_layout(packed, kept, middle), None
        except FusedUnsupported as e:
            self.fused, self.fused_reason = None, str(e)
        if self.fused is not None:  # decoding reads the streams through the fused layout: drop the packing indices
            for part in (packed.keys, packed.values):
                part.layout.release_caches()

    @property
    def length(self) -> int:
        """Slots of the prefix: sink + padded kept middle + window."""
        return int(self.sink_kv[0].shape[-2] + self.gather_index.shape[1] + self.window_kv[0].shape[-2])

    @property
    def nbytes(self) -> int:
        return self.packed.nbytes + sum(2 * t.numel() for t in (*self.sink_kv, *self.window_kv))

    def prefix(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(keys, values, valid)``: ``[1, kv_heads, length, head_dim]`` twice and ``[kv_heads, length]`` bool
        (sink, each head's kept middle tokens padded, window)."""
        k = unpack_tensor(self.packed.keys)
        v = unpack_tensor(self.packed.values)
        B, H, _, D = k.shape
        idx = self.gather_index[None, :, :, None].expand(B, H, -1, D)
        mk, mv = torch.gather(k, 2, idx), torch.gather(v, 2, idx)
        sk, sv = self.sink_kv
        wk, wv = self.window_kv
        ones = torch.ones(H, sk.shape[-2] + wk.shape[-2], dtype=torch.bool, device=self.gather_valid.device)
        valid = torch.cat([ones[:, :sk.shape[-2]], self.gather_valid, ones[:, sk.shape[-2]:]], dim=1)
        return torch.cat([sk, mk.to(sk.dtype), wk], dim=2), torch.cat([sv, mv.to(sv.dtype), wv], dim=2), valid


def compress_row(keys: torch.Tensor, values: torch.Tensor, plan: Plan, applier: PlanApplier, layer: int,
                 kept: np.ndarray) -> CompressedRow:
    """Layer ``layer`` of one sequence (``keys``/``values`` ``[1, kv_heads, C, head_dim]``) packed by ``applier``
    (built on :func:`storage_plan` of ``plan``), sink and window cloned at full precision."""
    C = keys.shape[-2]
    sink, window = int(plan.meta.get("sink", 0)), int(plan.meta.get("window", 0))
    packed = applier.pack(keys, values, layer=layer)
    sk = (keys[:, :, :sink].clone(), values[:, :, :sink].clone())
    wk = (keys[:, :, C - window:].clone(), values[:, :, C - window:].clone())
    return CompressedRow(packed, sk, wk, kept)


class CompressedLayer(DynamicLayer):
    """One decoder layer of a :class:`CompressedCache`: one :class:`CompressedRow` per batch row (``rows``), and the
    tokens appended since (``self.keys``/``self.values`` ``[batch, kv_heads, T, head_dim]``, as in ``DynamicLayer``).
    ``tokens``: the prefill length the model saw (with left padding, the padded length), so that
    ``get_seq_length`` agrees with transformers' own bookkeeping (positions come from the attention mask)."""

    def __init__(self, layer_idx: int, rows: list[CompressedRow], tokens: int):
        super().__init__()
        self.layer_idx = int(layer_idx)
        self.rows = list(rows)
        self.tokens = int(tokens)
        self.attention: JointAttention | None = None  # set while a JointAttention runs this cache
        self._buffers: tuple | None = None  # (keys, values) [batch, kv_heads, capacity, head_dim]; self.keys views them

    # batch-1 views (the five-step path and reference_attention)
    @property
    def packed(self) -> PackedLayer:
        return self.rows[0].packed

    @property
    def sink_kv(self) -> tuple:
        return self.rows[0].sink_kv

    @property
    def window_kv(self) -> tuple:
        return self.rows[0].window_kv

    @property
    def gather_index(self) -> torch.Tensor:
        return self.rows[0].gather_index

    @property
    def gather_valid(self) -> torch.Tensor:
        return self.rows[0].gather_valid

    @property
    def kept_counts(self) -> np.ndarray:
        return self.rows[0].kept_counts

    @property
    def prefix_length(self) -> int:
        return max(row.length for row in self.rows)

    def prefix(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(keys, values, valid)``: the compressed prefix of every row ``[batch, kv_heads, P', head_dim]`` and the
        valid slots ``[batch, kv_heads, P']`` (each row padded to the longest; a row shared by several batch slots,
        as after beam reordering, is dequantized once)."""
        done: dict[int, tuple] = {}
        for row in self.rows:
            if id(row) not in done:
                done[id(row)] = row.prefix()
        P = self.prefix_length
        ks, vs, valids = [], [], []
        for row in self.rows:
            k, v, valid = done[id(row)]
            pad = P - k.shape[-2]
            if pad:
                k = torch.nn.functional.pad(k, (0, 0, 0, pad))
                v = torch.nn.functional.pad(v, (0, 0, 0, pad))
                valid = torch.nn.functional.pad(valid, (0, pad))
            ks.append(k)
            vs.append(v)
            valids.append(valid)
        return torch.cat(ks), torch.cat(vs), torch.stack(valids)

    def update(self, key_states, value_states, *args, **kwargs):
        refused = (f"layer {self.layer_idx}: a compressed cache needs the per-head masked attention; run the model "
                   f"under `with JointAttention(model):` (a plain attention would attend to the padding slots of "
                   f"evicted tokens)")
        if self.attention is None:
            raise RuntimeError(refused)
        if key_states.shape[0] != len(self.rows):
            raise ValueError(f"layer {self.layer_idx}: the new keys have batch {key_states.shape[0]}, the compressed "
                             f"cache holds {len(self.rows)} rows")
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        pending = self.attention.pending
        if self.layer_idx in pending:
            pending.pop(self.layer_idx)
            raise RuntimeError(f"the per-head mask of the previous step was never used: {refused}")
        self._append(key_states, value_states)
        if self.attention.fused and all(row.fused is not None for row in self.rows):
            # a lossless layer (nothing quantized or evicted: 100 % retention) takes the gather path, whose SDPA
            # over the original tokens in order matches the uncompressed model bit for bit (docs/design.md §5)
            if not all(row.fused.lossless for row in self.rows):
                pending[self.layer_idx] = self  # the attention reads the packed storage and the buffers itself
                return self.keys, self.values
        elif self.attention.fused:
            self.attention.warn_unfused(self)
        pk, pv, valid = self.prefix()
        pending[self.layer_idx] = (valid, pk.shape[-2], self.keys.shape[-2])
        return (torch.cat([pk.to(self.keys.dtype), self.keys], dim=-2),
                torch.cat([pv.to(self.values.dtype), self.values], dim=-2))

    def _append(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Write the new tokens into preallocated buffers, their capacity doubled when full (never grown per step);
        ``self.keys``/``self.values`` are views of the valid part. When they were replaced from outside (row moves,
        ``crop``) the buffers are rebuilt from them."""
        B, H, n, D = key_states.shape
        held = self._buffers is not None and self.keys is self._buffers[2]
        T = 0 if self.keys is None or self.keys.numel() == 0 else int(self.keys.shape[-2])
        if not held or T + n > self._buffers[0].shape[-2]:
            cap = max(16, 2 * (T + n))
            kb = key_states.new_empty(B, H, cap, D)
            vb = value_states.new_empty(B, H, cap, value_states.shape[-1])
            if T:
                kb[:, :, :T] = self.keys
                vb[:, :, :T] = self.values
            self._buffers = (kb, vb, None)
        kb, vb, _ = self._buffers
        kb[:, :, T:T + n] = key_states
        vb[:, :, T:T + n] = value_states
        self.keys, self.values = kb[:, :, :T + n], vb[:, :, :T + n]
        self._buffers = (kb, vb, self.keys)

    def get_seq_length(self) -> int:
        appended = 0 if not self.is_initialized or self.keys is None else int(self.keys.shape[-2])
        return self.tokens + appended

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def _select(self, rows: list[int]) -> None:
        self.rows = [self.rows[i] for i in rows]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: batch slot ``i`` takes row ``beam_idx[i]`` (prefix and appended tokens)."""
        self._select(beam_idx.tolist())
        if self.is_initialized and self.keys is not None and self.keys.numel():
            self.keys = self.keys.index_select(0, beam_idx.to(self.keys.device))
            self.values = self.values.index_select(0, beam_idx.to(self.values.device))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._select([i for i in range(len(self.rows)) for _ in range(int(repeats))])
        if self.is_initialized and self.keys is not None and self.keys.numel():
            self.keys = self.keys.repeat_interleave(repeats, dim=0)
            self.values = self.values.repeat_interleave(repeats, dim=0)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._select(torch.arange(len(self.rows))[torch.as_tensor(indices).cpu()].tolist())
        if self.is_initialized and self.keys is not None and self.keys.numel():
            self.keys = self.keys[indices, ...]
            self.values = self.values[indices, ...]

    def crop(self, tokens_to_remove: int) -> None:
        appended = 0 if not self.is_initialized or self.keys is None else int(self.keys.shape[-2])
        if tokens_to_remove < -appended or tokens_to_remove > 0:
            raise ValueError(f"layer {self.layer_idx}: a compressed cache can only drop appended tokens (it holds "
                             f"{appended}), got crop({tokens_to_remove})")
        super().crop(tokens_to_remove)

    @property
    def appended_nbytes(self) -> int:
        if not self.is_initialized or self.keys is None:
            return 0
        return 2 * (self.keys.numel() + self.values.numel())

    @property
    def nbytes(self) -> int:
        """Bytes held: every row's prefix (a row shared by several batch slots counted once per slot, as a serving
        system holds it per request) + the appended tokens at 2 bytes per element."""
        return sum(row.nbytes for row in self.rows) + self.appended_nbytes


class CompressedCache(Cache):
    """A ``transformers.Cache`` holding a prefix compressed by a token plan per batch row (module docstring).

    Build it with :meth:`compress` (one sequence) or :meth:`compress_rows` (a batch, a plan per row); run the model
    under :class:`JointAttention` (``model(...)`` or ``model.generate(...)``). ``nbytes`` (held now),
    ``compressed_nbytes`` (the prefixes only), ``fp16_nbytes`` (the prefixes at 16 bits), ``retention``,
    ``predicted_nbytes`` (from the plans alone).
    """

    def __init__(self, layers: list[CompressedLayer], plans: Plan | list[Plan], head_dim: int):
        super().__init__(layers=layers)
        self.plans = [plans] if isinstance(plans, Plan) else list(plans)
        self.plan = self.plans[0]
        self.head_dim = int(head_dim)

    @classmethod
    @torch.no_grad()
    def compress(cls, keys: torch.Tensor, values: torch.Tensor, plan: Plan, quantizer: Any = None) -> CompressedCache:
        """Compress ``keys``/``values`` (``[layers, kv_heads, C, head_dim]`` or ``[layers, 1, kv_heads, C,
        head_dim]``; e.g. :attr:`Prefill.keys`) once with ``plan`` (``meta["sink"]``/``meta["window"]`` protected)."""
        if keys.ndim == 4:
            keys, values = keys[:, None], values[:, None]
        if keys.ndim != 5 or keys.shape != values.shape or keys.shape[1] != 1:
            raise ValueError(f"keys and values must be [layers, kv_heads, tokens, head_dim] (one sequence), got "
                             f"{tuple(keys.shape)} and {tuple(values.shape)}")
        return cls.compress_rows([(keys, values, plan)], quantizer)

    @classmethod
    @torch.no_grad()
    def compress_rows(cls, rows: list[tuple], quantizer: Any = None, *, tokens: int | None = None,
                      slots: list[int] | None = None, layers: list | None = None) -> CompressedCache:
        """Compress a batch: ``rows`` = ``[(keys, values, plan), ...]``, one per sequence, ``keys``/``values``
        ``[layers, 1, kv_heads, C_b, head_dim]`` (that sequence's tokens only, no padding). ``slots``: the sequence of
        each batch row (default one row per sequence; rows of one sequence share its packed prefix). ``tokens``: the
        length the model saw (default the longest ``C_b``). With ``layers`` (a list, e.g. a ``DynamicCache``'s
        ``layers``) the compressed layers replace its items in place, all at once after every row is packed, and the
        cache returned wraps the same list."""
        if not rows:
            raise ValueError("rows must hold at least one (keys, values, plan)")
        built = []
        L = H = D = None
        for b, (keys, values, plan) in enumerate(rows):
            if keys.ndim != 5 or keys.shape != values.shape or keys.shape[1] != 1:
                raise ValueError(f"row {b}: keys and values must be [layers, 1, kv_heads, tokens, head_dim], got "
                                 f"{tuple(keys.shape)} and {tuple(values.shape)}")
            Lb, _, Hb, C, Db = (int(s) for s in keys.shape)
            if L is None:
                L, H, D = Lb, Hb, Db
            elif (Lb, Hb, Db) != (L, H, D):
                raise ValueError(f"row {b}: keys are {(Lb, Hb, Db)} (layers, kv_heads, head_dim), row 0's {(L, H, D)}")
            if plan.granularity != "token" or plan.value_axes[-1] != "token":
                raise ValueError(f"a compressed cache needs a token plan with per-token value bits, got value axes "
                                 f"{plan.value_axes}")
            plan.check(layers=L, kv_heads=H, tokens=C, head_dim=D)
            sink, window = int(plan.meta.get("sink", 0)), int(plan.meta.get("window", 0))
            if sink + window > C:
                raise ValueError(f"the plan protects sink={sink} + window={window} tokens, more than the {C} the cache "
                                 f"has")
            ap = PlanApplier(storage_plan(plan), quantizer)
            kept = plan.kept() & ~protected_mask(C, sink, window)[None, None, :]
            built.append([compress_row(keys[i], values[i], plan, ap, i, kept[i]) for i in range(L)])
        seen = max(p.tokens for _, _, p in rows) if tokens is None else int(tokens)
        slots = list(range(len(rows))) if slots is None else [int(s) for s in slots]
        if not slots or min(slots) < 0 or max(slots) >= len(rows):
            raise ValueError(f"slots must index the {len(rows)} rows, got {slots}")
        new = [CompressedLayer(i, [built[s][i] for s in slots], seen) for i in range(L)]
        plans = [rows[s][2] for s in slots]
        if layers is None:
            return cls(new, plans, D)
        layers[:] = new
        return cls(layers, plans, D)

    @property
    def compressed_nbytes(self) -> int:
        return sum(layer.nbytes - layer.appended_nbytes for layer in self.layers)

    @property
    def nbytes(self) -> int:
        return sum(layer.nbytes for layer in self.layers)

    @property
    def fp16_nbytes(self) -> int:
        return sum(2 * 2 * p.layers * p.kv_heads * p.tokens * self.head_dim for p in self.plans)

    @property
    def retention(self) -> float:
        """Bytes of the compressed prefixes / their bytes at 16 bits."""
        return self.compressed_nbytes / self.fp16_nbytes

    @property
    def predicted_nbytes(self) -> int:
        q = self.layers[0].packed.keys.layout.quantizer
        return sum(compressed_nbytes(p, q, head_dim=self.head_dim) for p in self.plans)


def _mask(valid: torch.Tensor, q: int, T: int, groups: int) -> torch.Tensor:
    """``[batch, q_heads, q, P + T]`` bool: each row's and kv head's valid prefix slots (``valid`` ``[batch, kv_heads,
    P]``, expanded to the head's query heads), and causality among the ``T`` appended tokens (the ``q`` queries are the
    last ``q`` of them)."""
    B, H, P = valid.shape
    pre = valid.repeat_interleave(groups, 1)[:, :, None, :].expand(-1, -1, q, -1)
    causal = torch.arange(T, device=valid.device)[None, :] <= (T - q + torch.arange(q, device=valid.device))[:, None]
    tail = causal[None, None].expand(B, H * groups, -1, -1)
    return torch.cat([pre, tail], dim=-1)


def _masked_sdpa(query, key, value, mask, scaling):
    g = query.shape[1] // key.shape[1]
    k = key.repeat_interleave(g, 1)
    v = value.repeat_interleave(g, 1)
    out = torch.nn.functional.scaled_dot_product_attention(query, k.to(query.dtype), v.to(query.dtype),
                                                           attn_mask=mask, scale=scaling)
    return out.transpose(1, 2).contiguous()


def _compressed_layers(cache: Any) -> list[CompressedLayer]:
    layers = getattr(cache, "layers", None) or []
    return [layer for layer in layers if isinstance(layer, CompressedLayer)]


FUSED_DEFAULT = True
"""Whether :class:`JointAttention` reads the packed storage directly (:mod:`.fused_decode`) unless told otherwise:
set from ``benchmarks/decode.py`` (the fused path against the dequantize-and-gather path, side by side)."""


class JointAttention(CacheAttention):
    """Context manager: run ``model`` with the per-head masked attention of :class:`CompressedCache` (module
    docstring); ``model(...)`` and ``model.generate(...)`` inside it. Layers whose cache is not compressed run the
    model's own attention implementation.

    ``fused`` (default :data:`FUSED_DEFAULT`): read the packed storage directly (:func:`.fused_decode.fused_attention`)
    instead of dequantizing and gathering the prefix; a layer whose rows the fused read cannot take runs the gather
    path, with one warning per block.

    A cache with compressed layers handed to the model (under either cache keyword) is attached on each call: its
    layers hand their per-head masks (or, fused, themselves) to this object (``pending``, by layer index) on
    ``update`` and the attention takes them. Leaving the block detaches every cache and drops any mask a failed call
    left."""

    def __init__(self, model: Any, *, fused: bool | None = None):
        if fused is not None and not isinstance(fused, bool):
            raise TypeError(f"fused must be None (the default path), True or False, got {fused!r}")
        super().__init__(model)
        self.fused = FUSED_DEFAULT if fused is None else fused
        self._warned = False

    def warn_unfused(self, layer: CompressedLayer) -> None:
        """Once per block: a layer whose rows have no fused layout runs the dequantize-and-gather path."""
        if not self._warned:
            self._warned = True
            reason = next(row.fused_reason for row in layer.rows if row.fused is None)
            warnings.warn(f"layer {layer.layer_idx}: the fused decode path cannot read this storage ({reason}); "
                          f"using the dequantize-and-gather path", RuntimeWarning, stacklevel=3)

    def cache_layers(self, cache: Any) -> list:
        return _compressed_layers(cache)

    def attention(self, module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        pending = self.pending.pop(module.layer_idx, None)
        if pending is None:  # not a compressed layer: the model's own attention
            return self.original_attention(module, query, key, value, attention_mask, scaling=scaling,
                                           dropout=dropout, **kwargs)
        if isinstance(pending, CompressedLayer):
            return fused_attention(pending, query, scaling), None
        valid, P, T = pending
        if key.shape[-2] != P + T:
            raise ValueError(f"layer {module.layer_idx}: the keys hold {key.shape[-2]} slots, but the compressed "
                             f"cache announced {P} prefix + {T} appended")
        mask = _mask(valid, query.shape[-2], T, query.shape[1] // key.shape[1])
        return _masked_sdpa(query, key, value, mask, scaling), None


@torch.no_grad()
def reference_attention(layer: CompressedLayer, query: torch.Tensor, scaling: float | None = None,
                        row: int = 0) -> torch.Tensor:
    """Attention of ``query`` (``[1, q_heads, q, head_dim]``, the last ``q`` appended tokens) over batch row ``row`` of
    ``layer``, by explicit gathers: for each query head, the sink, its kv head's kept middle tokens, the window and
    the appended tokens up to the query's own. Returns ``[1, q, q_heads, head_dim]`` like the attention functions."""
    r = layer.rows[row]
    k_all = unpack_tensor(r.packed.keys)[0]
    v_all = unpack_tensor(r.packed.values)[0]
    H = k_all.shape[0]
    Hq, q, D = query.shape[1], query.shape[2], query.shape[3]
    g = Hq // H
    s = D ** -0.5 if scaling is None else scaling
    T = layer.keys.shape[-2]
    out = torch.zeros(1, q, Hq, D, dtype=query.dtype, device=query.device)
    for qh in range(Hq):
        h = qh // g
        pos = r.gather_index[h][r.gather_valid[h]]
        ks = torch.cat([r.sink_kv[0][0, h], k_all[h, pos], r.window_kv[0][0, h]])
        vs = torch.cat([r.sink_kv[1][0, h], v_all[h, pos], r.window_kv[1][0, h]])
        for j in range(q):
            kk = torch.cat([ks, layer.keys[row, h, :T - q + j + 1]]).to(query.dtype)
            vv = torch.cat([vs, layer.values[row, h, :T - q + j + 1]]).to(query.dtype)
            p = torch.softmax((kk @ query[0, qh, j]) * s, dim=0)
            out[0, j, qh] = p @ vv
    return out
