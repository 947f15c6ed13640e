"""Real text with no network, tokenized once and cut into disjoint calibration and evaluation windows.

The default text is CPython's ``pydoc_data.topics`` (the help texts of the language reference, about half a
megabyte of English prose in CPython 3.11): the topics are joined in sorted-key order with a blank line between them,
so the text (and every window cut from it) is the same on every run of the same Python. A second built-in text, in
another register, checks that conclusions drawn on the first are not tuned to it: ``"python-source"``, the source of
eight pure-Python standard-library modules (code, comments and docstrings; about 0.6 MB) joined in a fixed order.
Both ship with every CPython, so neither needs a network. Any UTF-8 file works too.

Splitting. The token stream of ``N`` tokens is cut at ``split_at = floor(split * N)``: the **calibration** part is
``[0, split_at)`` and the **evaluation** part is ``[split_at, N)``. Windows are consecutive, non-overlapping slices of
``length`` tokens taken from the start of each part, so no calibration token is ever an evaluation token, and asking
for more calibration windows never moves the evaluation windows.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["TextWindows", "BUILTIN_TEXTS", "default_text", "python_source_text", "read_text", "tokenize",
           "cut_windows", "text_windows"]

#: Standard-library modules that are single pure-Python files in every CPython >= 3.11, in the order joined.
PYTHON_SOURCE_MODULES = ("argparse", "difflib", "tarfile", "inspect", "typing", "statistics", "dataclasses", "shutil")


def default_text() -> str:
    """``pydoc_data.topics`` joined in sorted-key order (deterministic for a given CPython)."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k].strip() for k in sorted(topics))


def python_source_text() -> str:
    """The source of :data:`PYTHON_SOURCE_MODULES`, joined in that order with a blank line between files."""
    import importlib.util

    parts = []
    for name in PYTHON_SOURCE_MODULES:
        origin = importlib.util.find_spec(name).origin
        parts.append(Path(origin).read_text(encoding="utf-8").strip())
    return "\n\n".join(parts)


#: Texts known by name (``read_text("python-source")``, ``--text python-source``): a name wins over a file of that name.
BUILTIN_TEXTS = {"pydoc_data.topics": default_text, "python-source": python_source_text}


def read_text(path: str | os.PathLike | None = None) -> str:
    """The default text (``path=None``), a built-in text by name (:data:`BUILTIN_TEXTS`) or a UTF-8 file's contents."""
    if path is None:
        return default_text()
    if isinstance(path, str) and path in BUILTIN_TEXTS:
        return BUILTIN_TEXTS[path]()
    p = Path(path).expanduser()
    if not p.is_file():
        raise ValueError(f"text path must be an existing UTF-8 file, got {str(path)!r}")
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"text file {str(path)!r} is not valid UTF-8 ({e.reason} at byte {e.start})") from None


def tokenize(text: str, tokenizer: Any):
    """Token ids of ``text`` as a 1-D ``torch.long`` tensor, without special tokens (one pass over the text)."""
    import torch

    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    return torch.as_tensor(ids, dtype=torch.long)


def cut_windows(ids, length: int, count: int, *, what: str = "text"):
    """``count`` consecutive non-overlapping windows of ``length`` tokens from the start of 1-D ``ids``:
    a ``[count, length]`` tensor. ``ValueError`` (saying how many tokens there are and are needed) if too short."""
    import torch

    ids = torch.as_tensor(ids, dtype=torch.long)
    if ids.ndim != 1:
        raise ValueError(f"ids must be 1-D token ids, got shape {tuple(ids.shape)}")
    if isinstance(length, bool) or not isinstance(length, int) or length < 2:
        raise ValueError(f"window length must be an integer >= 2, got {length!r}")
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise ValueError(f"window count must be a non-negative integer, got {count!r}")
    need = length * count
    if need > ids.numel():
        raise ValueError(f"the {what} has {ids.numel()} tokens but {count} windows of {length} tokens need {need}; "
                         f"use fewer or shorter windows, or a longer text")
    return ids[:need].reshape(count, length)


@dataclass(frozen=True)
class TextWindows:
    """Disjoint calibration and evaluation windows cut from one token stream.

    Attributes:
      calibration, evaluation: ``[count, length]`` long tensors of token ids.
      tokens: tokens in the whole text; split_at: the first evaluation-part token (calibration part is before it).
      source: where the text came from (``"pydoc_data.topics"`` or the file path).
    """

    calibration: Any
    evaluation: Any
    tokens: int
    split_at: int
    source: str

    @property
    def length(self) -> int:
        return int(self.evaluation.shape[1] if self.evaluation.numel() else self.calibration.shape[1])

    def to_dict(self) -> dict:
        """Facts only (no token ids): counts, length, split, source."""
        return {"calibration_windows": int(self.calibration.shape[0]), "evaluation_windows":
                int(self.evaluation.shape[0]), "length": self.length, "tokens": self.tokens,
                "split_at": self.split_at, "source": self.source}


def text_windows(tokenizer: Any, *, length: int, calibration: int, evaluation: int,
                 path: str | os.PathLike | None = None, text: str | None = None, split: float = 0.5) -> TextWindows:
    """Tokenize the text once and cut ``calibration`` and ``evaluation`` windows of ``length`` tokens.

    Args:
      tokenizer: a Hugging Face tokenizer.
      length: tokens per window; calibration, evaluation: how many windows of each.
      path: a UTF-8 file or a name in :data:`BUILTIN_TEXTS` (default: ``pydoc_data.topics``);
        text: the text itself (overrides ``path``).
      split: fraction of the token stream that forms the calibration part, in ``(0, 1)`` (see the module docstring).
    """
    if not (isinstance(split, (int, float)) and 0.0 < float(split) < 1.0):
        raise ValueError(f"split must be a fraction in (0, 1), got {split!r}")
    source = "text" if text is not None else ("pydoc_data.topics" if path is None else str(path))
    ids = tokenize(read_text(path) if text is None else text, tokenizer)
    n = int(ids.numel())
    split_at = int(n * float(split))
    calib = cut_windows(ids[:split_at], length, calibration,
                        what=f"calibration part (first {split:.0%} of {n} tokens of {source})")
    evals = cut_windows(ids[split_at:], length, evaluation,
                        what=f"evaluation part (last {1 - split:.0%} of {n} tokens of {source})")
    return TextWindows(calibration=calib, evaluation=evals, tokens=n, split_at=split_at, source=source)
