"""One implementation, every array-API backend: numpy, torch, array_api_strict and JAX under ``jax.jit``."""

import importlib

import numpy as np
import pytest

xs = pytest.importorskip("array_api_strict")
jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")
torch = pytest.importorskip("torch")
from hypothesis import given, settings
from hypothesis import strategies as st

from rdalloc import ExponentialModel, TabulatedModel, allocate, waterfill
from rdalloc._namespace import to_numpy

MENU = (0, 1, 2, 3, 4, 6, 8, 16)


def instance(seed, n_items):
    rng = np.random.default_rng(seed)
    alpha = rng.lognormal(0, 2, n_items)
    beta = rng.uniform(1.5, 6.0, n_items)
    ev = alpha * rng.uniform(0.2, 3.0, n_items)
    n = rng.integers(1, 100, n_items).astype(float)
    w = rng.uniform(0, 2, n_items)
    return alpha, beta, ev, n, w


def run_allocate(to, seed, n_items, avg, **kw):
    alpha, beta, ev, n, w = (to(x) for x in instance(seed, n_items))
    return allocate(ExponentialModel(alpha, beta, eviction=ev), n, average_bits=avg, weights=w, menu=MENU,
                    metadata=32.0, **kw)


def run_waterfill(to, seed, n_items, avg):
    alpha, beta, _, n, w = (to(x) for x in instance(seed, n_items))
    return waterfill(ExponentialModel(alpha, beta), n, average_bits=avg, weights=w)


BACKENDS = {"torch": torch.asarray, "array_api_strict": xs.asarray}


@given(st.integers(0, 2**32 - 1), st.integers(1, 300), st.floats(0.5, 10.0))
@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_eager_backends_agree_with_numpy(backend, seed, n_items, avg):
    ref = run_allocate(np.asarray, seed, n_items, avg)
    got = run_allocate(BACKENDS[backend], seed, n_items, avg)
    np.testing.assert_array_equal(to_numpy(got.bits), ref.bits)
    assert float(to_numpy(got.distortion)) == pytest.approx(float(ref.distortion), rel=1e-12, abs=1e-300)
    ref_c = run_waterfill(np.asarray, seed, n_items, float(np.clip(avg, 1.0, 8.0)))
    got_c = run_waterfill(BACKENDS[backend], seed, n_items, float(np.clip(avg, 1.0, 8.0)))
    np.testing.assert_allclose(to_numpy(got_c.bits), ref_c.bits, rtol=0, atol=1e-12)


@jax.jit
def jit_allocate(a, b, e, n, w, avg):
    return allocate(ExponentialModel(a, b, eviction=e), n, average_bits=avg, weights=w, menu=MENU, metadata=32.0)


@jax.jit
def jit_waterfill(a, b, n, w, avg):
    return waterfill(ExponentialModel(a, b), n, average_bits=avg, weights=w)


@settings(max_examples=15)  # a handful of shapes, so few compilations
@given(st.integers(0, 2**32 - 1), st.sampled_from([1, 2, 37, 300]), st.floats(0.5, 10.0))
def test_jax_jit_agrees_with_numpy(seed, n_items, avg):
    with jax.enable_x64(True):
        alpha, beta, ev, n, w = (jnp.asarray(x) for x in instance(seed, n_items))
        got = jit_allocate(alpha, beta, ev, n, w, avg)
        got_c = jit_waterfill(alpha, beta, n, w, float(np.clip(avg, 1.0, 8.0)))
    # Under jit there is no exact phase: the answer is numpy's hull/greedy one (max_nodes=0), never better than exact.
    ref = run_allocate(np.asarray, seed, n_items, avg, max_nodes=0)
    np.testing.assert_array_equal(np.asarray(got.bits), ref.bits)
    assert float(got.distortion) == pytest.approx(float(ref.distortion), rel=1e-12, abs=1e-300)
    assert float(got.lower_bound) == pytest.approx(float(ref.lower_bound), rel=1e-9, abs=1e-300)
    assert int(got.nodes) == 0 and float(got.dual_bound) == pytest.approx(float(ref.dual_bound), rel=1e-9, abs=1e-300)
    exact = run_allocate(np.asarray, seed, n_items, avg)
    assert float(exact.distortion) <= float(got.distortion) * (1 + 1e-12)
    ref_c = run_waterfill(np.asarray, seed, n_items, float(np.clip(avg, 1.0, 8.0)))
    np.testing.assert_allclose(np.asarray(got_c.bits), ref_c.bits, atol=1e-10)


def test_jax_jit_compiles_once_for_many_budgets():
    with jax.enable_x64(True):
        alpha, beta, ev, n, w = (jnp.asarray(x) for x in instance(0, 64))
        traces = []

        @jax.jit
        def solve(avg):
            traces.append(1)
            return allocate(ExponentialModel(alpha, beta, eviction=ev), n, average_bits=avg, weights=w, menu=MENU)

        out = [int(jnp.sum(solve(a).bits)) for a in (1.0, 2.0, 3.0)]
    assert len(traces) == 1 and out == sorted(out)


def test_eager_jax_allocate_compiles_once_per_shape(monkeypatch):
    """An eager JAX call runs one cached jax.jit per shape and settings: other budgets and other values reuse it
    (the solver's loops are not traced again), the answer is numpy's hull/greedy one, and an infeasible budget still
    raises as on every eager backend."""
    allocate_module = importlib.import_module("rdalloc.allocate")  # the module, not the function rdalloc exports
    traces = []
    real = allocate_module._allocate

    def counting(*args, **kwargs):
        if any(isinstance(x, jax.core.Tracer) for x in args[1:]):
            traces.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(allocate_module, "_allocate", counting)
    with jax.enable_x64(True):
        for seed, avg in ((0, 2.0), (1, 3.0), (2, 3.5)):
            alpha, beta, ev, n, w = instance(seed, 64)
            got = allocate(ExponentialModel(jnp.asarray(alpha), jnp.asarray(beta), eviction=jnp.asarray(ev)),
                           jnp.asarray(n), average_bits=avg, weights=jnp.asarray(w), menu=MENU)
            ref = allocate(ExponentialModel(alpha, beta, eviction=ev), n, average_bits=avg, weights=w, menu=MENU,
                           max_nodes=0)
            np.testing.assert_array_equal(np.asarray(got.bits), ref.bits)
            assert int(got.status) == int(ref.status)
        assert len(traces) == 1
        with pytest.raises(ValueError, match="infeasible"):
            allocate(ExponentialModel(jnp.asarray(alpha), jnp.asarray(beta), eviction=jnp.asarray(ev)),
                     jnp.asarray(n), budget=1.0, weights=jnp.asarray(w), menu=(2, 4))


def test_jax_float32_without_x64():
    alpha, beta, _, n, w = instance(1, 50)
    r = jax.jit(lambda a: waterfill(ExponentialModel(a, jnp.asarray(beta)), jnp.asarray(n), average_bits=3.0))(
        jnp.asarray(alpha))
    ref = waterfill(ExponentialModel(alpha, beta), n, average_bits=3.0)
    assert r.bits.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(r.bits), ref.bits, atol=1e-3)


def test_jax_infeasible_budget_reports_status_under_jit():
    with jax.enable_x64(True):
        r = jax.jit(lambda a: allocate(ExponentialModel(a), 1.0, budget=0.5, menu=(1, 2)))(jnp.ones(3))
    assert int(r.status) == 3 and np.all(np.asarray(r.bits) == -1)


def test_tabulated_model_on_torch():
    d = torch.tensor([[9.0, 4.0, 1.0, 0.0], [3.0, 2.0, 1.5, 0.0]], dtype=torch.float64)
    r = allocate(TabulatedModel(bits=(0, 2, 4, 16), distortion=d), torch.tensor([8.0, 8.0]), budget=48.0)
    ref = allocate(TabulatedModel(bits=(0, 2, 4, 16), distortion=d.numpy()), np.array([8.0, 8.0]), budget=48.0)
    assert isinstance(r.bits, torch.Tensor)
    assert r.bits.tolist() == ref.bits.tolist()


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_chunked_passes_agree_across_backends(backend):
    # N above the chunk sizes of both solvers, so numpy, torch and array_api_strict all take the chunked paths.
    n_items = 70_001
    ref, got = run_waterfill(np.asarray, 7, n_items, 3.3), run_waterfill(BACKENDS[backend], 7, n_items, 3.3)
    np.testing.assert_allclose(to_numpy(got.bits), ref.bits, rtol=0, atol=1e-12)
    assert float(to_numpy(got.kkt_residual)) < 1e-9
    ref_m, got_m = run_allocate(np.asarray, 7, n_items, 2.7), run_allocate(BACKENDS[backend], 7, n_items, 2.7)
    np.testing.assert_array_equal(to_numpy(got_m.bits), ref_m.bits)


@pytest.mark.parametrize("backend", ["torch", "array_api_strict"])
def test_validation_moves_only_scalars_off_the_device(backend, monkeypatch):
    """Checking device arrays reduces them where they live: on valid input no array larger than the two scalars
    (min, max) is copied to the host; invalid input still gets the first offending element in the message."""
    import rdalloc._checks as checks

    to = torch.asarray if backend == "torch" else xs.asarray
    copied = []
    real = checks.to_numpy
    def counting(x):
        copied.append(int(np.prod(np.shape(x) if np.isscalar(x) else x.shape)))
        return real(x)

    monkeypatch.setattr(checks, "to_numpy", counting)
    rng = np.random.default_rng(0)
    n_items = 1000
    model = ExponentialModel(to(rng.uniform(0.5, 2.0, n_items)), to(rng.uniform(2.0, 5.0, n_items)))
    r = waterfill(model, to(rng.uniform(1.0, 9.0, n_items)), average_bits=3.0, weights=to(np.ones(n_items)),
                  lo=to(np.zeros(n_items)), hi=to(np.full(n_items, 8.0)))
    assert int(r.status) == 0 and copied and max(copied) <= 2
    sizes = rng.uniform(1.0, 9.0, n_items)
    sizes[417] = -3.0
    with pytest.raises(ValueError, match=r"sizes must be > 0, got -3.0 at index 417"):
        waterfill(model, to(sizes), average_bits=3.0)
    lo = np.zeros(n_items)
    lo[12] = 9.0
    with pytest.raises(ValueError, match=r"lo must be <= hi, got lo=9.0 > hi=8.0 at item 12"):
        waterfill(model, to(np.ones(n_items)), average_bits=3.0, lo=to(lo), hi=to(np.full(n_items, 8.0)))
    with pytest.raises(ValueError, match=r"lo must be <= hi, got lo=9.0 > hi=8.0 at item 12"):
        allocate(model, to(np.ones(n_items)), average_bits=3.0, lo=to(lo), hi=to(np.full(n_items, 8.0)))


def test_tabulated_model_from_traced_arrays_under_jit():
    """A TabulatedModel built inside jax.jit (distortion and allowed traced) skips value checks, as documented, and
    allocates like the eager model."""
    D = np.array([[10.0, 8.0, 0.0], [5.0, 2.0, 1.0], [3.0, 1.0, 0.5]])
    ok = np.array([[True, True, False], [True, True, True], [True, False, True]])

    def solve(d, mask):
        return allocate(TabulatedModel(bits=(2, 4, 8), distortion=d, allowed=mask), 100.0, budget=1400.0).bits

    eager = np.asarray(solve(D, ok))
    with jax.enable_x64(True):
        traced = np.asarray(jax.jit(solve)(jnp.asarray(D), jnp.asarray(ok)))
    np.testing.assert_array_equal(traced, eager)
    assert ok[np.arange(3), [(2, 4, 8).index(int(b)) for b in eager]].all()
    with pytest.raises(ValueError, match="allowed must be a boolean array of shape"):
        TabulatedModel(bits=(2, 4, 8), distortion=D, allowed=jnp.asarray(ok, dtype=jnp.int32))
