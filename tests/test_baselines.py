import math

import numpy as np
import pytest
import torch

from sift_fl.baselines.central import central_train_config, concatenate_splits
from sift_fl.baselines.ft_merge import ResidualSum, uniform_mean
from sift_fl.baselines.mask_only import mask_only_residual, tensor_scales
from sift_fl.baselines.tall_masks import compute_tall_masks, select_lambda, summed_residual, tall_mask
from sift_fl.baselines.ties import TiesAccumulator, ties_merge, trim_residual
from sift_fl.codec import encode_residual
from sift_fl.layout import ParameterLayout, TensorSpec
from sift_fl.merge import MergeState
from sift_fl.settings import Split, TrainConfig
from sift_fl.sign import SignVector


def vectors(*rows):
    return [{"w": np.asarray(row, dtype=np.float32)} for row in rows]


# --- FT+Merge -------------------------------------------------------------


def test_uniform_mean_known_values():
    residuals = vectors([1.0, 2.0, -3.0], [3.0, -4.0, 0.0])

    mean = uniform_mean(residuals)

    np.testing.assert_array_equal(mean["w"], np.array([2.0, -1.0, -1.5], dtype=np.float32))


def test_residual_sum_mean_matches_uniform_mean():
    residuals = vectors([0.5, -0.25, 1.0], [0.25, 0.75, -1.0], [-0.75, 0.5, 0.5])
    total = ResidualSum({"w": (3,)})

    for index, residual in enumerate(residuals):
        total.add(str(index), residual)

    np.testing.assert_array_equal(total.mean()["w"], uniform_mean(residuals)["w"])
    np.testing.assert_array_equal(total.total()["w"], np.array([0.0, 1.0, 0.5], dtype=np.float32))


def test_residual_sum_withdraw_bit_exact():
    generator = np.random.default_rng(0)
    residuals = {str(c): {"w": generator.normal(0, 0.01, (4, 3)).astype(np.float32)} for c in range(6)}
    merged = ResidualSum({"w": (4, 3)})
    for client_id, residual in residuals.items():
        merged.add(client_id, residual)

    merged.remove("2", residuals["2"])
    scratch = ResidualSum({"w": (4, 3)})
    for client_id in ("0", "1", "3", "4", "5"):
        scratch.add(client_id, residuals[client_id])

    assert merged.equals(scratch)
    assert merged.mean()["w"].tobytes() == scratch.mean()["w"].tobytes()


def test_residual_sum_rejects_duplicate_and_unknown():
    merged = ResidualSum({"w": (3,)})
    merged.add("a", vectors([1.0, 0.0, 0.0])[0])

    with pytest.raises(ValueError, match="already merged"):
        merged.add("a", vectors([1.0, 0.0, 0.0])[0])
    with pytest.raises(KeyError, match="not merged"):
        merged.remove("b", vectors([1.0, 0.0, 0.0])[0])


def test_residual_sum_rejects_wrong_shape():
    merged = ResidualSum({"w": (3,)})

    with pytest.raises(ValueError, match="expected \\(3,\\)"):
        merged.add("a", {"w": np.zeros(4, dtype=np.float32)})

    assert merged.count == 0


# --- TIES -----------------------------------------------------------------


def test_ties_trim_keeps_top_magnitudes():
    trimmed = trim_residual({"w": np.array([4.0, -1.0, 2.0, -3.0], dtype=np.float32)}, density=0.5)

    np.testing.assert_array_equal(trimmed["w"], np.array([4.0, 0.0, 0.0, -3.0], dtype=np.float32))


def test_ties_sign_election_and_disjoint_mean():
    # Sums per coordinate: 1, 1, 1 -> elected +, +, +. Coordinate 0 keeps only 3, coordinate 1
    # keeps only 4, and coordinate 2 averages 0.5 and 0.5 (the zero entry is not counted).
    residuals = vectors([3.0, -1.0, 0.5], [-1.0, -2.0, 0.5], [-1.0, 4.0, 0.0])

    merged = ties_merge(residuals, density=1.0)

    np.testing.assert_allclose(merged["w"], [3.0, 4.0, 0.5])


def test_ties_negative_election_and_scale():
    residuals = vectors([1.0, 2.0], [1.0, 2.0], [-5.0, -1.0])

    merged = ties_merge(residuals, density=1.0, scale=2.0)

    np.testing.assert_allclose(merged["w"], [2.0 * -5.0, 2.0 * 2.0])


def test_ties_frequency_election():
    residuals = vectors([1.0], [1.0], [-5.0])

    by_mass = ties_merge(residuals, density=1.0, sign_method="total")
    by_count = ties_merge(residuals, density=1.0, sign_method="frequency")

    np.testing.assert_allclose(by_mass["w"], [-5.0])
    np.testing.assert_allclose(by_count["w"], [1.0])


@pytest.mark.parametrize("sign_method", ["total", "frequency"])
def test_ties_accumulator_matches_peft(sign_method):
    generator = np.random.default_rng(1)
    residuals = [
        {"a": generator.normal(size=(7, 5)).astype(np.float32), "b": generator.normal(size=9).astype(np.float32)}
        for _ in range(6)
    ]
    dense = TiesAccumulator({"a": (7, 5), "b": (9,)}, sign_method)
    sparse = TiesAccumulator({"a": (7, 5), "b": (9,)}, sign_method)

    for residual in residuals:
        trimmed = trim_residual(residual, 0.3)
        dense.add(trimmed)
        sparse.add_sparse({name: (np.flatnonzero(v), v.reshape(-1)[np.flatnonzero(v)]) for name, v in trimmed.items()})

    reference = ties_merge(residuals, density=0.3, scale=1.5, sign_method=sign_method)
    for name in reference:
        np.testing.assert_allclose(dense.merged(1.5)[name], reference[name], rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(sparse.merged(1.5)[name], dense.merged(1.5)[name])


def test_ties_rejects_invalid_options():
    with pytest.raises(ValueError, match="density"):
        trim_residual(vectors([1.0])[0], density=0.0)
    with pytest.raises(ValueError, match="sign election"):
        TiesAccumulator({"w": (1,)}, "majority")


# --- TALL masks -------------------------------------------------------------


def test_tall_mask_formula_known_values():
    # τ_MTL = [0, -1, 1]. Client 0: |τ| = [1, 2, .5] vs λ|τ_MTL − τ| = .5·[1, 1, .5] -> all kept.
    # Client 1: |τ| = [1, 1, .5] vs 1.0·[1, 2, .5] -> coordinate 1 dropped (1 < 2), ties kept.
    residuals = vectors([1.0, -2.0, 0.5], [-1.0, 1.0, 0.5])

    masks = compute_tall_masks(residuals, [0.5, 1.0])

    np.testing.assert_array_equal(masks[0]["w"], [True, True, True])
    np.testing.assert_array_equal(masks[1]["w"], [True, False, True])


def test_tall_masks_summed_residual():
    residuals = vectors([1.0, -2.0], [0.5, 1.0], [-1.0, 0.25])

    total = summed_residual(residuals)

    np.testing.assert_allclose(total["w"], [0.5, -0.75])


def test_tall_mask_zero_lambda_keeps_all():
    residuals = vectors([1e-6, -3.0, 0.0], [5.0, 1.0, 2.0])

    masks = compute_tall_masks(residuals, [0.0, 0.0])

    assert all(mask["w"].all() for mask in masks)


def test_tall_masks_rejects_lambda_count():
    with pytest.raises(ValueError, match="one lambda per residual"):
        compute_tall_masks(vectors([1.0], [2.0]), [0.5])


def test_tall_mask_rejects_negative_lambda():
    with pytest.raises(ValueError, match="non-negative"):
        tall_mask(vectors([1.0])[0], vectors([1.0])[0], -0.1)


def test_tall_select_lambda_best_then_smallest():
    # |τ_MTL − τ| = [0.5, 1.5, 0.9]: λ = 0.1 keeps 3 coordinates, 0.2 keeps 2, 0.5 keeps 1 and
    # 3.0 keeps none. The scores tie between 0.2 and 0.5, and the smaller λ wins.
    residual = {"w": np.array([1.0, 0.5, 0.1], dtype=np.float32)}
    total = {"w": np.array([1.5, 2.0, 1.0], dtype=np.float32)}
    scores = {3: 0.5, 2: 0.9, 1: 0.9, 0: 0.1}

    lam, mask = select_lambda(residual, total, lambda m: scores[int(m["w"].sum())], [0.2, 0.1, 3.0, 0.5])

    assert lam == 0.2
    np.testing.assert_array_equal(mask["w"], [True, True, False])


# --- mask-only ------------------------------------------------------------


def test_mask_only_scales_and_residual():
    layout = ParameterLayout((TensorSpec("w", (2, 3), "float32"), TensorSpec("b", (2,), "float32")))
    signs = SignVector(3, layout)
    first = {"w": np.array([[0.5, 0, 0.25], [0, 0, 0]]), "b": np.array([0.0, 2.0])}
    second = {"w": np.array([[0.25, 0, 0], [0, 1.0, 0]]), "b": np.array([0.0, 0.0])}
    state = MergeState(layout, signs)
    for client_id, values in (("a", first), ("b", second)):
        signed = {name: (np.abs(v) * signs.signs(name).reshape(v.shape)).astype(np.float32) for name, v in values.items()}
        state.add(client_id, encode_residual(signed, layout, signs))

    scales = tensor_scales(state)
    residual = mask_only_residual({"w": np.array([1, 0, 0, 0, 1, 0], bool), "b": np.zeros(2, bool)}, layout, signs, scales)

    # w: magnitudes 0.5, 0.25, 0.25, 1.0 over 4 set bits; b: one set bit of magnitude 2.
    assert scales["w"] == pytest.approx(0.5)
    assert scales["b"] == pytest.approx(2.0)
    expected_w = np.array([1, 0, 0, 0, 1, 0]) * signs.signs("w") * 0.5
    np.testing.assert_allclose(residual["w"].reshape(-1), expected_w)
    np.testing.assert_array_equal(residual["b"], [0.0, 0.0])


# --- central ----------------------------------------------------------------


def test_central_concatenates_splits():
    first = Split((torch.zeros(3, 2),), torch.tensor([0, 1, 0]))
    second = Split((torch.ones(2, 2),), torch.tensor([1, 1]))

    union = concatenate_splits([first, second])

    assert len(union) == 5
    assert union.inputs[0].shape == (5, 2)
    assert union.labels.tolist() == [0, 1, 0, 1, 1]


def test_central_train_config_steps():
    client = TrainConfig(steps=30, batch_size=16, learning_rate=1e-3)

    config = central_train_config(client, num_examples=1000, epochs=2.0, batch_size=64)

    assert config.steps == math.ceil(2000 / 64)
    assert config.batch_size == 64
    assert config.learning_rate == 1e-3
