"""Run the benchmark suite: `python -m benchmarks --json PATH [--quick]`.

Prints one row per figure (ratio, target, PASS or FAIL, the figure and its reference) and
writes the same figures, the raw timings and the machine description as JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import SIGN_SEED, BenchConfig, Figure
from benchmarks.report import format_markdown, format_table, git_state, machine_info

logger = logging.getLogger("benchmarks")


def run_suite(config: BenchConfig, workdir: Path) -> tuple[list[Figure], dict[str, Any]]:
    """Measure every figure of `config` and return them with the density used."""
    from benchmarks.density import measure_bbc_density
    from benchmarks.ingest import measure_ingest
    from benchmarks.models import build_model_batch
    from benchmarks.peak_rss import measure_peak_rss
    from benchmarks.serving import measure_serving
    from benchmarks.step_time import measure_step_time
    from benchmarks.unlearning import measure_unlearning
    from benchmarks.upload import measure_upload
    from benchmarks.workload import ResidualFiles
    from sift_fl.layout import ParameterLayout
    from sift_fl.sign import SignVector

    if config.density_clients:
        density = measure_bbc_density(config.density_clients)
    else:
        density = {"value": config.nominal_density, "source": "nominal value of a reduced run, not measured"}

    figures = []
    batch = build_model_batch(config.model, config.step_batch_size, config.step_max_length)
    figures.append(measure_step_time(batch, config))
    theta0 = batch.theta0()
    del batch

    layout = ParameterLayout.from_arrays(theta0)
    sign_vector = SignVector(SIGN_SEED, layout)
    figures.extend(measure_upload(layout, sign_vector, density["value"]))

    files = ResidualFiles.create(
        workdir / "residuals", layout, sign_vector, density["value"], config.stored_residuals, config.num_clients
    )
    figures.append(measure_ingest(files, config))
    figures.append(measure_serving(theta0, files, config))
    del theta0
    figures.extend(measure_unlearning(files, config))
    figures.extend(measure_peak_rss(files, workdir, config))
    return figures, density


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, required=True, help="path of the JSON report to write")
    parser.add_argument("--quick", action="store_true", help="reduced smoke run (small MLP, small P), under a minute")
    parser.add_argument("--markdown", type=Path, help="also write the table as Markdown to this path")
    parser.add_argument("--workdir", type=Path, help="directory for residual files (default: a temporary directory)")
    arguments = parser.parse_args(argv)

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    torch.set_num_threads(1)
    config = BenchConfig.reduced() if arguments.quick else BenchConfig.full()
    repository = git_state()  # before the run, as other commits may land while it runs
    started = time.perf_counter()

    with tempfile.TemporaryDirectory(prefix="sift-fl-benchmarks-") as temporary:
        workdir = arguments.workdir or Path(temporary)
        figures, density = run_suite(config, workdir)

    report = {
        "command": " ".join(["python", "-m", "benchmarks", *(argv if argv is not None else sys.argv[1:])]),
        "commit": repository["commit"],
        "uncommitted_paths": repository["uncommitted_paths"],
        "machine": machine_info(),
        "config": dataclasses.asdict(config),
        "density": density,
        "seconds": time.perf_counter() - started,
        "figures": [figure.to_json() for figure in figures],
    }
    arguments.json.parent.mkdir(parents=True, exist_ok=True)
    arguments.json.write_text(json.dumps(report, indent=2) + "\n")
    if arguments.markdown:
        arguments.markdown.write_text(format_markdown(figures) + "\n")

    sys.stdout.write(format_table(figures) + "\n")
    passed = sum(figure.passed for figure in figures)
    sys.stdout.write(f"{passed} of {len(figures)} figures pass; report written to {arguments.json}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
