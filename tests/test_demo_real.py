"""End to end on the real SmolLM2-135M-Instruct (slow: a couple of minutes on 2 CPU cores). ``pytest -m slow``."""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from rdalloc.backends.hf import (  # noqa: E402
    perplexity,
    reference_logprobs,
    text_windows,  # noqa: E402
)
from rdalloc.backends.hf.calibrate import calibrate  # noqa: E402
from rdalloc.backends.hf.head_plans import allocate_plan, plan_cache_factory, uniform_plan  # noqa: E402
from rdalloc.backends.hf.paired import paired_comparison  # noqa: E402

pytestmark = pytest.mark.slow


# `real`: the bundled model, loaded once per session (tests/conftest.py).


@pytest.fixture(scope="module")
def windows(real):
    cal = text_windows(real.tokenizer, length=128, calibration=2, evaluation=0).calibration
    ev = text_windows(real.tokenizer, length=256, calibration=0, evaluation=1).evaluation
    return cal, ev


@pytest.fixture(scope="module")
def calib(real, windows):
    return calibrate(real.model, real.facts, windows[0], progress=False)


def test_calibration_gives_finite_fits(real, calib):
    n = 2 * real.facts.layers * real.facts.kv_heads
    for q in ("kivi", "quarot"):
        m = calib.model(q)
        assert m.n_items == n and np.all(np.isfinite(m.alpha)) and np.all(m.alpha > 0)
        betas = calib.betas(q)
        # published decays per bit are 3.6-5.3; allow a wide band around them
        assert all(2.5 < b < 6.5 for b in betas.values()), betas
        for role in ("key", "value"):
            assert calib.fits[q][role].r2_overall > 0.9
    for method in ("fisher", "attention"):
        w = calib.weights(method)
        assert w.shape == (n,) and np.all(np.isfinite(w)) and np.all(w >= 0) and w.max() > 0


@pytest.mark.parametrize("quantizer", ["kivi", "quarot"])
def test_four_bit_plans_stay_close_to_fp16(real, windows, calib, quantizer):
    ev = windows[1]
    ref = reference_logprobs(real.model, ev, progress=False)
    fp16 = ref.result
    assert 1.0 < fp16.ppl < 100.0 and fp16.kl == 0.0

    def run(plan):
        return perplexity(real.model, ev, plan_cache_factory(plan, real.model.config), reference=ref, progress=False)

    tokens = ev.shape[1]
    uniform = run(uniform_plan(real.facts, quantizer, 4, tokens=tokens))
    budget = uniform_plan(real.facts, quantizer, 4, tokens=tokens).usage.average_bits  # 4 bits + metadata
    plan = allocate_plan(calib, quantizer, budget, tokens=tokens)
    assert plan.usage.average_bits <= budget + 1e-9
    ours = run(plan)
    two = run(uniform_plan(real.facts, quantizer, 2, tokens=tokens))
    c = paired_comparison(ours.token_kl, uniform.token_kl)
    print(f"\n{quantizer}: FP16 {fp16.ppl:.3f}, uniform 4-bit {uniform.ppl:.3f} (KL {uniform.kl:.4f}), rdalloc at "
          f"the same {budget:.2f} bits {ours.ppl:.3f} (KL {ours.kl:.4f}; vs uniform {c.difference:+.4f} "
          f"[{c.low:+.4f}, {c.high:+.4f}] {c.verdict}); uniform 2-bit KL {two.kl:.4f}")
    assert c.low <= c.difference <= c.high and c.tokens == tokens - 1
    # KL to FP16 is positive and grows as bits fall: 4 bits damage the distribution less than 2 bits
    assert 0 < uniform.kl < two.kl and 0 < ours.kl < two.kl
    assert uniform.token_kl.shape == (1, tokens - 1) and uniform.token_kl.min() > -1e-6
    for r in (uniform, ours):
        assert math.isfinite(r.ppl)
        # measured on this 255-token window: KIVI +0.9% (uniform) / +0.3% (rdalloc), QuaRot +7.1% / +4.2%
        assert r.ppl / fp16.ppl < 1.10, (quantizer, r.ppl, fp16.ppl)
        assert r.ppl / fp16.ppl > 0.99  # a quantized cache scoring clearly better than the full one is a bug
