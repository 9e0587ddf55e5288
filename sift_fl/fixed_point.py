"""Fixed-point number format of the exact merge accumulator.

Each received magnitude is rounded once (round half to even) to an integer multiple of
the resolution 2**-fraction_bits, and sums are kept in int64. Integer addition is
associative and commutative, so any order of joins and withdrawals leaves the same sums.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

INT64_MAX = 2**63 - 1


class OutOfRangeError(ValueError):
    """A value or a client count exceeds what the fixed-point format can hold exactly."""


@dataclass(frozen=True)
class FixedPointFormat:
    """Resolution and range of the exact accumulator.

    With the defaults (40 fraction bits, max magnitude 16) the resolution is
    2**-40 ≈ 9.1e-13, and up to 524,287 clients can be summed without overflow.
    """

    fraction_bits: int = 40
    max_magnitude: float = 16.0

    def __post_init__(self) -> None:
        if not 0 <= self.fraction_bits <= 62:
            raise ValueError(f"fraction_bits must be in [0, 62], got {self.fraction_bits}")
        if not (math.isfinite(self.max_magnitude) and self.max_magnitude > 0):
            raise ValueError(f"max_magnitude must be positive and finite, got {self.max_magnitude}")
        if self.max_units >= INT64_MAX:
            raise ValueError("max_magnitude * 2**fraction_bits must be below 2**63 - 1")

    @property
    def resolution(self) -> float:
        return 2.0 ** -self.fraction_bits

    @property
    def max_units(self) -> int:
        """Largest quantized magnitude, in units of the resolution."""
        return math.ceil(self.max_magnitude * 2**self.fraction_bits)

    @property
    def max_clients(self) -> int:
        """Largest number of clients whose sums fit in int64 at max magnitude."""
        return INT64_MAX // self.max_units

    def quantize(self, magnitude: np.ndarray, field: str = "magnitude") -> np.ndarray:
        """Return the magnitudes as int64 multiples of the resolution.

        Raises
        ------
        OutOfRangeError
            If a value is NaN, Inf or larger than `max_magnitude`.
        """
        values = np.array(magnitude, dtype=np.float64)
        low = float(values.min(initial=0.0))
        high = float(values.max(initial=0.0))
        if not (math.isfinite(low) and math.isfinite(high)):
            raise OutOfRangeError(f"{field}: contains NaN or Inf")
        largest = max(abs(low), abs(high))
        if largest > self.max_magnitude:
            raise OutOfRangeError(
                f"{field}: magnitude {largest:.6g} exceeds the accumulator's limit of {self.max_magnitude:g}"
            )
        np.ldexp(values, self.fraction_bits, out=values)
        np.rint(values, out=values)
        return values.astype(np.int64)

    def to_float(self, units: np.ndarray, divisor: np.ndarray | int) -> np.ndarray:
        """Return units * resolution / divisor as float32, computed in float64."""
        values = units.astype(np.float64)
        np.ldexp(values, -self.fraction_bits, out=values)
        np.divide(values, divisor, out=values)
        return values.astype(np.float32)
