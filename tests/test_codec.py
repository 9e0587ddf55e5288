import numpy as np
import pytest

from sift_fl.codec import InvalidResidualError, decode_residual, dense_nbytes, encode_residual, from_arrays
from sift_fl.layout import ParameterLayout, TensorSpec
from sift_fl.sign import SignVector

LAYOUT = ParameterLayout((TensorSpec("a.weight", (5, 7), "float32"), TensorSpec("a.bias", (5,), "float32")))


def sift_residual(seed: int, density: float = 0.5) -> dict[str, np.ndarray]:
    """Return a random residual that agrees with the sign vector of seed 42."""
    generator = np.random.default_rng(seed)
    signs = SignVector(42, LAYOUT)
    residual = {}
    for spec in LAYOUT.tensors:
        magnitude = generator.uniform(1e-4, 1e-1, spec.numel).astype(np.float32)
        keep = generator.random(spec.numel) < density
        residual[spec.name] = (np.where(keep, magnitude, 0) * signs.signs(spec.name)).astype(np.float32).reshape(spec.shape)
    return residual


def test_codec_round_trip_exact():
    signs = SignVector(42, LAYOUT)
    residual = sift_residual(0)

    decoded = decode_residual(from_arrays(encode_residual(residual, LAYOUT, signs).to_arrays(), LAYOUT), LAYOUT, signs)

    for name in LAYOUT.names:
        # Adding +0.0 turns -0.0 into +0.0: a zero coordinate is not sent, so its sign bit is not kept.
        assert decoded[name].tobytes() == (residual[name] + np.float32(0)).tobytes()


def test_codec_bytes_at_half_density():
    encoded = encode_residual(sift_residual(1, density=0.5), LAYOUT, SignVector(42, LAYOUT))

    ratio = encoded.nbytes / dense_nbytes(LAYOUT)

    assert 0.3 < ratio < 0.75


def test_codec_rejects_sign_violation():
    residual = sift_residual(2)
    flat = residual["a.bias"].reshape(-1)
    index = int(np.flatnonzero(flat)[0])
    flat[index] = -flat[index]

    with pytest.raises(InvalidResidualError, match="violates the sign vector"):
        encode_residual(residual, LAYOUT, SignVector(42, LAYOUT))


def test_codec_rejects_nan():
    residual = sift_residual(3)
    residual["a.weight"][0, 0] = np.nan

    with pytest.raises(InvalidResidualError, match="NaN"):
        encode_residual(residual, LAYOUT, SignVector(42, LAYOUT))


def wire(seed: int = 4) -> dict[str, np.ndarray]:
    return encode_residual(sift_residual(seed), LAYOUT, SignVector(42, LAYOUT)).to_arrays()


def drop_magnitude(arrays):
    arrays["a.bias/magnitude"] = arrays["a.bias/magnitude"][:-1]


def set_padding_bit(arrays):
    arrays["a.bias/mask"] = arrays["a.bias/mask"].copy()
    arrays["a.bias/mask"][-1] |= 1


def wrong_mask_dtype(arrays):
    arrays["a.weight/mask"] = arrays["a.weight/mask"].astype(np.int32)


def wrong_magnitude_dtype(arrays):
    arrays["a.weight/magnitude"] = arrays["a.weight/magnitude"].astype(np.float64)


def negative_magnitude(arrays):
    arrays["a.weight/magnitude"] = -arrays["a.weight/magnitude"]


def infinite_magnitude(arrays):
    arrays["a.weight/magnitude"] = arrays["a.weight/magnitude"].copy()
    arrays["a.weight/magnitude"][0] = np.inf


def short_mask(arrays):
    arrays["a.weight/mask"] = arrays["a.weight/mask"][:-1]


def missing_tensor(arrays):
    del arrays["a.bias/mask"]


def unknown_tensor(arrays):
    arrays["b.weight/mask"] = np.zeros(1, np.uint8)


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        (drop_magnitude, "a.bias/magnitude: mask has"),
        (set_padding_bit, "a.bias/mask: padding bits"),
        (wrong_mask_dtype, "a.weight/mask: expected a 1-D uint8"),
        (wrong_magnitude_dtype, "a.weight/magnitude: expected a 1-D float32"),
        (negative_magnitude, "a.weight/magnitude: magnitudes at set mask bits must be positive"),
        (infinite_magnitude, "a.weight/magnitude: contains NaN or Inf"),
        (short_mask, "a.weight/mask: expected 5 bytes"),
        (missing_tensor, "missing tensors"),
        (unknown_tensor, "not in the layout"),
    ],
)
def test_from_arrays_rejects_malformed(corrupt, message):
    arrays = wire()
    corrupt(arrays)

    with pytest.raises(InvalidResidualError, match=message):
        from_arrays(arrays, LAYOUT)


def test_from_arrays_rejects_oversized():
    with pytest.raises(InvalidResidualError, match="more than the limit"):
        from_arrays(wire(), LAYOUT, max_bytes=10)


def test_codec_float16_is_lossy_but_close():
    signs = SignVector(42, LAYOUT)
    residual = sift_residual(5)

    decoded = decode_residual(encode_residual(residual, LAYOUT, signs, "float16"), LAYOUT, signs)

    for name in LAYOUT.names:
        assert np.allclose(decoded[name], residual[name], rtol=1e-3, atol=0)
