"""The run report: per-client accuracies per method, their means and the withdrawals."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

METHODS = ("local", "local_sift", "ft_merge", "sift_merge", "sift_masks", "sift_masks_coverage")
METRIC_KEYS = {method: "accuracy-" + method.replace("_", "-") for method in METHODS}


def build_report(
    setting: str,
    num_clients: int,
    train_metrics: dict[str, dict[str, float]],
    evaluations: dict[str, dict[str, dict[str, Any]]],
    withdrawals: list[dict[str, Any]],
    failures: list[dict[str, str]],
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Assemble the JSON report from the strategy's per-client results."""
    merged = evaluations.get("merged", {})
    # A withdrawal the client requested at the start of the run precedes the "merged" evaluation, so
    # without a run-config withdrawal phase, that evaluation is the one after every withdrawal.
    after = evaluations.get("after-withdrawal", merged)
    clients = []
    for client_id in sorted(set(train_metrics) | set(merged), key=_client_sort_key):
        row = merged.get(client_id, {})
        clients.append(
            {
                "client": client_id,
                "served": row.get("served"),
                "accuracy": {m: row[k] for m, k in METRIC_KEYS.items() if k in row},
                **{k.replace("-", "_"): v for k, v in train_metrics.get(client_id, {}).items()},
            }
        )

    # Means cover the clients served through their own mask. A client withdrawn before this
    # evaluation is served the unmasked merge, so it is reported under `withdrawals` instead.
    served_masked = [row for row in merged.values() if row.get("served") != "unmasked"]
    methods = {}
    for method, key in METRIC_KEYS.items():
        values = [row[key] for row in served_masked if key in row and not math.isnan(row[key])]
        if values:
            methods[method] = {"mean_accuracy": sum(values) / len(values), "clients": len(values)}

    withdrawal_rows = []
    for withdrawal in withdrawals:
        row = after.get(withdrawal["client"], {})
        withdrawal_rows.append(
            {
                **withdrawal,
                "served_after": row.get("served"),
                "accuracy_after": {m: row[k] for m, k in METRIC_KEYS.items() if k in row},
            }
        )

    return {
        "setting": setting,
        "num_clients": num_clients,
        "clients": clients,
        "methods": methods,
        "withdrawals": withdrawal_rows,
        "failures": failures,
        **(extra or {}),
    }


def _client_sort_key(client_id: str) -> tuple[int, int | str]:
    return (0, int(client_id)) if client_id.isdigit() else (1, client_id)


def format_table(report: dict[str, Any]) -> str:
    """Return the report as a plain-text table: one row per client, then the means and withdrawals."""
    methods = [m for m in METHODS if m in report["methods"]]
    header = f"{'client':>8} " + " ".join(f"{m:>20}" for m in methods)
    lines = ["Accuracy on each client's local test split", header, "-" * len(header)]
    unmasked = False
    for client in report["clients"]:
        cells = [f"{client['accuracy'][m]:>20.3f}" if m in client["accuracy"] else f"{'-':>20}" for m in methods]
        label = client["client"] + ("*" if client.get("served") == "unmasked" else "")
        unmasked = unmasked or client.get("served") == "unmasked"
        lines.append(f"{label:>8} " + " ".join(cells))
    lines.append("-" * len(header))
    lines.append(f"{'mean':>8} " + " ".join(f"{report['methods'][m]['mean_accuracy']:>20.3f}" for m in methods))
    if unmasked:
        lines.append("* withdrawn before this evaluation: served the unmasked merge, left out of the means")

    for withdrawal in report["withdrawals"]:
        accuracy = withdrawal.get("accuracy_after", {}).get("sift_masks")
        shown = "n/a" if accuracy is None else f"{accuracy:.3f}"
        lines.append(
            f"withdrew client {withdrawal['client']}: unmerge took {withdrawal['seconds'] * 1e3:.2f} ms, "
            f"bit-exact vs from-scratch merge of the retain set: {withdrawal['bit_exact']}, "
            f"now served {withdrawal.get('served_after')} merge (accuracy {shown})"
        )
    for failure in report["failures"]:
        lines.append(f"FAILED node {failure['node']} (client {failure['client']}): {failure['reason']}")
    return "\n".join(lines)


def write_report(report: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write the report as JSON through a temporary file and an atomic rename."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(target.name + ".tmp")
    temporary.write_text(json.dumps(report, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    os.replace(temporary, target)
    return target


def report_problems(report: dict[str, Any], expected_clients: int) -> list[str]:
    """Return what makes a run a failure: clients not merged, failed replies, inexact withdrawals.

    Flower exits normally even when every client failed, so callers check the report instead.
    """
    problems = []
    # A client withdrawn in this run or an earlier run on the same store was merged at some point.
    withdrawn = set(report.get("withdrawn_clients", [])) | {
        w["client"] for w in report.get("withdrawals", []) if w.get("status") == "withdrawn"
    }
    merged = len(set(report.get("merged_clients", [])) | withdrawn)
    if merged < expected_clients:
        problems.append(f"only {merged} of {expected_clients} clients were merged")
    for failure in report.get("failures", []):
        problems.append(f"node {failure['node']} (client {failure['client']}) failed: {failure['reason']}")
    for withdrawal in report.get("withdrawals", []):
        if not withdrawal.get("bit_exact"):
            problems.append(f"withdrawal of client {withdrawal['client']} was not bit-exact")
    return problems
