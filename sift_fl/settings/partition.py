"""Label-skewed partition of a labelled data set and per-client train/test splits."""

from __future__ import annotations

import warnings

import numpy as np
from datasets import Dataset
from flwr_datasets.partitioner import PathologicalPartitioner


def label_skewed_partition(
    labels: np.ndarray,
    partition_id: int,
    num_partitions: int,
    classes_per_partition: int,
    seed: int,
) -> np.ndarray:
    """Return the sorted example indices of one partition in which only a few classes occur.

    Uses flwr-datasets' `PathologicalPartitioner`: partition i gets the classes
    i, i+1, ... (mod the number of classes), and each class's examples are split
    evenly among the partitions that hold it.
    """
    if not 0 <= partition_id < num_partitions:
        raise ValueError(f"partition id {partition_id} is outside [0, {num_partitions})")

    num_classes = len(np.unique(labels))
    partitioner = PathologicalPartitioner(
        num_partitions=num_partitions,
        partition_by="label",
        num_classes_per_partition=min(classes_per_partition, num_classes),
        class_assignment_mode="first-deterministic",
        shuffle=True,
        seed=seed,
    )
    partitioner.dataset = Dataset.from_dict({"label": labels.tolist(), "index": list(range(len(labels)))})
    with warnings.catch_warnings():
        # With fewer partitions than classes some classes stay unused, which is intended here.
        warnings.filterwarnings("ignore", message="Classes: .* will NOT be used")
        partition = partitioner.load_partition(partition_id)
    return np.sort(np.asarray(partition["index"], dtype=np.int64))


def train_test_split(index: np.ndarray, labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split example indices per class, so the local test split follows the client's label mix."""
    generator = np.random.Generator(np.random.Philox(seed))
    train, test = [], []
    for label in np.unique(labels[index]):
        members = index[labels[index] == label]
        members = members[generator.permutation(len(members))]
        num_test = max(1, int(round(test_fraction * len(members)))) if len(members) > 1 else 0
        test.append(members[:num_test])
        train.append(members[num_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))
