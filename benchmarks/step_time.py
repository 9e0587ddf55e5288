"""Training step time with the SIFT projection against the same step without it."""

from __future__ import annotations

import logging

import torch
from torch import nn

from benchmarks.common import SIGN_SEED, BenchConfig, Figure, interleaved_times, median, paired_ratio, summary, time_call
from benchmarks.models import ModelBatch
from sift_fl.layout import ParameterLayout
from sift_fl.projection import SiftProjector
from sift_fl.sign import SignVector

logger = logging.getLogger(__name__)

LEARNING_RATE = 3e-4
TARGET = 1.03


def measure_step_time(batch: ModelBatch, config: BenchConfig) -> Figure:
    """Time Adam steps on one model and batch, alternating steps with and without the projection."""
    parameters = batch.parameters()
    layout = ParameterLayout.from_arrays(parameters)
    projector = SiftProjector(parameters, SignVector(SIGN_SEED, layout))
    optimizer = torch.optim.Adam(list(parameters.values()), lr=LEARNING_RATE)
    loss_fn = nn.CrossEntropyLoss()
    batch.model.train()

    def plain_step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss_fn(batch.model(*batch.inputs), batch.labels).backward()
        optimizer.step()

    def sift_step() -> None:
        handle = projector.attach(optimizer)
        try:
            plain_step()
        finally:
            handle.remove()

    logger.info("step time: %d interleaved repeats of %s", config.step_repeats, batch.description)
    samples = interleaved_times({"plain": plain_step, "sift": sift_step}, config.step_repeats, warmup=2)
    projection = [time_call(projector.project) for _ in range(config.step_repeats)]

    plain = median(samples["plain"])
    return Figure.compare(
        "step_time",
        "SIFT training step (Adam step + projection)",
        "the same step without projection",
        paired_ratio(samples["sift"], samples["plain"]),
        TARGET,
        "<=",
        measured={
            "model": batch.description,
            "num_parameters": layout.num_parameters,
            "optimizer": f"Adam lr {LEARNING_RATE}",
            "plain_step": summary(samples["plain"]),
            "sift_step": summary(samples["sift"]),
            "projection_only": summary(projection),
            "projection_share_of_plain_step": median(projection) / plain,
        },
        notes=(
            "ratio = median over repeats of t(sift) / t(plain), each pair run back to back; "
            "projection_only times SiftProjector.project() alone on the same parameters"
        ),
    )
