"""The optimised core kernels against straightforward implementations, bit for bit.

Each reference below is the plain NumPy or torch formulation of the same rule. The
library's blocked or clamp-based versions must return the same bytes on random inputs
and on edge values: signed zeros, NaN, Inf, and sizes that are not multiples of 8 or of
the block size.
"""

import itertools

import numpy as np
import pytest
import torch

from sift_fl.codec import EncodedResidual, EncodedTensor, InvalidResidualError, encode_residual, from_arrays
from sift_fl.fixed_point import FixedPointFormat, OutOfRangeError
from sift_fl.layout import ParameterLayout, TensorSpec
from sift_fl.merge import MergeState, apply_residual
from sift_fl.projection import SiftProjector
from sift_fl.sign import SignVector

EDGE_VALUES = [0.0, -0.0, 1.0, -1.0, float("nan"), float("inf"), float("-inf"), 1e-45, -1e-45, 2.5]


def reference_project(parameter: torch.Tensor, base: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    residual = parameter - base
    keep = torch.where(positive, residual > 0, residual < 0)
    return torch.where(keep, parameter, base)


def reference_quantize(number_format: FixedPointFormat, magnitude: np.ndarray) -> np.ndarray:
    values = np.asarray(magnitude, dtype=np.float64)
    return np.rint(np.ldexp(values, number_format.fraction_bits)).astype(np.int64)


def reference_sums(
    layout: ParameterLayout,
    sign_vector: SignVector,
    residuals: list[EncodedResidual],
    number_format: FixedPointFormat,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    sums = {spec.name: np.zeros(spec.numel, dtype=np.int64) for spec in layout.tensors}
    coverage = {spec.name: np.zeros(spec.numel, dtype=np.int32) for spec in layout.tensors}
    for residual in residuals:
        for spec in layout.tensors:
            index = np.flatnonzero(np.unpackbits(residual.tensors[spec.name].mask, count=spec.numel))
            units = reference_quantize(number_format, residual.tensors[spec.name].magnitude)
            positive = sign_vector.positive(spec.name)[index]
            sums[spec.name][index] += np.where(positive, units, -units)
            coverage[spec.name][index] += 1
    return sums, coverage


def reference_apply(base, residual, mask=None):
    served = {}
    for name, base_values in base.items():
        delta = residual[name]
        if mask is not None:
            delta = np.where(mask[name].reshape(delta.shape), delta, np.float32(0))
        served[name] = (base_values + delta).astype(base_values.dtype)
    return served


def random_residual(layout, sign_vector, seed, density=0.55, magnitude_dtype="float32", scale=1e-3):
    generator = np.random.default_rng(seed)
    dense = {}
    for spec in layout.tensors:
        keep = generator.random(spec.numel) < density
        magnitude = generator.uniform(1e-6, 1.0, spec.numel) * scale
        signs = sign_vector.signs(spec.name)
        dense[spec.name] = (np.where(keep, magnitude, 0) * signs).astype(np.float32).reshape(spec.shape)
    return encode_residual(dense, layout, sign_vector, magnitude_dtype)


LAYOUT = ParameterLayout(
    (
        TensorSpec("big", (70001,), "float32"),
        TensorSpec("matrix", (13, 7), "float32"),
        TensorSpec("one", (1,), "float32"),
        TensorSpec("block", (65536,), "float32"),
    )
)
SIGNS = SignVector(5, LAYOUT)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_projection_edge_values_bitwise(dtype):
    pairs = list(itertools.product(EDGE_VALUES, EDGE_VALUES))
    for size in range(1, len(pairs) + 1, 7):
        theta = torch.tensor([a for a, _ in pairs[:size]], dtype=dtype)
        base = torch.tensor([b for _, b in pairs[:size]], dtype=dtype)
        parameter = torch.nn.Parameter(base.clone())
        layout = ParameterLayout.from_arrays({"w": parameter.detach()})
        projector = SiftProjector({"w": parameter}, SignVector(size, layout))
        with torch.no_grad():
            parameter.copy_(theta)

        projector.project()

        expected = reference_project(theta, base, projector.positive["w"])
        bits = torch.int16 if dtype == torch.float16 else {torch.float32: torch.int32, torch.float64: torch.int64}[dtype]
        assert torch.equal(parameter.detach().view(bits), expected.view(bits)), f"size {size}"


def test_projection_random_steps_bitwise():
    generator = torch.Generator().manual_seed(0)
    base = {"a": torch.randn(1001, generator=generator), "b": torch.zeros(37, 3)}
    base["a"][::17] = 0.0
    parameters = {name: torch.nn.Parameter(value.clone()) for name, value in base.items()}
    projector = SiftProjector(parameters, SignVector(9, ParameterLayout.from_arrays(base)))
    expected = {name: value.clone() for name, value in base.items()}

    for _ in range(5):
        with torch.no_grad():
            for name, parameter in parameters.items():
                step = 1e-3 * torch.randn(parameter.shape, generator=generator)
                step[torch.rand(parameter.shape, generator=generator) < 0.1] = 0.0
                parameter.add_(step)
                expected[name] = reference_project(expected[name] + step, base[name], projector.positive[name])
        projector.project()

        for name, parameter in parameters.items():
            assert torch.equal(parameter.detach().view(torch.int32), expected[name].view(torch.int32)), name


def test_projection_non_contiguous_bitwise():
    base = torch.tensor([[0.0, -0.0, 1.0], [2.0, -0.0, 0.0]]).t()
    theta = torch.tensor([[-0.0, 0.0, 3.0], [1.0, 0.0, -0.0]]).t()
    parameter = torch.nn.Parameter(base.clone().t().contiguous().t())
    projector = SiftProjector({"w": parameter}, SignVector(2, ParameterLayout.from_arrays({"w": base})))
    with torch.no_grad():
        parameter.copy_(theta)

    projector.project()

    expected = reference_project(theta, base, projector.positive["w"])
    assert not parameter.is_contiguous()
    assert torch.equal(parameter.detach().contiguous().view(torch.int32), expected.contiguous().view(torch.int32))


@pytest.mark.parametrize("magnitude_dtype", ["float32", "float16"])
@pytest.mark.parametrize("number_format", [FixedPointFormat(), FixedPointFormat(0, 8.0), FixedPointFormat(58, 2.0)])
def test_merge_sums_match_reference(magnitude_dtype, number_format):
    residuals = [random_residual(LAYOUT, SIGNS, seed, magnitude_dtype=magnitude_dtype, scale=1.5) for seed in range(4)]
    state = MergeState(LAYOUT, SIGNS, number_format)

    for client, residual in enumerate(residuals):
        state.add(str(client), residual)
    state.remove("1", residuals[1])

    sums, coverage = reference_sums(LAYOUT, SIGNS, [residuals[0], residuals[2], residuals[3]], number_format)
    for name in LAYOUT.names:
        assert np.array_equal(state.sums[name], sums[name]), name
        assert np.array_equal(state.coverage[name], coverage[name]), name


def test_merge_float64_magnitudes_match_reference():
    residual = random_residual(LAYOUT, SIGNS, 3)
    wide = EncodedResidual(
        {name: EncodedTensor(t.mask, t.magnitude.astype(np.float64) / 3.0) for name, t in residual.tensors.items()}
    )
    state = MergeState(LAYOUT, SIGNS)

    state.add("0", wide)

    sums, coverage = reference_sums(LAYOUT, SIGNS, [wide], FixedPointFormat())
    for name in LAYOUT.names:
        assert np.array_equal(state.sums[name], sums[name]), name


def test_merge_rejects_out_of_range_unchanged():
    good = random_residual(LAYOUT, SIGNS, 1)
    tensors = dict(good.tensors)
    magnitude = tensors["one"].magnitude.copy() if tensors["one"].magnitude.size else None
    bad_magnitude = tensors["matrix"].magnitude.copy()
    bad_magnitude[-1] = 100.0
    tensors["matrix"] = EncodedTensor(tensors["matrix"].mask, bad_magnitude)
    state = MergeState(LAYOUT, SIGNS)
    state.add("0", good)
    digest = state.digest()

    with pytest.raises(OutOfRangeError, match="client '1' tensor 'matrix' magnitude: magnitude 100 exceeds"):
        state.add("1", EncodedResidual(tensors))

    assert state.digest() == digest
    assert magnitude is None or np.array_equal(good.tensors["one"].magnitude, magnitude)


def test_merge_rejects_nan_magnitude():
    tensors = dict(random_residual(LAYOUT, SIGNS, 2).tensors)
    bad_magnitude = tensors["big"].magnitude.copy()
    bad_magnitude[5] = np.nan
    tensors["big"] = EncodedTensor(tensors["big"].mask, bad_magnitude)
    state = MergeState(LAYOUT, SIGNS)

    with pytest.raises(OutOfRangeError, match="tensor 'big' magnitude: contains NaN or Inf"):
        state.add("0", EncodedResidual(tensors))

    assert not state.sums["big"].any()


def test_merge_rejects_count_mismatch():
    tensors = dict(random_residual(LAYOUT, SIGNS, 2).tensors)
    tensors["big"] = EncodedTensor(tensors["big"].mask, tensors["big"].magnitude[:-1])
    state = MergeState(LAYOUT, SIGNS)

    with pytest.raises(InvalidResidualError, match="set bits but"):
        state.add("0", EncodedResidual(tensors))


@pytest.mark.parametrize("number_format", [FixedPointFormat(), FixedPointFormat(10, 1e6)])
def test_quantize_matches_reference(number_format):
    generator = np.random.default_rng(0)
    magnitude = np.concatenate([generator.uniform(-1.0, 1.0, 1000), [0.0, -0.0, 2.0**-45, 0.5, 1.5, 2.5]])

    assert np.array_equal(number_format.quantize(magnitude), reference_quantize(number_format, magnitude))


def test_quantize_keeps_input_unchanged():
    magnitude = np.array([0.25, 0.5])

    FixedPointFormat().quantize(magnitude)

    assert np.array_equal(magnitude, [0.25, 0.5])


def test_to_float_matches_reference():
    number_format = FixedPointFormat()
    generator = np.random.default_rng(1)
    units = generator.integers(-(2**50), 2**50, 999)
    divisor = generator.integers(1, 500, 999).astype(np.int32)

    expected = (np.ldexp(units.astype(np.float64), -number_format.fraction_bits) / divisor).astype(np.float32)

    assert np.array_equal(number_format.to_float(units, divisor).view(np.int32), expected.view(np.int32))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_apply_residual_masked_bitwise(dtype):
    generator = np.random.default_rng(2)
    size = 70007
    base = {"w": generator.standard_normal(size).astype(dtype).reshape(7, 10001), "e": np.array([-0.0, 0.0, 1.0], dtype)}
    base["w"].reshape(-1)[::11] = -0.0
    delta = {"w": generator.standard_normal((7, 10001)).astype(dtype), "e": np.array([np.nan, -0.0, np.inf], dtype)}
    mask = {"w": generator.random(size) < 0.5, "e": np.array([True, False, False])}

    served = apply_residual(base, delta, mask)

    expected = reference_apply(base, delta, mask)
    bits = np.int32 if dtype == np.float32 else np.int64
    for name in base:
        assert served[name].shape == expected[name].shape
        assert np.array_equal(served[name].view(bits), expected[name].view(bits)), name


def test_apply_residual_mixed_dtypes_bitwise():
    base = {"w": np.array([1.0, -0.0, 2.0], np.float16)}
    delta = {"w": np.array([0.5, 0.25, -1.0], np.float32)}
    mask = {"w": np.array([1, 0, 1], np.uint8)}

    served = apply_residual(base, delta, mask)

    expected = reference_apply(base, delta, mask)
    assert served["w"].dtype == np.float16
    assert np.array_equal(served["w"].view(np.int16), expected["w"].view(np.int16))


def test_unpacked_mask_matches_reference():
    residual = random_residual(LAYOUT, SIGNS, 4)

    mask = residual.unpacked_mask("big", 70001)

    assert mask.dtype == np.bool_
    assert np.array_equal(mask, np.unpackbits(residual.tensors["big"].mask, count=70001).astype(bool))


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda m: np.where(np.arange(m.size) == 3, np.nan, m).astype(np.float32), "contains NaN or Inf"),
        (lambda m: np.where(np.arange(m.size) == 3, np.inf, m).astype(np.float32), "contains NaN or Inf"),
        (lambda m: np.where(np.arange(m.size) == 3, 0.0, m).astype(np.float32), "must be positive"),
        (lambda m: m[:-1], "set bits but"),
    ],
    ids=["nan", "inf", "zero", "count"],
)
def test_from_arrays_magnitude_errors(corrupt, message):
    arrays = random_residual(LAYOUT, SIGNS, 6).to_arrays()
    arrays["big/magnitude"] = corrupt(arrays["big/magnitude"])

    with pytest.raises(InvalidResidualError, match=message):
        from_arrays(arrays, LAYOUT)


def test_merge_ties_match_reference():
    layout = ParameterLayout((TensorSpec("w", (41,), "float32"),))
    signs = SignVector(3, layout)
    magnitude = (np.arange(1, 42, dtype=np.float32) / 4).astype(np.float32)
    residual = EncodedResidual({"w": EncodedTensor(np.packbits(np.ones(41, dtype=bool)), magnitude)})
    number_format = FixedPointFormat(1, 16.0)
    state = MergeState(layout, signs, number_format)

    state.add("0", residual)

    sums, _ = reference_sums(layout, signs, [residual], number_format)
    assert np.array_equal(state.sums["w"], sums["w"])
    assert set(np.abs(state.sums["w"][:4]).tolist()) == {0, 1, 2}
