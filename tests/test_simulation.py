"""End-to-end Flower simulations of the digits setting (real Simulation Engine, real Ray actors)."""

import json
import os
import subprocess
import sys

import pytest

ENV = {
    **os.environ,
    "HF_HUB_OFFLINE": "1",
    "FLWR_TELEMETRY_ENABLED": "0",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
}


def simulate(tmp_path, *extra: str) -> tuple[subprocess.CompletedProcess, dict]:
    report_path = tmp_path / "report.json"
    command = [sys.executable, "-m", "sift_fl.cli", "simulate", "--setting", "digits", "--report", str(report_path), *extra]
    completed = subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=300)
    report = json.loads(report_path.read_text()) if report_path.exists() else {}
    return completed, report


@pytest.fixture(scope="module")
def three_client_run(tmp_path_factory):
    return simulate(tmp_path_factory.mktemp("sim"), "--clients", "3", "--withdraw", "0")


def test_simulation_exits_zero(three_client_run):
    completed, _ = three_client_run

    assert completed.returncode == 0, completed.stderr[-3000:]


def test_simulation_merges_every_client(three_client_run):
    _, report = three_client_run

    assert report["failures"] == []
    assert [c["client"] for c in report["clients"]] == ["0", "1", "2"]
    assert sorted(report["merged_clients"]) == ["1", "2"]


def test_simulation_reports_all_methods(three_client_run):
    _, report = three_client_run

    for method in ("local", "ft_merge", "sift_merge", "sift_masks"):
        assert report["methods"][method]["clients"] == 3, method
        assert 0.0 <= report["methods"][method]["mean_accuracy"] <= 1.0, method


def test_simulation_masks_beat_unmasked_merge(three_client_run):
    _, report = three_client_run

    # Label-skewed clients: the merged residual alone serves them badly, their own masks recover most of it.
    assert report["methods"]["sift_masks"]["mean_accuracy"] > report["methods"]["sift_merge"]["mean_accuracy"] + 0.2


def test_simulation_reports_sparse_upload(three_client_run):
    _, report = three_client_run

    for client in report["clients"]:
        assert 0.05 < client["density"] < 0.95
        assert client["upload_bytes"] < client["dense_bytes"]


def test_simulation_withdrawal_is_bit_exact(three_client_run):
    _, report = three_client_run

    [withdrawal] = report["withdrawals"]
    assert withdrawal["client"] == "0"
    assert withdrawal["bit_exact"] is True
    assert withdrawal["served_after"] == "unmasked"
    assert withdrawal["seconds"] >= 0.0


def test_simulation_withdrawn_client_served_unmasked_merge(three_client_run):
    _, report = three_client_run

    [withdrawal] = report["withdrawals"]
    after = withdrawal["accuracy_after"]
    # Served unmasked, the withdrawn client's "masked" model is the plain merge of the retain set.
    assert after["sift_masks"] == after["sift_merge"]


def test_simulation_prints_table(three_client_run):
    completed, _ = three_client_run

    assert "Accuracy on each client's local test split" in completed.stdout
    assert "withdrew client 0" in completed.stdout


def test_simulation_every_client_failed_is_reported(tmp_path):
    from flwr.app import Context, Message
    from flwr.clientapp import ClientApp
    from flwr.simulation import run_simulation

    from server.app import make_server_app
    from sift_fl.report import report_problems

    failing_app = ClientApp()

    @failing_app.train()
    def train(message: Message, context: Context) -> Message:
        raise RuntimeError("training crashed")

    @failing_app.evaluate()
    def evaluate(message: Message, context: Context) -> Message:
        raise RuntimeError("evaluation crashed")

    report_path = tmp_path / "report.json"
    overrides = {"setting": "digits", "num-clients": 2, "withdraw": "", "report": str(report_path)}

    run_simulation(
        server_app=make_server_app(overrides),
        client_app=failing_app,
        num_supernodes=2,
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}},
    )
    report = json.loads(report_path.read_text())
    problems = report_problems(report, expected_clients=2)

    assert report["methods"] == {}
    assert len(report["failures"]) >= 2
    assert problems[0] == "only 0 of 2 clients were merged"
