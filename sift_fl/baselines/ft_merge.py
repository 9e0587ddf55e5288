"""FT+Merge: the uniform mean of plain finetuning residuals (one-shot FedAvg), served unmasked.

Plain residuals have both signs at every coordinate, so `MergeState` (which takes signs from
the sign vector) does not apply. `ResidualSum` keeps the same exact int64 fixed-point sums for
signed dense residuals, so a withdrawal is one subtraction and leaves the sums bit-identical to
a merge of the retain set.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from sift_fl.fixed_point import FixedPointFormat, OutOfRangeError


def float64_sum(residuals: Sequence[Mapping[str, np.ndarray]], caller: str) -> dict[str, np.ndarray]:
    """Return Σ_c τ_c per tensor in float64; raise ValueError naming `caller` if there is no residual."""
    if not residuals:
        raise ValueError(f"{caller} needs at least one residual")
    total = {name: np.zeros(np.shape(values), dtype=np.float64) for name, values in residuals[0].items()}
    for residual in residuals:
        for name in total:
            total[name] += residual[name]
    return total


def uniform_mean(residuals: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Return (1/N) Σ_c τ_c per tensor, computed in float64 and returned as float32."""
    total = float64_sum(residuals, "uniform_mean")
    return {name: (values / len(residuals)).astype(np.float32) for name, values in total.items()}


class ResidualSum:
    """Exact sum S = Σ_c τ_c of signed dense residuals and the ids of the summed clients.

    Parameters
    ----------
    shapes : Mapping[str, tuple[int, ...]]
        Tensor names and shapes, in layout order.
    number_format : FixedPointFormat, optional
        Resolution and range of the int64 sums.
    """

    def __init__(self, shapes: Mapping[str, tuple[int, ...]], number_format: FixedPointFormat | None = None) -> None:
        self.shapes = {name: tuple(shape) for name, shape in shapes.items()}
        self.number_format = number_format or FixedPointFormat()
        self.sums = {name: np.zeros(shape, dtype=np.int64) for name, shape in self.shapes.items()}
        self.members: set[str] = set()

    @property
    def count(self) -> int:
        return len(self.members)

    @property
    def num_parameters(self) -> int:
        return sum(int(np.prod(shape, dtype=np.int64)) for shape in self.shapes.values())

    def add(self, client_id: str, residual: Mapping[str, np.ndarray]) -> None:
        """Add one client's residual; raise ValueError if the client is already summed."""
        if client_id in self.members:
            raise ValueError(f"client {client_id!r} is already merged; withdraw it before merging it again")
        if self.count + 1 > self.number_format.max_clients:
            raise OutOfRangeError(f"cannot merge more than {self.number_format.max_clients} clients")

        units = self._units(client_id, residual)
        for name, values in units.items():
            self.sums[name] += values
        self.members.add(client_id)

    def remove(self, client_id: str, residual: Mapping[str, np.ndarray]) -> None:
        """Subtract one client's residual; raise KeyError if the client is not summed."""
        if client_id not in self.members:
            raise KeyError(f"client {client_id!r} is not merged")

        units = self._units(client_id, residual)
        for name, values in units.items():
            self.sums[name] -= values
        self.members.remove(client_id)

    def _units(self, client_id: str, residual: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        # Quantize every tensor before touching the sums, so a rejected value changes nothing.
        units = {}
        for name, shape in self.shapes.items():
            values = np.asarray(residual[name])
            if tuple(values.shape) != shape:
                raise ValueError(f"client {client_id!r} tensor {name!r} has shape {values.shape}, expected {shape}")
            magnitude = self.number_format.quantize(np.abs(values), f"client {client_id!r} tensor {name!r}")
            units[name] = np.where(values < 0, -magnitude, magnitude)
        return units

    def total(self) -> dict[str, np.ndarray]:
        """Return S per tensor as float32."""
        return {name: self.number_format.to_float(sums, 1) for name, sums in self.sums.items()}

    def mean(self) -> dict[str, np.ndarray]:
        """Return S / n per tensor as float32; zeros when no client is summed."""
        divisor = max(self.count, 1)
        return {name: self.number_format.to_float(sums, divisor) for name, sums in self.sums.items()}

    def equals(self, other: ResidualSum) -> bool:
        """Return True if both sums hold the same members and values, bit for bit."""
        if self.members != other.members or self.shapes != other.shapes:
            return False
        return all(np.array_equal(self.sums[name], other.sums[name]) for name in self.shapes)
