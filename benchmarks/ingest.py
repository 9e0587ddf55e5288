"""Residual ingest into the exact accumulator against a dense float32 `acc += x` of the same size."""

from __future__ import annotations

import logging

import numpy as np

from benchmarks.common import BenchConfig, Figure, interleaved_times, median, paired_ratio, summary, time_call
from benchmarks.workload import ResidualFiles
from sift_fl.merge import MergeState

logger = logging.getLogger(__name__)

TARGET = 0.5


def measure_ingest(files: ResidualFiles, config: BenchConfig) -> Figure:
    """Time `MergeState.add` of one stored residual against `acc += x` over P float32 values.

    The ratio is a throughput ratio, t(acc += x) / t(add), for the same number of
    parameters. Each timed add is undone by an untimed remove, so every add sees the same
    state. Reading and validating the file is timed separately.
    """
    client_id = files.client_ids[0]
    residual = files.load(client_id)
    state = MergeState(files.layout, files.sign_vector)
    state.add(client_id, residual)  # touches every page of the sums before timing
    state.remove(client_id, residual)

    size = files.layout.num_parameters
    generator = np.random.default_rng(0)
    accumulator = np.zeros(size, dtype=np.float32)
    values = generator.random(size, dtype=np.float32)

    def dense_add() -> None:
        np.add(accumulator, values, out=accumulator)

    def ingest() -> None:
        state.add(client_id, residual)

    def undo() -> None:
        state.remove(client_id, residual)

    samples: dict[str, list[float]] = {"dense": [], "ingest": []}
    for repeat in range(config.fast_repeats):
        order = ["dense", "ingest"] if repeat % 2 == 0 else ["ingest", "dense"]
        times = interleaved_times({name: {"dense": dense_add, "ingest": ingest}[name] for name in order}, 1, warmup=0)
        undo()
        for name, seconds in times.items():
            samples[name].extend(seconds)
    load = [time_call(lambda: files.load(client_id)) for _ in range(config.fast_repeats)]

    dense, added = median(samples["dense"]), median(samples["ingest"])
    logger.info("ingest: add %.4fs, dense add %.4fs", added, dense)
    return Figure.compare(
        "ingest_throughput",
        "MergeState.add of one residual (quantize + int64 sums + int32 coverage)",
        "numpy acc += x on dense float32 of the same size",
        paired_ratio(samples["dense"], samples["ingest"]),
        TARGET,
        ">=",
        measured={
            "num_parameters": size,
            "density": residual.density(),
            "dense_add": summary(samples["dense"]),
            "merge_add": summary(samples["ingest"]),
            "read_and_validate_file": summary(load),
        },
        notes=(
            "ratio = median over repeats of t(acc += x) / t(add), each pair run back to back; "
            "read_and_validate_file is not part of the ratio"
        ),
    )
