"""`sift-fl simulate`: run the Flower app in the Simulation Engine and print the report."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
from pathlib import Path

from sift_fl.settings import SETTING_NAMES


def _simulation_environment() -> None:
    # Keep Ray on the loopback interface, without usage reporting, and load models offline.
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def simulate(args: argparse.Namespace) -> int:
    """Run the app with `args.clients` simulated SuperNodes and print the report table."""
    _simulation_environment()
    from flwr.simulation import run_simulation

    from clients.app import make_client_app
    from server.app import make_server_app, parse_client_ids
    from sift_fl.report import format_table, report_problems

    if args.clients < 1:
        raise SystemExit(f"error: --clients must be at least 1, got {args.clients}")
    _check_withdraw_ids(args)
    report_path = Path(args.report or Path(tempfile.mkdtemp(prefix="sift-fl-")) / "report.json").resolve()
    if report_path.exists():
        report_path.unlink()

    overrides = {
        "setting": args.setting,
        "num-clients": args.clients,
        "withdraw": args.withdraw,
        "report": str(report_path),
        "sign-seed": args.sign_seed,
        "data-seed": args.data_seed,
        "steps": args.steps,
        "baselines": not args.no_baselines,
        "classes-per-client": args.classes_per_client,
        "store-dir": str(Path(args.store).resolve()) if args.store else "",
    }
    if args.setting == "bbc":
        overrides["mode"] = args.mode
        overrides["trainable-layers"] = args.trainable_layers
        overrides["max-length"] = args.max_length
        _prepare_bbc_cache(args)

    backend_config = {
        "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
        "init_args": {"num_cpus": args.workers, "include_dashboard": False, "logging_level": logging.WARNING},
    }
    run_simulation(
        server_app=make_server_app(overrides),
        client_app=make_client_app(parse_client_ids(args.client_withdraw), Path(args.client_state).resolve() if args.client_state else None),
        num_supernodes=args.clients,
        backend_config=backend_config,
    )

    if not report_path.exists():
        print(f"error: the simulation wrote no report at {report_path}; see the Flower log above", file=sys.stderr)
        return 1
    report = json.loads(report_path.read_text(encoding="utf-8"))
    print(format_table(report))
    print(f"report: {report_path}")

    problems = report_problems(report, args.clients)
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    if problems:
        return 1
    return 0


def _check_withdraw_ids(args: argparse.Namespace) -> None:
    # Without a store, only this run's clients (partition ids 0..N-1) can be withdrawn: fail before training.
    from server.app import parse_client_ids

    if args.store:
        return
    valid = {str(i) for i in range(args.clients)}
    for option, value in (("--withdraw", args.withdraw), ("--client-withdraw", getattr(args, "client_withdraw", ""))):
        unknown = [client for client in parse_client_ids(value) if client not in valid]
        if unknown:
            raise SystemExit(
                f"error: {option} names clients {', '.join(unknown)}, but a run with --clients {args.clients} "
                f"has clients 0 to {args.clients - 1}; pass --store DIR to withdraw clients merged in an earlier run"
            )


def _prepare_bbc_cache(args: argparse.Namespace) -> None:
    # Compute the frozen-layer features once here, with a progress bar, before clients start.
    from sift_fl.settings.bbc import BbcSetting

    BbcSetting(trainable_layers=args.trainable_layers, max_length=args.max_length, mode=args.mode).frozen_features()


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `simulate` command."""
    parser = subparsers.add_parser("simulate", help="run the Flower app in the Simulation Engine")
    parser.add_argument("--setting", choices=SETTING_NAMES, default="bbc", help="data set and model (default: bbc)")
    parser.add_argument("--clients", type=int, default=20, help="number of simulated clients (default: 20)")
    parser.add_argument("--withdraw", default="", help="comma-separated client ids to unmerge after merging, e.g. 0 or 0,3")
    parser.add_argument(
        "--store", default="", help="merge store directory, kept across runs (default: a temporary store deleted after the run)"
    )
    parser.add_argument(
        "--client-withdraw", default="", help="comma-separated client ids whose ClientApp asks the server to unmerge it"
    )
    parser.add_argument(
        "--client-state",
        default="",
        help="directory where each simulated client keeps its residual between runs, in a subdirectory named by its client id "
        "(default: clients keep it for one run only)",
    )
    parser.add_argument("--report", default="", help="path of the JSON report (default: a new temporary directory)")
    parser.add_argument("--sign-seed", type=int, default=20250406, help="public seed of the sign vector")
    parser.add_argument("--data-seed", type=int, default=0, help="seed of the partition and the local splits")
    parser.add_argument("--steps", type=int, default=0, help="local optimizer steps (0: the setting's default)")
    parser.add_argument("--classes-per-client", type=int, default=2, help="labels in each client's partition (label skew)")
    parser.add_argument(
        "--mode",
        choices=("head", "top-layers", "lora"),
        default="top-layers",
        help="bbc: trainable set: the head only, the top encoder layers and the head, or LoRA (frozen shared A) and the head",
    )
    parser.add_argument("--trainable-layers", type=int, default=1, help="bbc: number of top encoder layers trained")
    parser.add_argument("--max-length", type=int, default=128, help="bbc: tokens per article")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="CPU cores for simulated clients (default: all cores)")
    parser.add_argument("--no-baselines", action="store_true", help="skip plain finetuning (FT+Merge baseline)")
    parser.set_defaults(handler=simulate)
