"""Two real digits simulations on one store: the second run withdraws clients merged by the first."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from sift_fl.cli import main
from sift_fl.store import MergeStore, verify_store

ENV = {
    **os.environ,
    "HF_HUB_OFFLINE": "1",
    "FLWR_TELEMETRY_ENABLED": "0",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
}


def simulate(report_path, store_dir, *extra: str) -> tuple[subprocess.CompletedProcess, dict]:
    command = [
        sys.executable, "-m", "sift_fl.cli", "simulate", "--setting", "digits", "--clients", "4",
        "--store", str(store_dir), "--report", str(report_path), *extra,
    ]
    completed = subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=400)
    report = json.loads(report_path.read_text()) if report_path.exists() else {}
    return completed, report


def residual_byte_strings(store: MergeStore, client_id: str) -> list[bytes]:
    arrays = store.load_residual(client_id).to_arrays()
    return [np.ascontiguousarray(a).tobytes() for a in arrays.values() if a.nbytes >= 16]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    directory = tmp_path_factory.mktemp("two-runs")
    store_dir = directory / "store"
    first = simulate(directory / "first.json", store_dir)
    with MergeStore.open(store_dir) as store:
        generation_after_first = store.generation
        secrets = {c: residual_byte_strings(store, c) for c in ("1", "2")} if store.members >= {"1", "2"} else {}

    second = simulate(directory / "second.json", store_dir, "--withdraw", "1", "--client-withdraw", "2")
    return {"first": first, "second": second, "store": store_dir, "generation": generation_after_first, "secrets": secrets}


def test_first_run_fills_store(runs):
    completed, report = runs["first"]

    assert completed.returncode == 0, completed.stderr[-3000:]
    assert report["merged_clients"] == ["0", "1", "2", "3"]
    assert report["store_dir"] == str(runs["store"])
    assert runs["generation"] == 4


def test_second_run_exits_zero(runs):
    completed, report = runs["second"]

    assert completed.returncode == 0, completed.stderr[-3000:]
    assert report["failures"] == []


def test_second_run_trains_nobody(runs):
    _, report = runs["second"]

    # A trained client's row carries its upload statistics; a client that only evaluated has none.
    assert [row.get("density") for row in report["clients"]] == [None, None, None, None]


def test_second_run_withdraws_earlier_clients(runs):
    _, report = runs["second"]

    by_client = {w["client"]: w for w in report["withdrawals"]}
    assert by_client["1"]["requested_by"] == "run-config"
    assert by_client["2"]["requested_by"] == "client"
    assert [by_client[c]["status"] for c in ("1", "2")] == ["withdrawn", "withdrawn"]
    assert [by_client[c]["bit_exact"] for c in ("1", "2")] == [True, True]
    assert report["merged_clients"] == ["0", "3"]
    assert report["withdrawn_clients"] == ["1", "2"]


def test_second_run_serves_stored_masks(runs):
    _, report = runs["second"]

    served = {row["client"]: row["served"] for row in report["clients"]}
    assert served == {"0": "masked", "1": "masked", "2": "unmasked", "3": "masked"}
    accuracy = {row["client"]: row["accuracy"] for row in report["clients"]}
    assert accuracy["0"]["sift_masks"] > accuracy["0"]["sift_merge"]


def test_store_after_runs_verifies(runs, capsys):
    code = main(["verify", "--store", str(runs["store"])])

    assert code == 0, capsys.readouterr().out
    with MergeStore.open(runs["store"]) as store:
        assert verify_store(store).ok
        assert store.members == {"0", "3"}


def test_store_after_runs_has_no_withdrawn_bytes(runs):
    needles = [needle for strings in runs["secrets"].values() for needle in strings]
    hits = [
        path.name for path in runs["store"].rglob("*")
        if path.is_file() and any(needle in path.read_bytes() for needle in needles)
    ]

    assert len(needles) >= 4
    assert hits == []
