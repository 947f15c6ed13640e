"""Fit, diagnose and compare two quantizers' distortion curves on synthetic data (numbers in experiments/README.md).

    python -m experiments.fit_and_mismatch
"""

import numpy as np

from rdalloc import choose_model, compare_models, fit_exponential, fit_report

rng, bits, q = np.random.default_rng(0), [0, 2, 3, 4, 6, 8, 16], np.array([2, 3, 4, 6, 8.0])


def measure(beta, a):
    """Distortion at ``bits``: eviction at a/3, the curve with 5% multiplicative noise, 0 at full precision."""
    return np.column_stack([a / 3, a[:, None] * beta ** -q * np.exp(rng.normal(0, .05, (64, 5))), np.zeros(64)])


a = rng.lognormal(0, 1, 64)
D_kivi, D_quarot = measure(3.6, a), measure(5.3, rng.permutation(a))
D_kivi[7, 4:6] = D_kivi[7, 3]  # item 7 stops improving after 4 bits (a floor)

report = fit_report(D_kivi, bits, quantizer="kivi")
print(report.text())
choice = choose_model(D_kivi, bits, quantizer="kivi")
print(choice.summary(), "\nre-estimated beta:", choice.fit.beta[0])
kivi = fit_exponential(D_kivi, bits, quantizer="kivi").model
quarot = fit_exponential(D_quarot, bits, quantizer="quarot").model
print(compare_models(kivi, quarot, 128 * 64, average_bits=3.0).summary())
