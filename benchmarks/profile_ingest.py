"""Stage profile of `MergeState.add`: seconds per NumPy step of its block loop.

cProfile attributes NumPy ufunc calls to their caller, so this script times each step of
the block loop with its own timer instead. Run `python -m benchmarks.profile_ingest`
(add `--quick` for the small MLP layout).

NOTE: the loop below mirrors `sift_fl.merge._accumulate_tensor` step by step, so it must
change when that function does.
"""

from __future__ import annotations

import argparse
import collections
import statistics
import sys
import time

import numpy as np

from benchmarks.common import SIGN_SEED, BenchConfig
from benchmarks.models import build_model_batch
from benchmarks.workload import synthetic_residual
from sift_fl.codec import EncodedResidual
from sift_fl.layout import ParameterLayout
from sift_fl.merge import _BLOCK, MergeState, _round_to_int64
from sift_fl.sign import SignVector


def profile_add(state: MergeState, residual: EncodedResidual, stages: collections.Counter[str]) -> None:
    """Add `residual` into `state` as `MergeState.add` does, adding each step's seconds to `stages`."""
    scale = 2.0**state.number_format.fraction_bits
    for spec in state.layout.tensors:
        started = time.perf_counter()
        mask, magnitude = state._checked_arrays("profile", residual, spec)
        stages["check: count set bits, min and max"] += time.perf_counter() - started

        sums, coverage = state.sums[spec.name], state.coverage[spec.name]
        packed_signs = state._packed_signs[spec.name]
        block = min(_BLOCK, spec.numel)
        dense, factor = np.empty(block, np.float32), np.empty(block, np.float32)
        wide, units = np.empty(block, np.float64), np.empty(block, np.int64)
        offset = 0
        for start in range(0, spec.numel, block):
            stop = min(start + block, spec.numel)
            size = stop - start
            clock = time.perf_counter()

            def lap(stage: str) -> None:
                nonlocal clock
                now = time.perf_counter()
                stages[stage] += now - clock
                clock = now

            bits = np.unpackbits(mask[start // 8 : (stop + 7) // 8], count=size).view(bool)
            lap("unpack mask bits")
            index = np.flatnonzero(bits)
            lap("flatnonzero of the mask")
            values = dense[:size]
            values.fill(0)
            values[index] = magnitude[offset : offset + index.size]
            offset += index.size
            lap("scatter magnitudes to coordinates")
            positive = np.unpackbits(packed_signs[start // 8 : (stop + 7) // 8], count=size).view(bool)
            np.multiply(positive, np.float32(2 * scale), out=factor[:size])
            np.subtract(factor[:size], np.float32(scale), out=factor[:size])
            np.multiply(values, factor[:size], out=values)
            lap("signs times 2**fraction_bits")
            _round_to_int64(values, wide[:size], units[:size])
            lap("round to int64")
            np.add(sums[start:stop], units[:size], out=sums[start:stop])
            lap("int64 sums +=")
            np.add(coverage[start:stop], bits, out=coverage[start:stop], casting="unsafe")
            lap("int32 coverage +=")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="use the small MLP layout")
    parser.add_argument("--repeats", type=int, default=5, help="number of profiled adds")
    arguments = parser.parse_args()

    config = BenchConfig.reduced() if arguments.quick else BenchConfig.full()
    layout = ParameterLayout.from_arrays(build_model_batch(config.model, 1, 8).theta0())
    residual = synthetic_residual(layout, config.nominal_density, seed=0)
    state = MergeState(layout, SignVector(SIGN_SEED, layout))
    state.add("warmup", residual)
    state.remove("warmup", residual)

    stages: collections.Counter[str] = collections.Counter()
    for _ in range(arguments.repeats):
        profile_add(state, residual, stages)
    accumulator = np.zeros(layout.num_parameters, np.float32)
    values = np.ones_like(accumulator)
    dense = []
    for _ in range(arguments.repeats):
        started = time.perf_counter()
        np.add(accumulator, values, out=accumulator)
        dense.append(time.perf_counter() - started)

    total = sum(stages.values()) / arguments.repeats
    lines = [f"MergeState.add stages, {layout.num_parameters} parameters, mean of {arguments.repeats} adds", ""]
    lines += ["| stage | ms | share |", "|---|---|---|"]
    for stage, seconds in stages.items():
        lines.append(f"| {stage} | {seconds / arguments.repeats * 1e3:.2f} | {seconds / arguments.repeats / total:.0%} |")
    lines.append(f"| total | {total * 1e3:.2f} | |")
    lines.append(f"\nnumpy acc += x on {layout.num_parameters} float32: median {statistics.median(dense) * 1e3:.2f} ms")
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
