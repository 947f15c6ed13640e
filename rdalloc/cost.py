"""The storage cost of an item: ``C_i(b) = n_i * b + m_i * [0 < b < 16]`` bits.

``n_i`` is the number of elements the item holds and ``m_i`` the metadata it carries when quantized (for an asymmetric
quantizer, a 16-bit scale and a 16-bit zero-point per group: ``m_i = 32 * groups_i``). An evicted item (``b = 0``)
costs nothing; a full-precision one (``b = 16``) costs ``16 n_i`` and needs no metadata. Budgets quoted in average bits
mean ``B / sum_i n_i`` with metadata charged; ``payload`` bits leave it out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ._namespace import as_float64, namespace

__all__ = ["item_cost", "metadata_bits", "Usage", "FULL_BITS"]

FULL_BITS = 16
"""Full precision: stored as is, no quantization metadata."""


def metadata_bits(groups: Any, scale_bits: int = 16, zero_bits: int = 16) -> Any:
    """Metadata of an asymmetric quantizer: one scale and one zero-point per group."""
    return groups * (scale_bits + zero_bits)


def item_cost(bits: Any, sizes: Any, metadata: Any = 0.0) -> Any:
    """``C(b) = n * b + m * [0 < b < 16]`` elementwise (float64)."""
    xp = namespace(bits, sizes, metadata)
    b = as_float64(xp, bits, name="bits")
    n = as_float64(xp, sizes, name="sizes")
    m = as_float64(xp, metadata, name="metadata")
    quantized = (b > 0) & (b < FULL_BITS)
    return n * b + xp.where(quantized, m, xp.zeros_like(m))


@dataclass(frozen=True)
class Usage:
    """Bits a solution spends, split into payload and metadata, and what they are per element."""

    payload_bits: float
    metadata_bits: float
    elements: float

    @property
    def total_bits(self) -> float:
        return self.payload_bits + self.metadata_bits

    @property
    def average_bits(self) -> float:
        """Bits per element with metadata charged (the honest number)."""
        return self.total_bits / self.elements if self.elements else 0.0

    @property
    def average_payload_bits(self) -> float:
        """Bits per element, payload only (what papers usually quote)."""
        return self.payload_bits / self.elements if self.elements else 0.0

    @classmethod
    def of(cls, bits: Any, sizes: Any, metadata: Any = 0.0) -> Usage:
        xp = namespace(bits, sizes, metadata)
        b = as_float64(xp, bits, name="bits")
        n = as_float64(xp, sizes, name="sizes") * xp.ones_like(b)
        m = as_float64(xp, metadata, name="metadata") * xp.ones_like(b)
        quantized = (b > 0) & (b < FULL_BITS)
        return cls(payload_bits=float(xp.sum(n * b)), metadata_bits=float(xp.sum(xp.where(quantized, m, 0 * m))),
                   elements=float(xp.sum(n)))

    def to_dict(self) -> dict:
        return {"payload_bits": self.payload_bits, "metadata_bits": self.metadata_bits, "elements": self.elements,
                "total_bits": self.total_bits, "average_bits": self.average_bits,
                "average_payload_bits": self.average_payload_bits}

    @classmethod
    def from_dict(cls, d: dict) -> Usage:
        return cls(payload_bits=float(d["payload_bits"]), metadata_bits=float(d["metadata_bits"]),
                   elements=float(d["elements"]))
