"""Running a transformers model with another attention function, for the length of a ``with`` block.

:class:`AttentionSwap` is the one way rdalloc swaps attention (kvpress style: ``with swap(model): model(...)``).
A subclass defines :meth:`AttentionSwap.attention` with the signature of transformers' attention functions and
keeps whatever the calls produce or need on the object itself. Entering registers that bound method under a name
of this object alone (with the mask function it expects, ``mask``) and switches the model to it; leaving switches
the model back, unregisters the name and calls :meth:`AttentionSwap.reset`, whatever happened inside, so a failed
call leaves nothing behind.

Nothing is hard-coded about the model's own implementation: :meth:`AttentionSwap.original_attention` runs whatever the
model had on entering (``sdpa``, ``eager``, a flash kernel, a registered custom one), and with ``mask = None`` the
swap keeps that implementation's mask function, so layers a subclass does not handle run exactly as before.

:class:`CacheAttention` is the swap for caches whose layers attend over their own storage: every cache handed to the
model inside the block is *attached* (its layers get ``layer.attention = self``); on ``update`` such a layer puts
itself (or what the attention needs) in ``pending[layer_idx]`` and the attention takes it from there.
"""

from __future__ import annotations

import sys
from typing import Any

__all__ = ["AttentionSwap", "CacheAttention"]


class AttentionSwap:
    """Context manager: ``model`` runs :meth:`attention` inside ``with``, its own implementation again after."""

    mask: str | None = "sdpa"
    """The transformers mask function the attention expects (``"sdpa"``: boolean masks; ``"eager"``: additive;
    ``None``: the one of the model's own implementation, falling back to ``"sdpa"``)."""

    def __init__(self, model: Any):
        self.model = model
        self.name: str | None = None
        self.previous: str | None = None

    def attention(self, module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        """``(output [batch, q, q_heads, head_dim], weights or None)``, as transformers' attention functions."""
        raise NotImplementedError

    def original_attention(self, module, query, key, value, attention_mask, **kwargs):
        """The attention the model had on entering (its ``eager`` function when that was the implementation)."""
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        eager = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
        if self.previous in (None, "eager") or self.previous not in ALL_ATTENTION_FUNCTIONS:
            if eager is None:
                raise RuntimeError(f"{type(module).__name__} (layer {getattr(module, 'layer_idx', '?')}): no attention "
                                   f"function for the model's implementation {self.previous!r}")
            return eager(module, query, key, value, attention_mask, **kwargs)
        return ALL_ATTENTION_FUNCTIONS[self.previous](module, query, key, value, attention_mask, **kwargs)

    def reset(self) -> None:
        """Forget what the calls inside the block left on the object (called on leaving it)."""

    def __enter__(self):
        from transformers import AttentionInterface
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

        if self.name is not None:
            raise RuntimeError(f"{type(self).__name__} is already entered; make one per `with` block")
        self.name = f"rdalloc_{type(self).__name__}_{id(self):x}"
        self.previous = self.model.config._attn_implementation
        mask = self.mask
        if mask is None:
            mask = self.previous if self.previous in ALL_MASK_ATTENTION_FUNCTIONS else "sdpa"
        AttentionInterface.register(self.name, self.attention)
        AttentionMaskInterface.register(self.name, ALL_MASK_ATTENTION_FUNCTIONS[mask])
        try:
            self.model.set_attn_implementation(self.name)
        except BaseException:
            self._unregister()
            raise
        return self

    def __exit__(self, *exc) -> bool:
        try:
            self.model.set_attn_implementation(self.previous)
        finally:
            self._unregister()
        return False

    def _unregister(self) -> None:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface

        try:
            self.reset()
        finally:
            for interface in (AttentionInterface, AttentionMaskInterface):
                interface._global_mapping.pop(self.name, None)
            self.name = None


class CacheAttention(AttentionSwap):
    """An :class:`AttentionSwap` that attaches the caches handed to the model (under either cache keyword) on each
    call: the layers :meth:`cache_layers` picks get ``attention = self`` until the block is left, and hand what the
    attention needs through :attr:`pending` (by layer index). Leaving detaches every layer and drops what a failed
    call left pending."""

    mask = None  # the model's own mask function

    def __init__(self, model: Any):
        super().__init__(model)
        self.pending: dict[int, Any] = {}
        self.attached: list = []
        self.hooks: list = []

    def cache_layers(self, cache: Any) -> list:
        """The layers of ``cache`` this attention runs (the rest run the model's own attention)."""
        raise NotImplementedError

    def attach(self, cache: Any) -> None:
        """Let ``cache``'s layers run under this attention (done for every cache the model is given)."""
        for layer in self.cache_layers(cache):
            if layer.attention is not self:
                layer.attention = self
                self.attached.append(layer)

    def _attach_given_cache(self, module, args, kwargs):
        from .compat import CACHE_KEYWORDS

        for keyword in CACHE_KEYWORDS:
            if kwargs.get(keyword) is not None:
                self.attach(kwargs[keyword])

    def reset(self) -> None:
        self.pending.clear()
        for layer in self.attached:
            layer.attention = None
        self.attached.clear()

    def __enter__(self):
        super().__enter__()
        try:
            self.hooks.append(self.model.register_forward_pre_hook(self._attach_given_cache, with_kwargs=True))
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> bool:
        try:
            while self.hooks:
                self.hooks.pop().remove()
        finally:
            super().__exit__(*exc)
        return False
