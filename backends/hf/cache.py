"""A transformers ``Cache`` that hands attention a transformed copy of K/V: simulated quantized-KV inference.

``TransformCache(transform, config)`` is a ``transformers.Cache`` built from the public layered cache API (one
:class:`TransformLayer`, a ``DynamicLayer`` subclass, per decoder layer). On every ``update`` a layer

1. appends the new *original* key/value states to what it stores (exactly as ``DynamicLayer`` does), then
2. returns ``transform(layer_idx, keys, values)`` of the **whole** stored cache to the attention.

So each query attends to transformed (e.g. fake-quantized) keys and values of every position, its own included
(docs/design.md §5, the RateQuant/QuaRot simulated protocol), and it works unchanged with ``model(...)`` and
``model.generate(...)`` (prefill, then one token at a time).

Why the originals are stored, not the transformed values. Quantizer groups can grow during decoding: a KIVI key
group of ``g`` consecutive tokens of one channel is partial until its ``g``-th token arrives, and its min/max (hence
its scale, hence every value in it) change as tokens are appended. Re-transforming the original full cache on each
step quantizes each group from its true members, never from already-quantized values (which would compound rounding
errors and make the result depend on how the sequence was chunked into forward calls). The price is that this is a
*simulation*: memory is not saved, and each step re-transforms the whole cache (``O(T)`` work per step). Note that in a
single forward over a window, a partial group's statistics include tokens later than the querying position; this is
the usual simulated protocol, and it is exactly what a per-token quantizer (groups within one token) never sees.

``transform(layer_idx, key, value) -> (key, value)`` takes and returns tensors shaped
``[batch, kv_heads, seq, head_dim]``; it must be pure (no in-place writes to its inputs: those are the stored
originals, and a write is detected and raised as an error). ``identity_transform`` keeps the model bit for bit.
Only full-attention layers are supported (a sliding-window or linear-attention layer raises ``ValueError``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from transformers.cache_utils import Cache, DynamicLayer

__all__ = ["Transform", "TransformLayer", "TransformCache", "identity_transform", "cache_factory"]

Transform = Callable[[int, torch.Tensor, torch.Tensor], "tuple[torch.Tensor, torch.Tensor]"]


def identity_transform(layer_idx: int, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The transform that changes nothing (a ``TransformCache`` with it equals a ``DynamicCache``)."""
    return key, value


class TransformLayer(DynamicLayer):
    """One decoder layer's cache: stores original K/V, returns ``transform(layer_idx, K, V)`` of all of it.

    Attributes:
      layer_idx: the decoder layer this cache belongs to; transform: the callable.
      keys, values: the stored originals (``[batch, kv_heads, seq, head_dim]``), as in ``DynamicLayer``.
      transformed: ``(key, value)`` last returned to the attention, kept only when ``keep_transformed``.
    """

    def __init__(self, layer_idx: int, transform: Transform, *, keep_transformed: bool = False):
        super().__init__()
        self.layer_idx = int(layer_idx)
        self.transform = transform
        self.keep_transformed = bool(keep_transformed)
        self.transformed: tuple[torch.Tensor, torch.Tensor] | None = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = super().update(key_states, value_states, *args, **kwargs)
        versions = (keys._version, values._version)
        out = self.transform(self.layer_idx, keys, values)
        if not (isinstance(out, tuple) and len(out) == 2):
            raise TypeError(f"transform must return a (key, value) tuple, got {type(out).__name__} at layer "
                            f"{self.layer_idx}")
        key, value = out
        if (keys._version, values._version) != versions:
            raise ValueError(f"transform wrote into its input K/V in place at layer {self.layer_idx}: those are the "
                             f"stored originals; return new tensors instead")
        for name, got, want in (("key", key, keys), ("value", value, values)):
            if not isinstance(got, torch.Tensor) or got.shape != want.shape:
                shape = tuple(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__
                raise ValueError(f"transform must return a {name} shaped like its input {tuple(want.shape)} "
                                 f"[batch, kv_heads, seq, head_dim], got {shape} at layer {self.layer_idx}")
        if key.dtype != keys.dtype or value.dtype != values.dtype:
            key, value = key.to(keys.dtype), value.to(values.dtype)
        if self.keep_transformed:
            self.transformed = (key, value)
        return key, value

    def reset(self) -> None:
        self.transformed = None
        super().reset()


def _num_layers(config_or_layers: Any) -> int:
    if isinstance(config_or_layers, bool):
        raise TypeError("config_or_layers must be a model config or a number of layers, got a bool")
    if isinstance(config_or_layers, int):
        if config_or_layers < 1:
            raise ValueError(f"the number of layers must be >= 1, got {config_or_layers}")
        return config_or_layers
    config = config_or_layers
    if not hasattr(config, "num_hidden_layers"):
        raise TypeError(f"config_or_layers must be a transformers config or an int, got {type(config).__name__}")
    if hasattr(config, "get_text_config"):
        config = config.get_text_config(decoder=True)
    try:
        from transformers.cache_utils import get_layer_types_and_kwargs

        types, _ = get_layer_types_and_kwargs(config)
    except (ImportError, AttributeError, TypeError):
        types = getattr(config, "layer_types", None) or ["full_attention"] * int(config.num_hidden_layers)
    other = [i for i, t in enumerate(types) if t != "full_attention"]
    if other:
        raise ValueError(f"TransformCache supports full-attention layers only; layer {other[0]} is "
                         f"{types[other[0]]!r} (all such layers: {other}; a sliding window keeps only the last "
                         f"tokens)")
    return len(types)


class TransformCache(Cache):
    """A ``transformers.Cache`` whose layers return ``transform(layer_idx, K, V)`` of the full stored cache.

    Args:
      transform: ``(layer_idx, key, value) -> (key, value)``, tensors ``[batch, kv_heads, seq, head_dim]``.
      config_or_layers: the model config (its layers must all be full attention) or the number of decoder layers.
      keep_transformed: keep the last transformed K/V on each layer (``layer.transformed``), for inspection.

    Use: ``compat.forward(model, TransformCache(t, model.config), ids)`` or ``compat.generate(model, cache, ids)``
    (they pass the cache under the keyword the installed transformers takes). One cache per sequence (batch):
    a fresh cache for each new window.
    """

    def __init__(self, transform: Transform, config_or_layers: Any, *, keep_transformed: bool = False):
        if not callable(transform):
            raise TypeError(f"transform must be callable (layer_idx, key, value) -> (key, value), got "
                            f"{type(transform).__name__}")
        n = _num_layers(config_or_layers)
        self.transform = transform
        super().__init__(layers=[TransformLayer(i, transform, keep_transformed=keep_transformed) for i in range(n)])

    def original(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The stored original ``(key, value)`` of a layer."""
        layer = self.layers[layer_idx]
        return layer.keys, layer.values


def cache_factory(transform: Transform, config_or_layers: Any, **kwargs: Any) -> Callable[[], TransformCache]:
    """A zero-argument callable making a fresh :class:`TransformCache` (what :func:`perplexity` takes)."""
    n = _num_layers(config_or_layers)

    def make() -> TransformCache:
        return TransformCache(transform, n, **kwargs)

    return make
