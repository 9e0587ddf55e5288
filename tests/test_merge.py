import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sift_fl.codec import encode_residual
from sift_fl.fixed_point import FixedPointFormat, OutOfRangeError
from sift_fl.layout import ParameterLayout, TensorSpec
from sift_fl.merge import MergeState, apply_residual
from sift_fl.sign import SignVector

LAYOUT = ParameterLayout((TensorSpec("w", (6, 5), "float32"), TensorSpec("b", (6,), "float32")))
SIGNS = SignVector(7, LAYOUT)


def client_residual(seed: int):
    generator = np.random.default_rng(seed)
    dense = {}
    for spec in LAYOUT.tensors:
        magnitude = generator.lognormal(-6, 2, spec.numel).astype(np.float32)
        keep = generator.random(spec.numel) < 0.55
        dense[spec.name] = (np.where(keep, magnitude, 0) * SIGNS.signs(spec.name)).astype(np.float32).reshape(spec.shape)
    return encode_residual(dense, LAYOUT, SIGNS)


RESIDUALS = {str(c): client_residual(c) for c in range(8)}


def test_withdraw_equals_from_scratch_bit_for_bit():
    state = MergeState.from_scratch(LAYOUT, SIGNS, RESIDUALS)

    state.remove("3", RESIDUALS["3"])
    retain = {c: r for c, r in RESIDUALS.items() if c != "3"}
    scratch = MergeState.from_scratch(LAYOUT, SIGNS, retain)

    assert state.equals(scratch)
    assert state.digest() == scratch.digest()
    for name in LAYOUT.names:
        assert state.mean()[name].tobytes() == scratch.mean()[name].tobytes()
        assert state.coverage_mean()[name].tobytes() == scratch.coverage_mean()[name].tobytes()


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.sampled_from(sorted(RESIDUALS))), min_size=1, max_size=40))
def test_any_join_withdraw_sequence_matches_scratch(operations):
    state = MergeState(LAYOUT, SIGNS)
    for join, client in operations:
        if join and client not in state.members:
            state.add(client, RESIDUALS[client])
        elif not join and client in state.members:
            state.remove(client, RESIDUALS[client])

    scratch = MergeState.from_scratch(LAYOUT, SIGNS, {c: RESIDUALS[c] for c in state.members})

    assert state.equals(scratch)
    for name in LAYOUT.names:
        assert state.mean()[name].tobytes() == scratch.mean()[name].tobytes()


def test_mean_is_close_to_float_mean():
    state = MergeState.from_scratch(LAYOUT, SIGNS, RESIDUALS)
    from sift_fl.codec import decode_residual

    dense = [decode_residual(r, LAYOUT, SIGNS) for r in RESIDUALS.values()]
    expected = {name: np.mean([d[name] for d in dense], axis=0, dtype=np.float64) for name in LAYOUT.names}

    for name in LAYOUT.names:
        assert np.allclose(state.mean()[name], expected[name], rtol=1e-6, atol=1e-11)


def test_coverage_mean_divides_by_mask_count():
    state = MergeState.from_scratch(LAYOUT, SIGNS, {c: RESIDUALS[c] for c in ("0", "1")})
    from sift_fl.codec import decode_residual

    first, second = (decode_residual(RESIDUALS[c], LAYOUT, SIGNS)["b"] for c in ("0", "1"))
    coverage = (first != 0).astype(int) + (second != 0).astype(int)
    expected = (first.astype(np.float64) + second) / np.maximum(coverage, 1)

    assert np.allclose(state.coverage_mean()["b"], expected, rtol=1e-6, atol=1e-11)


def test_duplicate_join_rejected():
    state = MergeState(LAYOUT, SIGNS)
    state.add("0", RESIDUALS["0"])

    with pytest.raises(ValueError, match="already merged"):
        state.add("0", RESIDUALS["0"])


def test_out_of_range_magnitude_changes_nothing():
    state = MergeState.from_scratch(LAYOUT, SIGNS, {"0": RESIDUALS["0"]})
    before = state.digest()
    number_format = FixedPointFormat(fraction_bits=40, max_magnitude=1e-9)
    strict = MergeState(LAYOUT, SIGNS, number_format)

    with pytest.raises(OutOfRangeError, match="exceeds the accumulator's limit"):
        strict.add("1", RESIDUALS["1"])

    assert strict.count == 0
    assert all(not s.any() for s in strict.sums.values())
    assert state.digest() == before


def test_fixed_point_range_documented_values():
    number_format = FixedPointFormat()

    assert number_format.resolution == 2.0**-40
    assert number_format.max_clients == 2**19 - 1


def test_apply_residual_with_mask():
    base = {"w": np.ones((2, 2), np.float32)}
    residual = {"w": np.full((2, 2), 0.5, np.float32)}
    mask = {"w": np.array([True, False, False, True])}

    served = apply_residual(base, residual, mask)

    assert served["w"].tolist() == [[1.5, 1.0], [1.0, 1.5]]
