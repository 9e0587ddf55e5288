"""Options of one scale experiment."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sift_fl.baselines.central import DEFAULT_BATCH_SIZE, DEFAULT_EPOCHS
from sift_fl.baselines.tall_masks import DEFAULT_LAMBDAS
from sift_fl.baselines.ties import DEFAULT_DENSITY, DEFAULT_SCALE
from sift_fl.experiment.methods import ALL_METHODS
from sift_fl.settings import Setting, TrainConfig
from sift_fl.settings.base import override_train_config


@dataclass(frozen=True)
class ExperimentConfig:
    """Setting, client counts, methods, seeds and hyperparameters of a scale experiment.

    Zero for `steps`, `batch_size` or `learning_rate` keeps the setting's default.
    """

    setting: str
    clients: tuple[int, ...]
    out: Path
    methods: tuple[str, ...] = ALL_METHODS
    setting_options: dict[str, Any] = field(default_factory=dict)
    model_seed: int = 0
    data_seed: int = 0
    sign_seed: int = 20250406
    steps: int = 0
    batch_size: int = 0
    learning_rate: float = 0.0
    validation_fraction: float = 0.15
    ties_density: float = DEFAULT_DENSITY
    ties_scale: float = DEFAULT_SCALE
    ties_sign_method: str = "total"
    tall_lambdas: tuple[float, ...] = DEFAULT_LAMBDAS
    central_epochs: float = DEFAULT_EPOCHS
    central_batch_size: int = DEFAULT_BATCH_SIZE
    withdraw_client: int = 0
    magnitude_dtype: str = "float32"
    keep_residuals: bool = False

    def __post_init__(self) -> None:
        if not self.clients or min(self.clients) < 1:
            raise ValueError(f"client counts must be positive integers, got {self.clients}")
        if not 0.0 < self.validation_fraction < 1.0:
            raise ValueError(f"validation_fraction must be in (0, 1), got {self.validation_fraction}")
        if self.withdraw_client < 0:
            raise ValueError(f"withdraw_client must be a client index (>= 0), got {self.withdraw_client}")
        unknown = [method for method in self.methods if method not in ALL_METHODS]
        if unknown:
            raise ValueError(f"unknown methods {unknown}; choose from {', '.join(ALL_METHODS)}")

    def train_config(self, setting: Setting, seed: int) -> TrainConfig:
        """Return the setting's client hyperparameters with this experiment's nonzero overrides."""
        return override_train_config(
            setting.default_train_config,
            seed,
            steps=self.steps,
            batch_size=self.batch_size,
            learning_rate=self.learning_rate,
        )

    def to_json(self) -> dict[str, Any]:
        """Return the options as JSON-ready values."""
        values = dict(self.__dict__)
        values["out"] = str(self.out)
        values["clients"] = list(self.clients)
        values["methods"] = list(self.methods)
        values["tall_lambdas"] = list(self.tall_lambdas)
        return values
