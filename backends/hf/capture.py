"""Capture the K/V a model caches, and estimate how much each cached head matters.

``capture_kv`` runs the model over token windows and returns what a ``DynamicCache`` holds per layer: post-RoPE keys
and values, ``[layers, windows, kv_heads, seq, head_dim]``.

Two head-importance estimators return per-(layer, kv_head) weights for keys and for values, arrays shaped
``(layers, kv_heads)``, meant as the ``w`` in rdalloc's objective ``sum_i w_i D_i(b_i)`` where ``D_i`` is the
**mean squared error per element** that quantization leaves in head ``i``'s cached K (or V):

* :func:`fisher_importance` (gradient / Fisher), in nats per token: ``w * D`` approximates the mean KL divergence
  of the model's next-token predictions from the full-precision ones (and, when the model fits the text, the
  increase of the mean NLL); see its docstring for the derivation.
* :func:`single_head_kl` is not a weight but the measured loss itself, for the low widths where the second-order
  (Fisher) picture breaks down: the mean KL to the full model with one head's K (or V) alone at ``b`` bits.
* :func:`fisher_error` is the same Fisher pass taken element by element: per quantizer, head and width the
  distortion in the loss's units ``D_h(b) = sum_{e in h} F_e err_e(b)^2`` (nats per token), which, unlike
  ``w_h * MSE_h(b)``, sees where in the head a quantizer puts its error (:func:`fisher_weighted_error` is the sum).
* :func:`attention_importance` (attention-output sensitivity), in units of squared attention-block output (what
  the layer adds to the residual stream, after ``o_proj``), per token: ``w * D`` is the expected squared error of
  that output (``relative=True``: relative to the residual stream's energy). Cheaper (no backward pass), but blind
  to what happens downstream of the layer, so its cross-layer scale is not comparable to the loss.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .attention import AttentionSwap
from .cache import TransformCache
from .compat import forward
from .model import check_attention_layers
from .windows import as_windows, split_batches, with_progress

__all__ = ["CapturedKV", "capture_kv", "HeadImportance", "fisher_importance", "attention_importance",
           "single_head_kl", "AttentionProbe", "FisherError", "fisher_error", "fisher_weighted_error",
           "fake_quantize_widths"]


def _num_layers(model: Any) -> int:
    config = model.config.get_text_config(decoder=True) if hasattr(model.config, "get_text_config") else model.config
    return int(config.num_hidden_layers)


def _layer_list(layers: Sequence[int] | None, n: int) -> tuple[int, ...]:
    if layers is None:
        return tuple(range(n))
    out = tuple(int(i) for i in layers)
    bad = [i for i in out if not 0 <= i < n]
    if bad or len(set(out)) != len(out) or not out:
        raise ValueError(f"layers must be distinct indices in [0, {n}), got {list(layers)!r}")
    return out


@dataclass(frozen=True)
class CapturedKV:
    """K/V as the cache holds them: ``keys``, ``values`` shaped ``[len(layers), windows, kv_heads, seq, head_dim]``
    (float32, post-RoPE keys), and ``layers``, the decoder-layer index of each leading entry."""

    keys: torch.Tensor
    values: torch.Tensor
    layers: tuple[int, ...]


@torch.no_grad()
def capture_kv(model: Any, windows: Any, *, layers: Sequence[int] | None = None, batch_size: int = 1,
               progress: bool = True) -> CapturedKV:
    """Run ``model`` over ``windows`` (``[count, length]`` token ids) and return the cached K/V of ``layers``
    (default all), stacked over windows: see :class:`CapturedKV`."""
    check_attention_layers(model, "capture_kv", softcap=False)
    ids = as_windows(windows)
    chosen = _layer_list(layers, _num_layers(model))
    from transformers import DynamicCache

    ks: list[list[torch.Tensor]] = [[] for _ in chosen]
    vs: list[list[torch.Tensor]] = [[] for _ in chosen]
    batches = split_batches(ids, batch_size)
    for batch in with_progress(batches, desc="capture K/V", total=len(batches), enabled=progress):
        cache = DynamicCache(config=model.config)
        forward(model, cache, batch.to(model.device))
        for slot, layer in enumerate(chosen):
            ks[slot].append(cache.layers[layer].keys.float().cpu())
            vs[slot].append(cache.layers[layer].values.float().cpu())
    keys = torch.stack([torch.cat(k, 0) for k in ks])
    values = torch.stack([torch.cat(v, 0) for v in vs])
    return CapturedKV(keys=keys, values=values, layers=chosen)


# ---- head importance ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class HeadImportance:
    """Per-(layer, kv_head) weights for keys and values, ``(layers, kv_heads)`` float64 arrays.

    ``method`` is ``"fisher"`` or ``"attention"``; ``units`` says what ``w * D`` measures (``D`` = per-element MSE
    of the head's cached K or V); ``windows`` and ``tokens`` say how much text the estimate averaged over;
    ``meta`` holds the options used.
    """

    key: np.ndarray
    value: np.ndarray
    method: str
    units: str
    windows: int
    tokens: int
    meta: dict

    def __post_init__(self):
        for name in ("key", "value"):
            a = np.array(getattr(self, name), dtype=np.float64)
            a.setflags(write=False)
            object.__setattr__(self, name, a)
        object.__setattr__(self, "meta", dict(self.meta))

    def to_dict(self) -> dict:
        return {"method": self.method, "units": self.units, "windows": self.windows, "tokens": self.tokens,
                "key": self.key.tolist(), "value": self.value.tolist(), "meta": dict(self.meta)}

    @classmethod
    def from_dict(cls, d: dict) -> HeadImportance:
        try:
            return cls(key=np.asarray(d["key"]), value=np.asarray(d["value"]), method=d["method"], units=d["units"],
                       windows=int(d["windows"]), tokens=int(d["tokens"]), meta=d.get("meta") or {})
        except (KeyError, TypeError) as e:
            raise ValueError(f"corrupted head importance: missing or malformed field {e}") from None


def fisher_importance(model: Any, windows: Any, *, labels: str = "model", samples: int = 1, batch_size: int = 1,
                      seed: int = 0, progress: bool = True) -> HeadImportance:
    r"""Fisher (expected squared gradient) weights: ``w * D`` approximates the damage of per-element MSE ``D``.

    Take one window of ``T`` tokens and its ``n = T - 1`` predicted positions, with next-token distributions ``p_t``.
    Quantizing head ``h`` adds zero-mean noise ``delta`` to the elements ``e`` of its cached K (all positions, as
    the simulated cache does), independent across elements, with per-element variance ``D_h``. To second order the
    mean KL divergence per token between the clean and the perturbed predictions is

        E[(1/n) sum_t KL(p_t || p_t')] ~= (1/(2n)) sum_e F_ee D_h,   F = sum_t E_{y~p_t}[grad l_t(y) grad l_t(y)^T],

    ``l_t(y) = -log p_t(y)`` and ``F`` the Fisher information of the whole window w.r.t. the cached K (the Hessian
    of the KL at zero perturbation; for softmax cross-entropy also the Gauss-Newton part of the Hessian of the NLL,
    so when the model is calibrated on the text, ``E[y] = p``, the same number is the expected increase of the mean
    NLL, i.e. of log-perplexity). Drawing each position's target from the model, ``y_t ~ p_t`` (``labels="model"``),
    makes the scores ``grad l_t(y_t)`` zero-mean and uncorrelated across ``t``, so the squared gradient of the
    *summed* loss is an unbiased estimate of the diagonal: ``E_y[(d sum_t l_t(y_t) / d e)^2] = F_ee``. Hence

        w_h = (1/(2n)) * E_{windows, y}[ sum_{e in h} (d sum_t l_t(y_t) / d e)^2 ],

    averaged over the windows and ``samples`` label draws per window; ``sum_h w_h D_h`` then predicts the mean KL
    per token (nats) from the full-precision model, and (to the extent Fisher ~ Hessian) the increase of the mean NLL.
    ``labels="data"`` uses the text's own next tokens instead (the "empirical Fisher": same cost, but the cross-token
    terms no longer cancel, so it is a heuristic).

    The gradient is taken w.r.t. zero perturbation tensors added to the *whole* cached K and V on their way into the
    attention (a :class:`~rdalloc.backends.hf.cache.TransformCache` whose transform returns ``K + dK``, ``V + dV``
    with ``dK``, ``dV`` leaves requiring grad), so it includes every downstream effect through later layers, and the
    model's parameters get no gradient. Cost: one forward and ``samples`` backward passes per window.

    Returns a :class:`HeadImportance` with ``key``, ``value`` shaped ``(layers, kv_heads)``, in nats per token per
    unit of per-element MSE.
    """
    ids, n_layers = _fisher_iv(model, windows, labels, samples, "fisher_importance")
    sums_k, sums_v = _fisher_pass(model, ids, n_layers, labels=labels, samples=samples, batch_size=batch_size,
                                  seed=seed, progress=progress, desc="Fisher importance")
    return _head_fisher(sums_k, sums_v, ids, labels, samples, seed)


def _fisher_iv(model: Any, windows: Any, labels: str, samples: int, caller: str) -> tuple[torch.Tensor, int]:
    """The Fisher pass's options checked (``ValueError`` naming the option); the windows and the layer count."""
    if labels not in ("model", "data"):
        raise ValueError(f"labels must be 'model' or 'data', got {labels!r}")
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise ValueError(f"samples must be a positive integer, got {samples!r}")
    if labels == "data" and samples != 1:
        raise ValueError(f"samples > 1 only makes sense with labels='model' (the data labels are fixed), got "
                         f"samples={samples}")
    check_attention_layers(model, caller, softcap=False)
    return as_windows(windows), _num_layers(model)


def _fisher_pass(model: Any, ids: torch.Tensor, n_layers: int, *, labels: str, samples: int, batch_size: int,
                 seed: int, progress: bool, desc: str, on_batch=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The Fisher pass shared by :func:`fisher_importance` and :func:`fisher_error`: per batch of windows one forward
    and ``samples`` backward passes; the squared gradients of the summed loss w.r.t. every cached K/V element are
    summed over the samples (float64, ``[batch, kv_heads, seq, head_dim]`` per layer and role) and handed, with
    the stored K/V of every layer, to ``on_batch(keys, values, grad_sq_k, grad_sq_v)`` (lists over layers). Returns
    the per-(layer, kv_head) sums of the squared gradients over everything, ``(layers, kv_heads)`` for K and V."""
    generator = torch.Generator().manual_seed(int(seed))
    sums_k: torch.Tensor | None = None
    sums_v: torch.Tensor | None = None
    batches = split_batches(ids, batch_size)
    for batch in with_progress(batches, desc=desc, total=len(batches), enabled=progress):
        leaves: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        stored: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

        def perturb(layer_idx, key, value, leaves=leaves, stored=stored):
            dk = torch.zeros_like(key, requires_grad=True)
            dv = torch.zeros_like(value, requires_grad=True)
            leaves[layer_idx] = (dk, dv)
            stored[layer_idx] = (key.detach(), value.detach())
            return key + dk, value + dv

        cache = TransformCache(perturb, n_layers)
        with torch.enable_grad():
            logits = forward(model, cache, batch.to(model.device)).logits[:, :-1].float()
            logp = torch.log_softmax(logits, dim=-1)
            if len(leaves) != n_layers:
                raise ValueError(f"the model updated {len(leaves)} of its {n_layers} cache layers; the Fisher "
                                 f"estimator needs every layer to go through the cache")
            inputs = [t for i in range(n_layers) for t in leaves[i]]
            squares: list[torch.Tensor] | None = None
            for s in range(samples):
                if labels == "model":
                    probs = logp.detach().exp().reshape(-1, logp.shape[-1]).cpu()
                    target = torch.multinomial(probs, 1, generator=generator).reshape(logp.shape[:-1])
                else:
                    target = batch[:, 1:]
                loss = -logp.gather(-1, target.to(logp.device)[..., None]).sum()
                grads = torch.autograd.grad(loss, inputs, retain_graph=s + 1 < samples)
                # squares summed in float64 (a bfloat16 model's gradients would lose digits in the sum)
                sq = [g.double().pow(2) for g in grads]
                squares = sq if squares is None else [a + b for a, b in zip(squares, sq)]
        gk = torch.stack([squares[2 * i].sum(dim=(0, 2, 3)) for i in range(n_layers)]).cpu()
        gv = torch.stack([squares[2 * i + 1].sum(dim=(0, 2, 3)) for i in range(n_layers)]).cpu()
        sums_k = gk if sums_k is None else sums_k + gk
        sums_v = gv if sums_v is None else sums_v + gv
        if on_batch is not None:
            on_batch([stored[i][0] for i in range(n_layers)], [stored[i][1] for i in range(n_layers)],
                     squares[0::2], squares[1::2])
    return sums_k, sums_v


def _fisher_scale(ids: torch.Tensor, samples: int) -> float:
    """``1 / (2 n W S)``: ``n`` predicted positions per window, ``W`` windows, ``S`` label draws."""
    return 1.0 / (2.0 * (ids.shape[1] - 1) * ids.shape[0] * samples)


def _head_fisher(sums_k: torch.Tensor, sums_v: torch.Tensor, ids: torch.Tensor, labels: str, samples: int,
                 seed: int) -> HeadImportance:
    scale = _fisher_scale(ids, samples)
    n_pred = ids.shape[1] - 1
    return HeadImportance(key=(sums_k * scale).numpy(), value=(sums_v * scale).numpy(), method="fisher",
                          units="nats per token per unit per-element MSE (mean KL to the full model ~= sum w * D)",
                          windows=int(ids.shape[0]), tokens=int(ids.shape[0] * n_pred),
                          meta={"labels": labels, "samples": samples, "seed": seed, "length": int(ids.shape[1])})


# ---- distortion in the loss's units, per quantizer ---------------------------------------------------------------
ERROR_CHUNK_ELEMENTS = 1 << 20
"""Elements (widths x layers x batch x heads x tokens x channels) of one batched error-table call in
:func:`fisher_error`: small models' layers are stacked up to it (fewer Python calls), larger ones go one layer at
a time (all widths still together): on SmolLM2-135M's 512-token windows one layer per call took half the CPU time
of five, the float64 temporaries then staying within the CPU caches' reach (~8 MiB each)."""

def fake_quantize_widths(x: torch.Tensor, quantizer: Any, bits: Sequence[int], role: str) -> torch.Tensor:
    r"""``x`` (``[..., kv_heads, seq, head_dim]``) quantized and dequantized at every width of ``bits`` at once:
    ``[len(bits), *x.shape]`` in ``x``'s dtype, slice ``j`` equal bit for bit to
    ``fake_quantize_uniform(x, quantizer, bits[j], role)``.

    The steps that do not depend on the width run once: the range check, the quantizer's ``transform`` (QuaRot's
    Hadamard rotation), the group view and the group extremes; the per-width scale and the codes are one broadcast
    over a leading width axis (``Quantizer.fit``/``encode``/``decode`` take an array of widths), and the inverse
    transform runs once on the stacked reconstructions. Every element sees the same floating-point operations as in
    the width-by-width call (the Hadamard transform's subnormal flush is a no-op wherever it is skipped), hence the
    bitwise equality. Widths must be quantized ones, ``quantizer.min_bits..max_bits`` (0 and 16 are not quantized).
    """
    from rdalloc.quantizers import check_role, compute_dtype, from_groups, get_quantizer, padding_mask, to_groups

    q = get_quantizer(quantizer)
    check_role(role)
    widths = [int(b) for b in bits]
    if not widths or any(not q.min_bits <= b <= q.max_bits for b in widths):
        raise ValueError(f"bits must be a non-empty list of quantized widths in {q.min_bits}..{q.max_bits} for "
                         f"quantizer {q.name!r}, got {list(bits)!r}")
    if not isinstance(x, torch.Tensor) or x.ndim < 3:
        raise ValueError(f"x must be a torch tensor shaped [..., kv_heads, seq, head_dim], got "
                         f"{type(x).__name__} of shape {tuple(getattr(x, 'shape', ()))}")
    q.check_range(x, "x")
    *_, tokens, head_dim = x.shape
    grouping = q.grouping(role, head_dim)
    valid = padding_mask(grouping, tokens, head_dim)
    if valid is not None:
        valid = torch.as_tensor(valid, device=x.device)
    xg = to_groups(q.transform(x.to(compute_dtype(torch, x)), role), grouping)        # [..., H, P, Q, g]
    b = torch.tensor(widths, dtype=torch.int64, device=x.device).reshape(-1, *([1] * xg.ndim))
    params = q.fit(xg, b, valid)                                                       # [len(bits), ..., 1] each
    xh = q.decode(q.encode(xg, params, b), params, b)                                  # [len(bits), ..., g]
    out = q.inverse_transform(from_groups(xh, grouping, tokens, head_dim), role)
    return out.to(x.dtype)


def fisher_weighted_error(grad_sq: torch.Tensor, x: torch.Tensor, quantizer: Any, bits: Sequence[int],
                          role: str) -> torch.Tensor:
    r"""``sum_{e in h} G_e (Q_b(x)_e - x_e)^2`` per kv head and width: ``[..., kv_heads, len(bits)]`` float64.

    ``x`` is a cached K (``role="key"``) or V, ``[batch, kv_heads, seq, head_dim]`` (one layer) or with more leading
    axes (``[layers, batch, ...]``: one result row per leading index), quantized uniformly at each width ``b`` by
    ``quantizer`` and dequantized (:func:`fake_quantize_widths`, every width in one batched computation, bitwise
    equal to :func:`rdalloc.quantizers.fake_quantize_uniform` in ``x``'s dtype as the simulated cache does);
    ``grad_sq`` (same shape) is the per-element weight ``G_e``, e.g. squared gradients of the loss. Sums run over
    the batch, tokens and channels of each head, in float64.
    """
    from rdalloc.quantizers import check_role, get_quantizer

    q = get_quantizer(quantizer)
    check_role(role)
    if grad_sq.shape != x.shape or x.ndim < 4:
        raise ValueError(f"grad_sq and x must both be [..., batch, kv_heads, seq, head_dim] (the same shape), got "
                         f"shapes {tuple(grad_sq.shape)} and {tuple(x.shape)}")
    rec = fake_quantize_widths(x, q, bits, role)                                       # [len(bits), *x.shape]
    err = (rec.double() - x.double()).pow_(2).mul_(grad_sq.double())
    n = x.ndim                                                                         # sum batch, seq, head_dim
    out = err.sum(dim=(n - 3, n - 1, n))                                               # [len(bits), ..., kv_heads]
    return out.movedim(0, -1)


@dataclass(frozen=True)
class FisherError:
    r"""Per-quantizer distortion in the loss's units: ``D_h(b) = sum_{e in h} F_e err_e(b)^2``, nats per token.

    ``tables[quantizer][role]`` is ``(layers, kv_heads, len(bits))`` float64: for head ``h`` (its cached K or V) and
    width ``b``, the Fisher diagonal ``F_e`` of every element times the squared error that quantizer leaves on that
    element at ``b`` bits (the whole cache quantized uniformly), summed over the head, averaged over windows: to
    second order the mean KL per token of the model with that head alone at ``b`` bits. ``windows``, ``tokens`` and
    ``meta`` (the Fisher pass's options) say what it averaged over.
    """

    tables: dict
    bits: tuple[int, ...]
    windows: int
    tokens: int
    meta: dict

    def __post_init__(self):
        tables = {}
        for q, roles in self.tables.items():
            tables[q] = {}
            for role in ("key", "value"):
                a = np.array(roles[role], dtype=np.float64)
                if a.ndim != 3 or a.shape[-1] != len(self.bits):
                    raise ValueError(f"tables[{q!r}][{role!r}] must be (layers, kv_heads, {len(self.bits)}), got "
                                     f"shape {a.shape}")
                a.setflags(write=False)
                tables[q][role] = a
        object.__setattr__(self, "tables", tables)
        object.__setattr__(self, "bits", tuple(int(b) for b in self.bits))
        object.__setattr__(self, "meta", dict(self.meta))

    def table(self, quantizer: str, role: str) -> np.ndarray:
        """``(layers * kv_heads, len(bits))``: the heads of ``role`` in C order (a fit's items)."""
        if quantizer not in self.tables:
            raise ValueError(f"quantizer {quantizer!r} has no Fisher-weighted error table (it has "
                             f"{list(self.tables)})")
        if role not in ("key", "value"):
            raise ValueError(f"role must be 'key' or 'value', got {role!r}")
        t = self.tables[quantizer][role]
        return t.reshape(-1, t.shape[-1])

    def to_dict(self) -> dict:
        return {"tables": {q: {r: a.tolist() for r, a in roles.items()} for q, roles in self.tables.items()},
                "bits": list(self.bits), "windows": self.windows, "tokens": self.tokens, "meta": dict(self.meta),
                "units": "nats per token (mean KL to the full model, second order)"}

    @classmethod
    def from_dict(cls, d: dict) -> FisherError:
        try:
            return cls(tables=d["tables"], bits=tuple(d["bits"]), windows=int(d["windows"]), tokens=int(d["tokens"]),
                       meta=d.get("meta") or {})
        except (KeyError, TypeError) as e:
            raise ValueError(f"corrupted Fisher-weighted error table: missing or malformed field {e}") from None


def fisher_error(model: Any, windows: Any, quantizers: Sequence[Any], bits: Sequence[int] = tuple(range(1, 9)), *,
                 labels: str = "model", samples: int = 1, batch_size: int = 1, seed: int = 0,
                 progress: bool = True) -> tuple[HeadImportance, FisherError]:
    r"""Head Fisher weights and every quantizer's distortion in the loss's units, from one Fisher pass.

    :func:`fisher_importance` weights a head's **mean** per-element MSE by the head's summed Fisher diagonal,
    ``w_h D_h = (1/(2n)) (sum_e F_e) (1/N_h) sum_e err_e^2``: exact only when the quantizer's error is spread evenly
    over the head. A quantizer with groups (KIVI: keys per channel over tokens, values per token) concentrates its
    error in outlier channels and tokens, which are the ones the loss is most sensitive to. Here the product is taken
    element by element, before summing:

        D_h(b) = (1/(2n)) E_{windows}[ sum_{e in h} G_e err_e(b)^2 ],   G_e = E_y[(d sum_t l_t(y_t) / d e)^2]

    with ``G_e`` the Fisher diagonal of the window at element ``e`` (estimated as in :func:`fisher_importance`, the
    same label draws) and ``err_e(b)`` the error ``quantizer`` leaves on that element at ``b`` bits when the whole
    cache is quantized uniformly (groups are within a window, so each window is quantized on its own). Each window
    pairs its own Fisher with its own errors, so nothing is aggregated beyond the window average: to second order
    (diagonal Fisher) ``D_h(b)`` is the mean KL per token of the model with head ``h`` alone at ``b`` bits. When the
    error is uniform over a head the two estimates agree (``D_h = w_h * MSE_h``).

    Cost: :func:`fisher_importance`'s pass plus, per window, quantizer and role, the uniform fake-quantizations at
    every width as batched computations over widths and layers (:func:`fake_quantize_widths`, chunks of
    :data:`ERROR_CHUNK_ELEMENTS`); no more forward passes. Memory: each window's squared gradients and cached K/V.

    Returns ``(HeadImportance, FisherError)``; the first equals :func:`fisher_importance` with the same options.
    """
    from rdalloc.measure import measured_bits
    from rdalloc.quantizers import get_quantizer

    ids, n_layers = _fisher_iv(model, windows, labels, samples, "fisher_error")
    if isinstance(quantizers, (str, dict)) or not hasattr(quantizers, "__iter__"):
        quantizers = [quantizers]
    instances = [get_quantizer(dict(q) if isinstance(q, dict) else q) for q in quantizers]
    names = [q.name for q in instances]
    if not names or len(set(names)) != len(names):
        raise ValueError(f"quantizers must be distinct quantizers, got {names!r}")
    widths: tuple[int, ...] = ()
    for q in instances:
        widths = measured_bits(bits, q)
    if any(not 0 < b < 16 for b in widths) or list(widths) != sorted(set(widths)):
        raise ValueError(f"bits must be strictly increasing quantized widths (0 < b < 16), got {list(bits)!r}")
    config = model.config.get_text_config(decoder=True) if hasattr(model.config, "get_text_config") else model.config
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)
    for q in instances:  # e.g. a group that does not divide head_dim: refused before any forward pass
        for role in ("key", "value"):
            q.grouping(role, head_dim)
    sums: dict[str, dict[str, torch.Tensor]] = {q.name: {} for q in instances}
    spent = [0.0, 0.0]  # wall and CPU seconds in the error tables (the Fisher pass's own cost is the rest)

    def on_batch(keys, values, grad_k, grad_v):
        t0, c0 = time.perf_counter(), time.process_time()
        per_layer = keys[0].numel() * len(widths)
        step = max(1, ERROR_CHUNK_ELEMENTS // per_layer)  # layers per batched call (bounded float64 temporaries)
        with torch.no_grad():
            for q in instances:
                for role, xs, gs in (("key", keys, grad_k), ("value", values, grad_v)):
                    t = torch.cat([fisher_weighted_error(torch.stack(gs[i:i + step]), torch.stack(xs[i:i + step]),
                                                         q, widths, role)
                                   for i in range(0, len(xs), step)]).cpu()
                    sums[q.name][role] = t if role not in sums[q.name] else sums[q.name][role] + t
        spent[0] += time.perf_counter() - t0
        spent[1] += time.process_time() - c0

    sums_k, sums_v = _fisher_pass(model, ids, n_layers, labels=labels, samples=samples, batch_size=batch_size,
                                  seed=seed, progress=progress, desc="Fisher importance and error",
                                  on_batch=on_batch)
    scale = _fisher_scale(ids, samples)
    importance = _head_fisher(sums_k, sums_v, ids, labels, samples, seed)
    tables = {q: {role: (t * scale).numpy() for role, t in roles.items()} for q, roles in sums.items()}
    return importance, FisherError(tables=tables, bits=widths, windows=importance.windows, tokens=importance.tokens,
                                   meta={**importance.meta, "quantizers": {q.name: q.spec() for q in instances},
                                         "error_seconds": spent[0], "error_cpu_seconds": spent[1]})


@torch.no_grad()
def single_head_kl(model: Any, windows: Any, quantizer: Any, bits: int, *, batch_size: int = 16,
                   progress: bool = True) -> HeadImportance:
    r"""Measured damage of one head at ``bits``: ``KL_h(b) = (1/n) sum_t KL(p_t || p_t^{(h, b)})``, nats per token.

    ``p_t`` is the full-precision model's next-token distribution and ``p_t^{(h, b)}`` the same model with head
    ``h``'s cached K (resp. V) alone fake-quantized at ``bits`` by ``quantizer`` (every position, as in the simulated
    cache), every other head at full precision. Where :func:`fisher_importance` is a second-order estimate at zero
    perturbation (``w_h D_h(b)``), this is the exact effect of the perturbation the allocation would make, so it also
    sees what a large error does (a 1-bit key that scrambles a head's attention pattern) and the cross-terms of
    the noise within the head. One forward pass per head and window, ``batch_size`` heads per batched pass (the
    window repeated, each copy perturbing another head). Returns a :class:`HeadImportance` (``method="single_head_kl"``)
    whose ``key``/``value`` are ``KL_h(b)`` itself, not a weight.
    """
    from rdalloc.quantizers import fake_quantize_uniform, get_quantizer

    q = get_quantizer(quantizer)
    q.check_bits(np.asarray([bits]), "bits")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    check_attention_layers(model, "single_head_kl", softcap=False)
    ids = as_windows(windows)
    config = model.config.get_text_config(decoder=True) if hasattr(model.config, "get_text_config") else model.config
    n_layers = _num_layers(model)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    items = [(role, layer, head) for role in (0, 1) for layer in range(n_layers) for head in range(kv_heads)]
    chunks = [items[i:i + batch_size] for i in range(0, len(items), batch_size)]
    total = np.zeros(len(items))
    steps = with_progress([(w, c) for w in range(ids.shape[0]) for c in range(len(chunks))],
                          desc=f"single-head KL ({q.name}, {bits} bits)", total=ids.shape[0] * len(chunks),
                          enabled=progress)
    full = None
    for w, c in steps:
        window = ids[w:w + 1].to(model.device)
        if c == 0:
            full = torch.log_softmax(model(window).logits[0].float(), dim=-1)
        chunk = chunks[c]
        masks = torch.zeros(2, n_layers, len(chunk), kv_heads, 1, 1, dtype=torch.bool)
        for j, (role, layer, head) in enumerate(chunk):
            masks[role, layer, j, head] = True

        def perturb(layer_idx, key, value, masks=masks):
            mk, mv = masks[0, layer_idx].to(key.device), masks[1, layer_idx].to(key.device)
            if mk.any():
                key = torch.where(mk, fake_quantize_uniform(key, q, int(bits), "key"), key)
            if mv.any():
                value = torch.where(mv, fake_quantize_uniform(value, q, int(bits), "value"), value)
            return key, value

        cache = TransformCache(perturb, n_layers)
        logits = forward(model, cache, window.expand(len(chunk), -1)).logits.float()
        kl = (full.exp() * (full - torch.log_softmax(logits, dim=-1))).sum(-1).mean(-1)
        start = c * batch_size
        total[start:start + len(chunk)] += kl.double().cpu().numpy()
    kl = (total / ids.shape[0]).clip(min=0.0).reshape(2, n_layers, kv_heads)
    return HeadImportance(key=kl[0], value=kl[1], method="single_head_kl",
                          units=f"nats per token: mean KL to the full model with this head alone at {bits} bits",
                          windows=int(ids.shape[0]), tokens=int(ids.shape[0] * ids.shape[1]),
                          meta={"quantizer": q.name, "bits": int(bits), "length": int(ids.shape[1])})


# ---- attention-output sensitivity --------------------------------------------------------------------------------
class AttentionProbe(AttentionSwap):
    """Eager attention that also hands ``(module, q, k, v, probabilities, scaling)`` of every call to ``callback``."""

    mask = "eager"

    def __init__(self, model: Any, callback):
        super().__init__(model)
        self.callback = callback

    def attention(self, module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        groups = query.shape[1] // key.shape[1]
        if scaling is None:
            scaling = query.shape[-1] ** -0.5
        k = key.repeat_interleave(groups, dim=1)
        v = value.repeat_interleave(groups, dim=1)
        work = torch.promote_types(query.dtype, torch.float32)  # bf16/fp16 models: the product in float32 too
        scores = torch.matmul(query.to(work), k.to(work).transpose(2, 3)).float() * scaling
        tq, tk = scores.shape[-2:]
        if attention_mask is None:
            causal = torch.ones(tq, tk, dtype=torch.bool, device=scores.device).tril(tk - tq)
            scores = scores.masked_fill(~causal, float("-inf"))
        elif attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask[..., :tk], float("-inf"))
        else:
            scores = scores + attention_mask[..., :tk].float()
        probs = torch.softmax(scores, dim=-1)
        self.callback(module, query, key, value, probs, scaling)
        out = torch.matmul(probs.to(value.dtype), v).transpose(1, 2).contiguous()
        return out, probs


def _output_gram(module, kv_heads: int, groups: int, head_dim: int, project: bool) -> torch.Tensor:
    """``M[h, g, g'] = W_{o,q}^T W_{o,q'}`` (``[kv_heads, G, G, d, d]``) for the query heads ``q = h*G + g`` of each
    group; identity blocks on the diagonal (zero off it) when not projecting through ``o_proj``."""
    if not project:
        eye = torch.eye(head_dim, dtype=torch.float64)
        m = torch.zeros(kv_heads, groups, groups, head_dim, head_dim, dtype=torch.float64)
        m[:, torch.arange(groups), torch.arange(groups)] = eye
        return m
    o_proj = getattr(module, "o_proj", None)
    weight = getattr(o_proj, "weight", None)
    if weight is None or weight.shape[1] != kv_heads * groups * head_dim:
        raise ValueError(f"attention_importance(project=True) needs the attention module's o_proj weight shaped "
                         f"[hidden, {kv_heads * groups * head_dim}], found {type(module).__name__} without it; "
                         f"pass project=False")
    w = weight.detach().double().cpu().reshape(weight.shape[0], kv_heads, groups, head_dim)
    return torch.einsum("ohgd,ohke->hgkde", w, w)


def attention_importance(model: Any, windows: Any, *, project: bool = True, relative: bool = False,
                         batch_size: int = 1, progress: bool = True) -> HeadImportance:
    r"""Attention-output sensitivity weights: ``w * D`` = expected squared error of a layer's attention output.

    Per layer, query head ``q`` (in the group ``G(h)`` of kv head ``h``), query position ``i``: scores
    ``s_ij = c q_i . k_j`` (``c`` the attention scaling, keys and queries post-RoPE), probabilities
    ``a_ij = softmax_j(s_ij)``, head output ``o_i = sum_j a_ij v_j``, and the layer's attention output
    ``y_i = sum_q W_q o^q_i`` (``W_q`` the ``o_proj`` columns of head ``q``; ``project=False`` sets ``W_q = I`` and
    treats the query heads as separate outputs). Noise of per-element variance ``D``, independent across
    elements, is added to head ``h``'s cached V (resp. K) at every position. Write ``M_{qq'} = W_q^T W_{q'}``.

    * **Values** (exact, ``y`` is linear in V): ``dy_i = sum_j (sum_{q in G(h)} a^q_ij W_q) eps_j``, so
      ``E|dy_i|^2 = D sum_{q,q'} tr(M_{qq'}) sum_j a^q_ij a^{q'}_ij``. With one query head per kv head and
      ``project=False`` this is the familiar ``D * d * sum_j a_ij^2``: the attention-weighted energy.
    * **Keys** (first order in the noise): ``ds^q_ij = c q^q_i . eta_j`` and the softmax Jacobian
      ``J = diag(a) - a a^T`` give ``do^q_i = sum_j a^q_ij (v_j - o^q_i) ds^q_ij``; the ``ds`` of different ``j``
      are independent with ``E[ds^q_ij ds^{q'}_ij] = D c^2 (q^q_i . q^{q'}_i)``, so
      ``E|dy_i|^2 = D c^2 sum_{q,q'} (q^q_i . q^{q'}_i) sum_j a^q_ij a^{q'}_ij (v_j - o^q_i)^T M_{qq'}
      (v_j - o^{q'}_i)``: the softmax-Jacobian energy. A key matters when the query is long, the attention is
      spread over a few keys (``a_ij^2`` large but not all on one), and the values it selects differ from their average.

    The weights are these expectations divided by ``D``, averaged over query positions and windows: units of
    squared attention-block output (residual-stream units) per token. The residual stream grows with depth, so raw
    weights of late layers come out orders of magnitude larger than those of early layers although their errors
    matter no more; ``relative=True`` divides each layer's weights by the mean squared norm of the residual stream
    entering that layer (``E|h_i|^2``), giving the relative error the attention output adds to the residual stream.
    Either way the estimate is local to the layer (blind to what later layers do with the error); for weights in
    loss units use :func:`fisher_importance`.

    One forward pass per batch, with an eager attention that materializes the probabilities (``O(T^2)`` memory per
    head, float64 intermediates of ``kv_heads * G^2 * T^2`` elements); no backward.

    Returns a :class:`HeadImportance` with ``key``, ``value`` shaped ``(layers, kv_heads)``.
    """
    check_attention_layers(model, "attention_importance")
    ids = as_windows(windows)
    n_layers = _num_layers(model)
    found: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    grams: dict[int, torch.Tensor] = {}

    def callback(module, query, key, value, probs, scaling):
        layer = int(module.layer_idx)
        b, hkv, tk, d = key.shape
        g = query.shape[1] // hkv
        tq = query.shape[2]
        if layer not in grams:
            grams[layer] = _output_gram(module, hkv, g, d, project)
        m = grams[layer].to(device=probs.device)
        a = probs.double().reshape(b, hkv, g, tq, tk)
        q = query.detach().double().reshape(b, hkv, g, tq, d)
        v = value.detach().double()
        o = torch.einsum("bhgij,bhjd->bhgid", a, v)
        pair = torch.einsum("bhgij,bhkij->bhgkij", a, a)                         # a^q_ij a^q'_ij
        trm = m.diagonal(dim1=-2, dim2=-1).sum(-1)                                 # tr M_qq'
        wv = torch.einsum("hgk,bhgkij->bhi", trm, pair)                            # / D
        vm = torch.einsum("bhjd,hgkde->bhgkje", v, m)
        om = torch.einsum("bhgid,hgkde->bhgkie", o, m)
        t = torch.einsum("bhgkij,bhgkj->bhgki", pair, (vm * v[:, :, None, None]).sum(-1))   # v_j^T M v_j
        t = t - (pair * torch.einsum("bhgkje,bhkie->bhgkij", vm, o)).sum(-1)                 # v_j^T M o^q'_i
        t = t - (pair * torch.einsum("bhgkie,bhje->bhgkij", om, v)).sum(-1)                  # o^q_i^T M v_j
        t = t + (om * o[:, :, None]).sum(-1) * pair.sum(-1)                                  # o^q_i^T M o^q'_i
        qq = torch.einsum("bhgid,bhkid->bhgki", q, q)
        wk = (float(scaling) ** 2) * (qq * t).sum(dim=(2, 3))                      # / D, [b, h, i]
        found[layer] = (wk.mean(dim=-1).sum(0), wv.mean(dim=-1).sum(0))

    sums_k: torch.Tensor | None = None
    sums_v: torch.Tensor | None = None
    energy: torch.Tensor | None = None
    batches = split_batches(ids, batch_size)
    with torch.no_grad(), AttentionProbe(model, callback):
        for batch in with_progress(batches, desc="attention importance", total=len(batches), enabled=progress):
            found.clear()
            out = model(batch.to(model.device), use_cache=False, output_hidden_states=relative)
            if sorted(found) != list(range(n_layers)):
                raise ValueError(f"the attention probe saw layers {sorted(found)} of {n_layers}; this model does not "
                                 f"route every layer through transformers' AttentionInterface")
            k = torch.stack([found[i][0] for i in range(n_layers)]).cpu()
            v = torch.stack([found[i][1] for i in range(n_layers)]).cpu()
            if relative:
                e = torch.stack([out.hidden_states[i].double().pow(2).sum(-1).mean(-1).sum(0)
                                 for i in range(n_layers)]).cpu()
                energy = e if energy is None else energy + e
            sums_k = k if sums_k is None else sums_k + k
            sums_v = v if sums_v is None else sums_v + v
    n = ids.shape[0]
    if relative:  # ratio of averages: mean output error over mean residual energy, per layer
        sums_k, sums_v = sums_k / energy[:, None] * n, sums_v / energy[:, None] * n
    return HeadImportance(key=(sums_k / n).numpy(), value=(sums_v / n).numpy(), method="attention",
                          units=("relative " if relative else "")
                          + ("squared attention-block output (after o_proj) per token per unit per-element MSE"
                             if project else "squared attention head output per token per unit per-element MSE"),
                          windows=int(n), tokens=int(n * ids.shape[1]),
                          meta={"project": project, "relative": relative, "length": int(ids.shape[1])})
