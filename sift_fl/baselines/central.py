"""Central reference: one model finetuned on the union of all clients' training data.

Withdrawing a client from it means retraining on the retain set, which is what exact
unlearning costs without any merge structure.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import replace

import numpy as np
import torch
from torch import nn

from sift_fl.settings.base import Split, TrainConfig
from sift_fl.training import finetune, load_values

DEFAULT_EPOCHS = 1.0
DEFAULT_BATCH_SIZE = 64


def concatenate_splits(splits: Sequence[Split]) -> Split:
    """Return one split containing the examples of all `splits`, in order."""
    if not splits:
        raise ValueError("concatenate_splits needs at least one split")
    num_inputs = len(splits[0].inputs)
    inputs = tuple(torch.cat([split.inputs[i] for split in splits]) for i in range(num_inputs))
    return Split(inputs, torch.cat([split.labels for split in splits]))


def central_train_config(
    client_config: TrainConfig,
    num_examples: int,
    epochs: float = DEFAULT_EPOCHS,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> TrainConfig:
    """Return the clients' optimizer settings with `epochs` passes of `batch_size` over `num_examples`."""
    if num_examples < 1:
        raise ValueError(f"central training needs at least one example, got {num_examples}")
    if epochs <= 0 or batch_size < 1:
        raise ValueError(f"central epochs must be positive and batch size at least 1, got {epochs} and {batch_size}")
    steps = max(1, math.ceil(epochs * num_examples / batch_size))
    return replace(client_config, steps=steps, batch_size=batch_size)


def train_central(
    model: nn.Module,
    parameters: Mapping[str, nn.Parameter],
    theta0: Mapping[str, np.ndarray],
    splits: Sequence[Split],
    config: TrainConfig,
) -> dict[str, np.ndarray]:
    """Finetune from θ0 on the union of `splits` and return the residual; the parameters end at θ0 + τ."""
    load_values(parameters, theta0)
    return finetune(model, parameters, concatenate_splits(splits), config)
