"""Scale-experiment harness: method parsing, the residual store and an end-to-end run with all methods."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from sift_fl.cli import main
from sift_fl.codec import encode_residual
from sift_fl.experiment import ALL_METHODS, METHODS, parse_methods
from sift_fl.experiment.store import ResidualStore
from sift_fl.layout import ParameterLayout, TensorSpec
from sift_fl.sign import SignVector

ISSUE_METHODS = (
    "local",
    "ft_merge",
    "sift_merge",
    "sift_masks",
    "ties",
    "tall_masks",
    "central",
    "sift_masks_coverage",
    "mask_only",
)
SUBTRACT_METHODS = ("ft_merge", "sift_merge", "sift_masks", "sift_masks_coverage", "mask_only")
RECOMPUTE_METHODS = ("ties", "tall_masks", "central")


def test_methods_names_complete():
    assert set(ISSUE_METHODS) <= set(METHODS)
    assert parse_methods("all") == ALL_METHODS


def test_methods_parse_keeps_table_order():
    assert parse_methods("sift_masks, ft_merge") == ("ft_merge", "sift_masks")


def test_methods_parse_rejects_unknown():
    with pytest.raises(ValueError, match="unknown methods \\['fedprox'\\]"):
        parse_methods("ft_merge,fedprox")


def test_store_round_trips(tmp_path):
    layout = ParameterLayout((TensorSpec("fc.weight", (3, 4), "float32"), TensorSpec("fc.bias", (3,), "float32")))
    signs = SignVector(5, layout)
    generator = np.random.default_rng(0)
    dense = {spec.name: generator.normal(0, 0.1, spec.shape).astype(np.float32) for spec in layout.tensors}
    sift = {
        name: (np.abs(values) * signs.signs(name).reshape(values.shape) * (generator.random(values.shape) < 0.5)).astype(np.float32)
        for name, values in dense.items()
    }
    store = ResidualStore(tmp_path / "residuals", layout)

    store.write_dense("ft", "7", dense)
    store.write_sparse("trimmed", "7", sift)
    store.write_encoded("sift", "7", encode_residual(sift, layout, signs))

    for name in layout.names:
        np.testing.assert_array_equal(store.read_dense("ft", "7")[name], dense[name])
        index, values = store.read_sparse("trimmed", "7")[name]
        np.testing.assert_array_equal(values, sift[name].reshape(-1)[index])
        assert np.count_nonzero(sift[name]) == index.size
        restored = store.read_encoded("sift", "7")
        assert restored.tensors[name].magnitude.tobytes() == encode_residual(sift, layout, signs).tensors[name].magnitude.tobytes()


def test_store_missing_client_names_path(tmp_path):
    layout = ParameterLayout((TensorSpec("w", (2,), "float32"),))
    store = ResidualStore(tmp_path, layout)

    with pytest.raises(FileNotFoundError, match="client '3'"):
        store.read_dense("ft", "3")


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """One run of `sift-fl experiment` on digits with 3 clients and every method."""
    out = tmp_path_factory.mktemp("experiment")
    code = main(["experiment", "--setting", "digits", "--clients", "1,3", "--methods", "all", "--out", str(out)])
    return code, out


def test_experiment_exits_zero(digits_run):
    code, _ = digits_run

    assert code == 0


def test_experiment_writes_outputs(digits_run):
    _, out = digits_run

    for name in ("results.csv", "per_client.csv", "summary.json", "scale.png"):
        assert (out / name).is_file(), name
    assert (out / "scale.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (out / "residuals").exists()


def test_experiment_summary_has_every_method(digits_run):
    _, out = digits_run
    summary = json.loads((out / "summary.json").read_text())
    run = next(run for run in summary["runs"] if run["num_clients"] == 3)

    assert [r["num_clients"] for r in summary["runs"]] == [1, 3]
    for method in ISSUE_METHODS:
        values = run["methods"][method]
        assert 0.0 <= values["mean_accuracy"] <= 1.0, method
        assert values["clients_evaluated"] == 3, method
        assert values["unlearning"]["seconds"] >= 0.0, method
        assert isinstance(values["unlearning"]["operations"], int), method


def test_experiment_subtractions_are_bit_exact(digits_run):
    _, out = digits_run
    summary = json.loads((out / "summary.json").read_text())

    for run in summary["runs"]:
        for method in SUBTRACT_METHODS:
            assert run["methods"][method]["unlearning"]["bit_exact"] is True, (run["num_clients"], method)


def test_experiment_recomputing_costs_more(digits_run):
    _, out = digits_run
    run = json.loads((out / "summary.json").read_text())["runs"][-1]
    sift_masks = run["methods"]["sift_masks"]["unlearning"]["operations"]

    for method in RECOMPUTE_METHODS:
        assert run["methods"][method]["unlearning"]["operations"] > sift_masks, method
    assert run["methods"]["central"]["unlearning"]["finetune_steps"] > 0
    assert run["methods"]["tall_masks"]["unlearning"]["forward_examples"] > 0
    assert run["methods"]["local"]["unlearning"]["operations"] == 0


def test_experiment_local_sift_matches_masks_at_one_client(digits_run):
    # With one client the mean residual is the client's own residual, so masking it is the local model.
    _, out = digits_run
    run = json.loads((out / "summary.json").read_text())["runs"][0]

    assert run["methods"]["sift_masks"]["mean_accuracy"] == run["methods"]["local_sift"]["mean_accuracy"]
    assert run["methods"]["sift_merge"]["mean_accuracy"] == run["methods"]["local_sift"]["mean_accuracy"]


def test_experiment_results_csv_rows(digits_run):
    _, out = digits_run
    with open(out / "results.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))

    assert len(rows) == 2 * len(ALL_METHODS)
    assert {row["method"] for row in rows} == set(ALL_METHODS)
    assert all(row["unlearning_operations"] != "" for row in rows)


def test_experiment_per_client_csv_rows(digits_run):
    _, out = digits_run
    with open(out / "per_client.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))

    assert len(rows) == 1 + 3
    assert set(ALL_METHODS) <= set(rows[0])


@pytest.mark.slow
def test_experiment_fmnist_scale(tmp_path):
    """The committed scale result: N up to 500 on Fashion-MNIST with the pretrained θ0 (minutes)."""
    code = main(["experiment", "--setting", "fmnist", "--clients", "1,10,50,100,200,500", "--methods", "all", "--out", str(tmp_path)])
    run = json.loads((tmp_path / "summary.json").read_text())["runs"][-1]
    accuracy = {method: values["mean_accuracy"] for method, values in run["methods"].items()}

    assert code == 0
    assert run["num_clients"] == 500
    assert accuracy["sift_masks"] >= accuracy["ft_merge"] + 0.10
    assert accuracy["sift_masks"] >= accuracy["local"] - 0.02
