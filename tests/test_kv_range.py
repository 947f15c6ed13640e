"""One contract for K/V values quantizers cannot represent, the same on numpy, torch and JAX: a NaN, an infinity or a
value whose group would overflow the float16 scale and zero is refused naming the argument and the element; values
kept at 16 bits are not checked, and 16 bits still restores everything bit for bit."""

from __future__ import annotations

import numpy as np
import pytest

from rdalloc import Plan, PlanApplier, get_quantizer, measure_distortion
from rdalloc.quantizers import MAX_MAGNITUDE, fake_quantize_uniform

QUANTIZERS = ("kivi", "quarot", "per_token", "absmax")
BAD = [np.nan, np.inf, -np.inf, 7e4, -4e4]


def kv(seed=0, tokens=64, head_dim=64):
    return np.random.default_rng(seed).normal(size=(1, 2, tokens, head_dim)).astype(np.float32)


def backends():
    out = [("numpy", np.asarray, np.asarray)]
    try:
        import torch

        out.append(("torch", torch.asarray, lambda t: t.numpy()))
    except ImportError:
        pass
    try:
        import jax.numpy as jnp

        out.append(("jax", jnp.asarray, np.asarray))
    except ImportError:
        pass
    return out


@pytest.mark.parametrize("value", BAD)
@pytest.mark.parametrize("name", QUANTIZERS)
def test_a_bad_element_is_refused_alike_on_every_backend(name, value):
    x = kv()
    x[0, 1, 5, 3] = value
    q = get_quantizer(name)
    messages = set()
    for _, to, _ in backends():
        for call in (lambda a: fake_quantize_uniform(a, q, 3, "key"),
                     lambda a: measure_distortion(a, q, [2, 4], role="value")):
            with pytest.raises(ValueError, match=r"x holds .* at index \(0, 1, 5, 3\)") as info:
                call(to(x))
            messages.add(str(info.value))
    assert len(messages) == 1, messages  # one message, whatever the backend


@pytest.mark.parametrize("name", QUANTIZERS)
def test_the_bound_is_safe_at_every_width(name):
    """At the bound (after the transform), every width gives finite values on every backend."""
    q = get_quantizer(name)
    x = kv(1)
    if q.mixes_channels:  # QuaRot: a token's norm bounds its rotated values
        x[0, 0, 5] *= MAX_MAGNITUDE / np.linalg.norm(x[0, 0, 5]) * (1 - 1e-6)
    else:
        x[0, 0, 5, 3], x[0, 0, 6, 3] = MAX_MAGNITUDE, -MAX_MAGNITUDE
    for _, to, back in backends():
        for bits in range(q.min_bits, q.max_bits + 1):
            for role in ("key", "value"):
                assert np.isfinite(back(fake_quantize_uniform(to(x), q, bits, role))).all(), (bits, role)


def plan_with_one_token_at_16(tokens=64):
    bits = np.full((1, 2, tokens), 4, dtype=np.int8)
    bits[:, :, 5] = 16
    axes = ("layer", "kv_head", "token")
    return Plan(key=bits, value=bits, key_axes=axes, value_axes=axes, quantizer="per_token")


def test_plan_application_checks_only_the_quantized_elements():
    plan = plan_with_one_token_at_16()
    ap = PlanApplier(plan)
    for _, to, back in backends():
        k, v = kv(2)[0:1], kv(3)[0:1]
        k[0, 1, 5, 7] = 1e30  # kept at 16 bits: allowed, restored exactly
        out = ap.fake_quantize(to(k), to(v), layer=0)
        assert back(out.keys)[0, 1, 5, 7] == np.float32(1e30)
        k[0, 1, 9, 7] = np.nan  # quantized: refused, naming keys and the element
        with pytest.raises(ValueError, match=r"keys holds nan at index \(0, 1, 9, 7\)"):
            ap.pack(to(k), to(v), layer=0)
