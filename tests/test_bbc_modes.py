"""The bbc setting's three modes end to end through the Flower Simulation Engine (slow: MiniLM on CPU)."""

import json
import os
import subprocess
import sys

import pytest


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["head", "top-layers", "lora"])
def test_bbc_mode_runs_through_flower(tmp_path, mode):
    report_path = tmp_path / "report.json"
    command = [sys.executable, "-m", "sift_fl.cli", "simulate", "--setting", "bbc", "--mode", mode,
               "--clients", "3", "--withdraw", "1", "--steps", "5", "--report", str(report_path)]

    completed = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=1200)
    report = json.loads(report_path.read_text())

    assert completed.returncode == 0, completed.stderr[-3000:]
    assert report["failures"] == []
    assert report["run_spec"]["mode"] == mode
    assert report["withdrawals"][0]["bit_exact"] is True
    assert report["methods"]["sift_masks"]["clients"] == 3
