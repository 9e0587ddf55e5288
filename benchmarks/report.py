"""The benchmark report: machine description, text and Markdown tables of the figures."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import Figure

ROOT = Path(__file__).resolve().parent.parent


def machine_info() -> dict[str, Any]:
    """Return the CPU model (from lscpu), core count, total memory and library versions."""
    model = "unknown"
    try:
        output = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        for line in output.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except FileNotFoundError:
        pass

    memory_kib = 0
    with open("/proc/meminfo", encoding="ascii") as meminfo:
        for line in meminfo:
            if line.startswith("MemTotal:"):
                memory_kib = int(line.split()[1])

    import torch

    return {
        "cpu_model": model,
        "cores": os.cpu_count(),
        "memory_gib": round(memory_kib / 2**20, 1),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }


def git_state() -> dict[str, Any]:
    """Return HEAD's hash and the tracked files under benchmarks/ and sift_fl/ that differ from it."""

    def git(*arguments: str) -> str:
        return subprocess.run(["git", *arguments], cwd=ROOT, capture_output=True, text=True, check=False).stdout

    # Porcelain lines are "XY path": two status columns, a space, then the path.
    changed = git("status", "--porcelain", "--untracked-files=no", "--", "benchmarks", "sift_fl")
    return {
        "commit": git("rev-parse", "HEAD").strip() or "unknown",
        "uncommitted_paths": [line[3:] for line in changed.splitlines() if line.strip()],
    }


def _result(figure: Figure) -> str:
    return "PASS" if figure.passed else "FAIL"


def format_table(figures: list[Figure]) -> str:
    """Return a plain-text table: name, ratio, target, result, then the figure and its reference."""
    lines = [f"{'name':<30} {'ratio':>10}  {'target':<10} {'result':<6}  figure | reference"]
    for figure in figures:
        target = f"{figure.comparison} {figure.target:.4g}"
        lines.append(
            f"{figure.name:<30} {figure.ratio:>10.5f}  {target:<10} {_result(figure):<6}  "
            f"{figure.figure} | {figure.reference}"
        )
    return "\n".join(lines)


def format_markdown(figures: list[Figure]) -> str:
    """Return the figures as a Markdown table."""
    lines = ["| name | figure | reference | ratio | target | result |", "|---|---|---|---|---|---|"]
    for figure in figures:
        lines.append(
            f"| {figure.name} | {figure.figure} | {figure.reference} | {figure.ratio:.5f} | "
            f"{figure.comparison} {figure.target:.4g} | {_result(figure)} |"
        )
    return "\n".join(lines)
