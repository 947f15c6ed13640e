"""Plans: the bit-widths an allocation decided, as versioned, validated, serializable data.

A plan holds integer bits for keys and for values, each with named axes:

* **head plan** (RateQuant): ``key`` and ``value`` over ``(layer, kv_head)``;
* **token plan** (RDKV): ``value`` over ``(layer, kv_head, token)`` and ``key`` over ``(layer, kv_head, channel)``
  (or ``(layer, kv_head, token)``). A token whose value bits are 0 is evicted: its key and its value are dropped.
  With per-token key bits too, key and value zeros must coincide.

Bits are integers in ``[0, 16]``: 16 keeps the original values, 0 evicts. The plan remembers the quantizer its
distortion model was fitted for, the budget asked and spent (payload and metadata separately), the predicted
distortion and the solver's certificate. JSON round trip via ``to_dict``/``from_dict`` and ``save``/``load``; a
corrupted, foreign or mismatched plan gets a ``ValueError`` that says what is wrong.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ._namespace import to_numpy
from .cost import Usage
from .models import FULL_BITS

__all__ = ["Plan", "PLAN_VERSION"]

PLAN_VERSION = 1
_FORMAT = "rdalloc.plan"
_KEY_AXES = {("layer", "kv_head"), ("layer", "kv_head", "token"), ("layer", "kv_head", "channel")}
_VALUE_AXES = {("layer", "kv_head"), ("layer", "kv_head", "token")}


def _bits(name: str, x: Any, axes: tuple[str, ...]) -> np.ndarray:
    a = np.asarray(to_numpy(x))
    if a.ndim != len(axes):
        raise ValueError(f"{name} bits must have {len(axes)} axes {axes}, got shape {a.shape}")
    if a.dtype.kind not in "iuf" or (a.dtype.kind == "f" and not np.all(np.isfinite(a))):
        raise ValueError(f"{name} bits must be finite numbers, got dtype {a.dtype}")
    if a.size and (np.any(a != np.round(a)) or a.min() < 0 or a.max() > FULL_BITS):
        bad = a[(a != np.round(a)) | (a < 0) | (a > FULL_BITS)].ravel()[0].item()
        raise ValueError(f"{name} bits must be integers in [0, {FULL_BITS}], got {bad!r}")
    out = a.astype(np.int8)
    out.setflags(write=False)
    return out


@dataclass(frozen=True)
class Plan:
    """Integer bit-widths for keys and values with named axes, plus what produced them.

    Attributes:
      key, value: int8 arrays of bits; key_axes, value_axes: their axis names (see the module docstring).
      quantizer: the quantizer the distortion model was fitted for (``None`` if unknown).
      budget_bits: the budget asked, total bits with metadata; usage: the bits spent (payload, metadata, elements).
      predicted_distortion: the model's ``sum_i w_i D_i(b_i)``; certificate: the solver's certificate (budget used,
      KKT residual, dual bound, gap). meta: free-form facts (model name, group size, menu, head_dim ...).

    >>> import numpy as np
    >>> from rdalloc import Plan
    >>> plan = Plan(key=np.array([[4, 2], [8, 16]]), value=np.array([[4, 4], [2, 0]]), quantizer="kivi")
    >>> plan.granularity, plan.layers, plan.kv_heads, plan.tokens
    ('head', 2, 2, None)
    >>> Plan.from_dict(plan.to_dict()).value.tolist()  # the JSON round trip (save and load write and read this dict)
    [[4, 4], [2, 0]]
    >>> plan.check(kv_heads=4)
    Traceback (most recent call last):
        ...
    ValueError: the plan was made for kv_heads=2, but the cache has kv_heads=4
    >>> axes = ("layer", "kv_head", "token")
    >>> tokens = Plan(key=np.array([[[16, 2, 0]]]), value=np.array([[[16, 3, 0]]]), key_axes=axes, value_axes=axes)
    >>> tokens.granularity, tokens.kept().tolist()  # value bits 0: the token is evicted
    ('token', [[[True, True, False]]])
    """

    key: Any
    value: Any
    key_axes: tuple[str, ...] = ("layer", "kv_head")
    value_axes: tuple[str, ...] = ("layer", "kv_head")
    quantizer: str | None = None
    budget_bits: float | None = None
    usage: Usage | None = None
    predicted_distortion: float | None = None
    certificate: Mapping[str, Any] = field(default_factory=dict)
    meta: Mapping[str, Any] = field(default_factory=dict)
    version: int = PLAN_VERSION

    def __post_init__(self):
        ka, va = tuple(self.key_axes), tuple(self.value_axes)
        if ka not in _KEY_AXES:
            raise ValueError(f"key_axes must be one of {sorted(_KEY_AXES)}, got {ka}")
        if va not in _VALUE_AXES:
            raise ValueError(f"value_axes must be one of {sorted(_VALUE_AXES)}, got {va}")
        if self.version != PLAN_VERSION:
            raise ValueError(f"plan version {self.version!r} is not supported (this rdalloc reads {PLAN_VERSION})")
        key, value = _bits("key", self.key, ka), _bits("value", self.value, va)
        if key.shape[:2] != value.shape[:2]:
            raise ValueError(f"key and value bits disagree on (layer, kv_head): {key.shape[:2]} vs {value.shape[:2]}")
        if ka[-1] == "token" and va[-1] == "token":
            if key.shape != value.shape:
                raise ValueError(f"per-token key and value bits must have the same shape, got {key.shape} vs "
                                 f"{value.shape}")
            if np.any((key == 0) != (value == 0)):
                idx = tuple(int(i) for i in np.argwhere((key == 0) != (value == 0))[0])
                raise ValueError(f"a token is evicted only as a whole: key bits {int(key[idx])} and value bits "
                                 f"{int(value[idx])} at (layer, kv_head, token) = {idx}")
        object.__setattr__(self, "key", key)
        object.__setattr__(self, "value", value)
        object.__setattr__(self, "key_axes", ka)
        object.__setattr__(self, "value_axes", va)
        object.__setattr__(self, "certificate", dict(self.certificate))
        object.__setattr__(self, "meta", dict(self.meta))

    # ---- shape facts -------------------------------------------------------------------------------------------
    @property
    def granularity(self) -> str:
        """``"head"`` when both key and value bits are per (layer, kv_head), else ``"token"``."""
        return "head" if len(self.key_axes) == 2 and len(self.value_axes) == 2 else "token"

    @property
    def layers(self) -> int:
        return int(self.key.shape[0])

    @property
    def kv_heads(self) -> int:
        return int(self.key.shape[1])

    @property
    def tokens(self) -> int | None:
        for bits, axes in ((self.value, self.value_axes), (self.key, self.key_axes)):
            if axes[-1] == "token":
                return int(bits.shape[-1])
        return None

    def kept(self) -> np.ndarray | None:
        """Boolean ``(layer, kv_head, token)``: tokens the plan keeps (``None`` for a head plan: nothing is evicted
        token by token; a head at 0 bits is dropped whole)."""
        if self.value_axes[-1] == "token":
            return self.value > 0
        if self.key_axes[-1] == "token":
            return self.key > 0
        return None

    def check(self, *, layers: int | None = None, kv_heads: int | None = None, tokens: int | None = None,
              head_dim: int | None = None, quantizer: str | None = None) -> Plan:
        """Raise ``ValueError`` if the plan was made for another model, context or quantizer; return ``self``."""
        facts = (("layers", layers, self.layers), ("kv_heads", kv_heads, self.kv_heads),
                 ("tokens", tokens, self.tokens))
        for name, want, have in facts:
            if want is not None and have is not None and want != have:
                raise ValueError(f"the plan was made for {name}={have}, but the cache has {name}={want}")
        if head_dim is not None and self.key_axes[-1] == "channel" and self.key.shape[-1] != head_dim:
            raise ValueError(f"the plan's key bits are per channel for head_dim={self.key.shape[-1]}, but the cache "
                             f"has head_dim={head_dim}")
        if quantizer is not None and self.quantizer is not None and quantizer != self.quantizer:
            raise ValueError(f"the plan was allocated with the distortion model of quantizer {self.quantizer!r}; "
                             f"applying it with {quantizer!r} is a distortion-model mismatch")
        return self

    @classmethod
    def from_allocation(cls, allocation: Any, key_shape: tuple[int, ...], value_shape: tuple[int, ...] | None = None,
                        *, key_axes: tuple[str, ...] = ("layer", "kv_head"),
                        value_axes: tuple[str, ...] = ("layer", "kv_head"), quantizer: str | None = None,
                        meta: Mapping[str, Any] | None = None) -> Plan:
        """A plan from one solve over key items then value items (each in C order over its shape).

        ``allocation`` is an :class:`rdalloc.Allocation` (its certificate, usage and budget are recorded).
        """
        bits = np.asarray(to_numpy(allocation.bits)).reshape(-1)
        value_shape = tuple(key_shape) if value_shape is None else tuple(value_shape)
        nk, nv = int(np.prod(key_shape)), int(np.prod(value_shape))
        if bits.size != nk + nv:
            raise ValueError(f"the allocation has {bits.size} items, but key_shape {tuple(key_shape)} and value_shape "
                             f"{value_shape} need {nk} + {nv} = {nk + nv}")
        cert = allocation.certificate()
        return cls(key=bits[:nk].reshape(key_shape), value=bits[nk:].reshape(value_shape), key_axes=key_axes,
                   value_axes=value_axes, quantizer=quantizer, budget_bits=cert["budget_bits"],
                   usage=allocation.usage, predicted_distortion=cert["distortion"], certificate=cert,
                   meta=dict(meta or {}))

    # ---- serialization -----------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"format": _FORMAT, "version": self.version, "granularity": self.granularity,
                "quantizer": self.quantizer,
                "key": {"axes": list(self.key_axes), "bits": self.key.tolist()},
                "value": {"axes": list(self.value_axes), "bits": self.value.tolist()},
                "budget_bits": self.budget_bits, "usage": None if self.usage is None else self.usage.to_dict(),
                "predicted_distortion": self.predicted_distortion,
                "certificate": _jsonable(self.certificate), "meta": _jsonable(self.meta)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Plan:
        if not isinstance(d, Mapping) or d.get("format") != _FORMAT:
            got = d.get("format") if isinstance(d, Mapping) else type(d).__name__
            raise ValueError(f"not an rdalloc plan: format={got!r} (expected {_FORMAT!r})")
        try:
            key, value = d["key"], d["value"]
            plan = cls(key=np.asarray(key["bits"]), value=np.asarray(value["bits"]), key_axes=tuple(key["axes"]),
                       value_axes=tuple(value["axes"]), quantizer=d.get("quantizer"), budget_bits=d.get("budget_bits"),
                       usage=None if d.get("usage") is None else Usage.from_dict(d["usage"]),
                       predicted_distortion=d.get("predicted_distortion"), certificate=d.get("certificate") or {},
                       meta=d.get("meta") or {}, version=d.get("version"))
        except (KeyError, TypeError) as e:
            raise ValueError(f"corrupted plan: missing or malformed field {e}") from None
        if d.get("granularity", plan.granularity) != plan.granularity:
            raise ValueError(f"corrupted plan: says granularity {d['granularity']!r} but its axes make it "
                             f"{plan.granularity!r}")
        return plan

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict()))

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        try:
            d = json.loads(Path(path).read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}): not an rdalloc plan") from None
        return cls.from_dict(d)


def _jsonable(x: Any) -> Any:
    if isinstance(x, Mapping):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.generic,)):
        return x.item()
    if hasattr(x, "shape"):
        return to_numpy(x).tolist()
    return x
