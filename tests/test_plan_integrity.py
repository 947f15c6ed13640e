"""Plan integrity (issue #18): quantizer provenance, strict field types, a digest checked on load, clear errors for
unreadable files, and a plan checked against a model's facts before the model is loaded."""

import json
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rdalloc import ExponentialModel, Plan, PlanApplier, allocate, waterfill
from rdalloc.cost import Usage
from rdalloc.mismatch import ModelMismatchWarning, check_quantizer


@pytest.fixture
def kivi():
    model = ExponentialModel(np.array([4.0, 1.0, 0.25, 2.0, 1.0, 0.5]), 4.0, quantizer="kivi")
    return model, allocate(model, 64.0, average_bits=3)


def saved(tmp_path, plan=None):
    plan = plan or Plan(key=np.array([[4, 2]]), value=np.array([[8, 3]]), quantizer="kivi", budget_bits=1e4,
                        meta={"model": "tiny", "head_dim": 64})
    plan.save(tmp_path / "p.json")
    return tmp_path / "p.json", json.loads((tmp_path / "p.json").read_text())


# ---- quantizer provenance ------------------------------------------------------------------------------------------
def test_from_allocation_carries_the_models_quantizer(kivi):
    model, alloc = kivi
    with pytest.raises(ValueError, match="the plan must record its quantizer: pass model="):
        Plan.from_allocation(alloc, (1, 3))  # was: quantizer=None, silently
    plan = Plan.from_allocation(alloc, (1, 3), model=model)
    assert plan.quantizer == "kivi"
    assert Plan.from_allocation(alloc, (1, 3), model=model, quantizer="kivi").quantizer == "kivi"
    with pytest.raises(ValueError, match="'quarot' is not the quantizer the model was fitted for"):
        Plan.from_allocation(alloc, (1, 3), model=model, quantizer="quarot")
    with pytest.raises(TypeError, match="model must be an ExponentialModel or TabulatedModel, got str"):
        Plan.from_allocation(alloc, (1, 3), model="kivi")


def test_a_kivi_plan_is_not_applied_with_quarot(kivi):
    model, alloc = kivi
    plan = Plan.from_allocation(alloc, (1, 3), model=model)
    with pytest.raises(ValueError, match="'kivi'; applying it with 'quarot' is a distortion-model mismatch"):
        PlanApplier(plan, "quarot")
    with pytest.warns(ModelMismatchWarning):
        assert check_quantizer(plan, "quarot") is False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert check_quantizer(plan, "kivi") is True and PlanApplier(plan, "kivi").quantizer.name == "kivi"
    assert plan.check(quantizer=" KIVI") is plan  # names compare as check_quantizer compares them


def test_from_allocation_refuses_a_waterfill_result(kivi):
    model, _ = kivi
    with pytest.raises(TypeError, match="allocation must be an rdalloc.Allocation .* got WaterfillResult"):
        Plan.from_allocation(waterfill(model, 64.0, average_bits=3), (1, 3), model=model)


def test_from_allocation_of_a_grouped_solve_records_the_sums():
    model = ExponentialModel(np.array([4.0, 1.0, 0.25, 2.0]), 4.0, quantizer="kivi")
    alloc = allocate(model, 64.0, average_bits=[3, 4], groups=np.array([0, 0, 1, 1]))
    plan = Plan.from_allocation(alloc, (1, 2), model=model)
    assert plan.budget_bits == 64.0 * 2 * 3 + 64.0 * 2 * 4 and plan.usage.total_bits <= plan.budget_bits
    assert len(plan.certificate["status"]) == 2


# ---- strict fields -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("field, bad, match", [
    ("version", True, "version must be an integer, got bool True"),
    ("quantizer", "nope", "quantizer 'nope' is not a registered quantizer"),
    ("quantizer", 5, "quantizer must be a registered quantizer name or None, got int 5"),
    ("budget_bits", "10000", "budget_bits must be a number or None, got str '10000'"),
    ("budget_bits", -1.0, "budget_bits must be a finite number >= 0, got -1.0"),
    ("predicted_distortion", float("nan"), "predicted_distortion must be a finite number >= 0, got nan"),
    ("certificate", [1], "certificate must be a mapping, got list"),
    ("meta", {"head_dim": "64"}, r"meta\['head_dim'\] must be an integer, got str '64'"),
    ("meta", {"model": 3}, r"meta\['model'\] must be the model's name \(str\), got int 3"),
    ("meta", {"quantizer_spec": {"name": "nope"}}, r"meta\['quantizer_spec'\] .* does not make a quantizer"),
    ("meta", {"quantizer_spec": {"name": "kivi", "bogus": 1}}, "does not make a quantizer"),
])
def test_plan_fields_are_type_checked(tmp_path, field, bad, match):
    _, d = saved(tmp_path)
    with pytest.raises((TypeError, ValueError), match=match):
        Plan(key=np.array([[4]]), value=np.array([[4]]), **{field: bad})
    d[field] = bad
    with pytest.raises(ValueError, match=match):  # a file says it as a ValueError (corrupted plan)
        Plan.from_dict(d)


@pytest.mark.parametrize("bits, match", [
    (True, "key.bits must be nested lists of integers, one level per axis, got bool True"),
    ([[True, 2]], "got bool True"),
    ([[4.0, 2]], "got float 4.0"),
    ([["4", 2]], "got str '4'"),
    ([[4], [2, 3]], "got list"),
    ([[10 ** 30, 2]], r"key bits must be integers in \[0, 16\], got 10{30}"),
])
def test_bits_in_a_file_are_integers(tmp_path, bits, match):
    _, d = saved(tmp_path)
    d["key"]["bits"] = bits
    with pytest.raises(ValueError, match=match):
        Plan.from_dict(d)


def test_quantizer_spec_must_be_the_plans_quantizer():
    with pytest.raises(ValueError, match="makes quantizer 'quarot', but the plan records 'kivi'"):
        Plan(key=np.array([[4]]), value=np.array([[4]]), quantizer="kivi", meta={"quantizer_spec": {"name": "quarot"}})


def test_usage_fields_and_budget(tmp_path, kivi):
    model, alloc = kivi
    plan = Plan.from_allocation(alloc, (1, 3), model=model)
    _, d = saved(tmp_path, plan)
    d["usage"]["payload_bits"] = "1"
    with pytest.raises(ValueError, match="usage.payload_bits must be a number or None, got str '1'"):
        Plan.from_dict(d)
    with pytest.raises(ValueError, match=r"the plan spends 1152.0 bits \(usage\), over its budget_bits 1.0"):
        Plan(key=plan.key, value=plan.value, quantizer="kivi", usage=plan.usage, budget_bits=1.0)


# ---- digest --------------------------------------------------------------------------------------------------------
def test_a_flipped_digit_is_caught_by_the_digest(tmp_path):
    path, d = saved(tmp_path)
    assert d["digest"].startswith("sha256:") and Plan.load(path).to_dict() == d
    d["key"]["bits"][0][0] = 5  # still a valid plan, but not the one written
    path.write_text(json.dumps(d))
    with pytest.raises(ValueError, match=r"p.json: corrupted plan: its content does not match its digest"):
        Plan.load(path)


def test_files_without_a_digest_still_load(tmp_path):
    path, d = saved(tmp_path)
    del d["digest"]
    assert Plan.from_dict(d).key.tolist() == [[4, 2]]


def test_non_finite_certificate_values_are_standard_json(tmp_path):
    plan = Plan(key=np.array([[4]]), value=np.array([[4]]), quantizer="kivi",
                certificate={"gap": float("inf"), "lower_bound": float("nan")})
    path, d = saved(tmp_path, plan)
    assert "NaN" not in path.read_text() and "Infinity" not in path.read_text()
    assert Plan.load(path).certificate == {"gap": "inf", "lower_bound": "nan"}


# ---- unreadable files ----------------------------------------------------------------------------------------------
def test_unreadable_files_get_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no plan file at .*missing.json"):
        Plan.load(tmp_path / "missing.json")
    with pytest.raises(ValueError, match="is a directory, not a plan file"):
        Plan.load(tmp_path)
    (tmp_path / "latin1.json").write_bytes(b'{"format": "rdalloc.plan", "x": "\xe9"}')
    with pytest.raises(ValueError, match=r"latin1.json is not UTF-8 text \(invalid byte at offset 33\)"):
        Plan.load(tmp_path / "latin1.json")
    (tmp_path / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ValueError, match="deep.json holds JSON nested too deeply"):
        Plan.load(tmp_path / "deep.json")
    (tmp_path / "foreign.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="foreign.json: not an rdalloc plan"):
        Plan.load(tmp_path / "foreign.json")


def test_save_refuses_a_directory_or_a_missing_folder(tmp_path):
    plan = Plan(key=np.array([[4]]), value=np.array([[4]]), quantizer="kivi")
    with pytest.raises(ValueError, match="it is a directory"):
        plan.save(tmp_path)
    with pytest.raises(FileNotFoundError, match="the folder .*nowhere does not exist"):
        plan.save(tmp_path / "nowhere" / "p.json")
    plan.save(tmp_path / "p.json")
    assert [p.name for p in tmp_path.iterdir()] == ["p.json"]  # written atomically: no temporary left


# ---- model facts before the model is loaded ------------------------------------------------------------------------
CONFIG = {"num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2, "hidden_size": 256}


def test_check_config_before_loading_the_model(tmp_path):
    path, _ = saved(tmp_path)  # 1 layer, 2 kv heads, head_dim 64, model "tiny"
    plan = Plan.load(path)
    assert plan.check_config(CONFIG, model="tiny") is plan
    assert plan.check_config({"text_config": {**CONFIG, "head_dim": 64}}) is plan
    with pytest.raises(ValueError, match="made for layers=1, but the cache has layers=29"):
        plan.check_config({**CONFIG, "num_hidden_layers": 29})
    with pytest.raises(ValueError, match="made for kv_heads=2, but the cache has kv_heads=4"):
        plan.check_config({**CONFIG, "num_key_value_heads": None})
    with pytest.raises(ValueError, match="made for head_dim=64, but the cache has head_dim=32"):
        plan.check_config({**CONFIG, "head_dim": 32})
    with pytest.raises(ValueError, match="made for model 'tiny', not 'other'"):
        plan.check_config(CONFIG, model="other")
    with pytest.raises(ValueError, match="config's num_hidden_layers must be a positive integer, got '1'"):
        plan.check_config({**CONFIG, "num_hidden_layers": "1"})
    with pytest.raises(TypeError, match="layers must be an integer, got bool True"):
        plan.check(layers=True)


# ---- byte accounting ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arg, bad, error", [("batch", -1, ValueError), ("batch", True, TypeError),
                                              ("tokens", 0, ValueError), ("head_dim", 64.0, TypeError)])
def test_predict_nbytes_refuses_impossible_dimensions(arg, bad, error):
    from rdalloc.accounting import item_costs, plan_usage, predict_nbytes

    plan = Plan(key=np.array([[4, 2]]), value=np.array([[8, 3]]), quantizer="kivi")
    dims = {"batch": 1, "tokens": 32, "head_dim": 64}
    assert predict_nbytes(plan, None, **dims) == 5376  # was -11264 at batch=-1
    dims[arg] = bad
    for f in (predict_nbytes, plan_usage):
        with pytest.raises(error, match=f"{arg} must be a positive integer, got .*{bad!r}"):
            f(plan, None, **dims)
    with pytest.raises(error, match=f"{arg} must be a positive integer"):
        item_costs(plan, None, "key", **dims)


# ---- any corruption: a ValueError or the very plan written ------------------------------------------------------
_JSON = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True) | st.text(),
                     lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
                     max_leaves=6)


def _leaves(x, path=()):
    if isinstance(x, dict):
        yield path
        for k, v in x.items():
            yield from _leaves(v, path + (k,))
    elif isinstance(x, list):
        yield path
        for i, v in enumerate(x):
            yield from _leaves(v, path + (i,))
    else:
        yield path


_PLAN = Plan(key=np.array([[4, 2]]), value=np.array([[8, 3]]), quantizer="kivi", budget_bits=1e4,
             usage=Usage(100.0, 8.0, 32.0), predicted_distortion=0.5,
             certificate={"gap": 0.0}, meta={"model": "tiny", "head_dim": 64}).to_dict()
_PATHS = list(_leaves(_PLAN))


@settings(max_examples=300, deadline=None)
@given(where=st.sampled_from(_PATHS), new=_JSON, keep_digest=st.booleans())
def test_a_corrupted_plan_is_refused_or_identical(where, new, keep_digest):
    d = json.loads(json.dumps(_PLAN))
    if where:
        parent = d
        for k in where[:-1]:
            parent = parent[k]
        parent[where[-1]] = new
    else:
        d = new
    if not keep_digest and isinstance(d, dict):
        d.pop("digest", None)
    try:
        plan = Plan.from_dict(d)
    except ValueError:
        return
    if keep_digest:  # the digest lets through only what changes nothing
        assert plan.to_dict() == _PLAN
    assert json.loads(json.dumps(plan.to_dict(), allow_nan=False))  # standard JSON, always
