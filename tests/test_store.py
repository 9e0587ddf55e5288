"""MergeStore on real files and a real SQLite manifest: durability, exactness, withdrawal, identity."""

import json
import os
import random
import sqlite3

import numpy as np
import pytest
import safetensors.numpy

from sift_fl.codec import encode_residual
from sift_fl.fixed_point import FixedPointFormat
from sift_fl.layout import ParameterLayout, TensorSpec
from sift_fl.merge import MergeState
from sift_fl.sign import SignVector
from sift_fl.store import (
    MergeStore,
    RejectedUploadError,
    StoreError,
    StoreIdentity,
    StoreMismatchError,
    UnknownClientError,
    Upload,
    content_digest,
    describe_format,
    verify_store,
)

LAYOUT = ParameterLayout((TensorSpec("w", (24, 10), "float32"), TensorSpec("b", (21,), "float32")))
SEED = 11
BASE = "b" * 64
IDENTITY = StoreIdentity(LAYOUT, BASE, SEED)
SIGNS = SignVector(SEED, LAYOUT)


def residual(seed: int):
    generator = np.random.default_rng(seed)
    dense = {}
    for spec in LAYOUT.tensors:
        magnitude = generator.uniform(1e-4, 0.5, spec.numel).astype(np.float32)
        keep = generator.random(spec.numel) < 0.55
        dense[spec.name] = (np.where(keep, magnitude, 0) * SIGNS.signs(spec.name)).astype(np.float32).reshape(spec.shape)
    return encode_residual(dense, LAYOUT, SIGNS)


def upload(client_id: str, seed: int | None = None) -> Upload:
    seed = sum(map(ord, client_id)) if seed is None else seed
    return Upload(client_id, residual(seed).to_arrays(), LAYOUT.digest(), BASE, SEED)


def build(directory, clients) -> MergeStore:
    store = MergeStore.create(directory, IDENTITY, {"setting": "digits"})
    for client_id in clients:
        store.join(upload(client_id))
    return store


def secret_byte_strings(client_id: str) -> list[bytes]:
    # Only strings of 16+ bytes: shorter ones could occur in other files by chance.
    arrays = upload(client_id).arrays
    return [np.ascontiguousarray(a).tobytes() for a in arrays.values() if a.nbytes >= 16]


def files_containing(directory, needles: list[bytes]) -> list[str]:
    hits = []
    for path in sorted(directory.rglob("*")):
        if path.is_file():
            content = path.read_bytes()
            hits += [f"{path.name}[{i}]" for i, needle in enumerate(needles) if needle in content]
    return hits


def tensor_content(directory) -> dict[str, dict[str, bytes]]:
    """Return the arrays of every tensor file, keyed by the client id or "accumulator"."""
    content = {}
    for path in sorted(directory.rglob("*.safetensors")):
        data = path.read_bytes()
        arrays = safetensors.numpy.load(data)
        key = "accumulator" if path.name.startswith("accumulator") else _client_of(data)
        content[key] = {name: array.tobytes() for name, array in sorted(arrays.items())}
    return content


def _client_of(data: bytes) -> str:
    # A safetensors file starts with the header length (u64, little-endian) and a JSON header.
    header_length = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + header_length])["__metadata__"]["client-id"]


def test_store_reopen_loads_accumulator(tmp_path):
    build(tmp_path, ["a", "b", "c"]).close()

    store = MergeStore.open(tmp_path, IDENTITY)

    scratch = MergeState.from_scratch(LAYOUT, SIGNS, {c: residual(sum(map(ord, c))) for c in "abc"})
    assert store.members == {"a", "b", "c"}
    assert store.state.equals(scratch)


def test_store_verify_passes(tmp_path):
    store = build(tmp_path, ["a", "b", "c"])
    store.withdraw("b")

    report = verify_store(store)

    assert report.ok, report.problems
    assert any("bit for bit" in line for line in report.checks)


def test_store_verify_detects_modified_residual(tmp_path):
    store = build(tmp_path, ["a", "b"])
    path = tmp_path / store.clients["a"].residual_file
    arrays = safetensors.numpy.load(path.read_bytes())
    arrays["w/magnitude"] = arrays["w/magnitude"] * np.float32(2)
    path.write_bytes(safetensors.numpy.save(arrays, metadata={"client-id": "a"}))

    report = verify_store(store)

    assert not report.ok
    assert "client 'a'" in report.problems[0]


def test_store_open_rejects_modified_accumulator(tmp_path):
    store = build(tmp_path, ["a"])
    path = next(tmp_path.glob("accumulator.g*.safetensors"))
    arrays = safetensors.numpy.load(path.read_bytes())
    arrays["w/sums"][0] += 1
    store.close()
    path.write_bytes(safetensors.numpy.save(arrays))

    with pytest.raises(StoreError, match="does not match the digest"):
        MergeStore.open(tmp_path)


def test_withdraw_twice_is_noop(tmp_path):
    store = build(tmp_path, ["a", "b"])
    store.withdraw("a")
    generation = store.generation

    outcome = store.withdraw("a")

    assert outcome.status == "already-withdrawn"
    assert "already withdrawn" in outcome.message
    assert store.generation == generation


def test_withdraw_unknown_client_raises(tmp_path):
    store = build(tmp_path, ["a"])

    with pytest.raises(UnknownClientError, match="'zz' is not in the store"):
        store.withdraw("zz")


def test_withdraw_leaves_no_residual_bytes(tmp_path):
    store = build(tmp_path, ["a", "b", "c"])
    needles = secret_byte_strings("b")
    before = files_containing(tmp_path, needles)

    store.withdraw("b")

    assert len(before) == len(needles)
    assert files_containing(tmp_path, needles) == []


def test_withdraw_leaves_no_manifest_row_bytes(tmp_path):
    store = build(tmp_path, ["a", "b", "c"])
    row = store.clients["b"]
    needles = [row.sha256.encode("ascii"), row.residual_file.encode("ascii")]
    before = files_containing(tmp_path, needles)

    store.withdraw("b")

    # secure_delete zeroes the deleted row and the WAL checkpoint truncates its old copy.
    assert before != []
    assert files_containing(tmp_path, needles) == []


def test_withdraw_checkpoints_wal(tmp_path):
    store = build(tmp_path, ["a", "b"])

    store.withdraw("a")

    assert os.path.getsize(tmp_path / "manifest.sqlite-wal") == 0


def test_withdraw_removes_manifest_row(tmp_path):
    store = build(tmp_path, ["a", "b"])

    store.withdraw("a")

    connection = sqlite3.connect(tmp_path / "manifest.sqlite")
    assert connection.execute("SELECT client_id FROM clients").fetchall() == [("b",)]
    assert [row[0] for row in connection.execute("SELECT client_id FROM tombstones")] == ["a"]


def test_withdraw_equals_store_of_retain_set(tmp_path):
    withdrawn = build(tmp_path / "withdrawn", ["a", "b", "c", "d"])
    withdrawn.withdraw("b")
    withdrawn.withdraw("d")
    retained = build(tmp_path / "retained", ["a", "c"])

    assert content_digest(withdrawn) == content_digest(retained)
    assert tensor_content(tmp_path / "withdrawn") == tensor_content(tmp_path / "retained")


@pytest.mark.parametrize("order_seed", [1, 2, 3])
def test_shuffled_ingest_orders_identical(tmp_path, order_seed):
    clients = [str(c) for c in range(8)]
    shuffled = clients.copy()
    random.Random(order_seed).shuffle(shuffled)

    in_order = build(tmp_path / "in-order", clients)
    in_shuffle = build(tmp_path / "shuffled", shuffled)

    assert shuffled != clients
    assert content_digest(in_shuffle) == content_digest(in_order)
    assert tensor_content(tmp_path / "shuffled") == tensor_content(tmp_path / "in-order")


def test_rejoin_after_withdrawal(tmp_path):
    store = build(tmp_path, ["a", "b"])
    store.withdraw("a")

    store.join(upload("a", seed=99))

    assert store.members == {"a", "b"}
    assert "a" not in store.withdrawn
    assert verify_store(store).ok


def test_second_store_object_sees_withdrawal(tmp_path):
    server_side = build(tmp_path, ["a", "b"])
    operator_side = MergeStore.open(tmp_path, IDENTITY)

    operator_side.withdraw("a")

    assert server_side.members == {"b"}
    assert server_side.state.equals(operator_side.state)


def test_store_recovers_leftover_files(tmp_path):
    build(tmp_path, ["a"]).close()
    leftovers = [tmp_path / "accumulator.g00000042.safetensors.tmp", tmp_path / "residuals" / "0123.g00000042.safetensors"]
    for path in leftovers:
        path.write_bytes(b"partial")

    MergeStore.open(tmp_path).close()

    assert [path.exists() for path in leftovers] == [False, False]


@pytest.mark.parametrize(
    "changed, field",
    [
        (StoreIdentity(ParameterLayout((TensorSpec("w", (24, 10), "float32"),)), BASE, SEED), "layout digest"),
        (StoreIdentity(LAYOUT, "c" * 64, SEED), "base digest"),
        (StoreIdentity(LAYOUT, BASE, SEED + 1), "sign seed"),
        (StoreIdentity(LAYOUT, BASE, SEED, FixedPointFormat(fraction_bits=32)), "number format"),
    ],
)
def test_store_open_rejects_identity_mismatch(tmp_path, changed, field):
    build(tmp_path, ["a"]).close()

    with pytest.raises(StoreMismatchError, match=field):
        MergeStore.open(tmp_path, changed)


def test_store_create_twice_raises(tmp_path):
    build(tmp_path, []).close()

    with pytest.raises(StoreError, match="already contains a store"):
        MergeStore.create(tmp_path, IDENTITY)


def test_store_open_missing_directory_raises(tmp_path):
    with pytest.raises(StoreError, match="no store at"):
        MergeStore.open(tmp_path / "absent")


def test_store_rejects_client_beyond_max_clients(tmp_path):
    number_format = FixedPointFormat(fraction_bits=60, max_magnitude=1.0)
    store = MergeStore.create(tmp_path, StoreIdentity(LAYOUT, BASE, SEED, number_format))
    for client_id in range(number_format.max_clients):
        store.join(upload(str(client_id)))

    with pytest.raises(RejectedUploadError, match="store is full") as raised:
        store.join(upload("late"))

    assert raised.value.field == "client-id"
    assert store.state.count == number_format.max_clients == 7


def test_describe_format_states_range():
    text = describe_format(FixedPointFormat())

    assert "2^-40" in text
    assert "magnitudes up to 16" in text
    assert "524,287 clients" in text


def test_safetensors_views_share_the_buffer(tmp_path):
    import safetensors.numpy

    from sift_fl.store.files import safetensors_views

    arrays = {"w/mask": np.arange(10, dtype=np.uint8), "w/magnitude": np.linspace(0.1, 1.0, 7, dtype=np.float32)}
    data = bytearray(safetensors.numpy.save(arrays))

    views = safetensors_views(data)

    for name, expected in arrays.items():
        assert np.array_equal(views[name], expected), name
        assert views[name].dtype == expected.dtype, name
        # A view, not a copy: a residual read from disk is held in memory once.
        assert np.shares_memory(views[name], np.frombuffer(data, dtype=np.uint8)), name
