"""Serving: materialising θ0 + m_c ⊙ τ̄ for one client against copying θ0."""

from __future__ import annotations

import logging

import numpy as np

from benchmarks.common import BenchConfig, Figure, interleaved_times, median, paired_ratio, summary, time_call
from benchmarks.workload import ResidualFiles
from sift_fl.merge import apply_residual

logger = logging.getLogger(__name__)

TARGET = 3.0


def measure_serving(theta0: dict[str, np.ndarray], files: ResidualFiles, config: BenchConfig) -> Figure:
    """Time `apply_residual(θ0, τ̄, m_c)` against a copy of θ0, interleaved.

    τ̄ is a random float32 mean and m_c the unpacked mask of one stored residual.
    Unpacking the client's packed mask is timed separately.
    """
    residual = files.load(files.client_ids[0])
    generator = np.random.default_rng(1)
    mean = {name: generator.standard_normal(values.shape, dtype=np.float32) * 1e-3 for name, values in theta0.items()}

    def unpack() -> dict[str, np.ndarray]:
        return {spec.name: residual.unpacked_mask(spec.name, spec.numel) for spec in files.layout.tensors}

    masks = unpack()

    def copy_base() -> dict[str, np.ndarray]:
        return {name: values.copy() for name, values in theta0.items()}

    def serve() -> dict[str, np.ndarray]:
        return apply_residual(theta0, mean, masks)

    samples = interleaved_times({"copy": copy_base, "serve": serve}, config.fast_repeats)
    unpacking = [time_call(unpack) for _ in range(config.fast_repeats)]

    copied, served = median(samples["copy"]), median(samples["serve"])
    logger.info("serving: apply_residual %.4fs, copy %.4fs", served, copied)
    return Figure.compare(
        "serving",
        "apply_residual(θ0, τ̄, m_c): θ0 + m_c ⊙ τ̄",
        "copying θ0",
        paired_ratio(samples["serve"], samples["copy"]),
        TARGET,
        "<=",
        measured={
            "num_parameters": files.layout.num_parameters,
            "copy": summary(samples["copy"]),
            "apply_residual": summary(samples["serve"]),
            "unpack_mask": summary(unpacking),
        },
        notes=(
            "ratio = median over repeats of t(apply_residual) / t(copy), each pair run back to back; "
            "the mask is passed unpacked, as apply_residual takes it, and unpack_mask is the extra cost from packed bits"
        ),
    )
