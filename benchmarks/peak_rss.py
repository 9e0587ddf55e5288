"""Server peak RSS while merging N residuals streamed from files, in fresh processes.

Each measurement runs `python -m benchmarks.peak_rss MANIFEST --mode MODE --clients N` in
a new process and reads its peak resident set size (VmHWM). The baseline mode
imports the same modules and merges nothing, so the difference is what merging costs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

from benchmarks.common import BenchConfig, Figure
from benchmarks.workload import ResidualFiles
from sift_fl.merge import MergeState
from sift_fl.store.files import residual_from_file

logger = logging.getLogger(__name__)

TARGET = 4.0
# The peak at N clients may exceed the peak at the small N by at most this share of P x 4 bytes.
GROWTH_TOLERANCE = 0.1
READERS = {
    "merge": "benchmarks.workload.read_residual_file (one copy of the file's bytes)",
    "store-merge": "sift_fl.store.files.residual_from_file (sha256 check, numpy views into one buffer)",
}


def measure_peak_rss(files: ResidualFiles, workdir: Path, config: BenchConfig) -> list[Figure]:
    """Return one peak-RSS figure per residual reader, each measured at N and at a smaller N."""
    manifest = workdir / "peak-rss-manifest.json"
    values = files.to_json()
    values["sha256"] = [hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in files.paths]
    manifest.write_text(json.dumps(values))

    baseline = _run_worker(manifest, "baseline", 0)
    dense_bytes = 4 * files.layout.num_parameters
    figures = []
    for mode, reader in READERS.items():
        small = _run_worker(manifest, mode, config.rss_small_clients)
        full = _run_worker(manifest, mode, files.num_clients)
        ratio = (full - baseline) / dense_bytes
        growth = (full - small) / dense_bytes
        figure = Figure.compare(
            "peak_rss" if mode == "merge" else "peak_rss_store_reader",
            f"peak RSS above baseline, merging {files.num_clients} residuals read by {reader}, in units of P x 4 bytes",
            "P x 4 bytes (dense float32 parameters); baseline = the same process merging nothing",
            ratio,
            TARGET,
            "<=",
            measured={
                "num_parameters": files.layout.num_parameters,
                "baseline_peak_bytes": baseline,
                f"peak_bytes_{config.rss_small_clients}_clients": small,
                f"peak_bytes_{files.num_clients}_clients": full,
                "growth_in_p4_units": growth,
            },
            notes=f"passes only if the peak also grows by at most {GROWTH_TOLERANCE} x P x 4 bytes "
            f"from {config.rss_small_clients} to {files.num_clients} clients",
        )
        figure.passed = figure.passed and growth <= GROWTH_TOLERANCE
        logger.info("peak RSS: %s ratio %.3f, growth %.3f", mode, ratio, growth)
        figures.append(figure)
    return figures


def _run_worker(manifest: Path, mode: str, clients: int) -> int:
    command = [sys.executable, "-m", "benchmarks.peak_rss", str(manifest), "--mode", mode, "--clients", str(clients)]
    root = Path(__file__).resolve().parent.parent
    completed = subprocess.run(command, cwd=root, capture_output=True, text=True, check=False)
    if completed.returncode != 0:
        raise RuntimeError(f"peak RSS worker {mode} with {clients} clients failed:\n{completed.stderr[-2000:]}")
    return int(json.loads(completed.stdout.strip().splitlines()[-1])["peak_rss_bytes"])


def _worker(manifest: Path, mode: str, clients: int) -> dict[str, Any]:
    values = json.loads(manifest.read_text())
    files = ResidualFiles.from_json(values)
    if mode != "baseline":
        sha256 = dict(zip(values["paths"], values["sha256"]))
        state = MergeState(files.layout, files.sign_vector)
        for client_id in files.client_ids[:clients]:
            if mode == "merge":
                residual = files.load(client_id)
            else:
                path = files.path_of(client_id)
                residual = residual_from_file(path, files.layout, sha256[str(path)])
            state.add(client_id, residual)
            del residual
    return {"mode": mode, "clients": clients, "peak_rss_bytes": peak_rss_bytes()}


def peak_rss_bytes() -> int:
    """Return this process's peak resident set size (VmHWM in /proc/self/status).

    `ru_maxrss` is not used because Linux keeps it across `execve`, so a worker started by
    a large parent would report at least the parent's RSS at fork time.
    """
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("VmHWM not found in /proc/self/status; peak RSS needs Linux")


def main() -> None:
    parser = argparse.ArgumentParser(description="Measure the peak RSS of merging stored residuals.")
    parser.add_argument("manifest", type=Path, help="JSON file written by measure_peak_rss")
    parser.add_argument("--mode", choices=["baseline", *READERS], required=True, help="what to merge and how to read it")
    parser.add_argument("--clients", type=int, default=0, help="number of clients to merge")
    arguments = parser.parse_args()
    sys.stdout.write(json.dumps(_worker(arguments.manifest, arguments.mode, arguments.clients)) + "\n")


if __name__ == "__main__":
    main()
