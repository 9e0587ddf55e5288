"""Tiny setting for fast tests: scikit-learn's bundled 8x8 digits and a small MLP."""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
from sklearn.datasets import load_digits
from torch import nn

from sift_fl.settings.base import ClientData, Setting, Split, TrainConfig, seeded_uniform
from sift_fl.settings.partition import label_skewed_partition, train_test_split


@lru_cache(maxsize=1)
def _load() -> tuple[np.ndarray, np.ndarray]:
    digits = load_digits()
    return (digits.data / 16.0).astype(np.float32), digits.target.astype(np.int64)


class DigitsMLP(nn.Module):
    def __init__(self, hidden: int = 64, num_classes: int = 10) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, hidden)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


class DigitsSetting(Setting):
    """1,797 digit images, two classes per client, MLP 64-64-10 from a seeded random θ0."""

    name = "digits"
    num_classes = 10
    default_train_config = TrainConfig(steps=30, batch_size=16, learning_rate=3e-3, optimizer="adam")

    def __init__(self, classes_per_client: int = 2, test_fraction: float = 0.25) -> None:
        self.classes_per_client = classes_per_client
        self.test_fraction = test_fraction

    def build_model(self, model_seed: int) -> nn.Module:
        model = DigitsMLP()
        with torch.no_grad():
            for offset, (name, parameter) in enumerate(model.named_parameters()):
                bound = 1.0 / np.sqrt(parameter.shape[-1] if parameter.ndim > 1 else 64)
                parameter.copy_(seeded_uniform(model_seed * 1000 + offset, tuple(parameter.shape), bound))
        return model

    def trainable_parameters(self, model: nn.Module) -> dict[str, nn.Parameter]:
        return dict(model.named_parameters())

    def client_data(self, partition_id: int, num_partitions: int, data_seed: int) -> ClientData:
        features, labels = _load()
        index = label_skewed_partition(labels, partition_id, num_partitions, self.classes_per_client, data_seed)
        train, test = train_test_split(index, labels, self.test_fraction, data_seed + partition_id)
        return ClientData(
            train=Split((torch.from_numpy(features[train]),), torch.from_numpy(labels[train])),
            test=Split((torch.from_numpy(features[test]),), torch.from_numpy(labels[test])),
            classes=sorted(int(c) for c in np.unique(labels[index])),
        )
