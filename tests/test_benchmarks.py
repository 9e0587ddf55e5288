"""Smoke test of the benchmark suite: `--quick` runs end to end and writes a well-formed report.

Timings never become assertions here; the figures' targets live in the benchmark report.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FIGURE_NAMES = {
    "step_time",
    "upload_fp32_density_0.5",
    "upload_fp32_measured_density",
    "upload_fp16_density_0.5",
    "ingest_throughput",
    "serving",
    "unlearn_vs_scratch",
    "unlearn_vs_tall",
    "peak_rss",
    "peak_rss_store_reader",
}


@pytest.mark.slow
def test_quick_run_writes_report(tmp_path):
    report_path = tmp_path / "report.json"
    environment = {**os.environ, "HF_HUB_OFFLINE": "1"}

    completed = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--json", str(report_path), "--workdir", str(tmp_path / "work")],
        cwd=ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
    )

    assert completed.returncode == 0, completed.stderr[-3000:]
    report = json.loads(report_path.read_text())
    assert {"commit", "machine", "command", "density", "figures"} <= set(report)
    names = {figure["name"] for figure in report["figures"]}
    assert names == FIGURE_NAMES
    for figure in report["figures"]:
        assert isinstance(figure["ratio"], float), figure["name"]
        assert isinstance(figure["target"], float), figure["name"]
        assert isinstance(figure["passed"], bool), figure["name"]
    for name in FIGURE_NAMES:
        assert name in completed.stdout, f"table row {name} missing from the printed table"
