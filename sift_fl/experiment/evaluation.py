"""Serving phase: each method's model for each client, scored on the client's local test split.

Shared models (ft_merge, sift_merge, ties, central) are built once. Per-client models
(sift_masks, sift_masks_coverage, mask_only, tall_masks) read the client's stored residual
back from disk, one client at a time.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from tqdm.auto import tqdm

from sift_fl.baselines.central import central_train_config, train_central
from sift_fl.baselines.mask_only import mask_only_residual, tensor_scales
from sift_fl.baselines.tall_masks import select_lambda
from sift_fl.experiment.clients import ClientSplits, TrainingResult
from sift_fl.experiment.context import RunContext
from sift_fl.merge import apply_residual
from sift_fl.settings import TrainConfig

logger = logging.getLogger(__name__)

SHARED_METHODS = ("ft_merge", "sift_merge", "ties", "central")
PER_CLIENT_METHODS = ("sift_masks", "sift_masks_coverage", "mask_only", "tall_masks")


@dataclass
class EvaluationResult:
    """Accuracy per method and client, the TALL thresholds chosen and the central training steps."""

    accuracies: dict[str, dict[str, float]]
    tall_lambdas: dict[str, float] = field(default_factory=dict)
    central_steps: int = 0
    seconds: float = 0.0


def evaluate_methods(context: RunContext, training: TrainingResult) -> EvaluationResult:
    """Score every selected method except the local ones (scored during training) on every client."""
    start = time.perf_counter()
    methods = context.config.methods
    result = EvaluationResult(accuracies={})

    for method in SHARED_METHODS:
        if method in methods:
            residual = _shared_residual(context, training, method, result)
            served = apply_residual(context.theta0, residual)
            result.accuracies[method] = {
                client.client_id: context.score(served, client.test) for client in training.clients
            }

    per_client = [method for method in PER_CLIENT_METHODS if method in methods]
    if per_client:
        scorers = _per_client_scorers(context, training, per_client, result)
        for method in per_client:
            result.accuracies[method] = {}
        num_clients = len(training.clients)
        for client in tqdm(training.clients, desc=f"N={num_clients}: serve per-client models", unit="client"):
            for method in per_client:
                result.accuracies[method][client.client_id] = scorers[method](client)

    result.seconds = time.perf_counter() - start
    return result


def _shared_residual(
    context: RunContext,
    training: TrainingResult,
    method: str,
    result: EvaluationResult,
) -> dict[str, np.ndarray]:
    if method == "ft_merge":
        return training.ft_sum.mean()
    if method == "sift_merge":
        return training.sift_state.mean()
    if method == "ties":
        return training.ties.merged(context.config.ties_scale)

    splits = [client.train for client in training.clients]
    config = central_config(context, sum(len(split) for split in splits))
    result.central_steps = config.steps
    logger.info("Training the central reference on %d examples for %d steps", sum(map(len, splits)), config.steps)
    return train_central(context.model, context.parameters, context.theta0, splits, config)


def central_config(context: RunContext, num_examples: int) -> TrainConfig:
    """Return the central reference's training configuration for `num_examples` examples."""
    experiment = context.config
    client_config = experiment.train_config(context.setting, seed=experiment.data_seed)
    return central_train_config(client_config, num_examples, experiment.central_epochs, experiment.central_batch_size)


def _per_client_scorers(
    context: RunContext,
    training: TrainingResult,
    methods: list[str],
    result: EvaluationResult,
) -> dict[str, Callable[[ClientSplits], float]]:
    # Each scorer reads the client's stored residual, builds its served model and scores it.
    scorers: dict[str, Callable[[ClientSplits], float]] = {}
    layout, store = context.layout, context.store

    def masked(merged: dict[str, np.ndarray]) -> Callable[[ClientSplits], float]:
        def score(client: ClientSplits) -> float:
            encoded = store.read_encoded("sift", client.client_id)
            masks = {spec.name: encoded.unpacked_mask(spec.name, spec.numel) for spec in layout.tensors}
            return context.score(apply_residual(context.theta0, merged, masks), client.test)

        return score

    if "sift_masks" in methods:
        scorers["sift_masks"] = masked(training.sift_state.mean())
    if "sift_masks_coverage" in methods:
        scorers["sift_masks_coverage"] = masked(training.sift_state.coverage_mean())
    if "mask_only" in methods:
        scales = tensor_scales(training.sift_state)

        def score_mask_only(client: ClientSplits) -> float:
            encoded = store.read_encoded("sift", client.client_id)
            residual = mask_only_residual(encoded, layout, context.sign_vector, scales)
            return context.score(apply_residual(context.theta0, residual), client.test)

        scorers["mask_only"] = score_mask_only
    if "tall_masks" in methods:
        total = training.ft_sum.total()

        def score_tall(client: ClientSplits) -> float:
            lam, mask = tall_masks_for_client(context, client, total)
            result.tall_lambdas[client.client_id] = lam
            return context.score(apply_residual(context.theta0, total, mask), client.test)

        scorers["tall_masks"] = score_tall
    return scorers


def tall_masks_for_client(
    context: RunContext,
    client: ClientSplits,
    total: dict[str, np.ndarray],
) -> tuple[float, dict[str, np.ndarray]]:
    """Return the client's TALL threshold chosen on its validation split, and its mask."""
    residual = context.store.read_dense("ft", client.client_id)

    def validation_accuracy(mask: dict[str, np.ndarray]) -> float:
        return context.score(apply_residual(context.theta0, total, mask), client.validation)

    return select_lambda(residual, total, validation_accuracy, context.config.tall_lambdas)
