"""Handing a KV cache to a transformers model, whichever release is installed — and proving it was used.

transformers 5.24 renamed the cache argument of ``forward`` and ``generate`` from ``past_key_values`` to ``cache``;
the old name is a deprecated alias until 5.40. A model whose ``forward`` no longer knows a keyword passes it on in
``**kwargs`` and ignores it: a quantized cache handed over under the wrong name gives full-precision logits and an
empty cache, silently. So every rdalloc call goes through this module:

* :func:`cache_keyword` reads the name from the model's own ``forward`` signature (``cache`` where it is a
  parameter, else ``past_key_values``);
* :func:`forward` and :func:`generate` call the model with the cache under that name, then check that the cache
  grew (``get_seq_length()`` larger than before the call) and raise ``RuntimeError`` if it did not.
"""

from __future__ import annotations

import inspect
from typing import Any

__all__ = ["CACHE_KEYWORDS", "cache_keyword", "cache_kwargs", "forward", "generate"]

CACHE_KEYWORDS = ("cache", "past_key_values")  # newest first


def cache_keyword(model: Any) -> str:
    """The keyword under which ``model.forward`` (and so ``model.generate``) takes a KV cache."""
    forward_fn = getattr(model, "forward", None)
    if forward_fn is None:
        raise TypeError(f"model must be a torch module with a forward method, got {type(model).__name__}")
    params = inspect.signature(forward_fn).parameters
    for name in CACHE_KEYWORDS:
        if name in params:
            return name
    raise TypeError(f"{type(model).__name__}.forward takes none of the cache keywords {CACHE_KEYWORDS}; its "
                    f"parameters are {tuple(params)}")


def cache_kwargs(model: Any, cache: Any) -> dict:
    """``{keyword: cache}`` for ``model(**...)`` / ``model.generate(**...)`` under the installed transformers."""
    return {cache_keyword(model): cache}


def _length(cache: Any) -> int:
    if not hasattr(cache, "get_seq_length"):
        raise TypeError(f"cache must be a transformers Cache (with get_seq_length), got {type(cache).__name__}")
    return int(cache.get_seq_length())


def _check_used(model: Any, cache: Any, before: int, call: str) -> None:
    after = _length(cache)
    if after <= before:
        raise RuntimeError(f"{type(model).__name__}.{call} ignored the {type(cache).__name__} it was given (its "
                           f"length stayed {before} -> {after}); the installed transformers may take the cache under "
                           f"another keyword than {cache_keyword(model)!r}")


def forward(model: Any, cache: Any, *args: Any, **kwargs: Any) -> Any:
    """``model(*args, <cache keyword>=cache, use_cache=True, **kwargs)``; raises ``RuntimeError`` if the model did not
    extend ``cache``."""
    before = _length(cache)
    kwargs.setdefault("use_cache", True)
    out = model(*args, **cache_kwargs(model, cache), **kwargs)
    _check_used(model, cache, before, "forward")
    return out


def generate(model: Any, cache: Any, *args: Any, **kwargs: Any) -> Any:
    """``model.generate(*args, <cache keyword>=cache, **kwargs)``; raises ``RuntimeError`` if generation did not
    extend ``cache``."""
    before = _length(cache)
    out = model.generate(*args, **cache_kwargs(model, cache), **kwargs)
    _check_used(model, cache, before, "generate")
    return out
