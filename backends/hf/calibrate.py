"""Calibrate a real model for per-head allocation: distortion curves per quantizer, and head importance.

:func:`calibrate` runs the model over calibration windows (disjoint from evaluation text, see :mod:`.text`) and

1. captures the cached K/V (post-RoPE keys, values) of every layer (:func:`~.capture.capture_kv`);
2. measures, per quantizer and role, the per-element MSE ``D[i, b]`` of every (layer, kv_head) item at
   ``b = 1..8`` (:func:`rdalloc.measure.measure_distortion`, the whole cache quantized uniformly at each width);
3. fits ``D_i(b) = alpha_i * beta**(-b)`` on the widths ``fit_bits`` (default ``2..8``, the allocation menu; the
   1-bit point is measured and stored but left out: its step to 2 bits is far steeper than the per-bit decay of the
   other widths, see :mod:`.head_plans`), with **one pooled beta per (quantizer, role)** (keys and values of a
   quantizer are grouped differently, e.g. KIVI keys per channel and values per token, so their decays differ; one
   beta per item would over-fit eight points of a single calibration run, and a pooled beta keeps the closed-form
   water level exact). The two role fits are joined into one :class:`rdalloc.ExponentialModel` over the
   ``2 * layers * kv_heads`` items of a head plan: all key heads ``(layer, kv_head)`` in C order, then all value
   heads (the order of :meth:`rdalloc.Plan.from_allocation`), with ``beta`` one entry per item;
4. optionally (``probe_bits``, e.g. ``(1, 2)``) measures the damage of the low widths directly,
   :func:`~.capture.single_head_kl`: the KL to the full model with one head alone at ``b`` bits, per head. The
   Fisher weights are a second-order picture at zero perturbation and miss what a 1-bit key does to a head's
   attention pattern (``experiments/ppl_grid.py --full`` compares plans with and without probes);
   :meth:`Calibration.loss_model` joins the two;
5. estimates head importance with both estimators, :func:`~.capture.fisher_importance` (nats per token per unit
   MSE, through every later layer) and :func:`~.capture.attention_importance` (``relative=True``: the relative error
   a head's MSE adds to the residual stream at its own layer);
6. in the same Fisher pass (:func:`~.capture.fisher_error`), measures every quantizer's **distortion in the loss's
   units**, ``D_h(b) = sum_{e in h} F_e err_e(b)^2`` (nats per token): the Fisher diagonal of each cached element
   times the squared error that quantizer leaves on it at ``b`` bits, summed over the head. It is fitted like the
   MSE (one pooled beta per quantizer and role, on ``fit_bits``) and stored in :attr:`Calibration.loss_fits`.

**Two distortions** (``distortion=``, :data:`DISTORTIONS`; the one allocations use is recorded in every plan):

* ``"fisher-mse"``: the head's Fisher weight times its fitted mean per-element MSE, ``w_h * MSE_h(b)``; exact when
  the quantizer's error is spread evenly over the head's elements;
* ``"fisher-error"``: ``D_h(b)`` above, the product taken element by element, so a quantizer whose error gathers in
  the channels or tokens the loss is sensitive to (KIVI's per-channel keys over token groups, per-token values) is
  charged for it. The allocation reads each head's fitted curve where it is within the fit tolerance of the
  measurements, and the measured values where it bends away (:func:`rdalloc.fit.choose_model`); widths outside
  the fitted range (1 bit) are always read as measured.

The result is a :class:`Calibration`: plain data, saved as JSON (models via ``to_dict``), timed step by step.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from rdalloc.environment import environment
from rdalloc.fit import ExponentialFit, ModelChoice, choose_model, fit_exponential
from rdalloc.models import ExponentialModel, TabulatedModel
from rdalloc.quantizers import Quantizer, get_quantizer

from .capture import HeadImportance, attention_importance, capture_kv, fisher_error, single_head_kl
from .model import ModelFacts, check_attention_layers

__all__ = ["Calibration", "calibrate", "CALIBRATION_FORMAT", "IMPORTANCE_METHODS", "DEFAULT_IMPORTANCE",
           "DEFAULT_QUANTIZERS", "CALIBRATION_BITS", "FIT_BITS", "fixed_beta_model", "DISTORTIONS",
           "DEFAULT_DISTORTION"]

CALIBRATION_FORMAT = "rdalloc.calibration"
CALIBRATION_VERSION = 1
IMPORTANCE_METHODS = ("fisher", "attention")
DEFAULT_IMPORTANCE = "fisher"
"""The estimator allocations use unless told otherwise (the perplexity grid, ``experiments/ppl_grid.py``, compares
the two)."""
DEFAULT_QUANTIZERS = ("kivi", "quarot")
DISTORTIONS = ("fisher-mse", "fisher-error")
"""What an allocation minimizes per head and width: Fisher weight x mean MSE, or the Fisher-weighted error summed
element by element (see the module docstring)."""
DEFAULT_DISTORTION = "fisher-error"
"""The distortion :func:`calibrate` makes the default of its calibration when the Fisher estimator runs (else
``"fisher-mse"``): on the bundled model it allocated better than Fisher x MSE in every cell measured, both quantizers
and both built-in texts (``experiments/results/fisher_error/``). Calibrations made before it existed, or without the
Fisher estimator, default to ``"fisher-mse"``."""
CALIBRATION_BITS = tuple(range(1, 9))
FIT_BITS = tuple(range(2, 9))
ROLES = ("key", "value")


@dataclass(frozen=True)
class Calibration:
    """What allocation needs to know about one model: per-quantizer distortion fits and head importance.

    Attributes:
      facts: the model's :class:`~.model.ModelFacts` (a plan made from this calibration is for this model only).
      fits: ``{quantizer: {"key": ExponentialFit, "value": ExponentialFit}}`` over ``layers * kv_heads`` items each.
      importance: ``{"fisher": HeadImportance, "attention": HeadImportance}`` (either may be absent).
      default_importance: the estimator :meth:`weights` uses when none is named.
      text: facts about the calibration text (source, windows, window length).
      timings: seconds per step (``capture``, ``measure_fit``, ``probe``, ``fisher``, ``attention``, ``total``;
        ``fisher_error_tables`` is the part of ``fisher`` spent on the error tables), wall clock.
      cpu_timings: the same steps in CPU seconds of this process (``time.process_time``, all threads): the cost on
        a shared machine, where wall time also counts the other jobs.
      probes: ``{quantizer: {bits: HeadImportance}}`` from :func:`~.capture.single_head_kl` (may be empty).
      environment: what it was measured on (:func:`rdalloc.environment.environment`: versions, CPU, dtype).
      quantizer_specs: ``{quantizer: spec}`` (:meth:`rdalloc.quantizers.Quantizer.spec`, e.g. KIVI's group size)
        of the quantizers as measured; a name absent here was measured with its defaults.
      loss_fits: ``{quantizer: {"key": ExponentialFit, "value": ExponentialFit}}`` of the Fisher-weighted error
        ``D_h(b)`` in nats per token (empty when the Fisher estimator did not run: then only ``"fisher-mse"``).
      default_distortion: the distortion (:data:`DISTORTIONS`) :meth:`loss_model` uses when none is named.
    """

    facts: ModelFacts
    fits: Mapping[str, Mapping[str, ExponentialFit]]
    importance: Mapping[str, HeadImportance]
    default_importance: str = DEFAULT_IMPORTANCE
    text: Mapping[str, Any] = field(default_factory=dict)
    timings: Mapping[str, float] = field(default_factory=dict)
    cpu_timings: Mapping[str, float] = field(default_factory=dict)
    fit_bits: tuple[int, ...] = FIT_BITS
    probes: Mapping[str, Mapping[int, HeadImportance]] = field(default_factory=dict)
    environment: Mapping[str, Any] = field(default_factory=dict)
    quantizer_specs: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    loss_fits: Mapping[str, Mapping[str, ExponentialFit]] = field(default_factory=dict)
    default_distortion: str = "fisher-mse"

    @property
    def quantizers(self) -> tuple[str, ...]:
        return tuple(self.fits)

    def quantizer(self, quantizer: str | Mapping | Quantizer) -> Quantizer:
        """The calibrated quantizer named by ``quantizer`` (a name: as measured, e.g. with its group size; a spec or
        an instance: checked to be the one measured, else ``ValueError`` saying both)."""
        given = get_quantizer(dict(quantizer) if isinstance(quantizer, Mapping) else quantizer)
        name = self._quantizer(given.name)
        measured = get_quantizer(dict(self.quantizer_specs.get(name) or {"name": name}))
        if measured.name != name:
            raise ValueError(f"the spec recorded for {name!r} makes quantizer {measured.name!r}")
        if not isinstance(quantizer, str) and given.spec() != measured.spec():
            raise ValueError(f"quantizer {given.spec()} is not the one this calibration measured: "
                             f"{measured.spec()}")
        return measured

    def _quantizer(self, quantizer: str) -> str:
        name = get_quantizer(quantizer).name
        if name not in self.fits:
            raise ValueError(f"quantizer {name!r} was not calibrated; this calibration has {list(self.fits)} (run "
                             f"calibrate with quantizers including {name!r})")
        return name

    def betas(self, quantizer: str) -> dict[str, float]:
        """``{"key": beta, "value": beta}``: the pooled decay per role."""
        name = self._quantizer(quantizer)
        return {role: float(self.fits[name][role].beta[0]) for role in ROLES}

    def distortion(self, distortion: str | None = None, quantizer: str | None = None) -> str:
        """``distortion`` checked (``None``: :attr:`default_distortion`): one of :data:`DISTORTIONS`, and for
        ``"fisher-error"`` measured for ``quantizer`` (when named); ``ValueError`` naming the value otherwise."""
        kind = self.default_distortion if distortion is None else distortion
        if kind not in DISTORTIONS:
            raise ValueError(f"distortion must be one of {DISTORTIONS}, got {kind!r}")
        if kind == "fisher-error":
            missing = [q for q in ([self._quantizer(quantizer)] if quantizer is not None else self.fits)
                       if q not in self.loss_fits]
            if missing or not self.loss_fits:
                raise ValueError(f"distortion 'fisher-error' was not measured for {missing or list(self.fits)} in "
                                 f"this calibration (it comes from the Fisher pass: calibrate with importance "
                                 f"including 'fisher')")
        return kind

    def model(self, quantizer: str, distortion: str | None = None) -> ExponentialModel:
        """The fitted :class:`rdalloc.ExponentialModel` over key heads then value heads, ``beta`` per item: of the
        per-element MSE (``"fisher-mse"``; multiply by :meth:`weights`), or of the Fisher-weighted error in nats
        per token (``"fisher-error"``; unit weights). ``distortion`` ``None``: ``"fisher-mse"``, the fit of the
        measured MSE (this method's meaning before distortions had a choice)."""
        name = self._quantizer(quantizer)
        kind = self.distortion(distortion or "fisher-mse", name)
        fits = self.fits[name] if kind == "fisher-mse" else self.loss_fits[name]
        k, v = (fits[role].model for role in ROLES)
        n = self.facts.layers * self.facts.kv_heads
        beta = np.concatenate([np.full(n, float(np.ravel(k.beta)[0])), np.full(n, float(np.ravel(v.beta)[0]))])
        return ExponentialModel(alpha=np.concatenate([np.asarray(k.alpha), np.asarray(v.alpha)]), beta=beta,
                                lo=float(min(self.fit_bits)), hi=float(max(self.fit_bits)), quantizer=name)

    def probed_bits(self, quantizer: str) -> tuple[int, ...]:
        """The widths whose single-head KL was measured for ``quantizer`` (empty: none)."""
        return tuple(sorted(int(b) for b in self.probes.get(self._quantizer(quantizer), {})))

    def menu(self, quantizer: str) -> tuple[int, ...]:
        """The widths an allocation for ``quantizer`` may use: the fitted range plus the probed widths."""
        lo, hi = min(self.fit_bits), max(self.fit_bits)
        return tuple(sorted(set(range(lo, hi + 1)) | set(self.probed_bits(quantizer))))

    def loss_model(self, quantizer: str, importance: str | None = None, distortion: str | None = None,
                   menu: Sequence[int] | None = None) -> TabulatedModel:
        """Predicted loss per item and width, in nats per token (allocate it with unit weights), over ``menu``
        (default :meth:`menu`):

        ``L_i(b) = KL_i(b)`` measured (:func:`~.capture.single_head_kl`) at the probed widths, and elsewhere
        ``L_i(b) = s D_i(b)`` with ``D`` the distortion (:data:`DISTORTIONS`, default :attr:`default_distortion`):
        ``"fisher-mse"``: ``w_i * MSE_i(b)`` (importance ``w``, the fitted MSE curve); ``"fisher-error"``: the
        Fisher-weighted error, the fitted curve where it is within tolerance of the measurements and the measured
        values where it is not (:func:`rdalloc.fit.choose_model`, per quantizer and role). Widths outside the fitted
        range are read as measured, never extrapolated. One scale ``s = sum_i KL_i(b*) / sum_i D_i(b*)`` at the
        widest probed width ``b*`` makes the two pieces meet on the same level (``s = 1`` without probes).
        ``"fisher-error"`` is already a Fisher estimate: ``importance`` may only name ``"fisher"`` with it.
        Returns a :class:`rdalloc.TabulatedModel` over the menu; ``meta`` of the probes is in :attr:`probes`."""
        name = self._quantizer(quantizer)
        kind = self.distortion(distortion, name)
        menu = self.menu(name) if menu is None else tuple(sorted({int(b) for b in menu}))
        probed = {b: np.concatenate([np.ravel(p.key), np.ravel(p.value)]) for b, p in self.probes.get(name, {}).items()}
        lo, hi = min(self.fit_bits), max(self.fit_bits)
        if kind == "fisher-mse":
            model, w = self.model(name), self.weights(importance)
            alpha, beta = np.asarray(model.alpha, dtype=np.float64), np.asarray(model.beta, dtype=np.float64)
            measured, bits = self.distortions(name)
            curve = {}
            for b in menu:
                if lo <= b <= hi or b in probed:
                    curve[b] = w * alpha * beta ** (-float(b))
                else:
                    curve[b] = w * self._measured_column(measured, bits, b, name)
        else:
            if importance not in (None, "fisher"):
                raise ValueError(f"importance {importance!r} does not apply to distortion 'fisher-error' (the "
                                 f"Fisher-weighted error is itself the Fisher estimate); pass importance=None")
            choices = [self.loss_choice(name, role) for role in ROLES]
            measured, bits = self.loss_distortions(name)
            curve = {}
            for b in menu:
                if lo <= b <= hi:
                    curve[b] = np.concatenate([c.model.table([b])[0][:, 0] for c in choices])
                else:
                    curve[b] = self._measured_column(measured, bits, b, name)
        scale = 1.0
        if probed:
            top = max(probed)
            predicted = float(curve[top].sum()) if top in curve else float("nan")
            scale = float(probed[top].sum()) / predicted if predicted > 0 else 1.0
        table = np.stack([probed[b] if b in probed else scale * curve[b] for b in menu], axis=1)
        return TabulatedModel(bits=menu, distortion=table, quantizer=name)

    def _measured_column(self, measured: np.ndarray, bits: tuple[int, ...], b: int, name: str) -> np.ndarray:
        if b == 16:
            return np.zeros(measured.shape[0])
        if b not in bits:
            raise ValueError(f"menu width {b} is outside the fitted range {min(self.fit_bits)}..{max(self.fit_bits)} "
                             f"and was not measured for {name!r} (measured {list(bits)})")
        return measured[:, bits.index(b)]

    def loss_choice(self, quantizer: str, role: str) -> ModelChoice:
        """:func:`rdalloc.fit.choose_model` on the Fisher-weighted error of ``role``'s heads over the fitted widths:
        which heads read the pooled curve and which the measured table (``summary()`` says why)."""
        name = self._quantizer(quantizer)
        self.distortion("fisher-error", name)
        if role not in ROLES:
            raise ValueError(f"role must be 'key' or 'value', got {role!r}")
        fit = self.loss_fits[name][role]
        use = np.asarray([1.0 if b in self.fit_bits else 0.0 for b in fit.bits])
        fitted = tuple(b for b in fit.bits if b in self.fit_bits)
        return choose_model(fit.distortions, fit.bits, menu=fitted, sample_weights=use, quantizer=name)

    def loss_distortions(self, quantizer: str) -> tuple[np.ndarray, tuple[int, ...]]:
        """Measured Fisher-weighted error ``(2 * layers * kv_heads, len(bits))`` in nats per token (keys then
        values) and the widths measured."""
        name = self._quantizer(quantizer)
        self.distortion("fisher-error", name)
        k, v = (self.loss_fits[name][role] for role in ROLES)
        return np.concatenate([k.distortions, v.distortions]), tuple(k.bits)

    def distortions(self, quantizer: str) -> tuple[np.ndarray, tuple[int, ...]]:
        """Measured ``(2 * layers * kv_heads, len(bits))`` MSE (keys then values) and the widths measured."""
        name = self._quantizer(quantizer)
        k, v = (self.fits[name][role] for role in ROLES)
        return np.concatenate([k.distortions, v.distortions]), tuple(k.bits)

    def weights(self, method: str | None = None) -> np.ndarray:
        """Item weights ``w`` (keys then values, ``2 * layers * kv_heads``) from the named estimator (default:
        :attr:`default_importance`)."""
        method = self.default_importance if method is None else method
        if method not in IMPORTANCE_METHODS:
            raise ValueError(f"importance must be one of {IMPORTANCE_METHODS}, got {method!r}")
        if method not in self.importance:
            raise ValueError(f"this calibration has no {method!r} importance (it has {list(self.importance)})")
        imp = self.importance[method]
        return np.concatenate([np.ravel(imp.key), np.ravel(imp.value)]).astype(np.float64)

    def check_model(self, facts: ModelFacts) -> Calibration:
        """``ValueError`` when the calibration was made for a model with another cache layout."""
        for name in ("layers", "kv_heads", "head_dim"):
            have, want = getattr(self.facts, name), getattr(facts, name)
            if have != want:
                raise ValueError(f"the calibration was made for {self.facts.name} with {name}={have}, but the model "
                                 f"{facts.name} has {name}={want}")
        return self

    # ---- serialization -----------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"format": CALIBRATION_FORMAT, "version": CALIBRATION_VERSION, "facts": self.facts.to_dict(),
                "default_importance": self.default_importance, "text": dict(self.text),
                "timings": {k: float(v) for k, v in self.timings.items()},
                "cpu_timings": {k: float(v) for k, v in self.cpu_timings.items()}, "fit_bits": list(self.fit_bits),
                "betas": {q: self.betas(q) for q in self.fits},
                "r2": {q: {r: float(self.fits[q][r].r2_overall) for r in ROLES} for q in self.fits},
                "models": {q: self.model(q).to_dict() for q in self.fits},
                "fits": {q: {r: f.to_dict() for r, f in roles.items()} for q, roles in self.fits.items()},
                "importance": {m: imp.to_dict() for m, imp in self.importance.items()},
                "probes": {q: {str(b): p.to_dict() for b, p in ps.items()} for q, ps in self.probes.items()},
                "quantizer_specs": {q: self.quantizer(q).spec() for q in self.fits},
                "default_distortion": self.default_distortion,
                "loss_fits": {q: {r: f.to_dict() for r, f in roles.items()} for q, roles in self.loss_fits.items()},
                "loss_betas": {q: {r: float(f.beta[0]) for r, f in roles.items()}
                               for q, roles in self.loss_fits.items()},
                "environment": dict(self.environment)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Calibration:
        if not isinstance(d, Mapping) or d.get("format") != CALIBRATION_FORMAT:
            got = d.get("format") if isinstance(d, Mapping) else type(d).__name__
            raise ValueError(f"not an rdalloc calibration: format={got!r} (expected {CALIBRATION_FORMAT!r})")
        if d.get("version") != CALIBRATION_VERSION:
            raise ValueError(f"unsupported calibration version {d.get('version')!r} (this rdalloc reads "
                             f"{CALIBRATION_VERSION})")
        try:
            fits = {q: {r: ExponentialFit.from_dict(f[r]) for r in ROLES} for q, f in d["fits"].items()}
            importance = {m: HeadImportance.from_dict(i) for m, i in d["importance"].items()}
            probes = {q: {int(b): HeadImportance.from_dict(p) for b, p in ps.items()}
                      for q, ps in (d.get("probes") or {}).items()}
            loss_fits = {q: {r: ExponentialFit.from_dict(f[r]) for r in ROLES}
                         for q, f in (d.get("loss_fits") or {}).items()}
            calibration = cls(facts=ModelFacts.from_dict(d["facts"]), fits=fits, importance=importance,
                       default_importance=d.get("default_importance", DEFAULT_IMPORTANCE), text=d.get("text") or {},
                       timings=d.get("timings") or {}, cpu_timings=d.get("cpu_timings") or {},
                       fit_bits=tuple(int(b) for b in d.get("fit_bits", FIT_BITS)),
                       probes=probes, environment=d.get("environment") or {},
                       quantizer_specs={q: dict(spec) for q, spec in (d.get("quantizer_specs") or {}).items()},
                       loss_fits=loss_fits, default_distortion=d.get("default_distortion", "fisher-mse"))
        except (KeyError, TypeError) as e:
            raise ValueError(f"corrupted calibration: missing or malformed field {e}") from None
        if calibration.default_distortion not in DISTORTIONS or (
                calibration.default_distortion == "fisher-error" and not loss_fits):
            raise ValueError(f"corrupted calibration: default_distortion={calibration.default_distortion!r} (one of "
                             f"{DISTORTIONS}; 'fisher-error' needs loss_fits)")
        for q, spec in calibration.quantizer_specs.items():
            try:
                calibration.quantizer(q)
            except (TypeError, ValueError) as e:
                raise ValueError(f"corrupted calibration: quantizer_specs[{q!r}] = {spec!r} ({e})") from None
        return calibration

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict()))

    @classmethod
    def load(cls, path: str | Path) -> Calibration:
        p = Path(path)
        if not p.is_file():
            raise ValueError(f"calibration file {str(path)!r} does not exist")
        try:
            d = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}): not an rdalloc calibration") \
                from None
        return cls.from_dict(d)


def fixed_beta_model(calibration: Calibration, quantizer: str, beta: float = 4.0, *,
                     lo: float | None = None, distortion: str = "fisher-mse") -> ExponentialModel:
    """The naive model: one ``beta`` for every quantizer and role, ``alpha_i`` the least-squares fit of
    ``log D_i(b) = log alpha_i - b log beta`` to the same measurements (``alpha_i`` is the geometric mean of
    ``D_i(b) * beta**b`` over the fitted widths with ``D > 0``), valid from ``lo`` (default: the narrowest fitted
    width) up. ``distortion``: the measurements, the per-element MSE (``"fisher-mse"``: multiply by the
    importance) or the Fisher-weighted error in nats per token (``"fisher-error"``: unit weights)."""
    if not beta > 1:
        raise ValueError(f"beta must be > 1, got {beta!r}")
    kind = calibration.distortion(distortion, quantizer)
    d, bits = calibration.distortions(quantizer) if kind == "fisher-mse" else calibration.loss_distortions(quantizer)
    b = np.asarray(bits, dtype=np.float64)
    q = np.isin(b, calibration.fit_bits)
    d, b = d[:, q], b[q]
    ok = d > 0
    logs = np.where(ok, np.log(np.where(ok, d, 1.0)) + b[None, :] * np.log(beta), 0.0)
    count = ok.sum(axis=1)
    if (count == 0).any():
        i = int(np.argmin(count))
        raise ValueError(f"item {i} has no positive distortion measurement to fit alpha from")
    alpha = np.exp(logs.sum(axis=1) / count)
    return ExponentialModel(alpha=alpha, beta=float(beta), lo=float(b.min() if lo is None else lo), hi=float(b.max()),
                            quantizer=get_quantizer(quantizer).name)


def _clock() -> tuple[float, float]:
    """``(wall, cpu)`` seconds now: ``time.perf_counter()`` and this process's ``time.process_time()``."""
    return time.perf_counter(), time.process_time()


def _lap(wall: dict, cpu: dict, step: str, since: tuple[float, float]) -> None:
    """Record the wall and CPU seconds of ``step`` since ``since`` (a :func:`_clock` reading)."""
    now = _clock()
    wall[step], cpu[step] = now[0] - since[0], now[1] - since[1]


def calibrate(model: Any, facts: ModelFacts, windows: Any, *, quantizers: Sequence[str] = DEFAULT_QUANTIZERS,
              importance: Sequence[str] = IMPORTANCE_METHODS, default_importance: str = DEFAULT_IMPORTANCE,
              distortion: str | None = None,
              bits: Sequence[int] = CALIBRATION_BITS, fit_bits: Sequence[int] = FIT_BITS, fisher_samples: int = 1,
              probe_bits: Sequence[int] = (), probe_windows: int = 1, probe_length: int = 128,
              text: Mapping[str, Any] | None = None,
              progress: bool = True) -> Calibration:
    """Capture K/V over ``windows`` (``[count, length]`` token ids), measure and fit every quantizer's curves, and
    estimate head importance with each estimator in ``importance``; with ``probe_bits``, measure the single-head KL
    at those widths over the first ``probe_windows`` windows cut to ``probe_length`` tokens. With the Fisher
    estimator, the same pass measures every quantizer's Fisher-weighted error (:attr:`Calibration.loss_fits`);
    ``distortion`` (:data:`DISTORTIONS`) is the one allocations use by default (``"fisher-error"`` needs
    ``"fisher"`` in ``importance``; ``None``: :data:`DEFAULT_DISTORTION` when the Fisher estimator runs, else
    ``"fisher-mse"``). See the module docstring.

    ``quantizers`` are registered names (default settings), spec dicts or instances, e.g.
    ``get_quantizer("kivi", group_size=16)`` for a head_dim KIVI's default group of 32 channels does not divide; the
    calibration records each spec and plans made from it carry it. Works on float32, float64 and bfloat16/float16
    models on any device (statistics are upcast: K/V to float32, sums to float64). A model with sliding-window
    layers (or, for the attention estimator, soft-capped logits) is refused before any forward pass
    (:func:`~.model.check_attention_layers`)."""
    import torch

    from rdalloc.measure import measure_distortion

    check_attention_layers(model, "calibrate", softcap="attention" in tuple(importance))
    instances = [get_quantizer(dict(q) if isinstance(q, Mapping) else q) for q in quantizers]
    names = [q.name for q in instances]
    fit_bits = tuple(int(b) for b in fit_bits)
    if len(fit_bits) < 2 or not set(fit_bits) <= set(int(b) for b in bits):
        raise ValueError(f"fit_bits must be at least two of the measured widths {list(bits)}, got {list(fit_bits)}")
    if not names or len(set(names)) != len(names):
        raise ValueError(f"quantizers must be distinct registered names, got {list(quantizers)!r}")
    bad = [m for m in importance if m not in IMPORTANCE_METHODS]
    if bad or not importance:
        raise ValueError(f"importance must name estimators among {IMPORTANCE_METHODS}, got {list(importance)!r}")
    if default_importance not in importance:
        raise ValueError(f"default_importance {default_importance!r} must be one of the estimators run "
                         f"{list(importance)}")
    if distortion is None:
        distortion = DEFAULT_DISTORTION if "fisher" in importance else "fisher-mse"
    if not isinstance(distortion, str) or distortion not in DISTORTIONS:
        raise ValueError(f"distortion must be one of {DISTORTIONS}, got {distortion!r}")
    if distortion == "fisher-error" and "fisher" not in importance:
        raise ValueError(f"distortion 'fisher-error' is measured in the Fisher pass: importance must include "
                         f"'fisher', got {list(importance)!r}")
    probe_bits = tuple(sorted({int(b) for b in probe_bits}))
    if any(not 1 <= b <= 8 for b in probe_bits):
        raise ValueError(f"probe_bits must be quantized widths in 1..8, got {list(probe_bits)}")
    for name, v in (("probe_windows", probe_windows), ("probe_length", probe_length)):
        if isinstance(v, bool) or not isinstance(v, int) or v < (2 if name == "probe_length" else 1):
            raise ValueError(f"{name} must be a positive integer (probe_length >= 2), got {v!r}")
    by_name = dict(zip(names, instances))
    for q in instances:  # e.g. QuaRot needs a power-of-two head_dim: fail before any forward pass
        for role in ROLES:
            q.grouping(role, facts.head_dim)
    timings: dict[str, float] = {}
    cpu_timings: dict[str, float] = {}
    t_all = _clock()

    t0 = _clock()
    kv = capture_kv(model, windows, progress=progress)
    _lap(timings, cpu_timings, "capture", t0)

    t0 = _clock()
    fits: dict[str, dict[str, ExponentialFit]] = {}
    with torch.no_grad():
        for q in names:
            fits[q] = {}
            for role, x in (("key", kv.keys), ("value", kv.values)):
                d = measure_distortion(x, by_name[q], list(bits), role=role).double().cpu().numpy()
                use = np.asarray([1.0 if b in fit_bits else 0.0 for b in bits])
                fit = fit_exponential(d, list(bits), pooled=True, sample_weights=use, quantizer=q)
                _ = fit.model  # raises ValueError naming the item if a fit is unusable (beta <= 1, NaN)
                fits[q][role] = fit
    _lap(timings, cpu_timings, "measure_fit", t0)
    del kv

    probes: dict[str, dict[int, HeadImportance]] = {}
    if probe_bits:
        t0 = _clock()
        ids = torch.as_tensor(windows if hasattr(windows, "shape") else np.asarray(windows))
        probe_ids = ids[:probe_windows, :probe_length]
        for q in names:
            probes[q] = {b: single_head_kl(model, probe_ids, by_name[q], b, progress=progress) for b in probe_bits}
        _lap(timings, cpu_timings, "probe", t0)

    found: dict[str, HeadImportance] = {}
    loss_fits: dict[str, dict[str, ExponentialFit]] = {}
    for method in importance:
        t0 = _clock()
        if method == "fisher":
            widths = tuple(int(b) for b in bits if 0 < int(b) < 16)
            found[method], tables = fisher_error(model, windows, instances, widths, samples=fisher_samples,
                                                 progress=progress)
            timings["fisher_error_tables"] = float(tables.meta["error_seconds"])  # part of timings["fisher"]
            cpu_timings["fisher_error_tables"] = float(tables.meta["error_cpu_seconds"])
            use = np.asarray([1.0 if b in fit_bits else 0.0 for b in tables.bits])
            for q in names:
                loss_fits[q] = {}
                for role in ROLES:
                    fit = fit_exponential(tables.table(q, role), list(tables.bits), pooled=True, sample_weights=use,
                                          quantizer=q)
                    _ = fit.model
                    loss_fits[q][role] = fit
        else:
            found[method] = attention_importance(model, windows, relative=True, progress=progress)
        _lap(timings, cpu_timings, method, t0)
    _lap(timings, cpu_timings, "total", t_all)
    ids = windows if hasattr(windows, "shape") else np.asarray(windows)
    text_facts = {"calibration_windows": int(ids.shape[0]), "length": int(ids.shape[1]), **dict(text or {})}
    return Calibration(facts=facts, fits=fits, importance=found, default_importance=default_importance,
                       text=text_facts, timings=timings, cpu_timings=cpu_timings, fit_bits=fit_bits, probes=probes,
                       environment=environment(next(model.parameters()).dtype, device=str(model.device),
                                               attn_implementation=getattr(model.config, "_attn_implementation",
                                                                           None)),
                       quantizer_specs={q.name: q.spec() for q in instances}, loss_fits=loss_fits,
                       default_distortion=distortion)
