"""Run the scale experiment: for each client count N, train, serve, score and withdraw one client."""

from __future__ import annotations

import logging
import platform
import resource
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sift_fl.experiment.clients import train_clients
from sift_fl.experiment.config import ExperimentConfig
from sift_fl.experiment.context import build_context
from sift_fl.experiment.evaluation import evaluate_methods
from sift_fl.experiment.output import add_ratios, method_summary, write_outputs
from sift_fl.experiment.unlearning import measure_unlearning

logger = logging.getLogger(__name__)


def run_experiment(config: ExperimentConfig) -> dict[str, Any]:
    """Run every client count in `config.clients` and write the outputs after each one; return the summary."""
    summary: dict[str, Any] = {
        "setting": config.setting,
        "methods": list(config.methods),
        "config": config.to_json(),
        "environment": environment(),
        "runs": [],
    }
    per_client: dict[int, dict[str, dict[str, float]]] = {}
    for num_clients in config.clients:
        run, accuracies = run_clients(config, num_clients)
        summary["runs"].append(run)
        per_client[num_clients] = accuracies
        write_outputs(config.out, summary, per_client)
        logger.info("N=%d done in %.1f s; outputs in %s", num_clients, run["seconds"]["total"], config.out)
    return summary


def run_clients(config: ExperimentConfig, num_clients: int) -> tuple[dict[str, Any], dict[str, dict[str, float]]]:
    """Run one client count; return its summary and the accuracies per client and method."""
    start = time.perf_counter()
    residual_dir = Path(config.out) / "residuals" / f"N{num_clients}"
    shutil.rmtree(residual_dir, ignore_errors=True)
    context = build_context(config, residual_dir)

    training = train_clients(context, num_clients)
    evaluation = evaluate_methods(context, training)
    accuracies = {**training.accuracies, **evaluation.accuracies}
    storage = {kind: context.store.nbytes(kind) for kind in ("ft", "sift", "trimmed")}

    unlearning_start = time.perf_counter()
    costs = measure_unlearning(context, training)
    unlearning_seconds = time.perf_counter() - unlearning_start
    if not config.keep_residuals:
        context.store.remove_all()
        _remove_if_empty(residual_dir.parent)

    methods: dict[str, dict[str, Any]] = {}
    for method in config.methods:
        if method in accuracies:
            methods[method] = method_summary(accuracies[method])
            methods[method]["unlearning"] = costs[method].to_json() if method in costs else None
    add_ratios(methods)

    per_client: dict[str, dict[str, float]] = {}
    for method, scores in accuracies.items():
        for client_id, value in scores.items():
            per_client.setdefault(client_id, {})[method] = value

    run = {
        "num_clients": num_clients,
        "num_parameters": context.num_parameters,
        "withdrawn_client": str(config.withdraw_client) if config.withdraw_client < num_clients else None,
        "methods": methods,
        "train_examples_per_client": _describe([client.num_train for client in training.clients]),
        "test_examples_per_client": _describe([len(client.test) for client in training.clients]),
        "sift_density": _describe(training.densities),
        "tall_lambdas": _count_values(evaluation.tall_lambdas.values()),
        "central_steps": evaluation.central_steps,
        "storage_bytes": storage,
        "seconds": {
            "train": training.seconds,
            "evaluate": evaluation.seconds,
            "unlearning": unlearning_seconds,
            "total": time.perf_counter() - start,
        },
        "peak_memory_mib": peak_memory_mib(),
    }
    return run, per_client


def _remove_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:
        pass


def _describe(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    array = np.asarray(values, dtype=np.float64)
    return {"mean": float(array.mean()), "min": float(array.min()), "max": float(array.max())}


def _count_values(values: Any) -> dict[str, int]:
    counts: dict[str, int] = {}
    for value in values:
        counts[f"{value:g}"] = counts.get(f"{value:g}", 0) + 1
    return dict(sorted(counts.items()))


def peak_memory_mib() -> float:
    """Return this process's peak resident memory so far, in MiB (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def environment() -> dict[str, Any]:
    """Return the machine, library versions and git commit the experiment ran on."""
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "torch_threads": torch.get_num_threads(),
        "commit": _git_commit(),
    }


def _git_commit() -> str | None:
    try:
        completed = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return completed.stdout.strip() or None
