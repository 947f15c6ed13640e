"""Distortion in the loss's units per quantizer (backends/hf/capture.py ``fisher_error``, calibrate.py
``distortion=``): the estimator, a brute-force check on a tiny random Llama, fits, plans and refusals (seconds)."""

from __future__ import annotations

import importlib

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from hf_fixtures import tiny_llama  # noqa: E402
from rdalloc.backends.hf.cache import TransformCache  # noqa: E402
from rdalloc.backends.hf.calibrate import DISTORTIONS, Calibration, calibrate  # noqa: E402
from rdalloc.backends.hf.capture import (  # noqa: E402
    FisherError,
    fake_quantize_widths,
    fisher_error,
    fisher_importance,
    fisher_weighted_error,
)
from rdalloc.backends.hf.compat import forward  # noqa: E402
from rdalloc.backends.hf.head_plans import allocate_plan  # noqa: E402
from rdalloc.backends.hf.model import model_facts  # noqa: E402

from rdalloc import Plan  # noqa: E402
from rdalloc.diagnostics import diagnose  # noqa: E402
from rdalloc.measure import measure_distortion  # noqa: E402
from rdalloc.quantizers import fake_quantize_uniform, get_quantizer  # noqa: E402

LAYERS, KV_HEADS, Q_HEADS, HIDDEN, VOCAB = 2, 2, 4, 64, 128  # head_dim 16
KIVI16 = get_quantizer("kivi", group_size=16)


@pytest.fixture(scope="module")
def tiny():
    return tiny_llama(hidden=HIDDEN, layers=LAYERS, q_heads=Q_HEADS, kv_heads=KV_HEADS, vocab=VOCAB)


@pytest.fixture(scope="module")
def ids():
    return torch.randint(3, VOCAB, (2, 40), generator=torch.Generator().manual_seed(5))


@pytest.fixture(scope="module")
def calib(tiny, ids):
    return calibrate(tiny, model_facts(tiny), ids, quantizers=[KIVI16, "quarot"], progress=False)


# ---- the estimator on a synthetic head ---------------------------------------------------------------------------
def test_concentrated_error_where_the_loss_looks_is_ranked_above_spread_error():
    """Head 0: KIVI's key error sits in one outlier channel and the loss weights exactly that channel; head 1: error
    spread evenly, a larger MSE, the same total Fisher weight. The loss-unit distortion (here exact: the loss is the
    quadratic form sum_e G_e delta_e^2 / 2) ranks head 0 first; Fisher x MSE ranks head 1 first."""
    g = torch.Generator().manual_seed(0)
    T, D = 64, 16
    x = torch.empty(1, 2, T, D, dtype=torch.float64)
    x[0, 0] = (torch.rand(T, D, generator=g, dtype=torch.float64) - 0.5) * 0.02
    x[0, 0, :, 0] = (torch.rand(T, generator=g, dtype=torch.float64) - 0.5) * 16.0   # the outlier channel
    x[0, 1] = (torch.rand(T, D, generator=g, dtype=torch.float64) - 0.5) * 8.0
    grad_sq = torch.zeros_like(x)
    grad_sq[0, 0, :, 0] = float(D)   # head 0: all of its weight on the outlier channel
    grad_sq[0, 1] = 1.0              # head 1: the same total, spread evenly
    bits = (2, 3, 4)
    loss_units = fisher_weighted_error(grad_sq, x, KIVI16, bits, role="key").numpy()           # [heads, bits]
    mse = measure_distortion(x, KIVI16, list(bits), role="key").numpy()                      # [heads, bits]
    weight = grad_sq.sum(dim=(0, 2, 3)).numpy()
    today = weight[:, None] * mse
    assert np.all(mse[1] > 1.5 * mse[0])                   # head 1 has the larger MSE ...
    assert np.all(today[1] > today[0])                     # ... so Fisher x MSE ranks it first,
    assert np.all(loss_units[0] > 2.0 * loss_units[1])     # but its error lands where the loss does not look
    # uniform weights: the loss-unit distortion is Fisher x MSE exactly
    ones = torch.ones_like(x)
    np.testing.assert_allclose(fisher_weighted_error(ones, x, KIVI16, bits, role="key").numpy(),
                               T * D * mse, rtol=1e-6)


# ---- every width in one batched computation ---------------------------------------------------------------------
def _awkward(shape, dtype, seed):
    """Values a quantizer's edge cases live on: outlier channels, a constant group, exact zeros, subnormals."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g, dtype=torch.float64) * torch.logspace(-3, 1, shape[-1], dtype=torch.float64)
    x[..., 0, :, 3] = 7.25                                   # a constant channel: zero-range key groups
    x[..., 1, :] = 0.0                                       # an all-zero token: zero-range value groups
    x[..., 2, :5] = torch.finfo(torch.float32).tiny / 8      # subnormal in float32 (QuaRot's flush)
    return x.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("spec", [{"name": "kivi", "group_size": 16}, {"name": "quarot"},
                                  {"name": "absmax", "group_size": 8}, {"name": "per_token"}])
def test_all_widths_at_once_equal_width_by_width_bit_for_bit(spec, dtype):
    q = get_quantizer(spec)
    x = _awkward((3, 2, 2, 37, 16), dtype, seed=11)   # [layers, batch, heads, tokens, dim]; 37 tokens: a padded group
    widths = range(q.min_bits, q.max_bits + 1)
    for role in ("key", "value"):
        out = fake_quantize_widths(x, q, widths, role)
        assert out.shape == (len(widths), *x.shape) and out.dtype == dtype
        for j, b in enumerate(widths):
            assert torch.equal(out[j], fake_quantize_uniform(x, q, b, role)), (spec, role, b)


def test_stacked_layers_equal_one_layer_at_a_time():
    x = _awkward((3, 1, 2, 40, 16), torch.float32, seed=3)
    g2 = torch.rand(x.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    for q in (KIVI16, get_quantizer("quarot")):
        stacked = fisher_weighted_error(g2, x, q, (1, 3, 8), role="key")          # [layers, heads, widths]
        one = torch.stack([fisher_weighted_error(g2[i], x[i], q, (1, 3, 8), role="key") for i in range(3)])
        assert stacked.shape == (3, 2, 3)
        torch.testing.assert_close(stacked, one, rtol=1e-12, atol=0)


def test_batched_widths_refuse_bad_input_by_name():
    x = torch.zeros(1, 2, 8, 16)
    with pytest.raises(ValueError, match=r"bits must be a non-empty list of quantized widths in 1\.\.8 .*\[0, 2\]"):
        fake_quantize_widths(x, KIVI16, (0, 2), "key")
    with pytest.raises(ValueError, match=r"got \[16\]"):
        fake_quantize_widths(x, KIVI16, (16,), "key")
    with pytest.raises(ValueError, match="non-empty"):
        fake_quantize_widths(x, KIVI16, (), "key")
    with pytest.raises(ValueError, match="role must be"):
        fake_quantize_widths(x, KIVI16, (2,), "query")
    with pytest.raises(ValueError, match="x must be a torch tensor"):
        fake_quantize_widths(np.zeros((2, 8, 16)), KIVI16, (2,), "key")
    bad = x.clone()
    bad[0, 1, 3, 5] = float("nan")
    with pytest.raises(ValueError, match=r"x holds nan at index \(0, 1, 3, 5\)"):
        fake_quantize_widths(bad, KIVI16, (2,), "key")


# ---- brute force on a tiny model ---------------------------------------------------------------------------------
def _per_element_fisher(model, ids):
    """Per window, the squared gradient of the summed data NLL w.r.t. every cached K/V element, by autograd on
    explicit zero leaves; and the stored K/V. Lists over windows of {layer: (gk2, gv2, k, v)} (numpy float64)."""
    out = []
    for w in range(ids.shape[0]):
        leaves, stored = {}, {}

        def transform(layer, key, value, leaves=leaves, stored=stored):
            dk = torch.zeros_like(key, requires_grad=True)
            dv = torch.zeros_like(value, requires_grad=True)
            leaves[layer], stored[layer] = (dk, dv), (key.detach().clone(), value.detach().clone())
            return key + dk, value + dv

        with torch.enable_grad():
            logits = forward(model, TransformCache(transform, LAYERS), ids[w:w + 1]).logits[0, :-1].float()
            nll = -torch.log_softmax(logits, -1).gather(-1, ids[w, 1:, None]).sum()
            flat = [t for i in range(LAYERS) for t in leaves[i]]
            grads = torch.autograd.grad(nll, flat)
        out.append({i: (grads[2 * i].double().pow(2).numpy(), grads[2 * i + 1].double().pow(2).numpy(),
                        stored[i][0].numpy(), stored[i][1].numpy()) for i in range(LAYERS)})
    return out


def test_fisher_error_equals_brute_force_sum_over_elements(tiny, ids):
    bits = (1, 2, 5)
    quantizers = [KIVI16, get_quantizer("quarot")]
    imp, table = fisher_error(tiny, ids, quantizers, bits, labels="data", progress=False)
    per_window = _per_element_fisher(tiny, ids)
    n = ids.shape[1] - 1
    scale = 1.0 / (2.0 * n * ids.shape[0])
    for q in quantizers:
        for r, role in enumerate(("key", "value")):
            brute = np.zeros((LAYERS, KV_HEADS, len(bits)))
            for window in per_window:
                for layer, parts in window.items():
                    g2, x = parts[r], parts[2 + r]
                    for head in range(KV_HEADS):
                        xh = np.ascontiguousarray(x[:, head:head + 1])      # one head alone, numpy backend
                        for j, b in enumerate(bits):
                            err = fake_quantize_uniform(xh, q, b, role).astype(np.float64) - xh.astype(np.float64)
                            total = 0.0
                            for e in np.ndindex(err.shape):                # the sum over elements, one by one
                                total += g2[:, head:head + 1][e] * err[e] ** 2
                            brute[layer, head, j] += total
            np.testing.assert_allclose(table.tables[q.name][role], brute * scale, rtol=1e-9, atol=0)
            assert np.all(table.tables[q.name][role][..., 0] > table.tables[q.name][role][..., -1])
    # the head weights of the same pass are fisher_importance's
    alone = fisher_importance(tiny, ids, labels="data", progress=False)
    np.testing.assert_allclose(imp.key, alone.key, rtol=1e-12)
    np.testing.assert_allclose(imp.value, alone.value, rtol=1e-12)
    assert table.bits == bits and FisherError.from_dict(table.to_dict()).tables.keys() == table.tables.keys()


# ---- fits, the loss model and plans ------------------------------------------------------------------------------
def test_fitted_curves_pass_the_diagnostics(calib):
    for q in calib.quantizers:
        for role in ("key", "value"):
            fit = calib.loss_fits[q][role]
            report = diagnose(fit)
            assert not {"non_monotone", "too_few_points", "zero_measured"} & report.kinds(), report.text()
            assert 2.0 < float(fit.beta[0]) < 8.0 and report.pooled.r2_overall > 0.95
            # the heads the loss model reads from the table are the ones whose curve misses a point by > 1.3x
            choice = calib.loss_choice(q, role)
            assert np.all(choice.max_factor[choice.tabulated_items] > choice.tolerance)
            assert np.all(choice.max_factor[choice.exponential_items] <= choice.tolerance + 1e-9)


def test_loss_model_reads_the_curve_in_range_and_the_measurement_outside(calib):
    lm = calib.loss_model("kivi", distortion="fisher-error", menu=range(1, 9))
    measured, bits = calib.loss_distortions("kivi")
    table, ok = lm.table(range(1, 9))
    assert ok.all()
    np.testing.assert_array_equal(table[:, 0], measured[:, bits.index(1)])   # 1 bit: measured, not extrapolated
    choice = calib.loss_choice("kivi", "key")
    expo = choice.exponential_items
    n = calib.facts.layers * calib.facts.kv_heads
    np.testing.assert_allclose(table[:n][expo, 1:], choice.fit.curve(range(2, 9))[expo], rtol=1e-12)
    mse = calib.loss_model("kivi", distortion="fisher-mse")
    assert not np.allclose(mse.table(range(2, 9))[0], lm.table(range(2, 9))[0])


@pytest.mark.parametrize("distortion", DISTORTIONS)
def test_plans_record_the_distortion(calib, distortion, tmp_path):
    plan = allocate_plan(calib, "kivi", 4.5, tokens=64, distortion=distortion)
    assert plan.meta["distortion"] == distortion and plan.usage.average_bits <= 4.5 + 1e-9
    plan.save(tmp_path / "p.json")
    assert Plan.load(tmp_path / "p.json").meta["distortion"] == distortion
    for extra in ({"model_from": "quarot"}, {"fixed_beta": 4.0}):
        assert allocate_plan(calib, "kivi", 4.5, tokens=64, distortion=distortion, **extra).meta["distortion"] \
            == distortion
    low = allocate_plan(calib, "kivi", 4.0, tokens=64, distortion=distortion, menu=range(1, 9))
    assert low.meta["menu"] == list(range(1, 9)) and low.usage.average_bits <= 4.0 + 1e-9


def test_default_distortion_is_the_calibrations_and_survives_json(tiny, ids, calib):
    assert calib.default_distortion == "fisher-error"   # the Fisher estimator ran: the loss-unit distortion
    assert allocate_plan(calib, "kivi", 4.5, tokens=64).meta["distortion"] == "fisher-error"
    blind = calibrate(tiny, model_facts(tiny), ids, quantizers=[KIVI16], importance=["attention"],
                      default_importance="attention", progress=False)
    assert blind.default_distortion == "fisher-mse" and not blind.loss_fits
    assert allocate_plan(blind, "kivi", 4.5, tokens=64).meta["distortion"] == "fisher-mse"
    c = calibrate(tiny, model_facts(tiny), ids, quantizers=[KIVI16], importance=["fisher"], progress=False)
    back = Calibration.from_dict(c.to_dict())
    assert back.default_distortion == "fisher-error"
    # CPU seconds per step beside the wall ones; the error tables are part of the Fisher pass
    assert set(c.cpu_timings) == set(c.timings) >= {"capture", "measure_fit", "fisher", "fisher_error_tables"}
    assert 0 < c.cpu_timings["fisher_error_tables"] < c.cpu_timings["fisher"] <= c.cpu_timings["total"]
    assert back.cpu_timings == c.cpu_timings
    assert allocate_plan(back, "kivi", 4.5, tokens=64).meta["distortion"] == "fisher-error"
    np.testing.assert_array_equal(back.loss_model("kivi").table(range(2, 9))[0],
                                  c.loss_model("kivi").table(range(2, 9))[0])


# ---- refusals ----------------------------------------------------------------------------------------------------
def test_bad_options_are_refused_by_name(tiny, ids, calib):
    facts = model_facts(tiny)
    with pytest.raises(ValueError, match="distortion must be one of .*'fisher'"):
        calibrate(tiny, facts, ids, quantizers=[KIVI16], distortion="fisher", progress=False)
    with pytest.raises(ValueError, match="importance must include 'fisher'"):
        calibrate(tiny, facts, ids, quantizers=[KIVI16], importance=["attention"], default_importance="attention",
                  distortion="fisher-error", progress=False)
    with pytest.raises(ValueError, match="distortion must be one of .*'mse'"):
        allocate_plan(calib, "kivi", 4.5, tokens=64, distortion="mse")
    with pytest.raises(ValueError, match="importance 'attention' does not apply"):
        allocate_plan(calib, "kivi", 4.5, tokens=64, distortion="fisher-error", importance="attention")
    with pytest.raises(ValueError, match="importance 'attention' does not apply"):
        calib.loss_model("kivi", "attention", "fisher-error")
    with pytest.raises(ValueError, match="menu width 0"):
        calib.loss_model("kivi", distortion="fisher-error", menu=(0, 2, 3))
    old = calib.to_dict()
    del old["loss_fits"]
    old["default_distortion"] = "fisher-mse"   # a calibration made before the Fisher-weighted error existed
    with pytest.raises(ValueError, match="'fisher-error' was not measured"):
        allocate_plan(Calibration.from_dict(old), "kivi", 4.5, tokens=64, distortion="fisher-error")
    old["default_distortion"] = "fisher-error"
    with pytest.raises(ValueError, match="default_distortion"):
        Calibration.from_dict(old)
    with pytest.raises(ValueError, match="bits must be strictly increasing quantized widths"):
        fisher_error(tiny, ids, [KIVI16], (0, 2), progress=False)
    with pytest.raises(ValueError, match="quantizers must be distinct"):
        fisher_error(tiny, ids, [KIVI16, KIVI16], progress=False)
    with pytest.raises(ValueError, match="does not divide head_dim"):
        fisher_error(tiny, ids, ["kivi"], progress=False)   # KIVI's default value group, 32 channels: head_dim 16
    with pytest.raises(ValueError, match="grad_sq and x"):
        fisher_weighted_error(torch.ones(1, 2, 4, 16), torch.ones(1, 2, 4, 8), KIVI16, (2,), role="key")
    with pytest.raises(ValueError, match="grad_sq and x"):
        fisher_weighted_error(torch.ones(2, 4, 16), torch.ones(2, 4, 16), KIVI16, (2,), role="key")


def test_command_line_offers_the_calibrations_distortions():
    from rdalloc.backends.hf import calibrate as calibrate_module
    from rdalloc.backends.hf import cli

    assert cli.DISTORTIONS == calibrate_module.DISTORTIONS
    assert cli.DEFAULT_DISTORTION == calibrate_module.DEFAULT_DISTORTION


def test_allocate_command_takes_the_distortion(calib, tmp_path, capsys):
    from rdalloc.cli import main

    calib.save(tmp_path / "c.json")
    args = ["allocate", "--calibration", str(tmp_path / "c.json"), "--quantizer", "kivi", "--average-bits", "4.5",
            "--tokens", "64"]
    assert main(args + ["--distortion", "fisher-error", "--out", str(tmp_path / "p.json")]) == 0
    assert Plan.load(tmp_path / "p.json").meta["distortion"] == "fisher-error"
    assert main(args + ["--out", str(tmp_path / "q.json")]) == 0
    assert Plan.load(tmp_path / "q.json").meta["distortion"] == calib.default_distortion
    with pytest.raises(SystemExit):
        main(args + ["--distortion", "fisher", "--out", str(tmp_path / "r.json")])
    assert "--distortion: invalid choice: 'fisher'" in capsys.readouterr().err


# ---- the experiment's cache and plan distances --------------------------------------------------------------------
def test_experiment_scores_each_plan_window_once_and_extends_with_new_windows(tiny, calib, tmp_path, monkeypatch):

    from experiments import fisher_error as exp

    ppl_module = importlib.import_module("rdalloc.backends.hf.perplexity")  # (the package exports the function)
    ev = torch.randint(3, VOCAB, (3, 24), generator=torch.Generator().manual_seed(9))
    plans = {("kivi", "a"): allocate_plan(calib, "kivi", 4.5, tokens=24),
             ("kivi", "b"): allocate_plan(calib, "kivi", 6.0, tokens=24)}
    calls = []
    real = ppl_module.perplexity
    monkeypatch.setattr(ppl_module, "perplexity", lambda *a, **k: calls.append(a[1].shape) or real(*a, **k))
    two = exp.score_plans(tiny, ev[:2], plans, "float32", tmp_path, "t")
    assert len(calls) == 4                                      # 2 plans x 2 windows
    three = exp.score_plans(tiny, ev, plans, "float32", tmp_path, "t")
    assert len(calls) == 6                                      # only the new window, for both plans
    from rdalloc.backends.hf.head_plans import plan_cache_factory
    for k, plan in plans.items():
        whole = real(tiny, ev, plan_cache_factory(plan, tiny.config),
                     reference=ppl_module.reference_logprobs(tiny, ev, progress=False), progress=False)
        np.testing.assert_array_equal(three[k].token_kl, whole.token_kl)
        np.testing.assert_array_equal(three[k].token_nll[:2], two[k].token_nll)
        assert three[k].nll == pytest.approx(whole.nll, rel=1e-12) and three[k].kl == pytest.approx(whole.kl,
                                                                                                    rel=1e-9)


def test_plan_difference_counts_entries_and_bits(calib):
    from experiments.fisher_error import plan_difference

    a = allocate_plan(calib, "kivi", 4.5, tokens=64)
    assert plan_difference(a, a) == {"entries": 2 * LAYERS * KV_HEADS, "differ": 0, "l1": 0}
    b = allocate_plan(calib, "kivi", 6.5, tokens=64)
    d = plan_difference(a, b)
    diff = np.concatenate([b.key.ravel() - a.key.ravel(), b.value.ravel() - a.value.ravel()])
    assert d["differ"] == int((diff != 0).sum()) > 0 and d["l1"] == int(np.abs(diff).sum())


def test_modelled_kl_reads_each_entrys_measured_width(calib):
    from rdalloc.backends.hf.head_plans import uniform_plan

    from experiments.fisher_error import modelled_kl

    measured, bits = calib.loss_distortions("kivi")
    for b in (2, 5):
        plan = uniform_plan(calib.facts, calib.quantizer("kivi"), b, tokens=64)
        assert modelled_kl(calib, plan) == pytest.approx(measured[:, bits.index(b)].sum(), rel=1e-12)
    mixed = allocate_plan(calib, "kivi", 4.5, tokens=64)
    widths = np.concatenate([mixed.key.ravel(), mixed.value.ravel()]).astype(int)
    assert len(set(widths)) > 1
    assert modelled_kl(calib, mixed) == pytest.approx(sum(measured[i, bits.index(w)] for i, w in enumerate(widths)),
                                                      rel=1e-12)


def test_experiment_calibration_cache_returns_the_same_calibration_marked_as_read(tiny, ids, tmp_path):
    from experiments.fisher_error import cached_calibration

    facts = model_facts(tiny)
    first = cached_calibration(tiny, facts, ids, [KIVI16], {"source": "t"}, "float32", tmp_path, False)
    again = cached_calibration(tiny, facts, ids, [KIVI16], {"source": "t"}, "float32", tmp_path, False)
    assert not first.text.get("read_from_cache") and again.text["read_from_cache"] is True
    np.testing.assert_array_equal(again.loss_distortions("kivi")[0], first.loss_distortions("kivi")[0])
    assert again.cpu_timings == first.cpu_timings
    other = cached_calibration(tiny, facts, ids[:1], [KIVI16], {"source": "t"}, "float32", tmp_path, False)
    assert not other.text.get("read_from_cache")   # other windows: calibrated anew
