"""Experiment outputs: `results.csv`, `per_client.csv`, `scale.png` and `summary.json` under the output directory."""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path
from typing import Any

from sift_fl.experiment.methods import ALL_METHODS

CSV_FIELDS = (
    "num_clients",
    "method",
    "mean_accuracy",
    "std_accuracy",
    "clients_evaluated",
    "unlearning_seconds",
    "unlearning_operations",
    "params_read",
    "params_written",
    "finetune_steps",
    "trained_examples",
    "forward_examples",
    "operations_ratio_vs_sift_masks",
    "seconds_ratio_vs_sift_masks",
    "bit_exact",
)


def add_ratios(methods: dict[str, dict[str, Any]]) -> None:
    """Add each method's unlearning operations and seconds relative to sift_masks, in place."""
    reference = methods.get("sift_masks", {}).get("unlearning")
    for row in methods.values():
        unlearning = row.get("unlearning")
        if not unlearning or not reference:
            continue
        unlearning["operations_ratio_vs_sift_masks"] = _ratio(unlearning["operations"], reference["operations"])
        unlearning["seconds_ratio_vs_sift_masks"] = _ratio(unlearning["seconds"], reference["seconds"])


def _ratio(value: float, reference: float) -> float | None:
    return value / reference if reference > 0 else None


def write_outputs(out: Path, summary: dict[str, Any], per_client: dict[int, dict[str, dict[str, float]]]) -> None:
    """Write the CSV files, the plot and the summary for all client counts finished so far.

    `per_client` maps N to {client id: {method: accuracy}}.
    """
    out.mkdir(parents=True, exist_ok=True)
    _write_atomically(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    _write_results_csv(out / "results.csv", summary)
    _write_per_client_csv(out / "per_client.csv", per_client)
    plot_scale(out / "scale.png", summary)


def _write_results_csv(path: Path, summary: dict[str, Any]) -> None:
    rows = []
    for run in summary["runs"]:
        for method, values in run["methods"].items():
            unlearning = values.get("unlearning") or {}
            rows.append(
                {
                    "num_clients": run["num_clients"],
                    "method": method,
                    "mean_accuracy": values["mean_accuracy"],
                    "std_accuracy": values["std_accuracy"],
                    "clients_evaluated": values["clients_evaluated"],
                    "unlearning_seconds": unlearning.get("seconds"),
                    "unlearning_operations": unlearning.get("operations"),
                    **{key: unlearning.get(key) for key in CSV_FIELDS[7:]},
                }
            )
    _write_csv(path, CSV_FIELDS, rows)


def _write_per_client_csv(path: Path, per_client: dict[int, dict[str, dict[str, float]]]) -> None:
    rows = []
    for num_clients, clients in per_client.items():
        for client_id, accuracies in clients.items():
            rows.append({"num_clients": num_clients, "client": client_id, **accuracies})
    fields = ("num_clients", "client") + tuple(m for m in ALL_METHODS if any(m in row for row in rows))
    _write_csv(path, fields, rows)


def _write_csv(path: Path, fields: tuple[str, ...], rows: list[dict[str, Any]]) -> None:
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(fields), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    os.replace(temporary, path)


def _write_atomically(path: Path, text: str) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)


def plot_scale(path: Path, summary: dict[str, Any]) -> None:
    """Plot mean accuracy vs N and unlearning operations vs N, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    runs = summary["runs"]
    methods = [m for m in ALL_METHODS if any(m in run["methods"] for run in runs)]
    figure, (accuracy_axis, cost_axis) = plt.subplots(1, 2, figsize=(12, 4.8))
    colors = plt.get_cmap("tab10").colors
    for method in methods:
        points = [(run["num_clients"], run["methods"][method]) for run in runs if method in run["methods"]]
        clients = [n for n, _ in points]
        style = {
            "marker": "o",
            "color": colors[ALL_METHODS.index(method) % len(colors)],
            "linewidth": 2.4 if method.startswith("sift_masks") else 1.3,
        }
        accuracy_axis.plot(clients, [100 * values["mean_accuracy"] for _, values in points], label=method, **style)

        costs = [(n, values["unlearning"]["operations"]) for n, values in points if values.get("unlearning")]
        costs = [(n, ops) for n, ops in costs if ops > 0]
        if costs:
            cost_axis.plot([n for n, _ in costs], [ops for _, ops in costs], label=method, **style)

    ticks = sorted({run["num_clients"] for run in runs})
    for axis in (accuracy_axis, cost_axis):
        axis.set_xscale("log")
        axis.set_xticks(ticks, [str(n) for n in ticks])
        axis.minorticks_off()
    accuracy_axis.set(xlabel="clients N", ylabel="mean accuracy on local test splits (%)")
    accuracy_axis.set_title(f"{summary['setting']}: accuracy vs number of clients")
    accuracy_axis.grid(True, alpha=0.3)
    cost_axis.set(yscale="log", xlabel="clients N", ylabel="operations to withdraw one client")
    cost_axis.set_title("exact unlearning cost (estimated operations)")
    cost_axis.grid(True, alpha=0.3)
    cost_axis.legend(fontsize=8, loc="upper left")
    accuracy_axis.legend(fontsize=8, loc="lower left")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def method_summary(accuracies: dict[str, float]) -> dict[str, Any]:
    """Return the mean and standard deviation of per-client accuracies (NaN scores are skipped)."""
    values = [value for value in accuracies.values() if not math.isnan(value)]
    if not values:
        return {"mean_accuracy": float("nan"), "std_accuracy": float("nan"), "clients_evaluated": 0}
    mean = sum(values) / len(values)
    variance = sum((value - mean) ** 2 for value in values) / len(values)
    return {"mean_accuracy": mean, "std_accuracy": math.sqrt(variance), "clients_evaluated": len(values)}
