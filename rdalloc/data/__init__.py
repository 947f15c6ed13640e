"""Bundled data: a real calibration problem of SmolLM2-135M-Instruct (see scripts/make_problem.py)."""
