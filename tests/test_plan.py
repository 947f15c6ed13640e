"""Plans, models and the cost model: validation, JSON round trips and clear errors on corrupted or foreign input."""

import json

import numpy as np
import pytest

from rdalloc import ExponentialModel, Plan, TabulatedModel, allocate
from rdalloc.cost import Usage, item_cost
from rdalloc.models import model_from_dict


def head_plan():
    model = ExponentialModel(np.linspace(0.5, 3.0, 12), 4.0, quantizer="kivi")
    r = allocate(model, 4096.0, average_bits=3.0, metadata=4096.0)
    return Plan.from_allocation(r, (2, 3), quantizer="kivi", meta={"model": "tiny"}), r


def test_from_allocation_and_json_round_trip(tmp_path):
    plan, r = head_plan()
    assert plan.granularity == "head" and plan.layers == 2 and plan.kv_heads == 3
    np.testing.assert_array_equal(np.concatenate([plan.key.ravel(), plan.value.ravel()]), np.asarray(r.bits))
    assert plan.usage.total_bits <= plan.budget_bits and plan.certificate["gap"] >= 0
    plan.save(tmp_path / "p.json")
    back = Plan.load(tmp_path / "p.json")
    np.testing.assert_array_equal(back.key, plan.key)
    np.testing.assert_array_equal(back.value, plan.value)
    assert back.usage == plan.usage and back.quantizer == "kivi" and back.meta == {"model": "tiny"}
    assert back.to_dict() == plan.to_dict()


def test_token_plan_eviction_and_kept_mask():
    value = np.array([[[16, 4, 0, 2]]])
    key = np.array([[[16, 4, 0, 2]]])
    plan = Plan(key=key, value=value, key_axes=("layer", "kv_head", "token"), value_axes=("layer", "kv_head", "token"))
    assert plan.granularity == "token" and plan.tokens == 4
    np.testing.assert_array_equal(plan.kept(), [[[True, True, False, True]]])
    with pytest.raises(ValueError, match="a token is evicted only as a whole"):
        Plan(key=np.array([[[16, 4, 2, 2]]]), value=value, key_axes=("layer", "kv_head", "token"),
             value_axes=("layer", "kv_head", "token"))


def test_plan_is_frozen():
    plan, _ = head_plan()
    with pytest.raises(ValueError):
        plan.key[0, 0] = 3
    with pytest.raises(AttributeError):
        plan.quantizer = "quarot"


@pytest.mark.parametrize("mutate, match", [
    (lambda d: d.update(format="something"), "not an rdalloc plan"),
    (lambda d: d.update(version=99), "plan version 99 is not supported"),
    (lambda d: d["key"].pop("bits"), "corrupted plan: missing or malformed field 'bits'"),
    (lambda d: d["key"].update(bits=[[1, 2, 3]]), r"disagree on \(layer, kv_head\)"),
    (lambda d: d["value"].update(bits=[[1, 2, 17], [1, 1, 1]]), r"value bits must be integers in \[0, 16\], got 17"),
    (lambda d: d["key"].update(axes=["layer", "token"]), "key_axes must be one of"),
    (lambda d: d.update(granularity="token"), "says granularity 'token'"),
])
def test_corrupted_plans_are_refused(mutate, match):
    d = json.loads(json.dumps(head_plan()[0].to_dict()))
    mutate(d)
    with pytest.raises(ValueError, match=match):
        Plan.from_dict(d)


def test_not_json(tmp_path):
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="is not valid JSON"):
        Plan.load(tmp_path / "bad.json")


def test_check_catches_another_model_or_quantizer():
    plan, _ = head_plan()
    assert plan.check(layers=2, kv_heads=3, quantizer="kivi") is plan
    with pytest.raises(ValueError, match="made for layers=2, but the cache has layers=30"):
        plan.check(layers=30)
    with pytest.raises(ValueError, match="distortion-model mismatch"):
        plan.check(quantizer="quarot")


def test_from_allocation_size_mismatch():
    _, r = head_plan()
    with pytest.raises(ValueError, match=r"the allocation has 12 items, but key_shape \(3, 3\)"):
        Plan.from_allocation(r, (3, 3))


def test_models_round_trip_and_tables():
    m = ExponentialModel(np.array([1.0, 2.0]), np.array([3.0, 5.0]), eviction=np.array([0.5, 9.0]), full=0.0,
                         quantizer="quarot")
    back = model_from_dict(json.loads(json.dumps(m.to_dict())))
    D, ok = back.table((0, 1, 8, 9, 16))
    np.testing.assert_allclose(D[:, 0], [0.5, 9.0])
    np.testing.assert_allclose(D[:, 1], [1 / 3, 2 / 5])
    np.testing.assert_array_equal(ok[:, 3], False)  # 9 bits is outside [lo, hi] = [1, 8]
    np.testing.assert_array_equal(D[:, 4], 0.0)
    t = TabulatedModel(bits=(0, 2, 16), distortion=np.array([[3.0, 1.0, 0.0]]), quantizer="kivi")
    assert model_from_dict(t.to_dict()).to_dict() == t.to_dict()
    with pytest.raises(ValueError, match="a model dict needs kind"):
        model_from_dict({"kind": "weird"})


def test_cost_and_usage():
    np.testing.assert_array_equal(item_cost(np.array([0, 2, 16]), 64.0, 32.0), [0.0, 160.0, 1024.0])
    u = Usage.of(np.array([0, 2, 16]), 64.0, 32.0)
    assert (u.payload_bits, u.metadata_bits, u.elements) == (1152.0, 32.0, 192.0)
    assert u.average_bits == pytest.approx(1184 / 192) and u.average_payload_bits == 6.0
    assert Usage.from_dict(u.to_dict()) == u


def test_tabulated_model_errors():
    with pytest.raises(ValueError, match=r"distortion must have shape \(items, 2\)"):
        TabulatedModel(bits=(1, 2), distortion=np.ones((3, 3)))
    with pytest.raises(ValueError, match="distortion must be >= 0"):
        TabulatedModel(bits=(1, 2), distortion=np.array([[1.0, -1.0]]))
    with pytest.raises(ValueError, match="bits must be strictly increasing"):
        TabulatedModel(bits=(2, 1), distortion=np.ones((1, 2)))
    with pytest.raises(ValueError, match="allowed leaves item 0 with no feasible bit-width"):
        TabulatedModel(bits=(1, 2), distortion=np.ones((1, 2)), allowed=np.zeros((1, 2), dtype=bool))
