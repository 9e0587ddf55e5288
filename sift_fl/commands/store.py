"""Operator commands on a merge store: `status`, `verify`, `withdraw` and `export`."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from sift_fl.store import MergeStore, StoreError, UnknownClientError, content_digest, describe_format, verify_store


def _open(args: argparse.Namespace) -> MergeStore:
    return MergeStore.open(Path(args.store).resolve())


def _error(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 1


def _utc(seconds: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(seconds))


def store_status(store: MergeStore) -> dict[str, Any]:
    """Return the store's clients, withdrawals, digests, number format and size on disk."""
    identity = store.identity
    with store.reading():
        state = store.state
        clients = store.clients
        files = [path for path in store.directory.rglob("*") if path.is_file()]
        return {
            "store": str(store.directory),
            "generation": store.generation,
            "clients": [
                {"client": row.client_id, "density": row.density, "bytes": row.nbytes, "joined_utc": _utc(row.joined_at)}
                for row in sorted(clients.values(), key=lambda row: row.client_id)
            ],
            "withdrawn": [{"client": c, "withdrawn_utc": _utc(t)} for c, t in sorted(store.withdrawn.items())],
            "layout_digest": identity.layout_digest,
            "base_digest": identity.base_digest,
            "sign_seed": identity.sign_seed,
            "trainable_parameters": identity.layout.num_parameters,
            "number_format": describe_format(identity.number_format),
            "accumulator_digest": state.digest(),
            "content_digest": content_digest(store),
            "size_bytes": sum(path.stat().st_size for path in files),
            "files": len(files),
            "setting": store.run_spec.get("setting", ""),
        }


def status(args: argparse.Namespace) -> int:
    """Print the store's clients, density per client, size on disk and digests."""
    try:
        with _open(args) as store:
            summary = store_status(store)
    except StoreError as error:
        return _error(str(error))

    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(f"store: {summary['store']} (setting {summary['setting'] or 'unknown'}, generation {summary['generation']})")
    print(f"clients merged: {len(summary['clients'])}")
    print(f"clients withdrawn: {len(summary['withdrawn'])} {[w['client'] for w in summary['withdrawn']]}")
    print(f"size on disk: {summary['size_bytes']:,} bytes in {summary['files']} files")
    print(f"number format: {summary['number_format']}")
    for key in ("layout_digest", "base_digest", "sign_seed", "accumulator_digest", "content_digest"):
        print(f"{key.replace('_', ' ')}: {summary[key]}")
    if summary["clients"]:
        print(f"{'client':>12} {'density':>8} {'bytes':>10}  joined (UTC)")
        for row in summary["clients"]:
            print(f"{row['client']:>12} {row['density']:>8.3f} {row['bytes']:>10,}  {row['joined_utc']}")
    return 0


def verify(args: argparse.Namespace) -> int:
    """Recompute the merge from the stored residuals and compare with the accumulator; exit 0 only on a match."""
    try:
        with _open(args) as store:
            report = verify_store(store)
    except StoreError as error:
        return _error(f"verification failed: {error}")

    for line in report.checks:
        print(f"ok: {line}")
    for line in report.problems:
        print(f"FAILED: {line}")
    print("verify: store is consistent" if report.ok else f"verify: {len(report.problems)} problems found")
    return 0 if report.ok else 1


def withdraw(args: argparse.Namespace) -> int:
    """Unmerge one client; a second withdrawal is a no-op, an unknown id exits 1."""
    try:
        with _open(args) as store:
            outcome = store.withdraw(args.client_id)
            check = verify_store(store)
    except (UnknownClientError, StoreError) as error:
        return _error(str(error))

    print(outcome.message)
    if outcome.status == "withdrawn":
        print(f"unmerge took {outcome.seconds * 1e3:.2f} ms; store verified: {check.ok}")
    return 0 if check.ok else 1


def export(args: argparse.Namespace) -> int:
    """Write the model served to one client (θ0 + m_c ⊙ τ̄) in the model's own format."""
    from sift_fl.store.export import export_served_model

    try:
        with _open(args) as store:
            result = export_served_model(store, args.client, Path(args.out).resolve(), args.allow_unmasked)
    except StoreError as error:
        return _error(str(error))

    print(f"exported the {result.served} model of client {args.client} to {result.directory}: {', '.join(result.files)}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `status`, `verify`, `withdraw` and `export` commands."""
    store_help = "store directory (the server's store-dir)"

    parser = subparsers.add_parser("status", help="show a store's clients, densities, size on disk and digests")
    parser.add_argument("--store", required=True, help=store_help)
    parser.add_argument("--json", action="store_true", help="print the status as JSON")
    parser.set_defaults(handler=status)

    parser = subparsers.add_parser("verify", help="recompute the merge from the stored residuals and compare bit for bit")
    parser.add_argument("--store", required=True, help=store_help)
    parser.set_defaults(handler=verify)

    parser = subparsers.add_parser("withdraw", help="unmerge a client and delete its residual and mask")
    parser.add_argument("--store", required=True, help=store_help)
    parser.add_argument("client_id", metavar="CLIENT_ID", help="stable client id (node config client-id or partition id)")
    parser.set_defaults(handler=withdraw)

    parser = subparsers.add_parser("export", help="write the model served to one client in the model's own format")
    parser.add_argument("--store", required=True, help=store_help)
    parser.add_argument("--client", required=True, help="client id whose served model to write")
    parser.add_argument("--out", required=True, help="output directory (created if missing)")
    parser.add_argument(
        "--allow-unmasked", action="store_true", help="for a withdrawn or unknown client, export θ0 + τ̄ without a mask"
    )
    parser.set_defaults(handler=export)
