"""Shared pieces of the benchmark suite: run sizes, the figure record and interleaved timing."""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

SIGN_SEED = 20250406


@dataclass(frozen=True)
class BenchConfig:
    """Sizes and repeat counts of one benchmark run.

    `model` is "minilm" (all 22.7M parameters of all-MiniLM-L6-v2 plus a 5-class head) or
    "mlp" (a small synthetic MLP for smoke runs). The residual workload uses that model's
    parameter layout.
    """

    quick: bool
    model: str
    step_batch_size: int
    step_max_length: int
    step_repeats: int
    num_clients: int
    stored_residuals: int
    unlearn_repeats: int
    removes_per_repeat: int
    tall_repeats: int
    tall_block: int
    rss_small_clients: int
    fast_repeats: int
    density_clients: int
    nominal_density: float = 0.55

    @classmethod
    def full(cls) -> BenchConfig:
        return cls(
            quick=False,
            model="minilm",
            step_batch_size=16,
            step_max_length=128,
            step_repeats=9,
            num_clients=500,
            stored_residuals=8,
            unlearn_repeats=3,
            removes_per_repeat=3,
            tall_repeats=1,
            tall_block=1 << 19,
            rss_small_clients=50,
            fast_repeats=9,
            density_clients=2,
        )

    @classmethod
    def reduced(cls) -> BenchConfig:
        return cls(
            quick=True,
            model="mlp",
            step_batch_size=64,
            step_max_length=0,
            step_repeats=5,
            num_clients=500,
            stored_residuals=4,
            unlearn_repeats=1,
            removes_per_repeat=3,
            tall_repeats=1,
            tall_block=1 << 18,
            rss_small_clients=50,
            fast_repeats=5,
            density_clients=0,
        )


@dataclass
class Figure:
    """One benchmark figure: a ratio against a reference measured in the same run.

    `comparison` is "<=" when the ratio must not exceed `target` and ">=" when it must
    reach it. `measured` contains the raw numbers behind the ratio (seconds, bytes).
    """

    name: str
    figure: str
    reference: str
    ratio: float
    target: float
    comparison: str
    passed: bool
    measured: dict[str, Any] = field(default_factory=dict)
    notes: str = ""

    @classmethod
    def compare(
        cls,
        name: str,
        figure: str,
        reference: str,
        ratio: float,
        target: float,
        comparison: str,
        decimals: int | None = None,
        **extra: Any,
    ) -> Figure:
        """Build a figure and decide `passed` from the ratio, the target and the comparison.

        With `decimals`, the ratio is rounded to that many decimals before the comparison,
        for targets written at that precision.
        """
        compared = ratio if decimals is None else round(ratio, decimals)
        if comparison == "<=":
            passed = compared <= target
        elif comparison == ">=":
            passed = compared >= target
        else:
            raise ValueError(f"comparison must be '<=' or '>=', got {comparison!r}")
        return cls(name, figure, reference, float(ratio), float(target), comparison, bool(passed), **extra)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "figure": self.figure,
            "reference": self.reference,
            "ratio": self.ratio,
            "target": self.target,
            "comparison": self.comparison,
            "passed": self.passed,
            "measured": self.measured,
            "notes": self.notes,
        }


def time_call(function: Callable[[], Any]) -> float:
    """Return the wall-clock seconds of one call, after a garbage collection outside the timing."""
    gc.collect()
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def interleaved_times(
    functions: dict[str, Callable[[], Any]],
    repeats: int,
    warmup: int = 1,
) -> dict[str, list[float]]:
    """Time each function `repeats` times, interleaved so that load drifts hit all alike.

    Returns the list of seconds per function name, in repeat order. The order within a
    round reverses every other round (A B, B A, ...), so neither function always runs
    first. `warmup` untimed rounds run first.
    """
    for _ in range(warmup):
        for function in functions.values():
            function()

    samples: dict[str, list[float]] = {name: [] for name in functions}
    names = list(functions)
    for repeat in range(repeats):
        for name in names if repeat % 2 == 0 else reversed(names):
            samples[name].append(time_call(functions[name]))
    return samples


def paired_ratio(numerators: list[float], denominators: list[float]) -> float:
    """Return the median over repeats of numerator / denominator, each pair measured side by side."""
    return median([n / d for n, d in zip(numerators, denominators, strict=True)])


def median(samples: list[float]) -> float:
    return float(statistics.median(samples))


def summary(samples: list[float]) -> dict[str, Any]:
    """Return the median, min, max and all samples of a list of seconds."""
    return {
        "median_s": median(samples),
        "min_s": float(min(samples)),
        "max_s": float(max(samples)),
        "samples_s": [float(s) for s in samples],
    }
