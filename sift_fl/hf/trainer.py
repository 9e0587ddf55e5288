"""SIFT under the Hugging Face `Trainer`: a callback that attaches the projection to its optimizer."""

from __future__ import annotations

import logging
from typing import Any

from transformers import TrainerCallback

from sift_fl.projection import SiftProjector

logger = logging.getLogger(__name__)


class SiftCallback(TrainerCallback):
    """Attach a `SiftProjector` to the optimizer that `Trainer` builds, for the whole training run.

    The projection runs as a step post-hook of the underlying torch optimizer (unwrapping
    Accelerate's `AcceleratedOptimizer`), so it runs after every optimizer step. With gradient
    accumulation there is one optimizer step per accumulation cycle, and the projection follows each.
    """

    def __init__(self, projector: SiftProjector) -> None:
        self.projector = projector
        self._handle: Any = None

    def on_train_begin(self, args: Any, state: Any, control: Any, optimizer: Any = None, **kwargs: Any) -> None:
        if optimizer is None:
            raise RuntimeError("Trainer passed no optimizer to the SIFT callback; cannot attach the projection")
        inner = getattr(optimizer, "optimizer", optimizer)
        self._handle = self.projector.attach(inner)
        logger.info("SIFT projection attached to %s", type(inner).__name__)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
