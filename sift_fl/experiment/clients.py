"""Training phase: each client finetunes from θ0 (plain and SIFT), once, in sequence.

Each client's residuals go to the on-disk store and into the streaming merge sums. Only the
client's small validation and test splits stay in memory, plus its training split when the
central reference needs it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from sift_fl.baselines.ft_merge import ResidualSum
from sift_fl.baselines.ties import TiesAccumulator, trim_residual
from sift_fl.codec import encode_residual
from sift_fl.experiment.context import RunContext
from sift_fl.experiment.methods import PLAIN_METHODS, SIFT_METHODS
from sift_fl.merge import MergeState
from sift_fl.projection import SiftProjector
from sift_fl.settings import Split
from sift_fl.settings.partition import train_test_split
from sift_fl.training import accuracy, finetune, load_values

logger = logging.getLogger(__name__)


@dataclass
class ClientSplits:
    """A client's training split (kept only for the central reference), validation and test splits."""

    client_id: str
    train: Split | None
    validation: Split
    test: Split
    num_train: int


@dataclass
class TrainingResult:
    """Per-client splits and local accuracies, and the merge sums after all clients joined."""

    clients: list[ClientSplits]
    accuracies: dict[str, dict[str, float]]
    ft_sum: ResidualSum | None
    sift_state: MergeState | None
    ties: TiesAccumulator | None
    densities: list[float] = field(default_factory=list)
    seconds: float = 0.0


def split_validation(train: Split, fraction: float, seed: int) -> tuple[Split, Split]:
    """Split a client's training data per class into (train, validation)."""
    positions = np.arange(len(train))
    kept, held_out = train_test_split(positions, train.labels.numpy(), fraction, seed)
    return train.subset(torch.from_numpy(kept)), train.subset(torch.from_numpy(held_out))


def train_clients(context: RunContext, num_clients: int) -> TrainingResult:
    """Finetune every client from θ0, store its residuals and merge them into the streaming sums."""
    methods = set(context.config.methods)
    needs_plain = bool(methods & PLAIN_METHODS)
    needs_sift = bool(methods & SIFT_METHODS)
    shapes = {spec.name: spec.shape for spec in context.layout.tensors}

    result = TrainingResult(
        clients=[],
        accuracies={method: {} for method in ("local", "local_sift") if method in methods},
        ft_sum=ResidualSum(shapes) if needs_plain else None,
        sift_state=MergeState(context.layout, context.sign_vector) if needs_sift else None,
        ties=TiesAccumulator(shapes, context.config.ties_sign_method) if "ties" in methods else None,
    )
    start = time.perf_counter()
    for index in tqdm(range(num_clients), desc=f"N={num_clients}: train clients", unit="client"):
        _train_one(context, index, num_clients, needs_plain, needs_sift, result)
    result.seconds = time.perf_counter() - start
    return result


def _train_one(
    context: RunContext,
    index: int,
    num_clients: int,
    needs_plain: bool,
    needs_sift: bool,
    result: TrainingResult,
) -> None:
    config = context.config
    client_id = str(index)
    data = context.setting.client_data(index, num_clients, config.data_seed)
    train, validation = split_validation(data.train, config.validation_fraction, config.data_seed + index)
    train_config = config.train_config(context.setting, seed=config.data_seed * 1_000_003 + index)
    keep_train = "central" in config.methods
    result.clients.append(ClientSplits(client_id, train if keep_train else None, validation, data.test, len(train)))

    if needs_plain:
        load_values(context.parameters, context.theta0)
        residual = finetune(context.model, context.parameters, train, train_config)
        if "local" in result.accuracies:
            result.accuracies["local"][client_id] = accuracy(context.model, data.test)
        context.store.write_dense("ft", client_id, residual)
        result.ft_sum.add(client_id, residual)
        if result.ties is not None:
            trimmed = trim_residual(residual, config.ties_density)
            context.store.write_sparse("trimmed", client_id, trimmed)
            result.ties.add(trimmed)

    if needs_sift:
        load_values(context.parameters, context.theta0)
        projector = SiftProjector(context.parameters, context.sign_vector)
        residual = finetune(context.model, context.parameters, train, train_config, projector)
        if "local_sift" in result.accuracies:
            result.accuracies["local_sift"][client_id] = accuracy(context.model, data.test)
        encoded = encode_residual(residual, context.layout, context.sign_vector, config.magnitude_dtype)
        context.store.write_encoded("sift", client_id, encoded)
        result.sift_state.add(client_id, encoded)
        result.densities.append(encoded.density())
