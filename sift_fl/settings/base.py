"""Setting interface: a base model θ0, its trainable set and each client's data."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from torch import nn


@dataclass
class Split:
    """Model inputs (one or more tensors, batch first) and integer labels."""

    inputs: tuple[torch.Tensor, ...]
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, index: torch.Tensor) -> Split:
        return Split(tuple(x[index] for x in self.inputs), self.labels[index])


@dataclass
class ClientData:
    """A client's training split and its local test split from the same distribution."""

    train: Split
    test: Split
    classes: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class TrainConfig:
    """Hyperparameters of one local finetuning run."""

    steps: int
    batch_size: int
    learning_rate: float
    optimizer: str = "adam"
    weight_decay: float = 0.0
    seed: int = 0


def override_train_config(config: TrainConfig, seed: int, **overrides: Any) -> TrainConfig:
    """Return `config` with `seed` set and every override that is not zero or empty applied."""
    return replace(config, seed=seed, **{name: value for name, value in overrides.items() if value})


def train_only(model: nn.Module, parameters: dict[str, nn.Parameter]) -> None:
    """Freeze every parameter of `model` except `parameters`."""
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    for parameter in parameters.values():
        parameter.requires_grad_(True)


class Setting(ABC):
    """A data set, its label-skewed partition across clients and a model with a fixed θ0."""

    name: str
    num_classes: int
    default_train_config: TrainConfig

    @abstractmethod
    def build_model(self, model_seed: int) -> nn.Module:
        """Return the model at θ0; identical bytes for the same `model_seed` on every machine."""

    @abstractmethod
    def trainable_parameters(self, model: nn.Module) -> dict[str, nn.Parameter]:
        """Return the trainable parameters in layout order; all others must be frozen."""

    @abstractmethod
    def client_data(self, partition_id: int, num_partitions: int, data_seed: int) -> ClientData:
        """Return the data of one client of a `num_partitions`-way partition."""


def seeded_normal(seed: int, shape: tuple[int, ...], std: float) -> torch.Tensor:
    """Return float32 N(0, std²) values from numpy's Philox generator (platform independent)."""
    generator = np.random.Generator(np.random.Philox(seed))
    return torch.from_numpy(generator.normal(0.0, std, size=shape).astype(np.float32))


def seeded_uniform(seed: int, shape: tuple[int, ...], bound: float) -> torch.Tensor:
    """Return float32 U(-bound, bound) values from numpy's Philox generator."""
    generator = np.random.Generator(np.random.Philox(seed))
    return torch.from_numpy(generator.uniform(-bound, bound, size=shape).astype(np.float32))
