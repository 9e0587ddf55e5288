"""Malformed uploads are rejected with the client and field named, and leave the store unchanged."""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sift_fl.codec import encode_residual
from sift_fl.layout import ParameterLayout, TensorSpec
from sift_fl.sign import SignVector
from sift_fl.store import MergeStore, RejectedUploadError, StoreIdentity, Upload, content_digest

# "b" has 21 coordinates, so its packed mask has 3 padding bits.
LAYOUT = ParameterLayout((TensorSpec("w", (12, 10), "float32"), TensorSpec("b", (21,), "float32")))
SEED = 5
BASE = "e" * 64
SIGNS = SignVector(SEED, LAYOUT)


def wire_arrays(seed: int) -> dict[str, np.ndarray]:
    generator = np.random.default_rng(seed)
    dense = {}
    for spec in LAYOUT.tensors:
        magnitude = generator.uniform(1e-3, 1.0, spec.numel).astype(np.float32)
        keep = generator.random(spec.numel) < 0.5
        dense[spec.name] = (np.where(keep, magnitude, 0) * SIGNS.signs(spec.name)).astype(np.float32).reshape(spec.shape)
    return encode_residual(dense, LAYOUT, SIGNS).to_arrays()


def good_upload(client_id: str = "new") -> Upload:
    return Upload(client_id, wire_arrays(7), LAYOUT.digest(), BASE, SEED)


def with_arrays(**changes) -> Upload:
    arrays = dict(good_upload().arrays)
    for key, value in changes.items():
        name = key.replace("__", "/")
        if value is None:
            del arrays[name]
        else:
            arrays[name] = value
    return Upload("new", arrays, LAYOUT.digest(), BASE, SEED)


def with_magnitude(index: int, value: float) -> Upload:
    magnitude = good_upload().arrays["w/magnitude"].copy()
    magnitude[index] = value
    return with_arrays(w__magnitude=magnitude)


def fingerprint(store: MergeStore) -> tuple:
    files = sorted((p.relative_to(store.directory).as_posix(), p.read_bytes()) for p in store.tensor_files())
    return content_digest(store), store.generation, files


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    store = MergeStore.create(tmp_path_factory.mktemp("store"), StoreIdentity(LAYOUT, BASE, SEED))
    store.join(Upload("merged", wire_arrays(1), LAYOUT.digest(), BASE, SEED))
    return store


GOOD = good_upload().arrays
CASES = {
    "tensor name": with_arrays(w__mask=None, v__mask=GOOD["w/mask"]),
    "missing tensor": with_arrays(b__magnitude=None),
    "extra tensor": with_arrays(extra__mask=GOOD["b/mask"]),
    "mask dtype": with_arrays(w__mask=GOOD["w/mask"].astype(np.int16)),
    "mask shape": with_arrays(w__mask=GOOD["w/mask"].reshape(3, 5)),
    "mask length": with_arrays(w__mask=GOOD["w/mask"][:-1]),
    "mask padding": with_arrays(b__mask=GOOD["b/mask"] | np.array([0, 0, 1], np.uint8)),
    "magnitude dtype": with_arrays(w__magnitude=GOOD["w/magnitude"].astype(np.float64)),
    "value count": with_arrays(w__magnitude=GOOD["w/magnitude"][:-1]),
    "nan": with_magnitude(0, np.nan),
    "inf": with_magnitude(1, np.inf),
    "sign violation": with_magnitude(2, -0.25),
    "out of range": with_magnitude(3, 17.0),
    "layout digest": Upload("new", GOOD, "0" * 64, BASE, SEED),
    "base digest": Upload("new", GOOD, LAYOUT.digest(), "f" * 64, SEED),
    "sign seed": Upload("new", GOOD, LAYOUT.digest(), BASE, SEED + 1),
    "oversized": with_arrays(w__magnitude=np.ones(LAYOUT.num_parameters * 4, np.float32)),
    "duplicate id": Upload("merged", GOOD, LAYOUT.digest(), BASE, SEED),
    "empty id": Upload("", GOOD, LAYOUT.digest(), BASE, SEED),
}
FIELDS = {
    "tensor name": "tensor names",
    "missing tensor": "tensor names",
    "extra tensor": "tensor names",
    "mask dtype": "w/mask",
    "mask shape": "w/mask",
    "mask length": "w/mask",
    "mask padding": "b/mask",
    "magnitude dtype": "w/magnitude",
    "value count": "w/magnitude",
    "nan": "w/magnitude",
    "inf": "w/magnitude",
    "sign violation": "w/magnitude",
    "out of range": "w/magnitude",
    "layout digest": "layout-digest",
    "base digest": "base-digest",
    "sign seed": "sign-seed",
    "oversized": "payload size",
    "duplicate id": "client-id",
    "empty id": "client-id",
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_upload_rejected(store, case):
    before = fingerprint(store)
    bad = CASES[case]

    with pytest.raises(RejectedUploadError) as raised:
        store.join(bad)

    assert raised.value.field == FIELDS[case]
    assert raised.value.client_id == bad.client_id
    assert f"client {bad.client_id!r}" in str(raised.value)
    assert FIELDS[case] in str(raised.value)
    assert fingerprint(store) == before


def test_out_of_range_error_states_format(store):
    with pytest.raises(RejectedUploadError, match=r"resolution 2\^-40 .*magnitudes up to 16.*clients"):
        store.join(CASES["out of range"])


def test_good_upload_accepted_after_rejections(tmp_path):
    store = MergeStore.create(tmp_path, StoreIdentity(LAYOUT, BASE, SEED))
    with pytest.raises(RejectedUploadError):
        store.join(CASES["nan"])

    store.join(good_upload())

    assert store.members == {"new"}


INVALID_MAGNITUDES = st.one_of(
    st.floats(max_value=0.0),
    st.floats(min_value=16.001, max_value=3e38),
    st.just(float("nan")),
    st.just(float("inf")),
)


@st.composite
def corrupted_uploads(draw):
    arrays = {key: value.copy() for key, value in wire_arrays(draw(st.integers(0, 3))).items()}
    name = draw(st.sampled_from(LAYOUT.names))
    kind = draw(st.sampled_from(["value", "truncate", "extend", "dtype", "padding", "bit"]))
    magnitude, mask = arrays[name + "/magnitude"], arrays[name + "/mask"]
    if kind == "value":
        magnitude[draw(st.integers(0, magnitude.size - 1))] = draw(INVALID_MAGNITUDES)
    elif kind == "truncate":
        arrays[name + "/magnitude"] = magnitude[: -draw(st.integers(1, magnitude.size))]
    elif kind == "extend":
        arrays[name + "/magnitude"] = np.concatenate([magnitude, np.full(draw(st.integers(1, 5)), 0.5, np.float32)])
    elif kind == "dtype":
        arrays[name + "/magnitude"] = magnitude.astype(draw(st.sampled_from(["float64", "int32", "uint8", "int64"])))
    elif kind == "padding":
        arrays["b/mask"][-1] |= np.uint8(1 << draw(st.integers(0, 2)))
    else:
        # Flipping one mask bit changes the set-bit count, so the magnitude count no longer matches.
        index = draw(st.integers(0, mask.size * 8 - 1 - (3 if name == "b" else 0)))
        mask[index // 8] ^= np.uint8(0x80 >> (index % 8))
    client_id = draw(st.text(st.characters(categories=["L", "N"]), min_size=1, max_size=12))
    return Upload(client_id, arrays, LAYOUT.digest(), BASE, SEED)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(corrupted_uploads())
def test_random_corruption_rejected(store, bad):
    before = fingerprint(store)

    with pytest.raises(RejectedUploadError) as raised:
        store.join(bad)

    assert raised.value.client_id == bad.client_id
    # A wider dtype can push the upload over the size limit before any tensor is checked.
    assert "/" in raised.value.field or raised.value.field == "payload size"
    assert fingerprint(store) == before
