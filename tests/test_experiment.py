"""rdalloc.backends.hf.calibrate / .head_plans, the real-model CLI steps and the experiment grids, on a tiny random
Llama (no download)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from hf_fixtures import logits, save_model_dir, tiny_llama  # noqa: E402
from rdalloc.backends.hf import (  # noqa: E402
    PerplexityResult,
    TransformCache,
    model_facts,
    perplexity,
    reference_logprobs,
)
from rdalloc.backends.hf.calibrate import Calibration, calibrate, fixed_beta_model  # noqa: E402
from rdalloc.backends.hf.head_plans import (  # noqa: E402
    allocate_plan,
    check_plan,
    evaluate_plan,
    head_costs,
    plan_cache_factory,
    plan_transform,
    random_plan,
    uniform_bits,
    uniform_plan,
)

from experiments.ppl_grid import (  # noqa: E402
    COMPARED,
    ExperimentResult,
    markdown_table,
    plot_results,
    plot_verdicts,
    run_experiment,
)
from rdalloc import Plan  # noqa: E402
from rdalloc.cli import main  # noqa: E402
from rdalloc.quantizers import get_quantizer  # noqa: E402

LAYERS, KV_HEADS, Q_HEADS, HIDDEN, VOCAB = 2, 2, 4, 128, 128  # head_dim 32: KIVI's value groups of 32 fit
TEXT = ("The quick brown fox jumps over the lazy dog while the cache holds keys and values of every token. " * 40)


def _tiny_model():
    return tiny_llama(hidden=HIDDEN, layers=LAYERS, q_heads=Q_HEADS, kv_heads=KV_HEADS, vocab=VOCAB, max_positions=512)


@pytest.fixture(scope="module")
def tiny():
    return _tiny_model()


@pytest.fixture(scope="module")
def facts(tiny):
    return model_facts(tiny)


@pytest.fixture(scope="module")
def ids():
    g = torch.Generator().manual_seed(1)
    return torch.randint(3, VOCAB, (2, 64), generator=g)


@pytest.fixture(scope="module")
def calib(tiny, facts, ids):
    return calibrate(tiny, facts, ids, progress=False)


# ---- the cache wiring --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("quantizer", ["kivi", "quarot"])
def test_sixteen_bit_plan_is_bit_exact(tiny, facts, ids, quantizer):
    plan = uniform_plan(facts, quantizer, 16, tokens=ids.shape[1])
    assert torch.equal(logits(tiny, ids, TransformCache(plan_transform(plan), tiny.config)), logits(tiny, ids))


@pytest.mark.parametrize("quantizer", ["kivi", "quarot"])
def test_two_bit_plan_changes_logits_more_than_eight(tiny, facts, ids, quantizer):
    plain = logits(tiny, ids)
    err = {b: (logits(tiny, ids, TransformCache(plan_transform(uniform_plan(facts, quantizer, b, tokens=64)),
                                                tiny.config)) - plain).abs().max().item() for b in (2, 8)}
    assert err[2] > 1e-3
    assert err[8] < err[2]


@pytest.mark.parametrize("quantizer", ["kivi", "quarot"])
def test_per_head_bits_land_on_their_heads(tiny, facts, ids, quantizer):
    key = np.full((LAYERS, KV_HEADS), 16)
    value = np.full((LAYERS, KV_HEADS), 16)
    key[1, 0] = 2
    value[0, 1] = 3
    plan = Plan(key=key, value=value, quantizer=quantizer)
    cache = TransformCache(plan_transform(plan), tiny.config, keep_transformed=True)
    logits(tiny, ids, cache)
    q = get_quantizer(quantizer)
    for layer in range(LAYERS):
        k, v = cache.layers[layer].transformed
        ko, vo = cache.original(layer)
        for h in range(KV_HEADS):
            for got, orig, bits, role in ((k, ko, key, "key"), (v, vo, value, "value")):
                b = int(bits[layer, h])
                if b == 16:
                    assert torch.equal(got[:, h], orig[:, h]), (layer, h, role)
                else:  # exactly the quantizer's uniform fake quantization of that head alone
                    want = q.fake_quantize(orig[:, h:h + 1], b, role)[:, 0]
                    assert torch.allclose(got[:, h], want, atol=1e-6), (layer, h, role)
                    assert not torch.equal(got[:, h], orig[:, h])


def test_fp16_evaluate_matches_plain_perplexity(tiny, facts, ids):
    plain = evaluate_plan(tiny, ids, None, progress=False)
    sixteen = evaluate_plan(tiny, ids, uniform_plan(facts, "kivi", 16, tokens=64), progress=False)
    assert sixteen.ppl == plain.ppl


def test_kl_to_the_reference_is_zero_unchanged_and_positive_at_two_bits(tiny, facts, ids):
    ref = reference_logprobs(tiny, ids, progress=False)
    plain = perplexity(tiny, ids, progress=False)
    assert ref.result.nll == plain.nll and ref.result.kl == 0.0 and plain.kl is None
    assert ref.nbytes == 2 * 63 * VOCAB * 4 and ref.logprobs[0].dtype == torch.float32
    same = perplexity(tiny, ids, plan_cache_factory(uniform_plan(facts, "kivi", 16, tokens=64), tiny.config),
                      reference=ref, progress=False)
    assert same.kl == 0.0 and not same.token_kl.any() and same.nll == plain.nll
    two = perplexity(tiny, ids, plan_cache_factory(uniform_plan(facts, "kivi", 2, tokens=64), tiny.config),
                     reference=ref, progress=False)
    assert two.kl > 1e-4 and two.token_kl.shape == two.token_nll.shape == (2, 63)
    assert two.token_kl.dtype == two.token_nll.dtype == np.float32
    assert two.token_kl.min() > -1e-6  # KL >= 0 up to float32 rounding
    # the per-token arrays line up with the tokens: recompute token (1, 10) by hand
    cache = plan_cache_factory(uniform_plan(facts, "kivi", 2, tokens=64), tiny.config)()
    lq = torch.log_softmax(logits(tiny, ids[1:2], cache)[0, 10].double(), -1)
    lp = ref.logprobs[1][10].double()
    assert two.token_nll[1, 10] == pytest.approx(-lq[ids[1, 11]].item(), rel=1e-6)
    assert two.token_kl[1, 10] == pytest.approx((lp.exp() * (lp - lq)).sum().item(), rel=1e-4, abs=1e-7)
    assert two.kl == pytest.approx(float(two.token_kl.astype(np.float64).mean()), rel=1e-6)
    assert two.window_kl == pytest.approx(two.token_kl.astype(np.float64).mean(1).tolist(), rel=1e-6)
    assert two.nll == pytest.approx(float(two.token_nll.astype(np.float64).mean()), rel=1e-6)
    with pytest.raises(ValueError, match="other windows"):
        perplexity(tiny, ids[:1], reference=ref, progress=False)
    with pytest.raises(TypeError, match="reference"):
        perplexity(tiny, ids, reference=ref.logprobs, progress=False)


def test_perplexity_result_json_old_and_new(tiny, ids):
    ref = reference_logprobs(tiny, ids, progress=False)
    r = perplexity(tiny, ids, reference=ref, progress=False)
    small = r.to_dict()
    assert "kl" in small and "token_kl" not in small
    full = PerplexityResult.from_dict(json.loads(json.dumps(r.to_dict(per_token=True))))
    assert full == r and np.array_equal(full.token_kl, r.token_kl) and np.array_equal(full.token_nll, r.token_nll)
    old = {k: small[k] for k in ("nll", "ppl", "tokens", "windows", "window_nll")}  # saved before KL existed
    loaded = PerplexityResult.from_dict(old)
    assert loaded.kl is None and loaded.window_kl is None and loaded.token_nll is None and loaded.nll == r.nll
    with pytest.raises(ValueError, match="corrupted"):
        PerplexityResult.from_dict({**small, "window_kl": None})


# ---- calibration -------------------------------------------------------------------------------------------------
def test_calibration_fits_and_round_trip(calib, facts, tmp_path):
    n = 2 * facts.layers * facts.kv_heads
    for q in ("kivi", "quarot"):
        m = calib.model(q)
        assert m.n_items == n and m.quantizer == q
        assert np.all(np.isfinite(m.alpha)) and np.all(np.asarray(m.beta) > 1)
        b = calib.betas(q)
        assert np.all(np.asarray(m.beta)[: n // 2] == b["key"]) and np.all(np.asarray(m.beta)[n // 2:] == b["value"])
    for method in ("fisher", "attention"):
        w = calib.weights(method)
        assert w.shape == (n,) and np.all(np.isfinite(w)) and np.all(w >= 0)
    assert set(calib.timings) >= {"capture", "measure_fit", "fisher", "attention", "total"}
    path = tmp_path / "calib.json"
    calib.save(path)
    back = Calibration.load(path)
    assert back.facts == calib.facts and back.default_importance == calib.default_importance
    for q in ("kivi", "quarot"):
        assert np.array_equal(back.model(q).alpha, calib.model(q).alpha)
    d = json.loads(path.read_text())
    assert d["models"]["kivi"]["kind"] == "exponential"
    # what it was measured on travels with it
    assert d["environment"]["dtype"] == "float32" and d["environment"]["packages"]["torch"] == torch.__version__
    assert back.environment == calib.environment


def test_fit_leaves_out_one_bit(calib):
    assert calib.fit_bits == tuple(range(2, 9))
    m = calib.model("kivi")
    assert (m.lo, m.hi) == (2.0, 8.0)
    d, bits = calib.distortions("kivi")
    assert bits == tuple(range(1, 9)) and np.all(d[:, 0] > d[:, 1])  # 1 bit measured and kept, not fitted


def test_fixed_beta_model(calib):
    m = fixed_beta_model(calib, "kivi", 4.0)
    assert float(m.beta) == 4.0 and np.all(np.isfinite(m.alpha))
    with pytest.raises(ValueError, match="beta"):
        fixed_beta_model(calib, "kivi", 1.0)


def test_calibration_errors(tiny, facts, ids, calib):
    with pytest.raises(ValueError, match="not calibrated"):
        calib.model("per_token")
    with pytest.raises(ValueError, match="importance"):
        calib.weights("gradient")
    other = type(facts)(name="other", layers=3, kv_heads=2, q_heads=4, head_dim=32)
    with pytest.raises(ValueError, match="layers=2"):
        calib.check_model(other)
    with pytest.raises(ValueError, match="not an rdalloc calibration"):
        Calibration.from_dict({"format": "x"})


# ---- plans ---------------------------------------------------------------------------------------------------------
def test_allocate_plan_meets_budget_and_follows_importance(calib, facts):
    sizes, meta = head_costs(facts, "kivi", 64)
    assert np.all(sizes == 64 * 32) and np.all(meta > 0)
    plan = allocate_plan(calib, "kivi", 4.0, tokens=64)
    assert plan.quantizer == "kivi" and plan.key.shape == (LAYERS, KV_HEADS)
    assert plan.usage.average_bits <= 4.0 + 1e-9 and plan.key.min() >= 2 and plan.value.min() >= 2
    assert plan.usage.average_payload_bits < plan.usage.average_bits
    # a head made far more important than the rest gets at least as many bits as it had
    boosted = Calibration(facts=calib.facts, fits=calib.fits, importance={
        "fisher": type(calib.importance["fisher"])(key=np.asarray(calib.importance["fisher"].key) * np.array(
            [[1e6, 1.0], [1.0, 1.0]]), value=calib.importance["fisher"].value, method="fisher", units="",
            windows=1, tokens=1, meta={})}, default_importance="fisher")
    p2 = allocate_plan(boosted, "kivi", 4.0, tokens=64)
    assert p2.key[0, 0] == 8


def test_uniform_and_random_plans(facts):
    assert uniform_bits(facts, "kivi", 3.0, 64) == 2  # 1 bit of KIVI metadata per element at groups of 32
    assert uniform_bits(facts, "quarot", 2.5, 64) is None  # per token over head_dim 32: 1 bit of metadata too
    assert uniform_bits(facts, "quarot", 3.0, 64) == 2
    p = uniform_plan(facts, "kivi", 2, tokens=64)
    assert abs(p.usage.average_bits - 3.0) < 1e-12
    r1, r2 = (random_plan(facts, "kivi", 4.0, tokens=64, seed=s) for s in (0, 1))
    assert r1.usage.average_bits <= 4.0 + 1e-9
    assert not (np.array_equal(r1.key, r2.key) and np.array_equal(r1.value, r2.value))


def test_check_plan_rejects_other_model_and_quantizer(facts):
    plan = uniform_plan(facts, "kivi", 4, tokens=64)
    assert check_plan(plan, facts) == "kivi"
    with pytest.raises(ValueError, match="mismatch"):
        check_plan(plan, facts, "quarot")
    other = type(facts)(name="other", layers=30, kv_heads=3, q_heads=9, head_dim=64)
    with pytest.raises(ValueError, match="layers"):
        check_plan(plan, other)


def test_run_experiment_table_and_plot(tiny, calib, ids, tmp_path):
    r = run_experiment(tiny, calib, ids, budgets=(2.5, 4.0), seeds=(0, 1), progress=False)
    # 2.5 average bits is below the 2-bit menu floor plus KIVI's 1 bit of metadata: recorded, not evaluated
    assert any(x["quantizer"] == "kivi" and x["budget"] == 2.5 for x in r.facts["infeasible"])
    table = r.table()
    assert set(table) == {"kivi", "quarot"}
    assert set(table["kivi"]) == {"uniform", "rdalloc", "rdalloc_other_importance", "mismatch", "beta4", "random"}
    assert set(table["kivi"]["rdalloc"]) == {4.0}
    assert all(np.isfinite(v) for rows in table.values() for cells in rows.values() for v in cells.values())
    comp = r.importance_comparison()
    assert comp["winner"] in ("fisher", "attention")
    md = markdown_table(r)
    assert "| FP16 |" in md and "### kivi" in md
    plot_results(r, tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 1000
    # KL to FP16 on every row, and the paired verdicts of rdalloc against the other rows
    assert r.fp16["kl"] == 0.0 and all(math.isfinite(x["kl"]) and x["kl"] > -1e-6 for x in r.rows)
    kl = r.table("kl")
    assert set(kl["kivi"]) == set(table["kivi"])
    for q in ("kivi", "quarot"):
        comps = {c["against"]: c for c in r.comparisons if c["quantizer"] == q and c["budget"] == 4.0}
        assert {"mismatch", "beta4", "random"} <= set(comps) <= set(COMPARED)
        assert comps["random"]["seeds"] == 2
        for c in comps.values():
            for metric in ("kl", "nll"):
                v = c[metric]
                assert v["verdict"] in ("better", "worse", "undecided") and v["tokens"] == ids.numel() - 2
                assert v["low"] <= v["difference"] <= v["high"] and v["level"] == 0.95
            if c["identical_plan"]:
                assert c["kl"]["difference"] == 0.0 and c["kl"]["verdict"] == "undecided"
        # the paired mean difference is the difference of the rows' mean KL (random: averaged over its seeds)
        ours = next(x["kl"] for x in r.rows if x["quantizer"] == q and x["budget"] == 4.0 and x["row"] == "rdalloc")
        rand = np.mean([x["kl"] for x in r.rows if x["quantizer"] == q and x["budget"] == 4.0 and x["row"] == "random"])
        assert comps["random"]["kl"]["difference"] == pytest.approx(ours - rand, rel=1e-4, abs=1e-9)
    assert "### Verdicts" in md and "| KL (mnat) |" in md and "rdalloc vs" in md
    plot_verdicts(r, tmp_path / "v.png")
    assert (tmp_path / "v.png").stat().st_size > 1000
    back = ExperimentResult.from_dict(json.loads(json.dumps(r.to_dict())))
    assert list(back.comparisons) == list(r.comparisons) and markdown_table(back) == md
    old = r.to_dict()
    del old["comparisons"]
    for row in old["rows"]:
        del row["kl"]
    legacy = ExperimentResult.from_dict(old)  # saved before KL was measured
    assert legacy.comparisons == () and legacy.table("kl") == {} and "### Verdicts" not in markdown_table(legacy)
    plot_results(legacy, tmp_path / "old.png")


# ---- the CLI steps -------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny Llama saved as a local Hugging Face directory with a character-level tokenizer (no download)."""
    d = tmp_path_factory.mktemp("tiny_llama")
    save_model_dir(_tiny_model(), d, TEXT)
    return d


def test_cli_steps_round_trip(model_dir, tmp_path, capsys):
    text = str(model_dir / "text.txt")
    calib_path, plan_path, out = tmp_path / "c.json", tmp_path / "p.json", tmp_path / "e.json"
    assert main(["calibrate", "--model", str(model_dir), "--text", text, "--windows", "2", "--length", "64",
                 "--no-progress", "--out", str(calib_path)]) == 0
    c = Calibration.load(calib_path)
    assert c.facts.layers == LAYERS and set(c.quantizers) == {"kivi", "quarot"}
    assert main(["allocate", "--calibration", str(calib_path), "--quantizer", "quarot", "--average-bits", "3",
                 "--tokens", "64", "--out", str(plan_path)]) == 0
    plan = Plan.load(plan_path)
    assert plan.quantizer == "quarot" and plan.usage.average_bits <= 3.0 + 1e-9
    assert main(["eval", "--model", str(model_dir), "--text", text, "--plan", str(plan_path), "--windows", "2",
                 "--length", "64", "--no-progress", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["quantizer"] == "quarot" and np.isfinite(result["ppl"])
    assert main(["eval", "--model", str(model_dir), "--text", text, "--windows", "2", "--length", "64",
                 "--no-progress"]) == 0
    assert "FP16" in capsys.readouterr().out


def test_cli_bad_input(model_dir, tmp_path, capsys):
    text = str(model_dir / "text.txt")
    # missing model, missing text
    assert main(["calibrate", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "c.json")]) == 2
    assert "--model" in capsys.readouterr().err
    assert main(["eval", "--model", str(model_dir), "--text", str(tmp_path / "none.txt")]) == 2
    assert "--text" in capsys.readouterr().err
    # a text too short for the windows
    assert main(["calibrate", "--model", str(model_dir), "--text", text, "--windows", "50", "--length", "256",
                 "--no-progress", "--out", str(tmp_path / "c.json")]) == 2
    assert "tokens" in capsys.readouterr().err
    # a plan for another model (layer/head counts) and for another quantizer
    facts = type(model_facts(_tiny_model()))(name="big", layers=30, kv_heads=3, q_heads=9, head_dim=64)
    uniform_plan(facts, "kivi", 4, tokens=64).save(tmp_path / "big.json")
    assert main(["eval", "--model", str(model_dir), "--text", text, "--plan", str(tmp_path / "big.json"),
                 "--windows", "1", "--length", "64", "--no-progress"]) == 2
    assert "layers=30" in capsys.readouterr().err
    small = model_facts(_tiny_model())
    uniform_plan(small, "kivi", 4, tokens=64).save(tmp_path / "kivi.json")
    assert main(["eval", "--model", str(model_dir), "--text", text, "--plan", str(tmp_path / "kivi.json"),
                 "--quantizer", "quarot", "--windows", "1", "--length", "64", "--no-progress"]) == 2
    assert "mismatch" in capsys.readouterr().err
    # a calibration that does not exist, a plan file that is not a plan
    assert main(["allocate", "--calibration", str(tmp_path / "none.json"), "--average-bits", "3", "--out",
                 str(tmp_path / "p.json")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "junk.json").write_text("{}")
    assert main(["eval", "--model", str(model_dir), "--plan", str(tmp_path / "junk.json")]) == 2
    assert "not an rdalloc plan" in capsys.readouterr().err


# ---- single-head KL probes and the loss model -------------------------------------------------------------------
def _kl_with_plan(model, ids, key, value, quantizer):
    """Mean KL to the plain model with a head plan (the direct, one-forward-per-plan measurement)."""
    plan = Plan(key=key, value=value, quantizer=quantizer, budget_bits=0.0, meta={"head_dim": HIDDEN // Q_HEADS})
    full = torch.log_softmax(logits(model, ids).float(), -1)
    lq = torch.log_softmax(logits(model, ids, TransformCache(plan_transform(plan), model.config)).float(), -1)
    return float((full.exp() * (full - lq)).sum(-1).mean())


@pytest.mark.parametrize("quantizer", ["kivi", "quarot"])
def test_single_head_kl_equals_one_plan_per_head(tiny, ids, quantizer):
    from rdalloc.backends.hf.capture import single_head_kl

    probe = single_head_kl(tiny, ids, quantizer, 1, batch_size=3, progress=False)
    assert probe.key.shape == (LAYERS, KV_HEADS) and probe.method == "single_head_kl"
    for role, (layer, head) in (("key", (1, 0)), ("value", (0, 1))):
        key, value = np.full((LAYERS, KV_HEADS), 16), np.full((LAYERS, KV_HEADS), 16)
        (key if role == "key" else value)[layer, head] = 1
        direct = np.mean([_kl_with_plan(tiny, ids[i:i + 1], key, value, quantizer) for i in range(ids.shape[0])])
        assert getattr(probe, role)[layer, head] == pytest.approx(direct, rel=1e-4, abs=1e-7)
    # the batching does not change the numbers, and a finer width does less damage in total
    again = single_head_kl(tiny, ids, quantizer, 1, batch_size=8, progress=False)
    np.testing.assert_allclose(again.key, probe.key, rtol=1e-4, atol=1e-8)
    four = single_head_kl(tiny, ids, quantizer, 4, batch_size=8, progress=False)
    assert four.key.sum() + four.value.sum() < probe.key.sum() + probe.value.sum()


def test_single_head_kl_rejects_bad_arguments(tiny, ids):
    from rdalloc.backends.hf.capture import single_head_kl

    with pytest.raises(ValueError, match="bits"):
        single_head_kl(tiny, ids, "kivi", 9, progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        single_head_kl(tiny, ids, "kivi", 1, batch_size=0, progress=False)


def test_probed_calibration_loss_model_and_one_bit_menu(tiny, facts, ids, tmp_path):
    c = calibrate(tiny, facts, ids, quantizers=("kivi",), probe_bits=(1, 2), probe_length=32, progress=False)
    assert c.probed_bits("kivi") == (1, 2) and c.menu("kivi") == tuple(range(1, 9))
    m = c.loss_model("kivi", distortion="fisher-mse")
    table = np.asarray(m.distortion)
    probe = {b: np.concatenate([np.ravel(p.key), np.ravel(p.value)]) for b, p in c.probes["kivi"].items()}
    np.testing.assert_array_equal(table[:, 0], probe[1])
    np.testing.assert_array_equal(table[:, 1], probe[2])
    # above the probes: the scaled importance x curve, the scale matching the sums at the widest probed width
    fitted = c.model("kivi")
    curve = c.weights() * np.asarray(fitted.alpha) * np.asarray(fitted.beta) ** -3.0
    two = c.weights() * np.asarray(fitted.alpha) * np.asarray(fitted.beta) ** -2.0
    np.testing.assert_allclose(table[:, 2], curve * probe[2].sum() / two.sum(), rtol=1e-12)
    # without probes the loss model is the curve times the weights, over 2..8
    plain = calibrate(tiny, facts, ids, quantizers=("kivi",), progress=False)
    assert plain.menu("kivi") == tuple(range(2, 9))
    np.testing.assert_allclose(np.asarray(plain.loss_model("kivi", distortion="fisher-mse").distortion)[:, 1],
                               plain.weights() * np.asarray(plain.model("kivi").alpha)
                               * np.asarray(plain.model("kivi").beta) ** -3.0, rtol=1e-12)
    # 2.0 average bits with KIVI's 1 bit of metadata is only reachable with the probed 1-bit width
    plan = allocate_plan(c, "kivi", 2.0, tokens=64)
    assert plan.key.max() == 1 and plan.value.max() == 1 and plan.meta["probed_bits"] == [1, 2]
    with pytest.raises(ValueError, match="infeasible"):
        allocate_plan(plain, "kivi", 2.0, tokens=64)
    # probes survive the JSON round trip
    c.save(tmp_path / "c.json")
    back = Calibration.load(tmp_path / "c.json")
    np.testing.assert_array_equal(np.asarray(back.loss_model("kivi", distortion="fisher-mse").distortion), table)


# ---- the joint grid script -----------------------------------------------------------------------------------------
def test_joint_grid_writes_its_table_where_told(model_dir, tmp_path, capsys):
    from experiments import joint_grid

    out = tmp_path / "joint"
    assert joint_grid.main(["--model", str(model_dir), "--text", str(model_dir / "text.txt"), "--windows", "1",
                            "--length", "64", "--continuation", "8", "--retentions", "0.5", "--head-scale", "none",
                            "--no-progress", "--out", str(out)]) == 0
    assert "joint-global" in capsys.readouterr().out
    result = json.loads((out / "joint_1x64_no_head_scale.json").read_text())
    assert result["rows"] and {r["method"] for r in result["rows"]} >= {"joint-global", "eviction", "uniform"}
    assert (out / "joint_1x64_no_head_scale.md").read_text().startswith("Full cache NLL")


def test_joint_grid_refuses_a_plan_before_loading_anything(capsys):
    from experiments import joint_grid

    with pytest.raises(SystemExit) as info:  # it allocates its own token plans: no --plan flag
        joint_grid.main(["--plan", "p.json"])
    assert info.value.code == 2 and "--plan" in capsys.readouterr().err
