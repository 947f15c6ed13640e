"""Perplexity and KL to the full-precision model over evaluation windows, each window run with a fresh cache.

With ``cache_factory=None`` the windows run with a plain ``DynamicCache`` (the full-precision reference); with a
factory making :class:`~rdalloc.backends.hf.cache.TransformCache` objects they run with fake-quantized K/V for every
position (docs/design.md §5). Within a window of ``T`` tokens the ``T - 1`` tokens after the first are scored; the mean
NLL is token-weighted over all windows (summed in float64) and ``ppl = exp(nll)``.

Given a :class:`ReferenceLogProbs` (the plain model's log-probabilities on the same windows, from
:func:`reference_logprobs`), each scored position ``t`` also gets ``KL_t = sum_v p_t(v) (log p_t(v) - log q_t(v))``,
``p`` the reference's next-token distribution and ``q`` the evaluated cache's: the damage the cache does to the whole
distribution, not only to the probability of the token that happened to follow. The reference stores the **full**
log-probabilities in float32 (``(T - 1) * vocab * 4`` bytes per window: 100 MB for a 512-token window of a 49k-token
vocabulary), computed once and reused for every row of a grid; both sides are rounded to float32 before the difference
and summed in float64, so an unchanged cache gives ``KL = 0`` exactly and a token's KL can fall below zero only by
float32 rounding (~1e-7).

The per-token NLL and KL (float32, ``[windows, T - 1]``) stay on the result, so that two results on the same windows
can be compared token by token (:mod:`rdalloc.backends.hf.paired`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .compat import forward
from .windows import as_windows, with_progress

__all__ = ["PerplexityResult", "ReferenceLogProbs", "perplexity", "reference_logprobs"]


@dataclass(frozen=True)
class PerplexityResult:
    """``nll``: mean negative log-likelihood per scored token (nats); ``ppl = exp(nll)``; ``tokens``: scored
    tokens; ``windows``: windows run; ``window_nll``: mean NLL of each window.

    Against a reference (else ``None``): ``kl``: mean KL(reference || cache) per scored token (nats), ``window_kl``
    per window. ``token_nll`` / ``token_kl``: float32 ``[windows, T - 1]`` per-token values (not in the JSON form
    unless asked; ``token_kl`` only against a reference)."""

    nll: float
    ppl: float
    tokens: int
    windows: int
    window_nll: tuple[float, ...]
    kl: float | None = None
    window_kl: tuple[float, ...] | None = None
    token_nll: np.ndarray | None = field(default=None, repr=False, compare=False)
    token_kl: np.ndarray | None = field(default=None, repr=False, compare=False)

    def to_dict(self, per_token: bool = False) -> dict:
        """JSON-ready dict; ``kl``/``window_kl`` when measured, the per-token arrays only with ``per_token``."""
        d = {"nll": self.nll, "ppl": self.ppl, "tokens": self.tokens, "windows": self.windows,
             "window_nll": list(self.window_nll)}
        if self.kl is not None:
            d["kl"] = self.kl
            d["window_kl"] = list(self.window_kl)
        if per_token:
            for name in ("token_nll", "token_kl"):
                arr = getattr(self, name)
                if arr is not None:
                    d[name] = arr.tolist()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> PerplexityResult:
        """Inverse of :meth:`to_dict`; results saved before KL was measured (no ``kl`` etc.) load with ``None``."""
        try:
            optional = {}
            if d.get("kl") is not None:
                optional["kl"] = float(d["kl"])
                optional["window_kl"] = tuple(float(x) for x in d["window_kl"])
            for name in ("token_nll", "token_kl"):
                if d.get(name) is not None:
                    optional[name] = np.asarray(d[name], dtype=np.float32)
            return cls(nll=float(d["nll"]), ppl=float(d["ppl"]), tokens=int(d["tokens"]), windows=int(d["windows"]),
                       window_nll=tuple(float(x) for x in d["window_nll"]), **optional)
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"corrupted perplexity result: missing or malformed field {e}") from None


@dataclass(frozen=True)
class ReferenceLogProbs:
    """The plain model's float32 log-probabilities ``[T - 1, vocab]`` per window (``logprobs``), the windows they
    were computed on (``ids``) and the plain model's own :class:`PerplexityResult` (``result``, with ``kl = 0``)."""

    ids: torch.Tensor = field(repr=False)
    logprobs: tuple[torch.Tensor, ...] = field(repr=False)
    result: PerplexityResult

    @property
    def nbytes(self) -> int:
        """Memory held by the stored log-probabilities."""
        return sum(x.numel() * x.element_size() for x in self.logprobs)


def _window_logprobs(model: Any, cache: Any, row: torch.Tensor) -> torch.Tensor:
    """float64 next-token log-probabilities ``[T - 1, vocab]`` of one window."""
    logits = forward(model, cache, row[None].to(model.device)).logits[0, :-1]
    return torch.log_softmax(logits.double(), dim=-1).cpu()


def _token_kl(ref: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """``sum_v p (log p - log q)`` per position, both log-probs rounded to float32, summed in float64."""
    ref64 = ref.double()
    return (ref64.exp() * (ref64 - logq.float().double())).sum(-1)


def _summary(token_nll: list[torch.Tensor], token_kl: list[torch.Tensor] | None) -> PerplexityResult:
    nll = torch.stack(token_nll)  # float64 [windows, T - 1]
    tokens = int(nll.numel())
    mean = float(nll.sum().item()) / tokens
    kl = None if token_kl is None else torch.stack(token_kl)
    return PerplexityResult(nll=mean, ppl=math.exp(mean), tokens=tokens, windows=int(nll.shape[0]),
                            window_nll=tuple(float(x) for x in nll.mean(1)),
                            kl=None if kl is None else float(kl.sum().item()) / tokens,
                            window_kl=None if kl is None else tuple(float(x) for x in kl.mean(1)),
                            token_nll=nll.numpy().astype(np.float32),
                            token_kl=None if kl is None else kl.numpy().astype(np.float32))


@torch.no_grad()
def reference_logprobs(model: Any, windows: Any, *, progress: bool = True,
                       desc: str = "reference") -> ReferenceLogProbs:
    """Run ``model`` with a plain ``DynamicCache`` over ``windows`` (``[count, length]`` token ids) once and keep its
    float32 log-probabilities for :func:`perplexity`'s KL (memory: :attr:`ReferenceLogProbs.nbytes`)."""
    from transformers import DynamicCache

    ids = as_windows(windows)
    logprobs, token_nll, token_kl = [], [], []
    for row in with_progress(ids, desc=desc, total=ids.shape[0], enabled=progress):
        logp = _window_logprobs(model, DynamicCache(config=model.config), row)
        token_nll.append(-logp.gather(-1, row[1:, None]).squeeze(-1))
        ref = logp.float()
        token_kl.append(_token_kl(ref, logp))  # zeros, by construction of the rounding
        logprobs.append(ref)
    return ReferenceLogProbs(ids=ids.clone(), logprobs=tuple(logprobs), result=_summary(token_nll, token_kl))


@torch.no_grad()
def perplexity(model: Any, windows: Any, cache_factory: Callable[[], Any] | None = None, *,
               reference: ReferenceLogProbs | None = None, progress: bool = True,
               desc: str = "perplexity") -> PerplexityResult:
    """Mean NLL and perplexity of ``model`` over ``windows`` (``[count, length]`` token ids), with the per-token NLL;
    with ``reference`` also the KL to it per token.

    Args:
      cache_factory: zero-argument callable returning a fresh ``transformers.Cache`` for each window (e.g.
        :func:`~rdalloc.backends.hf.cache.cache_factory`); ``None`` runs a plain ``DynamicCache``.
      reference: :func:`reference_logprobs` of the plain model on the same ``windows`` (``ValueError`` if its
        windows differ).
      progress: show a progress bar over windows; desc: its label.
    """
    from transformers import DynamicCache

    ids = as_windows(windows)
    if cache_factory is not None and not callable(cache_factory):
        raise TypeError(f"cache_factory must be a zero-argument callable returning a Cache, got "
                        f"{type(cache_factory).__name__}")
    if reference is not None:
        if not isinstance(reference, ReferenceLogProbs):
            raise TypeError(f"reference must be a ReferenceLogProbs from reference_logprobs(), got "
                            f"{type(reference).__name__}")
        if reference.ids.shape != ids.shape or not torch.equal(reference.ids, ids):
            raise ValueError(f"reference was computed on other windows (shape {tuple(reference.ids.shape)}) than "
                             f"the windows given (shape {tuple(ids.shape)})")
    token_nll, token_kl = [], []
    for i, row in enumerate(with_progress(ids, desc=desc, total=ids.shape[0], enabled=progress)):
        cache = DynamicCache(config=model.config) if cache_factory is None else cache_factory()
        logp = _window_logprobs(model, cache, row)
        token_nll.append(-logp.gather(-1, row[1:, None]).squeeze(-1))
        if reference is not None:
            token_kl.append(_token_kl(reference.logprobs[i], logp))
    return _summary(token_nll, token_kl if reference is not None else None)
