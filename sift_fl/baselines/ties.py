"""TIES-merging of plain finetuning residuals: trim, elect sign, disjoint mean.

1. Trim: each client keeps the `density` fraction of largest-magnitude entries of each
   tensor (PEFT's `magnitude_based_pruning`, per tensor, through `prune`).
2. Elect: per coordinate, γ = sign of the summed trimmed residuals (`total`), or of the
   summed signs (`frequency`); ties go to +1.
3. Disjoint mean: average only the trimmed entries whose sign equals γ; serve θ0 + λ·merged.

`ties_merge` runs PEFT's `peft.utils.merge_utils.ties` (prune, `calculate_majority_sign_mask`,
`disjoint_merge`) on stacked residuals. `TiesAccumulator` computes the same result from a stream
of trimmed residuals with four per-coordinate sums (positive and negative values and counts),
so the server never keeps all residuals in memory at once. Defaults: density 0.2 (the top 20%) and λ = 1.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from peft.utils.merge_utils import prune, ties

DEFAULT_DENSITY = 0.2
DEFAULT_SCALE = 1.0
SIGN_METHODS = ("total", "frequency")


def trim_residual(residual: Mapping[str, np.ndarray], density: float = DEFAULT_DENSITY) -> dict[str, np.ndarray]:
    """Return the residual with all but the top `density` fraction of magnitudes per tensor set to zero."""
    _check_density(density)
    if density >= 1.0:
        return {name: np.asarray(values, dtype=np.float32).copy() for name, values in residual.items()}
    return {
        name: prune(torch.from_numpy(np.asarray(values, dtype=np.float32)), density, method="magnitude").numpy()
        for name, values in residual.items()
    }


def ties_merge(
    residuals: Sequence[Mapping[str, np.ndarray]],
    density: float = DEFAULT_DENSITY,
    scale: float = DEFAULT_SCALE,
    sign_method: str = "total",
) -> dict[str, np.ndarray]:
    """Return λ·TIES(τ_1 … τ_N) per tensor with PEFT's `ties`, from untrimmed residuals held in memory."""
    _check_density(density)
    _check_sign_method(sign_method)
    if not residuals:
        raise ValueError("ties_merge needs at least one residual")

    weights = torch.ones(len(residuals), dtype=torch.float32)
    merged = {}
    with warnings.catch_warnings():
        # PEFT warns that density 1 prunes nothing, which is what density 1 requests.
        warnings.filterwarnings("ignore", message="The density .* no pruning will be performed")
        for name in residuals[0]:
            tensors = [torch.from_numpy(np.asarray(residual[name], dtype=np.float32)) for residual in residuals]
            merged[name] = (scale * ties(tensors, weights, density, majority_sign_method=sign_method)).numpy()
    return merged


class TiesAccumulator:
    """Streaming TIES: per-coordinate sums of positive and negative trimmed entries and their counts.

    The elected sign and the disjoint mean are functions of these four sums, so adding the
    trimmed residuals one at a time gives the same merge as `ties_merge` on all of them.
    """

    def __init__(self, shapes: Mapping[str, tuple[int, ...]], sign_method: str = "total") -> None:
        _check_sign_method(sign_method)
        self.sign_method = sign_method
        self.positive_sum = {name: np.zeros(shape, dtype=np.float64) for name, shape in shapes.items()}
        self.negative_sum = {name: np.zeros(shape, dtype=np.float64) for name, shape in shapes.items()}
        self.positive_count = {name: np.zeros(shape, dtype=np.int64) for name, shape in shapes.items()}
        self.negative_count = {name: np.zeros(shape, dtype=np.int64) for name, shape in shapes.items()}
        self.count = 0

    def add(self, trimmed: Mapping[str, np.ndarray]) -> None:
        """Add one client's trimmed residual."""
        for name in self.positive_sum:
            values = np.asarray(trimmed[name], dtype=np.float64)
            positive = values > 0
            negative = values < 0
            self.positive_sum[name] += np.where(positive, values, 0.0)
            self.negative_sum[name] += np.where(negative, values, 0.0)
            self.positive_count[name] += positive
            self.negative_count[name] += negative
        self.count += 1

    def add_sparse(self, trimmed: Mapping[str, tuple[np.ndarray, np.ndarray]]) -> None:
        """Add one client's trimmed residual given per tensor as (unique flat indices, values)."""
        for name, (index, values) in trimmed.items():
            values = np.asarray(values, dtype=np.float64)
            positive = values > 0
            negative = values < 0
            self.positive_sum[name].reshape(-1)[index[positive]] += values[positive]
            self.negative_sum[name].reshape(-1)[index[negative]] += values[negative]
            self.positive_count[name].reshape(-1)[index[positive]] += 1
            self.negative_count[name].reshape(-1)[index[negative]] += 1
        self.count += 1

    def merged(self, scale: float = DEFAULT_SCALE) -> dict[str, np.ndarray]:
        """Return λ times the disjoint mean of the entries that agree with the elected sign, as float32."""
        merged = {}
        for name, positive_sum in self.positive_sum.items():
            if self.sign_method == "total":
                elected_positive = positive_sum + self.negative_sum[name] >= 0
            else:
                elected_positive = self.positive_count[name] >= self.negative_count[name]
            positive_mean = positive_sum / np.maximum(self.positive_count[name], 1)
            negative_mean = self.negative_sum[name] / np.maximum(self.negative_count[name], 1)
            merged[name] = (scale * np.where(elected_positive, positive_mean, negative_mean)).astype(np.float32)
        return merged


def _check_density(density: float) -> None:
    if not 0.0 < density <= 1.0:
        raise ValueError(f"TIES density must be in (0, 1], got {density}")


def _check_sign_method(sign_method: str) -> None:
    if sign_method not in SIGN_METHODS:
        raise ValueError(f"unknown TIES sign election {sign_method!r}; choose one of {', '.join(SIGN_METHODS)}")
