"""The examples in the core's docstrings run as written (doctest), and the modules a user starts from have some."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import rdalloc

# Core modules only: the adapters (rdalloc.backends) need torch, JAX or transformers.
CORE = sorted(m.name for m in pkgutil.iter_modules(rdalloc.__path__, "rdalloc.") if m.name != "rdalloc.backends")
# The entry points the README sends a newcomer to: each must carry at least one example.
WITH_EXAMPLES = {"rdalloc.waterfill", "rdalloc.allocate", "rdalloc.fit", "rdalloc.plan"}


@pytest.mark.parametrize("name", CORE)
def test_docstring_examples(name):
    try:
        module = importlib.import_module(name)
    except ImportError as e:  # an optional dependency of this module is not installed (e.g. hypothesis)
        pytest.skip(f"{name}: {e}")
    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS, report=True)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples in {name} failed (printed above)"
    if name in WITH_EXAMPLES:
        assert result.attempted > 0, f"{name} should show an example in its docstrings"
