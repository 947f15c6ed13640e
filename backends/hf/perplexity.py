"""Perplexity of a model over evaluation windows, each window run with a fresh cache from a factory.

With ``cache_factory=None`` the windows run with a plain ``DynamicCache`` (the full-precision reference); with a
factory making :class:`~rdalloc.backends.hf.cache.TransformCache` objects they run with fake-quantized K/V for every
position (docs/design.md §5). Within a window of ``T`` tokens the ``T - 1`` tokens after the first are scored; the mean
NLL is token-weighted over all windows (summed in float64) and ``ppl = exp(nll)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .compat import forward
from .windows import as_windows, with_progress

__all__ = ["PerplexityResult", "perplexity"]


@dataclass(frozen=True)
class PerplexityResult:
    """``nll``: mean negative log-likelihood per scored token (nats); ``ppl = exp(nll)``; ``tokens``: scored
    tokens; ``windows``: windows run; ``window_nll``: mean NLL of each window."""

    nll: float
    ppl: float
    tokens: int
    windows: int
    window_nll: tuple[float, ...]

    def to_dict(self) -> dict:
        return {"nll": self.nll, "ppl": self.ppl, "tokens": self.tokens, "windows": self.windows,
                "window_nll": list(self.window_nll)}

    @classmethod
    def from_dict(cls, d: dict) -> PerplexityResult:
        try:
            return cls(nll=float(d["nll"]), ppl=float(d["ppl"]), tokens=int(d["tokens"]), windows=int(d["windows"]),
                       window_nll=tuple(float(x) for x in d["window_nll"]))
        except (KeyError, TypeError) as e:
            raise ValueError(f"corrupted perplexity result: missing or malformed field {e}") from None


@torch.no_grad()
def perplexity(model: Any, windows: Any, cache_factory: Callable[[], Any] | None = None, *, progress: bool = True,
               desc: str = "perplexity") -> PerplexityResult:
    """Mean NLL and perplexity of ``model`` over ``windows`` (``[count, length]`` token ids).

    Args:
      cache_factory: zero-argument callable returning a fresh ``transformers.Cache`` for each window (e.g.
        :func:`~rdalloc.backends.hf.cache.cache_factory`); ``None`` runs a plain ``DynamicCache``.
      progress: show a progress bar over windows; desc: its label.
    """
    from transformers import DynamicCache

    ids = as_windows(windows)
    if cache_factory is not None and not callable(cache_factory):
        raise TypeError(f"cache_factory must be a zero-argument callable returning a Cache, got "
                        f"{type(cache_factory).__name__}")
    total = 0.0
    per_window = []
    for row in with_progress(ids, desc=desc, total=ids.shape[0], enabled=progress):
        cache = DynamicCache(config=model.config) if cache_factory is None else cache_factory()
        batch = row[None].to(model.device)
        logits = forward(model, cache, batch).logits[0, :-1]
        logp = torch.log_softmax(logits.double(), dim=-1)
        nll = -logp.gather(-1, batch[0, 1:, None]).sum().item()
        total += nll
        per_window.append(nll / (ids.shape[1] - 1))
    tokens = int(ids.shape[0] * (ids.shape[1] - 1))
    mean = total / tokens
    return PerplexityResult(nll=mean, ppl=math.exp(mean), tokens=tokens, windows=int(ids.shape[0]),
                            window_nll=tuple(per_window))
