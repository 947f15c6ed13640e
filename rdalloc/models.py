"""Distortion models: what an item loses when it is stored at ``b`` bits.

* :class:`ExponentialModel` — ``D_i(b) = alpha_i * beta_i**(-b)`` on the quantized range ``[lo, hi]``, plus two
  measured endpoints kept off the curve: eviction ``D_i(0) = eviction_i`` (only when given; otherwise an item cannot
  be evicted) and full precision ``D_i(16) = full_i`` (0 unless given).
* :class:`TabulatedModel` — ``D_i(b)`` measured at a menu of bit-widths, for when the exponential does not hold.

Both are data (frozen dataclasses with ``to_dict``/``from_dict``); fitting them to measurements is :mod:`rdalloc.fit`.
Arrays may come from any array-API backend; values are validated unless traced under ``jax.jit``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ._checks import SMALLEST_SIZE, check_menu, check_shape, check_values
from ._namespace import as_float64, is_traced, namespace, to_numpy
from .cost import FULL_BITS

__all__ = ["ExponentialModel", "TabulatedModel", "FULL_BITS"]


@dataclass(frozen=True)
class ExponentialModel:
    """``D_i(b) = alpha_i * beta_i**(-b)`` for ``lo <= b <= hi``; ``D_i(0) = eviction_i``; ``D_i(16) = full_i``.

    ``alpha`` has one entry per item; ``beta``, ``eviction`` and ``full`` are a scalar or one per item.
    ``0 < lo <= hi < 16`` is the quantized range the curve was fitted on. ``quantizer`` names the quantizer the model
    describes (plans remember it, so a plan is never applied with another quantizer's curve unnoticed).
    """

    alpha: Any
    beta: Any = 4.0
    eviction: Any = None
    lo: float = 1.0
    hi: float = 8.0
    full: Any = 0.0
    quantizer: str | None = None

    def __post_init__(self):
        n = self.n_items
        check_values("alpha", self.alpha, positive=True)
        check_values("alpha", self.alpha, greater=SMALLEST_SIZE, why=" (a subnormal alpha: the solvers' ratios of "
                     "alphas overflow)")
        check_shape("beta", self.beta, n)
        check_values("beta", self.beta, greater=1.0)
        if self.eviction is not None:
            check_shape("eviction", self.eviction, n)
            check_values("eviction", self.eviction, nonnegative=True)
        check_shape("full", self.full, n)
        check_values("full", self.full, nonnegative=True)
        lo, hi = float(self.lo), float(self.hi)
        if not (0 < lo <= hi < FULL_BITS):
            raise ValueError(f"the quantized range must satisfy 0 < lo <= hi < {FULL_BITS}, got lo={self.lo!r}, "
                             f"hi={self.hi!r}")

    @property
    def n_items(self) -> int:
        shape = tuple(getattr(self.alpha, "shape", np.shape(self.alpha)))
        if len(shape) != 1:
            raise ValueError(f"alpha must be a vector with one entry per item, got shape {shape}")
        return shape[0]

    @property
    def can_evict(self) -> bool:
        return self.eviction is not None

    def distortion(self, bits: Any) -> Any:
        """``alpha * beta**(-bits)`` on the curve (``bits`` broadcast against the items; endpoints not applied)."""
        xp = namespace(self.alpha, bits)
        alpha = as_float64(xp, self.alpha, name="alpha")
        beta = as_float64(xp, self.beta, name="beta")
        return alpha * xp.exp(-xp.log(beta) * as_float64(xp, bits, name="bits"))

    def table(self, menu: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """Distortion ``(N, K)`` at each menu bit-width and a mask of the feasible ones (float64 numpy).

        ``b = 0`` is feasible only with a measured ``eviction``; ``b = 16`` always, at ``full``; other widths when
        they lie in ``[lo, hi]``.
        """
        menu = check_menu(menu)
        n = self.n_items
        alpha = to_numpy(self.alpha).astype(np.float64)
        beta = np.broadcast_to(to_numpy(np.asarray(self.beta) if np.isscalar(self.beta) else self.beta), (n,))
        d = np.empty((n, len(menu)))
        ok = np.zeros((n, len(menu)), dtype=bool)
        for k, b in enumerate(menu):
            if b == 0:
                ok[:, k] = self.can_evict
                d[:, k] = np.broadcast_to(to_numpy(self.eviction), (n,)) if self.can_evict else np.inf
            elif b == FULL_BITS:
                ok[:, k] = True
                full = np.asarray(self.full) if np.isscalar(self.full) else self.full
                d[:, k] = np.broadcast_to(to_numpy(full), (n,))
            elif self.lo <= b <= self.hi:
                ok[:, k] = True
                d[:, k] = alpha * beta.astype(np.float64) ** (-float(b))
            else:
                d[:, k] = np.inf
        return d, ok

    def to_dict(self) -> dict:
        def plain(x):
            return None if x is None else to_numpy(np.asarray(x) if np.isscalar(x) else x).astype(float).tolist()

        return {"kind": "exponential", "alpha": plain(self.alpha), "beta": plain(self.beta),
                "eviction": plain(self.eviction), "lo": float(self.lo), "hi": float(self.hi),
                "full": plain(self.full), "quantizer": self.quantizer}

    @classmethod
    def from_dict(cls, d: dict) -> ExponentialModel:
        if d.get("kind") != "exponential":
            raise ValueError(f"not an exponential model: kind={d.get('kind')!r}")

        def arr(x):
            return None if x is None else (float(x) if np.isscalar(x) else np.asarray(x, dtype=np.float64))

        return cls(alpha=np.asarray(d["alpha"], dtype=np.float64), beta=arr(d["beta"]), eviction=arr(d.get("eviction")),
                   lo=d.get("lo", 1.0), hi=d.get("hi", 8.0), full=arr(d.get("full", 0.0)),
                   quantizer=d.get("quantizer"))


@dataclass(frozen=True)
class TabulatedModel:
    """``D_i(bits[k]) = distortion[i, k]``, measured; ``allowed[i, k]`` false marks a width item ``i`` cannot take.

    ``bits`` is a strictly increasing menu in ``[0, 16]``; 0 means eviction and 16 full precision.
    """

    bits: tuple[int, ...]
    distortion: Any
    allowed: Any = None
    quantizer: str | None = None

    def __post_init__(self):
        object.__setattr__(self, "bits", check_menu(self.bits, "bits"))
        shape = tuple(getattr(self.distortion, "shape", np.shape(self.distortion)))
        if len(shape) != 2 or shape[1] != len(self.bits):
            raise ValueError(f"distortion must have shape (items, {len(self.bits)}) to match bits={list(self.bits)}, "
                             f"got shape {shape}")
        ok = self.allowed_mask
        if is_traced(self.distortion) or is_traced(ok):  # under jax.jit: shapes checked, values cannot be inspected
            return
        d = np.asarray(to_numpy(self.distortion), dtype=np.float64)
        check_values("distortion", np.where(ok, d, 0.0), nonnegative=True)
        if not ok.any(axis=1).all():
            i = int(np.argmin(ok.any(axis=1)))
            raise ValueError(f"allowed leaves item {i} with no feasible bit-width")

    @property
    def n_items(self) -> int:
        return int(np.shape(self.distortion)[0])

    @property
    def allowed_mask(self) -> Any:
        """``(items, len(bits))`` booleans: numpy, or the traced array itself under ``jax.jit``."""
        shape = (self.n_items, len(self.bits))
        if self.allowed is None:
            return np.ones(shape, dtype=bool)
        a = self.allowed if hasattr(self.allowed, "dtype") else np.asarray(self.allowed)
        got, dtype = tuple(a.shape), str(a.dtype)
        if got != shape or not dtype.removeprefix("torch.").startswith("bool"):
            raise ValueError(f"allowed must be a boolean array of shape {shape}, got {dtype} {got}")
        return a if is_traced(a) else np.asarray(to_numpy(a))

    def table(self, menu: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Distortion ``(N, K)`` and feasibility mask at ``menu`` (a subset of ``bits``; all of them by default)."""
        menu = self.bits if menu is None else check_menu(menu)
        missing = sorted(set(menu) - set(self.bits))
        if missing:
            raise ValueError(f"menu {list(menu)} asks for bit-widths {missing} that the table does not hold "
                             f"(it has {list(self.bits)})")
        cols = [self.bits.index(b) for b in menu]
        d = np.asarray(to_numpy(self.distortion), dtype=np.float64)[:, cols]
        ok = self.allowed_mask[:, cols]
        return np.where(ok, d, np.inf), ok

    def to_dict(self) -> dict:
        return {"kind": "tabulated", "bits": list(self.bits),
                "distortion": np.asarray(to_numpy(self.distortion), dtype=np.float64).tolist(),
                "allowed": None if self.allowed is None else self.allowed_mask.tolist(), "quantizer": self.quantizer}

    @classmethod
    def from_dict(cls, d: dict) -> TabulatedModel:
        if d.get("kind") != "tabulated":
            raise ValueError(f"not a tabulated model: kind={d.get('kind')!r}")
        allowed = d.get("allowed")
        return cls(bits=tuple(d["bits"]), distortion=np.asarray(d["distortion"], dtype=np.float64),
                   allowed=None if allowed is None else np.asarray(allowed, dtype=bool), quantizer=d.get("quantizer"))


def model_from_dict(d: dict):
    """An :class:`ExponentialModel` or :class:`TabulatedModel` from its ``to_dict`` form."""
    kinds = {"exponential": ExponentialModel, "tabulated": TabulatedModel}
    if not isinstance(d, dict) or d.get("kind") not in kinds:
        got = d.get("kind") if isinstance(d, dict) else d
        raise ValueError(f"a model dict needs kind in {sorted(kinds)}, got {got!r}")
    return kinds[d["kind"]].from_dict(d)
