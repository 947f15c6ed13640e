"""Running a transformers model with another attention function, for the length of a ``with`` block.

:class:`AttentionSwap` is the one way rdalloc swaps attention (kvpress style: ``with swap(model): model(...)``).
A subclass defines :meth:`AttentionSwap.attention` with the signature of transformers' attention functions and
keeps whatever the calls produce or need on the object itself. Entering registers that bound method under a name
of this object alone (with the mask function it expects, ``mask``) and switches the model to it; leaving switches
the model back, unregisters the name and calls :meth:`AttentionSwap.reset`, whatever happened inside, so a failed
call leaves nothing behind.
"""

from __future__ import annotations

from typing import Any

__all__ = ["AttentionSwap"]


class AttentionSwap:
    """Context manager: ``model`` runs :meth:`attention` inside ``with``, its own implementation again after."""

    mask = "sdpa"
    """The transformers mask function the attention expects (``"sdpa"``: boolean masks; ``"eager"``: additive)."""

    def __init__(self, model: Any):
        self.model = model
        self.name: str | None = None
        self.previous: str | None = None

    def attention(self, module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        """``(output [batch, q, q_heads, head_dim], weights or None)``, as transformers' attention functions."""
        raise NotImplementedError

    def reset(self) -> None:
        """Forget what the calls inside the block left on the object (called on leaving it)."""

    def __enter__(self):
        from transformers import AttentionInterface
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

        if self.name is not None:
            raise RuntimeError(f"{type(self).__name__} is already entered; make one per `with` block")
        self.name = f"rdalloc_{type(self).__name__}_{id(self):x}"
        AttentionInterface.register(self.name, self.attention)
        AttentionMaskInterface.register(self.name, ALL_MASK_ATTENTION_FUNCTIONS[self.mask])
        self.previous = self.model.config._attn_implementation
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
