"""Plans: the bit-widths an allocation decided, as versioned, validated, serializable data.

A plan holds integer bits for keys and for values, each with named axes:

* **head plan** (RateQuant): ``key`` and ``value`` over ``(layer, kv_head)``;
* **token plan** (RDKV): ``value`` over ``(layer, kv_head, token)`` and ``key`` over ``(layer, kv_head, channel)``
  (or ``(layer, kv_head, token)``). A token whose value bits are 0 is evicted: its key and its value are dropped.
  With per-token key bits too, key and value zeros must coincide.

Bits are integers in ``[0, 16]``: 16 keeps the original values, 0 evicts. The plan remembers the quantizer its
distortion model was fitted for, the budget asked and spent (payload and metadata separately), the predicted
distortion and the solver's certificate, and (in ``meta``) the facts that identify its model: ``"model"`` (name) and
``"head_dim"``; ``layers`` and ``kv_heads`` are the bits' shape. :meth:`Plan.check` and :meth:`Plan.check_config`
compare those facts with a cache or a model's config *before* any model is loaded.

Two file forms, chosen by the suffix given to ``save`` (``load`` reads either): ``.json``, the round trip of
``to_dict``/``from_dict``, readable anywhere (head plans); and ``.npz``, compact binary for token plans (the widths as
uint8 arrays, every other field in a JSON header entry; at 32 x 8 x 32768 a third of the JSON's size, ~50x faster
to write and ~100x faster to read: ``benchmarks/plan_io.py``). Both carry a ``"digest"``: in JSON the SHA-256 of the
canonical JSON of every other field, in npz the SHA-256 of the header's canonical JSON then the arrays' bytes.
Loading recomputes it, so an edited or corrupted file (a flipped digit in the bits) is refused, not silently loaded
as another plan. JSON files without a digest (written before it existed) load after the field checks; npz files
must have one. A plan of a newer version (``version``, or the npz form's ``npz_version``) is refused, asking for a
newer rdalloc. Every field is type-checked; a corrupted, foreign or mismatched plan gets a ``ValueError`` (``TypeError``
for a wrong Python type given in code) that names the field and the file. Only standard JSON is
written: non-finite floats in ``certificate`` and ``meta`` are stored as the strings ``"inf"``, ``"-inf"``, ``"nan"``.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ._io import write_atomic
from ._namespace import to_numpy
from .allocate import Allocation
from .cost import Usage
from .models import FULL_BITS, ExponentialModel, TabulatedModel
from .quantizers import available_quantizers, get_quantizer

__all__ = ["Plan", "PLAN_VERSION", "NPZ_VERSION", "NPZ_HEADER", "plan_format", "read_npz_header"]

PLAN_VERSION = 1
NPZ_VERSION = 1
"""The layout of the ``.npz`` form (entries and header fields); a file of a newer layout is refused on load."""
NPZ_HEADER = "plan"
"""The ``.npz`` entry holding the JSON header (an ASCII bytes string): every field but the bits, with the
``"digest"``."""
_FORMAT = "rdalloc.plan"
_SUFFIXES = {".json": "json", ".npz": "npz"}
_ZIP_MAGIC = b"PK\x03\x04"
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


def _number(name: str, x: Any) -> float | None:
    """``x`` as a finite float >= 0, or ``None``; a bool, string or other type is refused."""
    if x is None:
        return None
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        raise TypeError(f"{name} must be a number or None, got {type(x).__name__} {x!r}")
    if not math.isfinite(x) or x < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {x!r}")
    return float(x)


def _integer(name: str, x: Any) -> int:
    if isinstance(x, bool) or not isinstance(x, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {type(x).__name__} {x!r}")
    return int(x)


def _quantizer_name(x: Any) -> str | None:
    if x is None:
        return None
    if not isinstance(x, str):
        raise TypeError(f"quantizer must be a registered quantizer name or None, got {type(x).__name__} {x!r}")
    if x not in available_quantizers():
        raise ValueError(f"quantizer {x!r} is not a registered quantizer (registered: {list(available_quantizers())})")
    return x


def _same_quantizer(a: str, b: str) -> bool:
    """Quantizer names compare case-insensitively, surrounding spaces aside (as :func:`rdalloc.check_quantizer`)."""
    return a.strip().lower() == b.strip().lower()


def _check_meta(meta: Mapping[str, Any], quantizer: str | None) -> None:
    """The facts ``meta`` may record for checks: ``model`` (str), ``head_dim`` (positive int) and ``quantizer_spec``
    (a :meth:`~rdalloc.quantizers.Quantizer.spec` of the plan's quantizer, which the adapters apply)."""
    if "model" in meta and not isinstance(meta["model"], str):
        raise TypeError(f"meta['model'] must be the model's name (str), got {type(meta['model']).__name__} "
                        f"{meta['model']!r}")
    if "head_dim" in meta and (_integer("meta['head_dim']", meta["head_dim"]) < 1):
        raise ValueError(f"meta['head_dim'] must be a positive integer, got {meta['head_dim']!r}")
    spec = meta.get("quantizer_spec")
    if spec is not None:
        try:
            name = get_quantizer(dict(spec)).name
        except (TypeError, ValueError) as e:
            raise ValueError(f"meta['quantizer_spec'] {spec!r} does not make a quantizer: {e}") from None
        if quantizer is not None and name != quantizer:
            raise ValueError(f"meta['quantizer_spec'] makes quantizer {name!r}, but the plan records {quantizer!r}")


@dataclass(frozen=True, eq=False)
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
        if _integer("version", self.version) != PLAN_VERSION:
            newer = " (written by a newer rdalloc: upgrade rdalloc to read it)" if self.version > PLAN_VERSION else ""
            raise ValueError(f"plan version {self.version!r} is not supported (this rdalloc reads {PLAN_VERSION})"
                             f"{newer}")
        if self.usage is not None and not isinstance(self.usage, Usage):
            raise TypeError(f"usage must be an rdalloc.cost.Usage or None, got {type(self.usage).__name__}")
        for name in ("certificate", "meta"):
            if not isinstance(getattr(self, name), Mapping):
                raise TypeError(f"{name} must be a mapping, got {type(getattr(self, name)).__name__}")
        quantizer = _quantizer_name(self.quantizer)
        _check_meta(self.meta, quantizer)
        budget = _number("budget_bits", self.budget_bits)
        distortion = _number("predicted_distortion", self.predicted_distortion)
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
        if self.usage is not None:
            for name in ("payload_bits", "metadata_bits", "elements"):
                _number(f"usage.{name}", getattr(self.usage, name))
            if budget is not None and self.usage.total_bits > budget * (1 + 1e-12):
                raise ValueError(f"the plan spends {self.usage.total_bits!r} bits (usage), over its budget_bits "
                                 f"{budget!r}")
        object.__setattr__(self, "key", key)
        object.__setattr__(self, "value", value)
        object.__setattr__(self, "quantizer", quantizer)
        object.__setattr__(self, "budget_bits", budget)
        object.__setattr__(self, "predicted_distortion", distortion)
        object.__setattr__(self, "version", int(self.version))
        object.__setattr__(self, "key_axes", ka)
        object.__setattr__(self, "value_axes", va)
        object.__setattr__(self, "certificate", dict(self.certificate))
        object.__setattr__(self, "meta", dict(self.meta))

    def __eq__(self, other: object) -> bool:
        """Plans are equal when they save to the same content: same axes, same bits (value for value), and the same
        other fields as JSON data (a tuple in ``meta`` equals the list it is saved as; ``nan`` equals ``nan``)."""
        if not isinstance(other, Plan):
            return NotImplemented
        return (self.key_axes == other.key_axes and self.value_axes == other.value_axes
                and np.array_equal(self.key, other.key) and np.array_equal(self.value, other.value)
                and self._fields() == other._fields())

    __hash__ = None  # mutable-looking content (arrays): plans are compared, not hashed

    def _fields(self) -> dict:
        """Every field but the bits and their axes, as standard JSON data."""
        return {"version": self.version, "quantizer": self.quantizer, "budget_bits": self.budget_bits,
                "usage": None if self.usage is None else _jsonable(self.usage.to_dict()),
                "predicted_distortion": self.predicted_distortion,
                "certificate": _jsonable(self.certificate), "meta": _jsonable(self.meta)}

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
              head_dim: int | None = None, quantizer: str | None = None, model: str | None = None) -> Plan:
        """Raise ``ValueError`` if the plan was made for another model, context or quantizer; return ``self``.

        Each fact given is compared with the plan's: ``layers``, ``kv_heads`` (and ``tokens`` for a token plan) with
        the bits' shape, ``head_dim`` with ``meta["head_dim"]`` and per-channel key bits, ``model`` with
        ``meta["model"]``, ``quantizer`` with the recorded quantizer (case and surrounding spaces aside). A fact the
        plan does not record is not checked.
        """
        facts = (("layers", layers, self.layers), ("kv_heads", kv_heads, self.kv_heads),
                 ("tokens", tokens, self.tokens), ("head_dim", head_dim, self.meta.get("head_dim")))
        for name, want, have in facts:
            if want is not None and _integer(name, want) < 1:
                raise ValueError(f"{name} must be a positive integer, got {want!r}")
            if want is not None and have is not None and want != have:
                raise ValueError(f"the plan was made for {name}={have}, but the cache has {name}={want}")
        if head_dim is not None and self.key_axes[-1] == "channel" and self.key.shape[-1] != head_dim:
            raise ValueError(f"the plan's key bits are per channel for head_dim={self.key.shape[-1]}, but the cache "
                             f"has head_dim={head_dim}")
        if model is not None and not isinstance(model, str):
            raise TypeError(f"model must be the model's name (str), got {type(model).__name__} {model!r}")
        if model is not None and self.meta.get("model") not in (None, model):
            raise ValueError(f"the plan was made for model {self.meta['model']!r}, not {model!r}")
        if quantizer is not None and not isinstance(quantizer, str):
            raise TypeError(f"quantizer must be a quantizer name (str), got {type(quantizer).__name__} {quantizer!r}")
        if quantizer is not None and self.quantizer is not None and not _same_quantizer(quantizer, self.quantizer):
            raise ValueError(f"the plan was allocated with the distortion model of quantizer {self.quantizer!r}; "
                             f"applying it with {quantizer!r} is a distortion-model mismatch")
        return self

    def check_config(self, config: Any, *, model: str | None = None) -> Plan:
        """:meth:`check` against a transformers-style model config, before the model is loaded: ``config`` is the
        parsed ``config.json`` (a mapping) or a config object. Reads ``num_hidden_layers``, ``num_key_value_heads``
        (default ``num_attention_heads``) and ``head_dim`` (default ``hidden_size // num_attention_heads``), from its
        ``text_config`` when it has one. ``model`` is the model's name, compared with ``meta["model"]``."""
        get = config.get if isinstance(config, Mapping) else lambda k, default=None: getattr(config, k, default)
        text = get("text_config")
        if text is not None:
            return self.check_config(text, model=model)

        def positive(name: str, x: Any) -> int:
            if isinstance(x, bool) or not isinstance(x, numbers.Integral) or x < 1:
                raise ValueError(f"the model config's {name} must be a positive integer, got {x!r}")
            return int(x)

        q_heads = positive("num_attention_heads", get("num_attention_heads"))
        kv_heads = positive("num_key_value_heads", get("num_key_value_heads") or q_heads)
        head_dim = get("head_dim")
        if head_dim is None:
            head_dim = positive("hidden_size", get("hidden_size")) // q_heads
        return self.check(layers=positive("num_hidden_layers", get("num_hidden_layers")), kv_heads=kv_heads,
                          head_dim=positive("head_dim", head_dim), model=model)

    @classmethod
    def from_allocation(cls, allocation: Allocation, key_shape: tuple[int, ...],
                        value_shape: tuple[int, ...] | None = None, *, model: Any = None,
                        key_axes: tuple[str, ...] = ("layer", "kv_head"),
                        value_axes: tuple[str, ...] = ("layer", "kv_head"), quantizer: str | None = None,
                        meta: Mapping[str, Any] | None = None) -> Plan:
        """A plan from one solve over key items then value items (each in C order over its shape).

        ``allocation`` is an :class:`rdalloc.Allocation` (its certificate, usage and budget are recorded; a grouped
        solve records the sums and the per-group certificate). The plan records its quantizer: ``quantizer``, or else
        the ``quantizer`` of ``model`` (the model the allocation solved); both given must agree, and one must be known,
        so a plan never forgets which quantizer's curve made it.
        """
        if not isinstance(allocation, Allocation):
            raise TypeError(f"allocation must be an rdalloc.Allocation (the result of rdalloc.allocate: integer "
                            f"bits), got {type(allocation).__name__}; solve with rdalloc.allocate for integer bits")
        bits = np.asarray(to_numpy(allocation.bits)).reshape(-1)
        value_shape = tuple(key_shape) if value_shape is None else tuple(value_shape)
        nk, nv = int(np.prod(key_shape)), int(np.prod(value_shape))
        if bits.size != nk + nv:
            raise ValueError(f"the allocation has {bits.size} items, but key_shape {tuple(key_shape)} and value_shape "
                             f"{value_shape} need {nk} + {nv} = {nk + nv}")
        if model is not None and not isinstance(model, (ExponentialModel, TabulatedModel)):
            raise TypeError(f"model must be an ExponentialModel or TabulatedModel, got {type(model).__name__}")
        fitted = None if model is None else model.quantizer
        if quantizer is not None and fitted is not None and not _same_quantizer(quantizer, fitted):
            raise ValueError(f"quantizer {quantizer!r} is not the quantizer the model was fitted for ({fitted!r})")
        if quantizer is None and fitted is None:
            raise ValueError("the plan must record its quantizer: pass model= (the model the allocation solved, whose "
                             ".quantizer is recorded) or quantizer= (a registered quantizer name)")
        total = lambda x: float(np.sum(to_numpy(x)))  # noqa: E731  (one value, or one per group)
        usage = Usage(total(allocation.payload_bits), total(allocation.metadata_bits), total(allocation.elements))
        return cls(key=bits[:nk].reshape(key_shape), value=bits[nk:].reshape(value_shape), key_axes=key_axes,
                   value_axes=value_axes, quantizer=quantizer if quantizer is not None else fitted,
                   budget_bits=total(allocation.budget), usage=usage,
                   predicted_distortion=total(allocation.distortion), certificate=allocation.certificate(),
                   meta=dict(meta or {}))

    # ---- serialization -----------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """The plan as standard JSON data, with its ``"digest"`` (see the module docstring)."""
        d = {"format": _FORMAT, "version": self.version, "granularity": self.granularity,
             "quantizer": self.quantizer,
             "key": {"axes": list(self.key_axes), "bits": self.key.tolist()},
             "value": {"axes": list(self.value_axes), "bits": self.value.tolist()},
             "budget_bits": self.budget_bits, "usage": None if self.usage is None else _jsonable(self.usage.to_dict()),
             "predicted_distortion": self.predicted_distortion,
             "certificate": _jsonable(self.certificate), "meta": _jsonable(self.meta)}
        return {**d, "digest": _digest(d)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Plan:
        """The plan of :meth:`to_dict`'s data; ``ValueError`` naming the field if anything is missing, mistyped,
        inconsistent, or (when the data has a digest) changed since it was written."""
        if not isinstance(d, Mapping) or d.get("format") != _FORMAT:
            got = d.get("format") if isinstance(d, Mapping) else type(d).__name__
            raise ValueError(f"not an rdalloc plan: format={got!r} (expected {_FORMAT!r})")
        plan = _from_fields(cls, d, lambda role: _role(d, role))
        if "digest" in d and d["digest"] != _digest({k: v for k, v in d.items() if k != "digest"}):
            raise ValueError(f"corrupted plan: its content does not match its digest {d['digest']!r} (the file was "
                             f"changed after it was written)")
        return plan

    def save(self, path: str | Path) -> None:
        """Write the plan to ``path`` atomically (a temporary file in the same folder, renamed onto ``path`` once
        complete: a failed save leaves the previous file, or none). The suffix chooses the form (:func:`plan_format`):

        * ``.json``: :meth:`to_dict` as standard JSON, readable anywhere; the form for head plans.
        * ``.npz``: compact binary for token plans (numpy's uncompressed zip of ``.npy`` entries): ``key`` and
          ``value`` as uint8 arrays and :data:`NPZ_HEADER`, a JSON string of every other field plus ``"npz_version"``
          and a ``"digest"``: the SHA-256 of the header's canonical JSON (without the digest) followed by the key
          then the value bytes in C order. 1 byte per width instead of about 3 characters, and no parsing.
        """
        path = Path(path)
        if path.is_dir():
            raise ValueError(f"cannot save the plan to {path}: it is a directory")
        form = plan_format(path)
        if not path.parent.is_dir():
            raise FileNotFoundError(f"cannot save the plan to {path}: the folder {path.parent} does not exist")
        write = self._write_json if form == "json" else self._write_npz
        write_atomic(path, lambda tmp: _write_binary(tmp, write))

    def _write_json(self, f) -> None:
        f.write(json.dumps(self.to_dict(), allow_nan=False).encode())

    def _write_npz(self, f) -> None:
        key, value = self.key.astype(np.uint8), self.value.astype(np.uint8)
        header = {"format": _FORMAT, "npz_version": NPZ_VERSION, **self._fields(), "granularity": self.granularity,
                  "key": {"axes": list(self.key_axes), "shape": list(key.shape)},
                  "value": {"axes": list(self.value_axes), "shape": list(value.shape)}}
        header["digest"] = _npz_digest(header, key, value)
        text = json.dumps(header, allow_nan=False).encode("ascii")  # escapes make any text ASCII
        np.savez(f, **{NPZ_HEADER: np.array(text), "key": key, "value": value})

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        """The plan saved at ``path``, JSON or npz (told apart by content: an npz is a zip archive):
        ``FileNotFoundError`` if there is none, ``ValueError`` naming the file if it is not a readable, intact rdalloc
        plan (an npz is read with ``allow_pickle=False``: an entry holding Python objects is refused)."""
        path = Path(path)
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            raise FileNotFoundError(f"no plan file at {path}") from None
        except IsADirectoryError:
            raise ValueError(f"{path} is a directory, not a plan file") from None
        except OSError as e:
            raise ValueError(f"cannot read the plan file {path}: {e.strerror or e}") from None
        if raw.startswith(_ZIP_MAGIC) or path.suffix.lower() == ".npz":
            try:
                return _load_npz(cls, raw)
            except ValueError as e:
                raise ValueError(f"{path}: {e}") from None
        try:
            d = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise ValueError(f"{path} is not UTF-8 text (invalid byte at offset {e.start}): not an rdalloc plan") \
                from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}): not an rdalloc plan") from None
        except RecursionError:
            raise ValueError(f"{path} holds JSON nested too deeply to read: not an rdalloc plan") from None
        try:
            return cls.from_dict(d)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None


def plan_format(path: str | Path) -> str:
    """``"json"`` or ``"npz"``: the form :meth:`Plan.save` writes at ``path``, by its suffix (``.json`` or ``.npz``,
    any case); ``ValueError`` naming the path for any other suffix."""
    suffix = Path(path).suffix
    form = _SUFFIXES.get(suffix.lower())
    if form is None:
        raise ValueError(f"a plan file's name must end in .json (JSON) or .npz (compact binary), got {str(path)!r}"
                         f"{f' (suffix {suffix!r})' if suffix else ' (no suffix)'}")
    return form


def _from_fields(cls: type[Plan], d: Mapping[str, Any], role: Any) -> Plan:
    """The plan of the fields ``d`` (a JSON plan or an npz header), ``role("key")`` / ``role("value")`` giving the
    checked axes and bits; every problem as a ``ValueError`` (a file's corruption, never a ``TypeError``)."""
    try:
        key, value = role("key"), role("value")
        usage = d.get("usage")
        if usage is not None:
            if not isinstance(usage, Mapping):
                raise TypeError(f"usage must be an object, got {type(usage).__name__}")
            usage = Usage(*(_number(f"usage.{k}", usage[k]) for k in ("payload_bits", "metadata_bits", "elements")))
        plan = cls(key=key["bits"], value=value["bits"], key_axes=key["axes"], value_axes=value["axes"],
                   quantizer=d.get("quantizer"), budget_bits=d.get("budget_bits"), usage=usage,
                   predicted_distortion=d.get("predicted_distortion"),
                   certificate={} if d.get("certificate") is None else d["certificate"],
                   meta={} if d.get("meta") is None else d["meta"], version=d.get("version"))
    except KeyError as e:
        raise ValueError(f"corrupted plan: missing or malformed field {e}") from None
    except TypeError as e:
        raise ValueError(f"corrupted plan: {e}") from None
    if d.get("granularity", plan.granularity) != plan.granularity:
        raise ValueError(f"corrupted plan: says granularity {d['granularity']!r} but its axes make it "
                         f"{plan.granularity!r}")
    return plan


def _axes(r: Any, role: str) -> tuple[str, ...]:
    if not isinstance(r, Mapping):
        raise TypeError(f"{role} must be an object with axes and bits, got {type(r).__name__}")
    axes = r["axes"]
    if not isinstance(axes, list) or not all(isinstance(a, str) for a in axes):
        raise TypeError(f"{role}.axes must be a list of axis names, got {axes!r}")
    return tuple(axes)


def _role(d: Mapping[str, Any], role: str) -> dict:
    """``d[role]`` checked: ``{"axes": [names], "bits": nested lists of integers}`` (JSON ``true`` is not a bit)."""
    r = d[role]
    axes = _axes(r, role)
    bits = r["bits"]
    try:
        cells = np.asarray(bits, dtype=object).ravel() if isinstance(bits, list) else None
    except ValueError:  # ragged beyond the first axis
        cells = None
    if cells is None or not all(type(b) is int for b in cells):
        bad = bits if cells is None else next(b for b in cells if type(b) is not int)
        raise TypeError(f"{role}.bits must be nested lists of integers, one level per axis, got "
                        f"{type(bad).__name__} {bad!r}")
    out_of_range = [b for b in cells if not 0 <= b <= FULL_BITS]
    if out_of_range:
        raise ValueError(f"{role} bits must be integers in [0, {FULL_BITS}], got {out_of_range[0]!r}")
    return {"axes": axes, "bits": np.asarray(bits, dtype=np.int8)}


def _npz_role(header: Mapping[str, Any], role: str, bits: Any) -> dict:
    """``header[role]`` (``{"axes": [names], "shape": [sizes]}``) and the npz entry ``role``: a uint8 array of that
    shape."""
    r = header[role]
    axes = _axes(r, role)
    shape = r["shape"]
    if not isinstance(shape, list) or not all(type(n) is int for n in shape):
        raise TypeError(f"{role}.shape must be a list of integers, got {shape!r}")
    if not isinstance(bits, np.ndarray) or bits.dtype != np.uint8:
        got = f"dtype {bits.dtype}" if isinstance(bits, np.ndarray) else type(bits).__name__
        raise ValueError(f"corrupted plan: the {role!r} entry must be a uint8 array, got {got}")
    if list(bits.shape) != shape:
        raise ValueError(f"corrupted plan: the {role!r} entry has shape {bits.shape}, but the header says "
                         f"{tuple(shape)}")
    return {"axes": axes, "bits": bits}


def read_npz_header(source: str | Path | bytes) -> dict:
    """The JSON header of an npz plan (its path, or the file's bytes): every field but the widths, read without them;
    ``ValueError`` if it is not an npz plan this rdalloc reads (archive, ``format``, ``npz_version``). Its digest is
    not checked here (it covers the widths): :meth:`Plan.load` checks it."""
    raw = source if isinstance(source, bytes) else Path(source).read_bytes()
    with _open_npz(raw) as archive:
        return _npz_header(archive)


def _open_npz(raw: bytes) -> Any:
    """The npz archive in ``raw`` (never unpickling)."""
    if not raw.startswith(_ZIP_MAGIC):
        raise ValueError("not an npz (zip) archive: not an rdalloc plan")
    try:
        return np.load(io.BytesIO(raw), allow_pickle=False)
    except Exception as e:  # noqa: BLE001  (damaged bytes surface as zipfile's, numpy's or tokenize's many errors)
        raise ValueError(f"corrupted npz archive: {_describe(e)}") from None


def _load_npz(cls: type[Plan], raw: bytes) -> Plan:
    """The plan in the bytes of an npz file: header first (format and layout version), then the arrays, the fields'
    checks, then the digest."""
    with _open_npz(raw) as archive:
        names = sorted(archive.files)
        header = _npz_header(archive)
        if names != sorted({NPZ_HEADER, "key", "value"}):
            raise ValueError(f"corrupted plan: the npz archive must hold exactly the entries "
                             f"{sorted({NPZ_HEADER, 'key', 'value'})}, got {names}")
        arrays = {role: _npz_entry(archive, role) for role in ("key", "value")}
    plan = _from_fields(cls, header, lambda role: _npz_role(header, role, arrays[role]))
    digest = header.get("digest")
    if digest is None:
        raise ValueError("corrupted plan: the npz header has no digest")
    if digest != _npz_digest({k: v for k, v in header.items() if k != "digest"}, arrays["key"], arrays["value"]):
        raise ValueError(f"corrupted plan: its content does not match its digest {digest!r} (the file was changed "
                         f"after it was written)")
    return plan


def _npz_entry(archive: Any, name: str) -> Any:
    """One entry of an open npz archive; an object array (pickled Python objects) or a damaged entry is refused."""
    try:
        return archive[name]
    except ValueError as e:
        if "allow_pickle" in str(e):
            raise ValueError(f"the npz entry {name!r} holds pickled Python objects: refused (loading them could run "
                             f"code); an rdalloc plan holds only uint8 arrays and a JSON string") from None
        raise ValueError(f"corrupted npz entry {name!r}: {_describe(e)}") from None
    except Exception as e:  # noqa: BLE001  (zipfile: BadZipFile, NotImplementedError, RuntimeError; numpy's header
        # parser: tokenize errors; a damaged shape: MemoryError ... all mean the bytes are not what was written)
        raise ValueError(f"corrupted npz entry {name!r}: {_describe(e)}") from None


def _describe(e: BaseException) -> str:
    """An exception as one line: its type (unless a plain ValueError/OSError) and message."""
    text = " ".join(str(e).split())
    return text if type(e) in (ValueError, OSError) else f"{type(e).__name__}: {text}"


def _npz_header(archive: Any) -> dict:
    """The header entry of an open npz archive parsed: a bytes string (numpy dtype ``S``) of JSON, an object of format
    ``rdalloc.plan`` whose ``npz_version`` this rdalloc reads."""
    if NPZ_HEADER not in archive.files:
        raise ValueError(f"not an rdalloc plan: the npz archive has no {NPZ_HEADER!r} entry (entries: "
                         f"{sorted(archive.files)})")
    entry = _npz_entry(archive, NPZ_HEADER)
    if not isinstance(entry, np.ndarray) or entry.dtype.kind != "S" or entry.ndim != 0:
        got = f"an array of dtype {entry.dtype} and shape {entry.shape}" if isinstance(entry, np.ndarray) else \
            type(entry).__name__
        raise ValueError(f"not an rdalloc plan: the {NPZ_HEADER!r} entry must be a JSON string, got {got}")
    try:
        header = json.loads(entry[()])
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"corrupted plan: the {NPZ_HEADER!r} entry is not valid JSON ({getattr(e, 'msg', e)})") \
            from None
    except RecursionError:
        raise ValueError(f"corrupted plan: the {NPZ_HEADER!r} entry holds JSON nested too deeply to read") from None
    if not isinstance(header, dict) or header.get("format") != _FORMAT:
        got = header.get("format") if isinstance(header, dict) else type(header).__name__
        raise ValueError(f"not an rdalloc plan: format={got!r} (expected {_FORMAT!r})")
    version = header.get("npz_version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ValueError(f"corrupted plan: npz_version must be a positive integer, got {version!r}")
    if version > NPZ_VERSION:
        raise ValueError(f"npz plan format version {version} is newer than this rdalloc reads ({NPZ_VERSION}): "
                         f"upgrade rdalloc to read it")
    return header


def _canonical(d: Mapping[str, Any]) -> bytes:
    """The canonical JSON of ``d``: sorted keys, no spaces; what JSON cannot hold, by its ``repr``."""
    return json.dumps(d, sort_keys=True, separators=(",", ":"), default=repr).encode()


def _digest(d: Mapping[str, Any]) -> str:
    """SHA-256 of the canonical JSON of ``d`` (the JSON form's digest)."""
    return "sha256:" + hashlib.sha256(_canonical(d)).hexdigest()


def _npz_digest(header: Mapping[str, Any], key: np.ndarray, value: np.ndarray) -> str:
    """SHA-256 of the header's canonical JSON (without its digest; it records both shapes), then the key's and the
    value's uint8 bytes in C order (the npz form's digest)."""
    h = hashlib.sha256(_canonical({k: v for k, v in header.items() if k != "digest"}))
    for bits in (key, value):
        h.update(np.ascontiguousarray(bits, dtype=np.uint8))
    return "sha256:" + h.hexdigest()


def _jsonable(x: Any) -> Any:
    """``x`` as standard JSON data: mappings, lists, strings, finite numbers; non-finite floats as strings."""
    if isinstance(x, Mapping):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.generic):
        return _jsonable(x.item())
    if hasattr(x, "shape"):
        return _jsonable(to_numpy(x).tolist())
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    return x


def _write_binary(path: Path, write: Any) -> None:
    with open(path, "wb") as f:
        write(f)
