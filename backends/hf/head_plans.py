"""Per-head plans from a calibration, and the perplexity of a model whose KV cache follows one.

A head plan gives one width per (layer, kv_head) for K and one for V, for one quantizer, at an average-bit budget
**with metadata charged** (docs/design.md §2), over the calibration's menu (:meth:`.calibrate.Calibration.menu`:
the fitted widths ``2..8``, plus ``1`` when the calibration probed it):

* :func:`allocate_plan` — :func:`rdalloc.allocate` with the quantizer's calibrated loss model
  (:meth:`.calibrate.Calibration.loss_model`: importance x fitted curve, measured single-head KL at probed widths);
  options: another importance estimator, another quantizer's model (mismatch), one fixed ``beta``
  (:func:`.calibrate.fixed_beta_model`).
* :func:`uniform_plan` — every head at one integer width (:func:`uniform_bits`: the width whose charged average is
  exactly a budget, if any).
* :func:`random_plan` — :func:`rdalloc.allocate` on a flat model (all items alike, ``beta = 4``) with log-normal
  random weights (``sigma = 1.5``: about one bit of spread).

Why 1 bit only with probes: the 1->2-bit step of the measured MSE is far steeper than the per-bit decay of the other
widths, and the Fisher weights, a local (second-order) estimate, cannot see how badly 1-bit keys derail the softmax;
the single-head KL probes measure that damage instead of extrapolating it.

Costs. Item ``i`` of a head plan holds ``n = tokens * head_dim`` elements of one window of ``tokens`` tokens (the
evaluation length) and carries the quantizer's metadata ``m = quantizer.item_metadata_bits(role, "head", tokens,
head_dim)``; the plan records both the charged and the payload-only average bits.

Evaluation. :func:`plan_transform` turns a plan into a ``TransformCache`` transform (the torch ``PlanApplier``
fake-quantizes every stored position on each update), and :func:`evaluate_plan` measures perplexity over the
evaluation windows with it (docs/design.md §5, simulated quantized-KV protocol).

Quantizer settings. ``quantizer`` arguments take a registered name (default settings; for :func:`allocate_plan`:
the settings the calibration measured), a spec dict or an instance, e.g. ``get_quantizer("kivi", group_size=16)``
for head_dim 16. Every plan records ``meta["quantizer_spec"]`` and is applied with it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from rdalloc.allocate import allocate
from rdalloc.cost import Usage
from rdalloc.models import ExponentialModel
from rdalloc.plan import Plan
from rdalloc.quantizers import get_quantizer

from .calibrate import Calibration, fixed_beta_model
from .model import ModelFacts

__all__ = ["MENU", "head_costs", "allocate_plan", "uniform_plan", "uniform_bits", "random_plan", "check_plan",
           "plan_transform", "plan_cache_factory", "evaluate_plan"]

MENU = tuple(range(2, 9))
"""The menu of a calibration without probes (see the module docstring, "Why 1 bit only with probes")."""
RANDOM_SIGMA = 1.5


# ---- costs and plans ---------------------------------------------------------------------------------------------
def _instance(quantizer: Any):
    return get_quantizer(dict(quantizer) if isinstance(quantizer, Mapping) else quantizer)


def head_costs(facts: ModelFacts, quantizer: Any, tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """``(sizes, metadata)`` per item of a head plan (keys then values): ``tokens * head_dim`` elements each and the
    quantizer's metadata bits when quantized."""
    if isinstance(tokens, bool) or not isinstance(tokens, (int, np.integer)) or tokens < 1:
        raise ValueError(f"tokens must be a positive integer (the evaluation window length), got {tokens!r}")
    q = _instance(quantizer)
    n = facts.layers * facts.kv_heads
    sizes = np.full(2 * n, float(tokens * facts.head_dim))
    meta = np.concatenate([np.full(n, float(q.item_metadata_bits(role, "head", int(tokens), facts.head_dim)))
                           for role in ("key", "value")])
    return sizes, meta


def _head_plan(allocation, facts: ModelFacts, quantizer: Any, meta: Mapping[str, Any], menu: Sequence[int]) -> Plan:
    q = _instance(quantizer)
    return Plan.from_allocation(allocation, (facts.layers, facts.kv_heads), quantizer=q.name,
                                meta={"model": facts.name, "head_dim": facts.head_dim, "quantizer_spec": q.spec(),
                                      "menu": [int(b) for b in menu], **dict(meta)})


def allocate_plan(calibration: Calibration, quantizer: Any, average_bits: float, *, tokens: int,
                  importance: str | None = None, model_from: str | None = None, fixed_beta: float | None = None,
                  menu: Sequence[int] | None = None, distortion: str | None = None) -> Plan:
    """The rdalloc head plan for ``quantizer`` at ``average_bits`` (metadata charged), over ``menu`` (default:
    :meth:`.calibrate.Calibration.menu` of ``quantizer``).

    Allocates the calibration's loss model (:meth:`.calibrate.Calibration.loss_model`, unit weights). ``model_from``
    uses another quantizer's model (the mismatch experiment; the plan is still for ``quantizer``, whose costs it is
    charged). ``fixed_beta`` replaces the fitted curve by :func:`.calibrate.fixed_beta_model` extrapolated over the
    menu, times the importance (no probes). ``importance`` names the estimator (default: the calibration's).
    ``distortion`` (default: the calibration's ``default_distortion``) is what is minimized; the plan records it.
    """
    quant = calibration.quantizer(quantizer)
    q = quant.name
    source = q if model_from is None else get_quantizer(model_from).name
    kind = calibration.distortion(distortion, source)
    if kind == "fisher-error" and importance not in (None, "fisher"):
        raise ValueError(f"importance {importance!r} does not apply to distortion 'fisher-error' (a Fisher estimate "
                         f"itself); pass distortion='fisher-mse' to weight the MSE by {importance!r}")
    method = ("fisher" if kind == "fisher-error" else calibration.default_importance) if importance is None \
        else importance
    menu = calibration.menu(q) if menu is None else tuple(int(b) for b in menu)
    sizes, meta = head_costs(calibration.facts, quant, tokens)
    if fixed_beta is None:
        model = calibration.loss_model(source, method, kind, menu=menu)
        weights = np.ones(model.n_items)
    else:
        model = fixed_beta_model(calibration, source, fixed_beta, lo=min(menu), distortion=kind)
        weights = np.ones(model.n_items) if kind == "fisher-error" else calibration.weights(method)
    r = allocate(model, sizes, average_bits=float(average_bits), weights=weights, menu=menu, metadata=meta)
    return _head_plan(r, calibration.facts, quant, {"method": "rdalloc", "importance": method, "distortion": kind,
                                                "model_from": source,
                                                "fixed_beta": fixed_beta, "tokens": int(tokens),
                                                "probed_bits": list(calibration.probed_bits(source)),
                                                "average_bits_asked": float(average_bits)}, menu)


def uniform_bits(facts: ModelFacts, quantizer: Any, average_bits: float, tokens: int) -> int | None:
    """The integer width whose charged average equals ``average_bits`` exactly, or ``None``."""
    sizes, meta = head_costs(facts, quantizer, tokens)
    overhead = float(meta.sum() / sizes.sum())
    b = average_bits - overhead
    if abs(b - round(b)) > 1e-9 or not 1 <= round(b) <= 8:
        return None
    return int(round(b))


def uniform_plan(facts: ModelFacts, quantizer: Any, bits: int, *, tokens: int) -> Plan:
    """Every key and value head at ``bits`` (16: the full-precision plan)."""
    q = _instance(quantizer)
    q.check_bits(np.asarray([bits]), "bits")
    shape = (facts.layers, facts.kv_heads)
    sizes, meta = head_costs(facts, q, tokens)
    b = np.full(sizes.shape, float(bits))
    usage = Usage.of(b, sizes, meta)
    return Plan(key=np.full(shape, bits), value=np.full(shape, bits), quantizer=q.name,
                budget_bits=usage.total_bits, usage=usage,
                meta={"model": facts.name, "head_dim": facts.head_dim, "quantizer_spec": q.spec(),
                      "method": "uniform", "tokens": int(tokens)})


def random_plan(facts: ModelFacts, quantizer: Any, average_bits: float, *, tokens: int, seed: int,
                sigma: float = RANDOM_SIGMA, menu: Sequence[int] = MENU) -> Plan:
    """A random allocation at the budget: the flat model (every item alike) with log-normal random weights."""
    quant = _instance(quantizer)
    q = quant.name
    sizes, meta = head_costs(facts, quant, tokens)
    rng = np.random.default_rng(int(seed))
    weights = np.exp(sigma * rng.standard_normal(sizes.size))
    flat = ExponentialModel(alpha=np.ones(sizes.size), beta=4.0, lo=float(min(menu)), hi=float(max(menu)),
                            quantizer=q)
    r = allocate(flat, sizes, average_bits=float(average_bits), weights=weights, menu=menu, metadata=meta)
    return _head_plan(r, facts, quant, {"method": "random", "seed": int(seed), "sigma": float(sigma),
                                    "tokens": int(tokens), "average_bits_asked": float(average_bits)}, menu)


def check_plan(plan: Plan, facts: ModelFacts, quantizer: Any = None) -> str:
    """``ValueError`` if ``plan`` is not a head plan for this model's cache or for ``quantizer`` (a name, spec or
    instance; default: the spec the plan records), or if that quantizer's groups do not fit the cache's head_dim;
    returns the quantizer's name."""
    from rdalloc.layout import resolve_quantizer

    if not isinstance(plan, Plan):
        raise TypeError(f"plan must be an rdalloc.Plan, got {type(plan).__name__}")
    if plan.granularity != "head":
        raise ValueError(f"expected a head plan (one width per layer and kv-head), got a {plan.granularity!r} plan")
    if quantizer is None and plan.quantizer is None:
        raise ValueError("the plan does not record its quantizer: name one")
    q = resolve_quantizer(plan, dict(quantizer) if isinstance(quantizer, Mapping) else quantizer)
    plan.check(layers=facts.layers, kv_heads=facts.kv_heads, quantizer=q.name)
    hd = plan.meta.get("head_dim") if isinstance(plan.meta, Mapping) else None
    if hd is not None and int(hd) != facts.head_dim:
        raise ValueError(f"the plan was made for head_dim={hd}, but the cache has head_dim={facts.head_dim}")
    for role in ("key", "value"):
        q.grouping(role, facts.head_dim)
    q.check_bits(np.concatenate([np.ravel(plan.key), np.ravel(plan.value)]), "plan bits")
    return q.name


# ---- the cache -------------------------------------------------------------------------------------------------
def plan_transform(plan: Plan, quantizer: Any = None):
    """A ``TransformCache`` transform fake-quantizing each layer's whole stored K/V with ``plan`` (torch
    :class:`rdalloc.PlanApplier`, built once; a 16-bit plan returns the inputs bit for bit)."""
    from rdalloc.apply import PlanApplier

    applier = PlanApplier(plan, quantizer)

    def transform(layer_idx, key, value):
        out = applier.fake_quantize(key, value, layer=layer_idx)
        return out.keys, out.values

    transform.applier = applier
    return transform


def plan_cache_factory(plan: Plan, config: Any, quantizer: Any = None):
    """A zero-argument factory of fresh quantized-KV caches for :func:`~.perplexity.perplexity`."""
    from .cache import cache_factory

    return cache_factory(plan_transform(plan, quantizer), config)


def evaluate_plan(model: Any, windows: Any, plan: Plan | None, *, quantizer: Any = None, progress: bool = True,
                  desc: str = "perplexity"):
    """:class:`~.perplexity.PerplexityResult` of ``model`` over ``windows`` with ``plan`` (``None``: full cache)."""
    from .perplexity import perplexity

    factory = None if plan is None else plan_cache_factory(plan, model.config, quantizer)
    return perplexity(model, windows, factory, progress=progress, desc=desc)
