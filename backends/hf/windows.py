"""Token-id windows as the model runs them: checked, split into batches, with an optional progress bar."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

__all__ = ["as_windows", "split_batches", "with_progress"]


def as_windows(windows: Any) -> torch.Tensor:
    """``windows`` as a ``[count, length]`` long tensor (one ``[length]`` window becomes ``[1, length]``);
    ``ValueError`` unless ``count >= 1`` and ``length >= 2`` (a window must predict at least one token)."""
    ids = torch.as_tensor(windows, dtype=torch.long)
    if ids.ndim == 1:
        ids = ids[None]
    if ids.ndim != 2 or ids.shape[1] < 2 or ids.shape[0] < 1:
        raise ValueError(f"windows must be token ids shaped [count, length] (length >= 2), got shape "
                         f"{tuple(ids.shape)}")
    return ids


def split_batches(ids: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """Consecutive batches of at most ``batch_size`` windows (a positive integer)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    return [ids[i:i + batch_size] for i in range(0, ids.shape[0], batch_size)]


def with_progress(iterable: Iterable, *, desc: str, total: int, enabled: bool) -> Iterable:
    """``iterable`` behind a tqdm progress bar labelled ``desc`` when ``enabled``, else unchanged."""
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, leave=False)
