"""ServerApp: admit clients once, merge exactly, serve masked models, unlearn on request."""

from __future__ import annotations

import time
from collections.abc import Mapping
from logging import INFO
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from sift_fl.flower.strategy import SiftMasksStrategy
from sift_fl.report import build_report, format_table, write_report
from sift_fl.run_spec import RunSpec, load_base_model


def parse_client_ids(value: Any) -> list[str]:
    """Parse a comma-separated list of client ids ("" gives none)."""
    return [part.strip() for part in str(value).split(",") if part.strip()]


def run_server(grid: Grid, run_config: Mapping[str, Any], run_id: int = 0) -> dict[str, Any]:
    """Run the one-shot SIFT-Masks protocol and write the report; return the report."""
    spec = RunSpec.from_config({**run_config, "num-partitions": run_config.get("num-clients", RunSpec.num_partitions)})
    num_clients = int(run_config.get("num-clients", spec.num_partitions))
    base = load_base_model(spec)
    strategy = SiftMasksStrategy(
        spec,
        base,
        min_clients=num_clients,
        withdraw=parse_client_ids(run_config.get("withdraw", "")),
        node_wait_seconds=float(run_config.get("node-wait-seconds", 600)),
    )

    started = time.perf_counter()
    strategy.start(grid, num_rounds=int(run_config.get("rounds", 1)), timeout=float(run_config.get("timeout", 3600)))
    report = build_report(
        spec.setting,
        num_clients,
        strategy.train_metrics,
        strategy.evaluations,
        [w.__dict__ for w in strategy.withdrawals],
        strategy.failures,
        extra={
            "merged_clients": sorted(strategy.merge.members, key=lambda c: (len(c), c)),
            "merge_digest": strategy.merge.digest(),
            "layout_digest": base.layout_digest,
            "base_digest": base.base_digest,
            "trainable_parameters": base.layout.num_parameters,
            "run_spec": spec.to_config(),
            "seconds": time.perf_counter() - started,
        },
    )

    path = str(run_config.get("report", "")) or str(Path.home() / "sift-fl-reports" / f"report-{run_id}.json")
    write_report(report, path)
    for line in format_table(report).splitlines():
        log(INFO, "%s", line)
    log(INFO, "Report written to %s", path)
    return report


def make_server_app(overrides: Mapping[str, Any] | None = None) -> ServerApp:
    """Return a ServerApp whose run config is the app's run config updated with `overrides`."""
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        run_server(grid, {**dict(context.run_config), **dict(overrides or {})}, context.run_id)

    return server_app


app = make_server_app()
