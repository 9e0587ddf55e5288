"""Image setting for the scale experiment: Fashion-MNIST and an MLP 784-128-10.

Data: the Debian package `dataset-fashion-mnist` (60,000 training and 10,000 test images
as gzipped IDX files under /usr/share/datasets/fashion-mnist). A seeded, class-stratified
`pretrain_fraction` of the training set belongs to no client. Model merging assumes a shared
pretrained start, so by default θ0 is the seeded MLP trained on that slice for
`pretrain_epochs`. With `pretrained=False`, θ0 is the seeded random MLP. The rest of the training set is
split among clients with label skew, and each client's local test split holds the test-set
images of its own classes, partitioned the same way.
"""

from __future__ import annotations

import fcntl
import gzip
import logging
import math
import os
import warnings
from dataclasses import replace
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset
from flwr_datasets.partitioner import PathologicalPartitioner
from torch import nn

from sift_fl.settings.base import ClientData, Setting, Split, TrainConfig, seeded_uniform
from sift_fl.settings.bbc import cache_dir

logger = logging.getLogger(__name__)

DATA_DIR = Path("/usr/share/datasets/fashion-mnist")
INSTALL_HINT = "apt-get update && apt-get install -y dataset-fashion-mnist"
FILES = {
    "train-images": "train-images-idx3-ubyte.gz",
    "train-labels": "train-labels-idx1-ubyte.gz",
    "test-images": "t10k-images-idx3-ubyte.gz",
    "test-labels": "t10k-labels-idx1-ubyte.gz",
}
# Mean and standard deviation of the Fashion-MNIST training pixels scaled to [0, 1].
PIXEL_MEAN = 0.2860
PIXEL_STD = 0.3530
PRETRAIN_SEED = 7


def data_dir() -> Path:
    """Return $SIFT_FL_FMNIST_DIR, else the Debian package's directory."""
    return Path(os.environ.get("SIFT_FL_FMNIST_DIR", DATA_DIR))


def read_idx(path: Path) -> np.ndarray:
    """Return the array stored in a gzipped IDX file (unsigned bytes, big-endian dimensions)."""
    with gzip.open(path, "rb") as handle:
        payload = handle.read()
    if payload[:2] != b"\x00\x00" or payload[2] != 0x08:
        raise ValueError(f"{path} is not an IDX file of unsigned bytes (header {payload[:4].hex()})")
    num_dims = payload[3]
    dims = [int.from_bytes(payload[4 + 4 * i : 8 + 4 * i], "big") for i in range(num_dims)]
    values = np.frombuffer(payload, dtype=np.uint8, offset=4 + 4 * num_dims)
    if values.size != math.prod(dims):
        raise ValueError(f"{path} contains {values.size} values but its header declares dimensions {dims}")
    return values.reshape(dims)


@lru_cache(maxsize=1)
def load_fashion_mnist() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Return (train images, train labels, test images, test labels); images are float32 (n, 784), normalised."""
    root = data_dir()
    missing = [name for name in FILES.values() if not (root / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"Fashion-MNIST files {missing} not found in {root}; install them with `{INSTALL_HINT}` "
            "or point SIFT_FL_FMNIST_DIR at a directory holding the four IDX .gz files"
        )

    arrays = {key: read_idx(root / name) for key, name in FILES.items()}

    def images(raw: np.ndarray) -> np.ndarray:
        return ((raw.reshape(len(raw), -1).astype(np.float32) / 255.0 - PIXEL_MEAN) / PIXEL_STD).astype(np.float32)

    return (
        images(arrays["train-images"]),
        arrays["train-labels"].astype(np.int64),
        images(arrays["test-images"]),
        arrays["test-labels"].astype(np.int64),
    )


def pretrain_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Return (held-out rows for pretraining, client pool rows): a class-stratified `fraction` and the rest."""
    generator = np.random.Generator(np.random.Philox(seed))
    held_out = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        count = int(round(fraction * len(members)))
        held_out.append(generator.choice(members, size=count, replace=False))
    held_out_rows = np.sort(np.concatenate(held_out))
    pool_rows = np.setdiff1d(np.arange(len(labels)), held_out_rows)
    return held_out_rows, pool_rows


@lru_cache(maxsize=4)
def _partitioner(split: str, pretrain_fraction: float, num_partitions: int, classes_per_partition: int, seed: int) -> PathologicalPartitioner:
    # Same configuration as `label_skewed_partition`, kept per (split, N, seed) so that the
    # partition is computed once for all clients instead of once per client (measured 0.6 s per
    # call at 57,000 labels on a 2-core machine).
    labels = _split_labels(split, pretrain_fraction)
    partitioner = PathologicalPartitioner(
        num_partitions=num_partitions,
        partition_by="label",
        num_classes_per_partition=min(classes_per_partition, len(np.unique(labels))),
        class_assignment_mode="first-deterministic",
        shuffle=True,
        seed=seed,
    )
    partitioner.dataset = Dataset.from_dict({"label": labels.tolist(), "index": list(range(len(labels)))})
    return partitioner


def _split_labels(split: str, pretrain_fraction: float) -> np.ndarray:
    _, train_labels, _, test_labels = load_fashion_mnist()
    if split == "test":
        return test_labels
    _, pool_rows = pretrain_split(train_labels, pretrain_fraction, PRETRAIN_SEED)
    return train_labels[pool_rows]


def partition_rows(
    split: str,
    pretrain_fraction: float,
    partition_id: int,
    num_partitions: int,
    classes_per_partition: int,
    seed: int,
) -> np.ndarray:
    """Return the sorted positions of one label-skewed partition of the client pool ("train") or test set ("test")."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if not 0 <= partition_id < num_partitions:
        raise ValueError(f"partition id {partition_id} is outside [0, {num_partitions})")
    partitioner = _partitioner(split, pretrain_fraction, num_partitions, classes_per_partition, seed)
    with warnings.catch_warnings():
        # With fewer partitions than classes some classes stay unused, which is intended here.
        warnings.filterwarnings("ignore", message="Classes: .* will NOT be used")
        partition = partitioner.load_partition(partition_id)
    return np.sort(np.asarray(partition["index"], dtype=np.int64))


class FashionMLP(nn.Module):
    def __init__(self, hidden: int = 128, num_classes: int = 10) -> None:
        super().__init__()
        self.fc1 = nn.Linear(784, hidden)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


class FashionMnistSetting(Setting):
    """Fashion-MNIST, two classes per client, MLP 784-128-10 from a pretrained (or random) θ0."""

    name = "fmnist"
    num_classes = 10
    default_train_config = TrainConfig(steps=30, batch_size=16, learning_rate=1e-3, optimizer="adam")
    pretrain_config = TrainConfig(steps=0, batch_size=64, learning_rate=1e-3, optimizer="adam", seed=PRETRAIN_SEED)

    def __init__(
        self,
        classes_per_client: int = 2,
        pretrained: bool = True,
        pretrain_fraction: float = 0.05,
        pretrain_epochs: float = 1.0,
        hidden: int = 128,
    ) -> None:
        if not 0.0 < pretrain_fraction < 1.0:
            raise ValueError(f"pretrain_fraction must be in (0, 1), got {pretrain_fraction}")
        self.classes_per_client = classes_per_client
        self.pretrained = pretrained
        self.pretrain_fraction = pretrain_fraction
        self.pretrain_epochs = pretrain_epochs
        self.hidden = hidden

    def build_model(self, model_seed: int) -> nn.Module:
        model = FashionMLP(self.hidden, self.num_classes)
        # U(-1/sqrt(fan_in), 1/sqrt(fan_in)) as in torch's Linear, from a platform-independent generator.
        with torch.no_grad():
            for index, layer in enumerate((model.fc1, model.fc2)):
                bound = 1.0 / np.sqrt(layer.in_features)
                layer.weight.copy_(seeded_uniform(model_seed * 1000 + 2 * index, tuple(layer.weight.shape), bound))
                layer.bias.copy_(seeded_uniform(model_seed * 1000 + 2 * index + 1, tuple(layer.bias.shape), bound))
        if self.pretrained:
            self._load_pretrained(model, model_seed)
        return model

    def trainable_parameters(self, model: nn.Module) -> dict[str, nn.Parameter]:
        return dict(model.named_parameters())

    def client_data(self, partition_id: int, num_partitions: int, data_seed: int) -> ClientData:
        train_images, train_labels, test_images, test_labels = load_fashion_mnist()
        _, pool_rows = pretrain_split(train_labels, self.pretrain_fraction, PRETRAIN_SEED)
        partition = (partition_id, num_partitions, self.classes_per_client, data_seed)
        train_rows = pool_rows[partition_rows("train", self.pretrain_fraction, *partition)]
        test_rows = partition_rows("test", self.pretrain_fraction, *partition)
        return ClientData(
            train=Split((torch.from_numpy(train_images[train_rows]),), torch.from_numpy(train_labels[train_rows])),
            test=Split((torch.from_numpy(test_images[test_rows]),), torch.from_numpy(test_labels[test_rows])),
            classes=sorted(int(c) for c in np.unique(train_labels[train_rows])),
        )

    def pretrain_cache_path(self, model_seed: int) -> Path:
        """Return the cache file of the pretrained θ0 for `model_seed`."""
        epochs = f"{self.pretrain_epochs:g}".replace(".", "p")
        fraction = f"{self.pretrain_fraction:g}".replace(".", "p")
        return cache_dir() / f"fmnist-mlp{self.hidden}-seed{model_seed}-pretrain{fraction}-epochs{epochs}.npz"

    def _load_pretrained(self, model: FashionMLP, model_seed: int) -> None:
        # Pretraining runs once per machine and its bytes are cached, so every process on the
        # machine builds a bit-identical θ0.
        # NOTE: another machine or torch build may pretrain to different bytes; clients check the base digest.
        path = self.pretrain_cache_path(model_seed)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not path.exists():
                self._pretrain(model, path)
        with np.load(path) as stored:
            state = {name: torch.from_numpy(stored[name]) for name in stored.files}
        model.load_state_dict(state)

    def _pretrain(self, model: FashionMLP, path: Path) -> None:
        from sift_fl.training import finetune

        train_images, train_labels, _, _ = load_fashion_mnist()
        held_out_rows, _ = pretrain_split(train_labels, self.pretrain_fraction, PRETRAIN_SEED)
        split = Split((torch.from_numpy(train_images[held_out_rows]),), torch.from_numpy(train_labels[held_out_rows]))
        steps = max(1, math.ceil(self.pretrain_epochs * len(split) / self.pretrain_config.batch_size))
        config = replace(self.pretrain_config, steps=steps)
        logger.info("Pretraining θ0 on %d held-out Fashion-MNIST images for %d steps (once per machine)", len(split), steps)

        parameters = dict(model.named_parameters())
        finetune(model, parameters, split, config)
        arrays = {name: parameter.detach().numpy().copy() for name, parameter in parameters.items()}
        temporary = path.with_name(path.name + ".tmp.npz")
        np.savez(temporary, **arrays)
        os.replace(temporary, path)
