"""Joint compression after prefill in one call: ``with compress_after_prefill(model, retention=0.1): generate``.

Inside the block, a forward of the model on an empty cache is a **prefill**. While it runs, every layer's attention
is the model's own, and for each sequence of the batch the last ``observe`` queries, their attention probabilities
and outputs over the sequence's own tokens are recorded (:func:`.compress.observe_row`). When the forward returns,
for each sequence: the weights (:func:`.compress.token_weights`, optionally in the loss's units by
:func:`.compress.scale_heads`), one token plan under the budget (:func:`.joint.allocate_joint`, or
:func:`.joint.allocate_joint_shared` for a budget shared by the batch), and the cache the model was given, or made
and returned, is **compressed in place**: its layers become :class:`.compress.CompressedLayer` (one packed prefix per
sequence), so ``generate``, which holds that same cache object, decodes on from the compressed cache. Later forwards
on that cache run the per-row, per-head masked attention of :class:`.compress.JointAttention`.

This is the five-step path (``observe_prefill`` -> ``token_weights`` -> ``allocate_joint`` ->
``CompressedCache.compress`` -> ``with JointAttention(model)``) run by hooks; for one sequence it gives the same plan
and the same logits. The five steps stay for research (other weights, baselines, scoring).

**Batches.** Left padding with an ``attention_mask`` (the way ``generate`` batches): a sequence's pads are never
observed, never weighted, never stored and never charged; its tokens keep their true positions (``generate`` derives
them from the mask). Identical rows (same tokens and mask, e.g. the beams of ``num_beams`` made by ``generate``) are
one sequence: solved and packed once, their rows share the packed prefix. Beam search and sampling reorder and
select rows through the cache API (``reorder_cache``, ``batch_select_indices``, ``batch_repeat_interleave``).

**Budget.** ``retention`` (fraction of the FP16 bytes of the prefix, metadata and protected tokens included) or
``nbytes``, and ``budget="sequence"`` (the default: each sequence gets that budget of its own; a request's quality
must not depend on what it is batched with, and a sequence alone gives the same plan) or ``"shared"`` (one budget over
the whole batch, the sum of the sequences' budgets: bits go where they buy the most in the batch).

**State.** Everything a call produces lives on the object (``plans``, ``cache``, the last prefill's); nothing is kept
at module level. Leaving the block restores the model's attention implementation, removes the hooks and detaches the
caches, whatever happened inside; a prefill that fails (bad input, an exception inside ``generate``) leaves the cache
it was given as it was, and the next call inside or after the block starts afresh.

**Chunked prefill** (``generate(..., prefill_chunk_size=n)`` on a prompt longer than ``n``) is refused before
anything runs: each chunk is its own forward, so the first would be compressed as the whole prefill and the rest of
the prompt kept at full precision outside the budget. Inside the block ``model.generate`` is wrapped to check this
(restored on leaving).

Refused with a message naming the layer: sliding-window attention and soft-capped attention logits (Gemma2's
``sliding_window``, ``attn_logit_softcapping``): the masked attention of a compressed cache implements neither.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from rdalloc.quantizers import get_quantizer

from .compat import CACHE_KEYWORDS
from .compress import (
    WEIGHTINGS,
    CompressedCache,
    CompressedLayer,
    JointAttention,
    Prefill,
    _facts,
    observe_row,
    scale_heads,
    token_weights,
)
from .joint import DEFAULT_MENU, _check_context, _check_options, allocate_joint, allocate_joint_shared

__all__ = ["compress_after_prefill", "PrefillCompression", "BUDGETS"]

PROTECT = ("reserved", "allocated", "auto")
"""How the sink/window tokens are kept (:func:`.joint.allocate_joint`'s ``protect``)."""
BUDGETS = ("sequence", "shared")


def _unsupported_layers(model: Any) -> list[str]:
    """Why each attention layer of ``model`` cannot run a compressed cache (empty: all can)."""
    reasons = []
    for name, module in model.named_modules():
        if not hasattr(module, "layer_idx") or not hasattr(module, "config"):
            continue
        sliding = getattr(module, "sliding_window", None)
        if sliding:
            reasons.append(f"layer {module.layer_idx} ({name}) uses sliding-window attention (sliding_window="
                           f"{sliding})")
        cap = getattr(module, "attn_logit_softcapping", None)
        if cap:
            reasons.append(f"layer {module.layer_idx} ({name}) soft-caps its attention logits "
                           f"(attn_logit_softcapping={cap})")
    return reasons


def _prompt_length(args: tuple, kwargs: dict) -> int | None:
    """Tokens per row of the prompt handed to ``generate`` (``None`` when it cannot be told)."""
    for x in (kwargs.get("input_ids"), kwargs.get("inputs"), args[0] if args else None):
        if isinstance(x, torch.Tensor) and x.ndim >= 2:
            return int(x.shape[1])
    embeds = kwargs.get("inputs_embeds")
    return int(embeds.shape[1]) if isinstance(embeds, torch.Tensor) and embeds.ndim == 3 else None


def _refuse_chunked_prefill(model: Any, args: tuple, kwargs: dict) -> None:
    """``ValueError`` when a ``generate`` call would prefill its prompt in several chunks (module docstring)."""
    config = kwargs.get("generation_config") or getattr(model, "generation_config", None)
    chunk = kwargs.get("prefill_chunk_size", getattr(config, "prefill_chunk_size", None))
    if chunk is None:
        return
    length = _prompt_length(args, kwargs)
    if length is None or length > int(chunk):
        raise ValueError(f"generate(prefill_chunk_size={chunk}) would prefill the "
                         f"{'prompt' if length is None else f'{length}-token prompt'} in chunks: "
                         f"compress_after_prefill compresses the prefill it observes in one forward, so it would "
                         f"compress the first chunk alone and keep the rest at full precision outside the budget; "
                         f"pass prefill_chunk_size=None inside the block")


def _options_iv(model, *, retention, nbytes, budget, method, quantizer, menu, sink, window, observe, pool,
                mode, protect, importance=None) -> dict:
    """Validate the options of :func:`compress_after_prefill` (apart from the math); returns them normalised with the
    model's ``layers`` and ``head_dim``."""
    if (retention is None) == (nbytes is None):
        raise ValueError(f"give exactly one of retention= (fraction of the FP16 prefix) and nbytes=, got "
                         f"retention={retention!r}, nbytes={nbytes!r}")
    if retention is not None and (isinstance(retention, bool) or not isinstance(retention, (int, float))
                                  or not 0 < float(retention) <= 1):
        raise ValueError(f"retention must be a fraction in (0, 1], got {retention!r}")
    if nbytes is not None and (isinstance(nbytes, bool) or not isinstance(nbytes, (int, np.integer)) or nbytes <= 0):
        raise ValueError(f"nbytes must be a positive integer, got {nbytes!r}")
    if budget not in BUDGETS:
        raise ValueError(f"budget must be one of {BUDGETS}, got {budget!r}")
    if method is None:  # the measured default of each case (compress_after_prefill's docstring)
        method = "hybrid" if importance is None else "rdkv"
    if method not in WEIGHTINGS:
        raise ValueError(f"method must be one of {WEIGHTINGS} (or None: the measured default), got {method!r}")
    if mode not in ("global", "per_head"):
        raise ValueError(f"mode must be 'global' or 'per_head', got {mode!r}")
    if protect not in PROTECT:
        raise ValueError(f"protect must be one of {PROTECT}, got {protect!r}")
    if mode == "per_head" and budget == "shared":
        raise ValueError("mode='per_head' gives every head of a sequence its own budget; it cannot share one "
                         "budget over the batch (budget='shared')")
    for name, v in (("observe", observe), ("pool", pool)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    if pool % 2 == 0:
        raise ValueError(f"pool must be odd (tokens averaged around each token), got {pool!r}")
    layers, _, _, head_dim = _facts(model)
    q = get_quantizer(quantizer)
    return {"retention": retention, "nbytes": nbytes, "budget": budget, "method": method, "quantizer": q,
            "menu": _check_options(q, menu, sink, window, head_dim), "layers": layers, "head_dim": head_dim}


class PrefillCompression(JointAttention):
    """Context manager made by :func:`compress_after_prefill` (module docstring). After a prefill inside the block:
    ``plans`` (one :class:`rdalloc.Plan` per batch row; rows of one sequence share it), ``cache`` (a
    :class:`.compress.CompressedCache` view of the compressed cache: ``nbytes``, ``predicted_nbytes``,
    ``retention``), ``rows`` (batch row -> sequence index)."""

    def __init__(self, model: Any, *, retention: float | None = None, nbytes: int | None = None,
                 budget: str = "sequence", method: str | None = None, quantizer: Any = "kivi",
                 menu: Sequence[int] = DEFAULT_MENU, sink: int = 4, window: int = 8, observe: int = 32,
                 pool: int = 7, mode: str = "global", importance: Any = None, protect: str = "auto"):
        super().__init__(model)
        options = _options_iv(model, retention=retention, nbytes=nbytes, budget=budget, method=method,
                              quantizer=quantizer, menu=menu, sink=sink, window=window, observe=observe, pool=pool,
                              mode=mode, protect=protect, importance=importance)
        self.num_layers, self.head_dim = options.pop("layers"), options.pop("head_dim")
        self.retention, self.nbytes, self.budget = options["retention"], options["nbytes"], options["budget"]
        self.method, self.quantizer, self.menu = options["method"], options["quantizer"], options["menu"]
        self.sink, self.window, self.observe, self.pool = sink, window, observe, pool
        self.mode, self.importance, self.protect = mode, importance, protect
        self._prefill: dict | None = None  # the prefill in flight: pads, sequences, observations
        self.plans: list = []
        self.rows: list[int] = []
        self.cache: CompressedCache | None = None

    # ---- the hooks -----------------------------------------------------------------------------------------------
    def _given_cache(self, kwargs) -> Any:
        for keyword in CACHE_KEYWORDS:
            if kwargs.get(keyword) is not None:
                return kwargs[keyword]
        return None

    def _before(self, module, args, kwargs):
        self._prefill = None
        cache = self._given_cache(kwargs)
        if cache is not None and any(isinstance(layer, CompressedLayer) for layer in getattr(cache, "layers", [])):
            return  # decoding on a compressed cache (attached by JointAttention's hook)
        if cache is not None and cache.get_seq_length() > 0:
            raise ValueError(f"the cache given holds {cache.get_seq_length()} tokens that were not prefilled inside "
                             f"this block: compress_after_prefill compresses the prefill it sees; prefill inside the "
                             f"block")
        if kwargs.get("use_cache") is False:
            raise ValueError("use_cache=False: a prefill without a cache leaves nothing to compress")
        ids = kwargs.get("input_ids", args[0] if args else None)
        embeds = kwargs.get("inputs_embeds")
        shape = tuple(ids.shape) if ids is not None else tuple(embeds.shape[:2]) if embeds is not None else None
        if shape is None or len(shape) != 2:
            raise ValueError(f"input_ids must be [batch, tokens], got shape {shape}")
        B, C = shape
        mask = kwargs.get("attention_mask")
        if mask is None:
            mask = torch.ones(B, C, dtype=torch.long)
        if tuple(mask.shape) != (B, C):
            raise ValueError(f"attention_mask must be [batch, tokens] = {(B, C)} like the input, got "
                             f"{tuple(mask.shape)}")
        positions = kwargs.get("position_ids")
        if positions is not None and positions.shape[-1] != C:
            raise ValueError(f"position_ids (generate derives them from attention_mask) must have the input's {C} "
                             f"tokens, got shape {tuple(positions.shape)}")
        m = mask.detach().to("cpu", torch.long)
        if not torch.isin(m, torch.tensor([0, 1])).all():
            raise ValueError("attention_mask must hold 0 (pad) and 1 (token) only")
        lengths = m.sum(1)
        pads = (C - lengths).tolist()
        for b in range(B):
            if pads[b] and (m[b, :pads[b]].any() or not m[b, pads[b]:].all()):
                raise ValueError(f"attention_mask row {b} is not left-padded (pads first, then the tokens): "
                                 f"{m[b].tolist()}")
            n = int(lengths[b])
            if n <= self.observe:
                raise ValueError(f"row {b} has {n} tokens, not more than the observation window observe="
                                 f"{self.observe}: a context must be longer than the window it is scored by")
            _check_context(n, self.sink, self.window, b)
        # identical rows (same tokens, same mask: beams) are one sequence
        key = (ids if ids is not None else embeds).detach().cpu()
        sequences, rows = [], []
        for b in range(B):
            for s, first in enumerate(sequences):
                if pads[b] == pads[first] and torch.equal(key[b], key[first]):
                    rows.append(s)
                    break
            else:
                sequences.append(b)
                rows.append(len(sequences) - 1)
        self._prefill = {"pads": pads, "sequences": sequences, "rows": rows, "tokens": C, "observed": {}}

    def attention(self, module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        state = self._prefill
        if state is None:
            return super().attention(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                     **kwargs)
        out = self.original_attention(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
        if key.shape[-2] != state["tokens"]:
            raise ValueError(f"layer {module.layer_idx}: the prefill's keys hold {key.shape[-2]} tokens, the input "
                             f"{state['tokens']}")
        state["observed"][module.layer_idx] = [
            observe_row(query[b], key[b, :, p:], value[b, :, p:], self.observe, scaling)
            for b, p in ((b, state["pads"][b]) for b in state["sequences"])]
        return out

    @torch.no_grad()
    def _after(self, module, args, kwargs, output):
        state, self._prefill = self._prefill, None
        if state is None:
            return None
        cache = self._given_cache(kwargs)
        if cache is None:
            cache = next((getattr(output, k) for k in CACHE_KEYWORDS if getattr(output, k, None) is not None), None)
        L = self.num_layers
        if cache is None or len(getattr(cache, "layers", ())) != L:
            raise RuntimeError("the prefill returned no cache of every layer to compress")
        if len(state["observed"]) != L:
            raise RuntimeError(f"observed {len(state['observed'])} of {L} layers: every layer must route through "
                               f"transformers' AttentionInterface")
        sequences, pads = state["sequences"], state["pads"]
        kv, prefills = [], []
        for s, b in enumerate(sequences):
            p = pads[b]
            k = torch.stack([cache.layers[i].keys[b, :, p:] for i in range(L)])
            v = torch.stack([cache.layers[i].values[b, :, p:] for i in range(L)])
            obs = [state["observed"][i][s] for i in range(L)]
            q, pr, o = (torch.stack([x[j] for x in obs]).cpu() for j in range(3))
            prefills.append(Prefill(keys=k.float().cpu(), values=v.float().cpu(), queries=q, probs=pr, outputs=o,
                                    scaling=obs[0][3], window=self.observe))
            kv.append((k, v))
        weights = [token_weights(pre, method=self.method, pool=self.pool) for pre in prefills]
        if self.importance is not None:
            weights = [scale_heads(w, self.importance) for w in weights]
        budget = {"retention": self.retention,
                  "budget_bits": None if self.nbytes is None else 8.0 * float(self.nbytes)}
        options = {"menu": self.menu, "quantizer": self.quantizer, "sink": self.sink, "window": self.window}
        if self.budget == "shared":
            plans = allocate_joint_shared(weights, [pre.keys for pre in prefills], [pre.values for pre in prefills],
                                          protect=self.protect, **budget, **options)
        else:
            plans = [allocate_joint(w, pre.keys, pre.values, mode=self.mode, protect=self.protect, **budget,
                                    **options) for w, pre in zip(weights, prefills)]
        rows = [(k[:, None], v[:, None], plan) for (k, v), plan in zip(kv, plans)]
        compressed = CompressedCache.compress_rows(rows, self.quantizer, tokens=state["tokens"],
                                                   slots=state["rows"], layers=cache.layers)
        self.plans = [plans[s] for s in state["rows"]]
        self.rows = list(state["rows"])
        self.cache = compressed
        self.attach(compressed)
        return None

    # ---- entering and leaving ------------------------------------------------------------------------------------
    def __enter__(self):
        reasons = _unsupported_layers(self.model)
        if reasons:
            raise ValueError("compress_after_prefill cannot run this model: " + "; ".join(reasons[:4])
                             + (f" (and {len(reasons) - 4} more)" if len(reasons) > 4 else "")
                             + ": the per-head masked attention of a compressed cache has no sliding window and no "
                             "logit soft-capping")
        super().__enter__()
        try:
            self.hooks.append(self.model.register_forward_pre_hook(self._before, with_kwargs=True))
            self.hooks.append(self.model.register_forward_hook(self._after, with_kwargs=True))
            self._wrap_generate()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _wrap_generate(self) -> None:
        """``model.generate`` refuses a chunked prefill inside the block (an instance attribute, removed on leaving)."""
        model = self.model
        self._own_generate = ("generate" in vars(model), vars(model).get("generate"))
        original = model.generate

        def generate(*args, **kwargs):
            _refuse_chunked_prefill(model, args, kwargs)
            return original(*args, **kwargs)

        model.generate = generate
        self._wrapped = generate

    def _unwrap_generate(self) -> None:
        wrapped, self._wrapped = getattr(self, "_wrapped", None), None
        if wrapped is None or vars(self.model).get("generate") is not wrapped:
            return
        had, previous = self._own_generate
        if had:
            self.model.generate = previous
        else:
            del self.model.generate

    def __exit__(self, *exc) -> bool:
        try:
            self._unwrap_generate()
        finally:
            super().__exit__(*exc)
        return False

    def reset(self) -> None:
        self._prefill = None
        super().reset()


def compress_after_prefill(model: Any, *, retention: float | None = None, nbytes: int | None = None,
                           budget: str = "sequence", method: str | None = None, quantizer: Any = "kivi",
                           menu: Sequence[int] = DEFAULT_MENU, sink: int = 4, window: int = 8, observe: int = 32,
                           pool: int = 7, mode: str = "global", importance: Any = None,
                           protect: str = "auto") -> PrefillCompression:
    """``with compress_after_prefill(model, retention=0.1): out = model.generate(ids, attention_mask=mask, ...)``:
    each prefill inside the block is observed, weighted, allocated and compressed in place (module docstring).

    ``retention`` (fraction of the FP16 bytes of a sequence's prefix) or ``nbytes`` (bytes), per sequence or shared
    by the batch (``budget``: ``"sequence"``, the default, or ``"shared"``); ``method``: the weighting
    (:data:`.compress.WEIGHTINGS`); ``quantizer`` (default KIVI), ``menu`` (default ``{0, 2, 4, 8, 16}``),
    ``sink``/``window`` (the first and last tokens, never evicted), ``observe`` (queries observed), ``pool``,
    ``mode`` (``"global"`` or RDKV's ``"per_head"``), ``importance`` (a :class:`~.capture.HeadImportance`: the
    weights in the loss's units) and ``protect`` (the sink/window tokens ``"reserved"`` at 16 bits, ``"allocated"``
    at their own distortion, or ``"auto"``: whichever plan has the lower modelled distortion; per sequence or for
    the shared batch plan) as in the five-step path.

    Defaults are what was measured best on two texts with paired intervals (``experiments/results/joint_default/``,
    6 windows of 1024 tokens per text): ``protect="auto"``, ``sink=4``, ``window=8``, ``observe=32``, and
    ``method=None``, which means ``"rdkv"`` with an ``importance`` (that row was never significantly beaten by any
    row or kvpress press) and ``"hybrid"`` without one (with no head scale the hybrid had lower KL than ``"rdkv"``,
    decided, in 6 of 10 cells and higher in 1; likely because ``rdkv``'s score is attention normalized per query,
    whose total is about the same in every head, while ``mse``'s part of the hybrid carries each head's output
    error, a level the Fisher scale otherwise supplies). Pass ``method="hybrid", protect="reserved", window=32``
    for the behaviour before that measurement."""
    return PrefillCompression(model, retention=retention, nbytes=nbytes, budget=budget, method=method,
                              quantizer=quantizer, menu=menu, sink=sink, window=window, observe=observe, pool=pool,
                              mode=mode, importance=importance, protect=protect)

