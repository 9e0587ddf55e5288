"""Command-line interface `sift-fl`; each command lives in its own module under `sift_fl.commands`."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# Modules under sift_fl.commands; each defines register(subparsers) and sets a `handler`.
COMMAND_MODULES = ("simulate", "store", "experiment")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sift-fl", description="Exact unlearning for federated finetuning with SIFT-Masks on Flower.")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(f"sift_fl.commands.{name}").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    package_logger = logging.getLogger("sift_fl")
    package_logger.addHandler(handler)
    package_logger.setLevel(logging.INFO)

    args = build_parser().parse_args(argv)
    return int(args.handler(args))


if __name__ == "__main__":
    sys.exit(main())
