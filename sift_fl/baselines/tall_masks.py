"""TALL masks: per-client masks over the summed residual of all clients.

With the summed residual τ_MTL = Σ_t τ_t, client t's mask keeps the coordinates where its own
residual dominates the residuals of all other clients:

    m_t = 1{|τ_t| ≥ λ_t · |τ_MTL − τ_t|}

and client t is served θ0 + m_t ⊙ τ_MTL. λ_t is chosen per client from a small grid on the
client's validation split. Every mask depends on τ_MTL, so withdrawing one client changes
every remaining client's mask: exact unlearning recomputes all of them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from sift_fl.baselines.ft_merge import float64_sum

logger = logging.getLogger(__name__)

DEFAULT_LAMBDAS = (0.2, 0.3, 0.4, 0.5, 0.6)


def summed_residual(residuals: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Return τ_MTL = Σ_t τ_t per tensor, summed in float64 and returned as float32."""
    total = float64_sum(residuals, "summed_residual")
    return {name: values.astype(np.float32) for name, values in total.items()}


def tall_mask(residual: Mapping[str, np.ndarray], total: Mapping[str, np.ndarray], lam: float) -> dict[str, np.ndarray]:
    """Return the bool mask 1{|τ_t| ≥ λ·|τ_MTL − τ_t|} of one client, per tensor and shaped like it.

    Parameters
    ----------
    residual : Mapping[str, np.ndarray]
        The client's residual τ_t.
    total : Mapping[str, np.ndarray]
        The summed residual τ_MTL, which includes τ_t.
    lam : float
        The client's threshold λ_t, non-negative.
    """
    if not (np.isfinite(lam) and lam >= 0):
        raise ValueError(f"TALL mask threshold lambda must be finite and non-negative, got {lam}")
    masks = {}
    for name, values in residual.items():
        own = np.asarray(values, dtype=np.float64)
        others = np.asarray(total[name], dtype=np.float64) - own
        masks[name] = np.abs(own) >= lam * np.abs(others)
    return masks


def compute_tall_masks(
    residuals: Sequence[Mapping[str, np.ndarray]],
    lambdas: Sequence[float],
) -> list[dict[str, np.ndarray]]:
    """Return every client's TALL mask, m_t = |τ_t| ≥ λ_t·|τ_MTL − τ_t| with τ_MTL = Σ_t τ_t.

    Parameters
    ----------
    residuals : Sequence[Mapping[str, np.ndarray]]
        The residuals τ_t of all merged clients, with the same tensor names and shapes.
    lambdas : Sequence[float]
        One threshold λ_t per client, in the same order.

    Returns
    -------
    list[dict[str, np.ndarray]]
        One dict of bool masks per client, shaped like its residual tensors.
    """
    if len(residuals) != len(lambdas):
        raise ValueError(f"got {len(residuals)} residuals but {len(lambdas)} lambdas; pass one lambda per residual")
    if not residuals:
        return []

    total = summed_residual(residuals)
    return [tall_mask(residual, total, lam) for residual, lam in zip(residuals, lambdas)]


def select_lambda(
    residual: Mapping[str, np.ndarray],
    total: Mapping[str, np.ndarray],
    score: Callable[[dict[str, np.ndarray]], float],
    lambdas: Sequence[float] = DEFAULT_LAMBDAS,
) -> tuple[float, dict[str, np.ndarray]]:
    """Return the λ from `lambdas` whose mask scores highest, and that mask.

    `score(mask)` returns the validation accuracy of θ0 + mask ⊙ τ_MTL. Ties go to the
    smallest λ, which keeps the most coordinates.
    """
    if not lambdas:
        raise ValueError("select_lambda needs at least one candidate lambda")
    candidates = sorted(lambdas)
    best_lambda, best_mask = candidates[0], tall_mask(residual, total, candidates[0])
    best_score = score(best_mask)
    for lam in candidates[1:]:
        mask = tall_mask(residual, total, lam)
        value = score(mask)
        if value > best_score or (np.isnan(best_score) and not np.isnan(value)):
            best_lambda, best_mask, best_score = lam, mask, value
    return float(best_lambda), best_mask
