"""ServerApp: admit clients once, merge exactly into a durable store, serve masked models, unlearn on request."""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from logging import INFO
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from sift_fl.flower.strategy import SiftMasksStrategy
from sift_fl.report import build_report, format_table, write_report
from sift_fl.run_spec import BaseModel, RunSpec, load_base_model
from sift_fl.store import MergeStore, StoreIdentity, content_digest


def parse_flag(value: Any, key: str) -> bool:
    """Parse a boolean run config value (a TOML bool, or "true"/"false").

    Raises
    ------
    ValueError
        If the value is neither, naming the key.
    """
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no", ""):
        return False
    raise ValueError(f"run config key {key} must be true or false, got {value!r}")


def parse_client_ids(value: Any) -> list[str]:
    """Parse a comma-separated list of client ids ("" gives none), dropping repeats."""
    ids = [part.strip() for part in str(value).split(",") if part.strip()]
    return list(dict.fromkeys(ids))


@contextmanager
def open_store(run_config: Mapping[str, Any], spec: RunSpec, base: BaseModel) -> Iterator[MergeStore]:
    """Open (or create) the store at the `store-dir` run config key; an empty key gives a temporary store.

    Raises
    ------
    ValueError
        If `store-dir` is a relative path: Flower runs the ServerApp from an installed copy
        of the app, so a relative path would not point where the operator expects.
    """
    store_dir = str(run_config.get("store-dir", "")).strip()
    identity = StoreIdentity(base.layout, base.base_digest, spec.sign_seed)
    if not store_dir:
        with tempfile.TemporaryDirectory(prefix="sift-fl-store-") as temporary:
            log(INFO, "No store-dir in the run config: using a temporary store at %s, deleted after the run", temporary)
            with MergeStore.create(temporary, identity, spec.to_config()) as store:
                yield store
        return

    if not os.path.isabs(store_dir):
        raise ValueError(f"store-dir must be an absolute path, got {store_dir!r}; the ServerApp does not run from the project directory")
    with MergeStore.open_or_create(store_dir, identity, spec.to_config()) as store:
        yield store


def run_server(grid: Grid, run_config: Mapping[str, Any], run_id: int = 0) -> dict[str, Any]:
    """Run the one-shot SIFT-Masks protocol and write the report; return the report."""
    spec = RunSpec.from_config({**run_config, "num-partitions": run_config.get("num-clients", RunSpec.num_partitions)})
    num_clients = int(run_config.get("num-clients", spec.num_partitions))
    base = load_base_model(spec)
    with open_store(run_config, spec, base) as store:
        strategy = SiftMasksStrategy(
            spec,
            base,
            store,
            min_clients=num_clients,
            withdraw=parse_client_ids(run_config.get("withdraw", "")),
            node_wait_seconds=float(run_config.get("node-wait-seconds", 600)),
            bind_node_keys=parse_flag(run_config.get("bind-node-keys", False), "bind-node-keys"),
        )
        started = time.perf_counter()
        strategy.start(grid, num_rounds=int(run_config.get("rounds", 1)), timeout=float(run_config.get("timeout", 3600)))
        report = _report(strategy, spec, base, num_clients, str(run_config.get("store-dir", "")), time.perf_counter() - started)

    path = str(run_config.get("report", "")) or str(Path.home() / "sift-fl-reports" / f"report-{run_id}.json")
    write_report(report, path)
    for line in format_table(report).splitlines():
        log(INFO, "%s", line)
    log(INFO, "Report written to %s", path)
    return report


def _report(strategy: SiftMasksStrategy, spec: RunSpec, base: BaseModel, num_clients: int, store_dir: str, seconds: float) -> dict[str, Any]:
    store = strategy.store
    return build_report(
        spec.setting,
        num_clients,
        strategy.train_metrics,
        strategy.evaluations,
        [w.__dict__ for w in strategy.withdrawals],
        strategy.failures,
        extra={
            "merged_clients": sorted(store.members, key=lambda c: (len(c), c)),
            "withdrawn_clients": sorted(store.withdrawn, key=lambda c: (len(c), c)),
            "merge_digest": store.state.digest(),
            "store_dir": store_dir,
            "store_content_digest": content_digest(store),
            "node_key_bindings": sorted(store.node_keys(), key=lambda c: (len(c), c)),
            "rejected_nodes": [r.__dict__ for r in strategy.nodes.rejections],
            "own_masks_sent": sorted(strategy.own_masks_sent, key=lambda c: (len(c), c)),
            "layout_digest": base.layout_digest,
            "base_digest": base.base_digest,
            "trainable_parameters": base.layout.num_parameters,
            "run_spec": spec.to_config(),
            "seconds": seconds,
        },
    )


def make_server_app(overrides: Mapping[str, Any] | None = None) -> ServerApp:
    """Return a ServerApp whose run config is the app's run config updated with `overrides`."""
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        run_server(grid, {**dict(context.run_config), **dict(overrides or {})}, context.run_id)

    return server_app


app = make_server_app()
