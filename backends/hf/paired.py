"""Paired comparison of two evaluations on the same tokens: mean difference, a block-bootstrap confidence interval
and a verdict (numpy only).

Given per-token losses ``a`` and ``b`` (lower is better: NLL, KL to the reference) on the same ``[windows, tokens]``
positions, ``d = a - b`` and the estimate is its token-weighted mean. Neighbouring tokens are not independent (a
quantized head that hurts one token tends to hurt its neighbours, and a window of hard text is hard for both rows), so
an i.i.d. bootstrap over tokens gives intervals that are too narrow. The interval resamples **units** of tokens with
replacement and recomputes the mean (sum of the drawn units' sums over their token count; percentile interval):

* whole windows when there are at least ``min_windows`` of them (default 20): dependence within a window is then
  kept entirely;
* otherwise non-overlapping blocks of ``block`` consecutive tokens inside each window (the last block of a window may
  be shorter; blocks never straddle two windows). Default ``block = 32``: about twice the ``n**(1/3)`` rule of thumb
  (Hall, Horowitz & Jing 1995: ~15 for the demo's ~3000 tokens), on the long side because a block too short
  understates the variance (too narrow an interval, false verdicts) while one too long only costs precision; 32 still
  leaves ~100 blocks for 6 windows of 512 tokens. With few windows, dependence across a whole window (text that is
  hard for one plan throughout) is not captured: verdicts hold for text like the windows evaluated.

Verdict at ``level``: ``better`` if the whole interval lies below 0 (``a`` has lower loss), ``worse`` if above,
``undecided`` otherwise (so identical rows, ``d = 0``, are always undecided).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

__all__ = ["DEFAULT_BLOCK", "MIN_WINDOWS", "VERDICTS", "PairedComparison", "paired_comparison"]

VERDICTS = ("better", "worse", "undecided")
DEFAULT_BLOCK = 32
"""Tokens per resampled block when there are too few windows to resample whole windows."""
MIN_WINDOWS = 20
"""From this many windows on, whole windows are resampled."""
_CHUNK = 1 << 22  # indices drawn at a time (bounds memory)


@dataclass(frozen=True)
class PairedComparison:
    """``difference``: mean of ``a - b`` per token; ``[low, high]``: its bootstrap interval at ``level``;
    ``verdict``: one of :data:`VERDICTS` for ``a`` against ``b``; ``tokens``: positions compared; ``unit``:
    ``"window"`` or ``"block"`` with ``block`` tokens per unit and ``units`` units; ``resamples``, ``seed``."""

    difference: float
    low: float
    high: float
    level: float
    verdict: str
    tokens: int
    unit: str
    block: int
    units: int
    resamples: int
    seed: int

    def to_dict(self) -> dict:
        return asdict(self)


def _as_tokens(name: str, x: Any) -> np.ndarray:
    v = np.asarray(x, dtype=np.float64)
    if v.ndim == 1:
        v = v[None]
    if v.ndim != 2 or v.size == 0:
        raise ValueError(f"{name} must be per-token values shaped [tokens] or [windows, tokens], got shape "
                         f"{np.shape(x)}")
    bad = ~np.isfinite(v)
    if bad.any():
        w, t = (int(i) for i in np.argwhere(bad)[0])
        raise ValueError(f"{name} must be finite, got {float(v[w, t])!r} at window {w}, token {t}")
    return v


def _check_args(level: Any, block: Any, resamples: Any, seed: Any, min_windows: Any) -> None:
    if isinstance(level, bool) or not isinstance(level, (int, float)) or not 0.0 < level < 1.0:
        raise ValueError(f"level must be a probability strictly between 0 and 1, got {level!r}")
    for name, value, least in (("block", block, 1), ("resamples", resamples, 100), ("min_windows", min_windows, 2)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < least:
            raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")


def _units(d: np.ndarray, block: int, min_windows: int) -> tuple[str, int, np.ndarray, np.ndarray]:
    """Resampling units of ``d`` (``[windows, tokens]``): kind, tokens per unit, each unit's sum and token count."""
    windows, length = d.shape
    if windows >= min_windows or block >= length:
        return "window", length, d.sum(1), np.full(windows, length, dtype=np.float64)
    starts = np.arange(0, length, block)
    sums = np.add.reduceat(d, starts, axis=1).ravel()
    counts = np.tile(np.diff(np.append(starts, length)).astype(np.float64), windows)
    return "block", block, sums, counts


def paired_comparison(a: Any, b: Any, *, level: float = 0.95, block: int = DEFAULT_BLOCK, resamples: int = 2000,
                      seed: int = 0, min_windows: int = MIN_WINDOWS) -> PairedComparison:
    """Mean per-token difference ``a - b`` (lower is better), its block-bootstrap interval and the verdict.

    Args:
      a, b: per-token losses on the same positions, ``[tokens]`` (one window) or ``[windows, tokens]``, finite.
      level: coverage of the percentile interval; block: tokens per block when blocks are resampled;
      resamples: bootstrap replicates (>= 100); seed: of the generator (same seed, same interval);
      min_windows: resample whole windows from this many windows on.
    """
    _check_args(level, block, resamples, seed, min_windows)
    av, bv = _as_tokens("a", a), _as_tokens("b", b)
    if av.shape != bv.shape:
        raise ValueError(f"a and b must be values on the same tokens, got shapes {av.shape} and {bv.shape}")
    d = av - bv
    unit, size, sums, counts = _units(d, int(block), int(min_windows))
    n = sums.size
    rng = np.random.default_rng(int(seed))
    means = np.empty(int(resamples))
    step = max(1, _CHUNK // n)
    for start in range(0, int(resamples), step):
        idx = rng.integers(0, n, size=(min(step, int(resamples) - start), n))
        means[start:start + idx.shape[0]] = sums[idx].sum(1) / counts[idx].sum(1)
    low, high = (float(x) for x in np.quantile(means, [(1 - level) / 2, (1 + level) / 2]))
    verdict = "better" if high < 0 else "worse" if low > 0 else "undecided"
    return PairedComparison(difference=float(d.sum() / d.size), low=low, high=high, level=float(level),
                            verdict=verdict, tokens=int(d.size), unit=unit, block=int(size), units=int(n),
                            resamples=int(resamples), seed=int(seed))
