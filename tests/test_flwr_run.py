"""`flwr run .` with a local SuperLink in simulation mode, as a Flower user would start the app."""

import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import psutil
import pytest

PROJECT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stop_processes_using(flwr_home: Path) -> None:
    """Stop the local SuperLink (and its children) that `flwr run` started for this FLWR_HOME."""
    for process in psutil.process_iter(["pid", "cmdline"]):
        cmdline = " ".join(process.info["cmdline"] or [])
        if "flower-superlink" in cmdline and str(flwr_home) in cmdline:
            for child in process.children(recursive=True):
                child.send_signal(signal.SIGKILL)
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=10)
            except psutil.TimeoutExpired:
                process.kill()


@pytest.fixture
def flwr_home(tmp_path):
    home = tmp_path / "flwr-home"
    home.mkdir()
    (home / "config.toml").write_text(
        '[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = ":local:"\n', encoding="utf-8"
    )
    yield home
    stop_processes_using(home)


def test_flwr_run_local_simulation(flwr_home, tmp_path):
    report_path = tmp_path / "report.json"
    env = {
        **os.environ,
        "FLWR_HOME": str(flwr_home),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(free_port()),
        "FLWR_LOCAL_CONTROL_API_PORT": str(free_port()),
        "HF_HUB_OFFLINE": "1",
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    run_config = f"setting='digits' num-clients=3 withdraw='1' report='{report_path}'"
    command = ["flwr", "run", ".", "local", "--stream", "--run-config", run_config, "--federation-config", "num-supernodes=3"]

    completed = subprocess.run(command, cwd=PROJECT, env=env, capture_output=True, text=True, timeout=400)

    assert report_path.exists(), completed.stdout[-3000:] + completed.stderr[-3000:]
    report = json.loads(report_path.read_text())
    assert report["failures"] == []
    assert sorted(report["merged_clients"]) == ["0", "2"]
    assert report["withdrawals"][0]["bit_exact"] is True
    assert report["methods"]["sift_masks"]["clients"] == 3
