"""One set of status codes for both solvers (rdalloc/status.py), each with one meaning."""

import importlib

import numpy as np
import pytest

from rdalloc import ExponentialModel, allocate, status, waterfill


def test_codes_are_distinct_and_shared():
    codes = [status.OPTIMAL, status.FEASIBLE, status.SATURATED, status.INFEASIBLE, status.MAX_ITER,
             status.CHECK_FAILED]
    assert sorted(codes) == list(range(6)) and set(status.MESSAGES) == set(codes)
    modules = [importlib.import_module(f"rdalloc.{m}") for m in ("allocate", "waterfill")]
    for name in ("OPTIMAL", "SATURATED", "INFEASIBLE"):  # the names both solver modules use are these codes
        assert all(getattr(m, name) == getattr(status, name) for m in modules)


@pytest.mark.parametrize("solve", ["waterfill", "allocate"])
def test_a_slack_budget_is_saturated_in_both_and_zero_weights_stay_cheapest(solve):
    """The waterfill status used to read "every item at hi" while a zero-weight item sat at lo."""
    model = ExponentialModel(np.array([4.0, 1.0, 2.0]), 4.0, lo=1.0, hi=8.0)
    weights = np.array([1.0, 0.0, 2.0])
    if solve == "waterfill":
        r = waterfill(model, 64, average_bits=8.0, weights=weights)
        cert = r.to_dict()
    else:
        r = allocate(model, 64, average_bits=8.0, weights=weights)
        cert = r.certificate()
    assert int(r.status) == status.SATURATED and cert["status_message"] == status.MESSAGES[status.SATURATED]
    np.testing.assert_array_equal(np.asarray(r.bits, dtype=float), [8.0, 1.0, 8.0])


def test_optimal_reads_the_same_in_both():
    model = ExponentialModel(np.array([4.0, 1.0, 0.25]), 4.0)
    cont = waterfill(model, 64, average_bits=3.0).to_dict()
    menu = allocate(model, 64, average_bits=3.0).certificate()
    assert cont["status"] == menu["status"] == status.OPTIMAL
    assert cont["status_message"] == menu["status_message"] == "optimal (proven)"
