"""Fashion-MNIST setting on small IDX files written by the tests (and on the Debian files when installed)."""

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch

from sift_fl.settings import get_setting
from sift_fl.settings import fmnist
from sift_fl.settings.partition import label_skewed_partition


def write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as handle:
        handle.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def fake_fmnist(tmp_path, monkeypatch):
    """A Fashion-MNIST directory with 40 training and 10 test images per class."""
    generator = np.random.default_rng(0)
    train_labels = np.repeat(np.arange(10), 40)
    test_labels = np.repeat(np.arange(10), 10)
    data = tmp_path / "fashion-mnist"
    data.mkdir()
    write_idx(data / fmnist.FILES["train-images"], generator.integers(0, 256, (400, 28, 28)))
    write_idx(data / fmnist.FILES["train-labels"], generator.permutation(train_labels))
    write_idx(data / fmnist.FILES["test-images"], generator.integers(0, 256, (100, 28, 28)))
    write_idx(data / fmnist.FILES["test-labels"], generator.permutation(test_labels))

    monkeypatch.setenv("SIFT_FL_FMNIST_DIR", str(data))
    monkeypatch.setenv("SIFT_FL_CACHE", str(tmp_path / "cache"))
    fmnist.load_fashion_mnist.cache_clear()
    fmnist._partitioner.cache_clear()
    yield data
    fmnist.load_fashion_mnist.cache_clear()
    fmnist._partitioner.cache_clear()


def test_fmnist_read_idx_round_trip(tmp_path):
    array = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / "x.gz", array)

    restored = fmnist.read_idx(tmp_path / "x.gz")

    np.testing.assert_array_equal(restored, array)


def test_fmnist_read_idx_rejects_truncated(tmp_path):
    with gzip.open(tmp_path / "x.gz", "wb") as handle:
        handle.write(bytes([0, 0, 8, 1]) + (10).to_bytes(4, "big") + bytes(5))

    with pytest.raises(ValueError, match="declares dimensions"):
        fmnist.read_idx(tmp_path / "x.gz")


def test_fmnist_missing_files_names_apt(tmp_path, monkeypatch):
    monkeypatch.setenv("SIFT_FL_FMNIST_DIR", str(tmp_path))
    fmnist.load_fashion_mnist.cache_clear()

    with pytest.raises(FileNotFoundError, match="apt-get install -y dataset-fashion-mnist"):
        fmnist.load_fashion_mnist()

    fmnist.load_fashion_mnist.cache_clear()


def test_fmnist_client_classes_match_test_split(fake_fmnist):
    setting = get_setting("fmnist")

    for partition_id in range(4):
        data = setting.client_data(partition_id, 4, data_seed=0)

        assert len(data.classes) == 2
        assert sorted(np.unique(data.test.labels.numpy()).tolist()) == data.classes
        assert data.train.inputs[0].shape[1] == 784


def test_fmnist_pretrain_slice_belongs_to_no_client(fake_fmnist):
    setting = get_setting("fmnist")
    train_images, train_labels, _, _ = fmnist.load_fashion_mnist()
    held_out, _ = fmnist.pretrain_split(train_labels, setting.pretrain_fraction, fmnist.PRETRAIN_SEED)
    held_out_images = {train_images[row].tobytes() for row in held_out}

    client_images = set()
    # Ten clients with two classes each use every class, so together they get the whole pool.
    for partition_id in range(10):
        data = setting.client_data(partition_id, 10, data_seed=0)
        client_images |= {row.numpy().tobytes() for row in data.train.inputs[0]}

    assert len(held_out) == 20
    assert held_out_images.isdisjoint(client_images)
    assert len(client_images) == 400 - 20


def test_fmnist_partition_matches_shared_partitioner(fake_fmnist):
    _, train_labels, _, test_labels = fmnist.load_fashion_mnist()
    _, pool_rows = fmnist.pretrain_split(train_labels, 0.05, fmnist.PRETRAIN_SEED)

    for partition_id in (0, 3, 6):
        cached = fmnist.partition_rows("train", 0.05, partition_id, 7, 2, seed=1)
        shared = label_skewed_partition(train_labels[pool_rows], partition_id, 7, 2, seed=1)
        cached_test = fmnist.partition_rows("test", 0.05, partition_id, 7, 2, seed=1)
        shared_test = label_skewed_partition(test_labels, partition_id, 7, 2, seed=1)

        np.testing.assert_array_equal(cached, shared)
        np.testing.assert_array_equal(cached_test, shared_test)


def test_fmnist_pretrained_base_cached(fake_fmnist):
    pretrained = get_setting("fmnist")
    random = get_setting("fmnist", pretrained=False)

    first = pretrained.build_model(0).state_dict()
    second = pretrained.build_model(0).state_dict()
    untrained = random.build_model(0).state_dict()

    assert pretrained.pretrain_cache_path(0).exists()
    for name in first:
        assert torch.equal(first[name], second[name])
    assert not torch.equal(first["fc1.weight"], untrained["fc1.weight"])


@pytest.mark.skipif(not (fmnist.DATA_DIR / fmnist.FILES["train-labels"]).exists(), reason=f"needs `{fmnist.INSTALL_HINT}`")
def test_fmnist_debian_files_shapes(monkeypatch):
    monkeypatch.delenv("SIFT_FL_FMNIST_DIR", raising=False)
    fmnist.load_fashion_mnist.cache_clear()

    train_images, train_labels, test_images, test_labels = fmnist.load_fashion_mnist()

    assert train_images.shape == (60000, 784)
    assert test_images.shape == (10000, 784)
    assert np.bincount(train_labels).tolist() == [6000] * 10
    assert np.bincount(test_labels).tolist() == [1000] * 10
    fmnist.load_fashion_mnist.cache_clear()
