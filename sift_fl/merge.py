"""Exact merge state: sums of quantized residuals, per-coordinate coverage and member ids.

The state is a pure function of the set of merged clients and their encoded residuals,
whatever the order in which they joined or withdrew, because it only adds and subtracts
int64 values (see `FixedPointFormat`).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable, Mapping

import numpy as np

from sift_fl.codec import EncodedResidual
from sift_fl.fixed_point import FixedPointFormat, OutOfRangeError
from sift_fl.layout import ParameterLayout
from sift_fl.sign import SignVector

logger = logging.getLogger(__name__)


class MergeState:
    """Sum S = Σ_c τ_c, coverage C = Σ_c m_c and the ids of the merged clients.

    Parameters
    ----------
    layout : ParameterLayout
        Layout of the trainable tensors.
    sign_vector : SignVector
        Sign vector that gives the residuals' signs.
    number_format : FixedPointFormat, optional
        Resolution and range of the int64 sums.
    """

    def __init__(
        self,
        layout: ParameterLayout,
        sign_vector: SignVector,
        number_format: FixedPointFormat | None = None,
    ) -> None:
        self.layout = layout
        self.sign_vector = sign_vector
        self.number_format = number_format or FixedPointFormat()
        self.sums = {spec.name: np.zeros(spec.numel, dtype=np.int64) for spec in layout.tensors}
        self.coverage = {spec.name: np.zeros(spec.numel, dtype=np.int32) for spec in layout.tensors}
        self.members: set[str] = set()

    @property
    def count(self) -> int:
        return len(self.members)

    def add(self, client_id: str, residual: EncodedResidual) -> None:
        """Merge one client's residual; raise ValueError if the client is already merged."""
        if client_id in self.members:
            raise ValueError(f"client {client_id!r} is already merged; withdraw it before merging it again")
        if self.count + 1 > self.number_format.max_clients:
            raise OutOfRangeError(f"cannot merge more than {self.number_format.max_clients} clients")

        updates = self._signed_units(client_id, residual)
        for name, (index, units) in updates.items():
            self.sums[name][index] += units
            self.coverage[name][index] += 1
        self.members.add(client_id)

    def remove(self, client_id: str, residual: EncodedResidual) -> None:
        """Unmerge one client: subtract its residual and coverage from the sums."""
        if client_id not in self.members:
            raise KeyError(f"client {client_id!r} is not merged")

        updates = self._signed_units(client_id, residual)
        for name, (index, units) in updates.items():
            self.sums[name][index] -= units
            self.coverage[name][index] -= 1
        self.members.remove(client_id)

    def _signed_units(self, client_id: str, residual: EncodedResidual) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        # Quantize every tensor before touching the sums, so a rejected value changes nothing.
        updates = {}
        for spec in self.layout.tensors:
            index = np.flatnonzero(residual.unpacked_mask(spec.name, spec.numel))
            field = f"client {client_id!r} tensor {spec.name!r} magnitude"
            units = self.number_format.quantize(residual.tensors[spec.name].magnitude, field)
            positive = self.sign_vector.positive(spec.name)[index]
            updates[spec.name] = (index, np.where(positive, units, -units))
        return updates

    def mean(self) -> dict[str, np.ndarray]:
        """Return τ̄ = S / n per tensor (float32, layout shapes); zeros when no client is merged."""
        divisor = max(self.count, 1)
        return {
            spec.name: self.number_format.to_float(self.sums[spec.name], divisor).reshape(spec.shape)
            for spec in self.layout.tensors
        }

    def coverage_mean(self) -> dict[str, np.ndarray]:
        """Return S / max(1, C) per tensor: each coordinate divided by the clients whose mask covers it."""
        return {
            spec.name: self.number_format.to_float(
                self.sums[spec.name], np.maximum(self.coverage[spec.name], 1)
            ).reshape(spec.shape)
            for spec in self.layout.tensors
        }

    def digest(self) -> str:
        """Return a sha256 hex digest of the member ids, sums and coverage."""
        hasher = hashlib.sha256(self.layout.digest().encode("ascii"))
        hasher.update("\n".join(sorted(self.members)).encode("utf-8"))
        for spec in self.layout.tensors:
            hasher.update(self.sums[spec.name].astype("<i8").tobytes())
            hasher.update(self.coverage[spec.name].astype("<i4").tobytes())
        return hasher.hexdigest()

    def equals(self, other: MergeState) -> bool:
        """Return True if both states hold the same members, sums and coverage, bit for bit."""
        if self.members != other.members or self.layout != other.layout:
            return False
        return all(
            np.array_equal(self.sums[name], other.sums[name]) and np.array_equal(self.coverage[name], other.coverage[name])
            for name in self.layout.names
        )

    @classmethod
    def from_scratch(
        cls,
        layout: ParameterLayout,
        sign_vector: SignVector,
        residuals: Mapping[str, EncodedResidual] | Iterable[tuple[str, EncodedResidual]],
        number_format: FixedPointFormat | None = None,
    ) -> MergeState:
        """Merge the given clients into a fresh state, in sorted client-id order."""
        items = dict(residuals.items() if isinstance(residuals, Mapping) else residuals)
        state = cls(layout, sign_vector, number_format)
        for client_id in sorted(items):
            state.add(client_id, items[client_id])
        return state


def apply_residual(
    base: Mapping[str, np.ndarray],
    residual: Mapping[str, np.ndarray],
    mask: Mapping[str, np.ndarray] | None = None,
) -> dict[str, np.ndarray]:
    """Return θ0 + τ, or θ0 + m ⊙ τ when a flat bool `mask` per tensor is given."""
    served = {}
    for name, base_values in base.items():
        delta = residual[name]
        if mask is not None:
            delta = np.where(mask[name].reshape(delta.shape), delta, np.float32(0))
        served[name] = (base_values + delta).astype(base_values.dtype)
    return served
