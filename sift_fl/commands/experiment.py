"""`sift-fl experiment`: every method on the same clients for several client counts, with unlearning costs."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from sift_fl.settings import SETTING_NAMES


def _parse_ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 1,10,50, got {text!r}") from error
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"client counts must be positive integers, got {text!r}")
    return values


def _parse_floats(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers such as 0.2,0.4, got {text!r}") from error
    if not values:
        raise argparse.ArgumentTypeError("expected at least one number")
    return values


def experiment(args: argparse.Namespace) -> int:
    """Run the experiment, print the accuracy and unlearning tables and name the output files."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from sift_fl.experiment import ExperimentConfig, parse_methods, run_experiment

    torch.set_num_threads(args.threads)
    try:
        methods = parse_methods(args.methods)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    setting_options: dict[str, Any] = {"classes_per_client": args.classes_per_client}
    if args.setting == "fmnist":
        setting_options["pretrained"] = not args.random_base
    elif args.random_base:
        print(f"note: --random-base only changes fmnist; {args.setting} keeps its own θ0", file=sys.stderr)

    config = ExperimentConfig(
        setting=args.setting,
        clients=args.clients,
        out=Path(args.out),
        methods=methods,
        setting_options=setting_options,
        model_seed=args.model_seed,
        data_seed=args.data_seed,
        sign_seed=args.sign_seed,
        steps=args.steps,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        ties_density=args.ties_density,
        ties_scale=args.ties_scale,
        tall_lambdas=args.tall_lambdas,
        central_epochs=args.central_epochs,
        withdraw_client=args.withdraw,
        keep_residuals=args.keep_residuals,
    )
    summary = run_experiment(config)
    print(format_summary(summary))
    names = ("results.csv", "per_client.csv", "scale.png", "summary.json")
    print("outputs: " + ", ".join(str(config.out / name) for name in names))
    return 0


def format_summary(summary: dict[str, Any]) -> str:
    """Return mean accuracy per method and N, then the unlearning cost at the largest N, as text tables."""
    methods = summary["methods"]
    runs = summary["runs"]
    width = max(len(m) for m in methods) + 2
    lines = [f"Mean accuracy on local test splits ({summary['setting']})", f"{'method':<{width}}" + "".join(f"{'N=' + str(r['num_clients']):>10}" for r in runs)]
    for method in methods:
        cells = [f"{100 * r['methods'][method]['mean_accuracy']:>10.1f}" if method in r["methods"] else f"{'-':>10}" for r in runs]
        lines.append(f"{method:<{width}}" + "".join(cells))

    last = runs[-1]
    lines += ["", f"Withdrawing client {last['withdrawn_client']} of N={last['num_clients']}", f"{'method':<{width}}{'seconds':>12}{'operations':>16}{'vs sift_masks':>15}{'bit-exact':>11}"]
    for method in methods:
        cost = last["methods"].get(method, {}).get("unlearning")
        if cost:
            ratio = cost.get("operations_ratio_vs_sift_masks")
            shown = "-" if ratio is None else f"{ratio:.3g}x"
            exact = "-" if cost["bit_exact"] is None else str(cost["bit_exact"])
            lines.append(f"{method:<{width}}{cost['seconds']:>12.4f}{cost['operations']:>16.3e}{shown:>15}{exact:>11}")
    return "\n".join(lines)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `experiment` command."""
    parser = subparsers.add_parser(
        "experiment",
        help="compare all methods' accuracy and unlearning cost for several client counts (in-process)",
    )
    parser.add_argument("--setting", choices=SETTING_NAMES, default="fmnist", help="data set and model (default: fmnist)")
    parser.add_argument("--clients", type=_parse_ints, default=(1, 10, 50, 100, 200, 500), help="comma-separated client counts N (default: 1,10,50,100,200,500)")
    parser.add_argument("--methods", default="all", help="comma-separated methods, or all (default: all)")
    parser.add_argument("--out", required=True, help="output directory for results.csv, per_client.csv, scale.png and summary.json")
    parser.add_argument("--random-base", action="store_true", help="fmnist: start from the random θ0 instead of the pretrained one")
    parser.add_argument("--classes-per-client", type=int, default=2, help="label skew: classes per client (default: 2)")
    parser.add_argument("--steps", type=int, default=0, help="local optimizer steps (0: the setting's default)")
    parser.add_argument("--batch-size", type=int, default=0, help="local batch size (0: the setting's default)")
    parser.add_argument("--learning-rate", type=float, default=0.0, help="local learning rate (0: the setting's default)")
    parser.add_argument("--ties-density", type=float, default=0.2, help="TIES: fraction of largest magnitudes kept per tensor (default: 0.2)")
    parser.add_argument("--ties-scale", type=float, default=1.0, help="TIES: scaling λ of the merged residual (default: 1.0)")
    parser.add_argument("--tall-lambdas", type=_parse_floats, default=(0.2, 0.3, 0.4, 0.5, 0.6), help="TALL: candidate thresholds λ (default: 0.2,0.3,0.4,0.5,0.6)")
    parser.add_argument("--central-epochs", type=float, default=1.0, help="central reference: passes over the union of the training data (default: 1)")
    parser.add_argument("--withdraw", type=int, default=0, help="index of the client whose withdrawal is measured (default: 0)")
    parser.add_argument("--model-seed", type=int, default=0, help="seed of θ0")
    parser.add_argument("--data-seed", type=int, default=0, help="seed of the partition, the validation splits and the batches")
    parser.add_argument("--sign-seed", type=int, default=20250406, help="public seed of the sign vector")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: 1)")
    parser.add_argument("--keep-residuals", action="store_true", help="keep the per-client residual files under OUT/residuals")
    parser.set_defaults(handler=experiment)
