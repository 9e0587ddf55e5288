"""Everything a client needs to rebuild θ0, its data and its training run, as flat config keys.

The server sends these keys in every train and evaluate message, so a client needs only its
own id and partition from node config.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
from torch import nn

from sift_fl.layout import ParameterLayout, base_digest, combined_digest, frozen_digest
from sift_fl.settings import Setting, TrainConfig, get_setting
from sift_fl.settings.base import override_train_config, train_only


@dataclass(frozen=True)
class RunSpec:
    """Setting, seeds and hyperparameters of one federation."""

    setting: str = "bbc"
    mode: str = "top-layers"
    lora_rank: int = 8
    trainable_patterns: str = ""
    num_partitions: int = 20
    model_seed: int = 0
    data_seed: int = 0
    sign_seed: int = 20250406
    trainable_layers: int = 1
    max_length: int = 128
    classes_per_client: int = 2
    steps: int = 0
    batch_size: int = 0
    learning_rate: float = 0.0
    optimizer: str = ""
    weight_decay: float = 0.0
    magnitude_dtype: str = "float32"
    baselines: bool = True

    def to_config(self) -> dict[str, Any]:
        """Return the spec as flat Flower config keys (kebab-case)."""
        return {key.replace("_", "-"): value for key, value in self.__dict__.items()}

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> RunSpec:
        """Read the spec from config keys; unknown keys are ignored, missing ones keep defaults."""
        values = {}
        for field_name, default in cls().__dict__.items():
            key = field_name.replace("_", "-")
            if key in config:
                values[field_name] = _coerce(config[key], default, key)
        return cls(**values)

    def build_setting(self) -> Setting:
        if self.setting == "bbc":
            return get_setting(
                "bbc",
                trainable_layers=self.trainable_layers,
                max_length=self.max_length,
                classes_per_client=self.classes_per_client,
                mode=self.mode,
                lora_rank=self.lora_rank,
                trainable_patterns=tuple(p.strip() for p in self.trainable_patterns.split(",") if p.strip()),
            )
        return get_setting(self.setting, classes_per_client=self.classes_per_client)

    def train_config(self, setting: Setting, seed: int) -> TrainConfig:
        """Return the setting's default hyperparameters with this spec's nonzero overrides."""
        return override_train_config(
            setting.default_train_config,
            seed,
            steps=self.steps,
            batch_size=self.batch_size,
            learning_rate=self.learning_rate,
            optimizer=self.optimizer,
            weight_decay=self.weight_decay,
        )


@dataclass
class BaseModel:
    """A setting's model at θ0, its trainable parameters, layout and digests."""

    setting: Setting
    model: nn.Module
    parameters: dict[str, nn.Parameter]
    theta0: dict[str, np.ndarray]
    layout: ParameterLayout
    layout_digest: str
    base_digest: str


@lru_cache(maxsize=2)
def load_base_model(spec: RunSpec) -> BaseModel:
    """Build (once per process and spec) the setting's model at θ0 and its digests."""
    setting = spec.build_setting()
    model = setting.build_model(spec.model_seed)
    parameters = setting.trainable_parameters(model)
    train_only(model, parameters)

    theta0 = {name: p.detach().numpy().copy() for name, p in parameters.items()}
    layout = ParameterLayout.from_arrays(theta0)
    frozen = {name: p for name, p in model.named_parameters() if name not in parameters}
    digest = combined_digest(base_digest(layout, theta0), frozen_digest(frozen))
    return BaseModel(setting, model, parameters, theta0, layout, layout.digest(), digest)


def _coerce(value: Any, default: Any, key: str) -> Any:
    if isinstance(default, bool):
        if isinstance(value, str):
            if value.lower() not in ("true", "false", "1", "0"):
                raise ValueError(f"config key {key!r} must be true or false, got {value!r}")
            return value.lower() in ("true", "1")
        return bool(value)
    try:
        return type(default)(value)
    except (TypeError, ValueError) as error:
        raise ValueError(f"config key {key!r} must be of type {type(default).__name__}, got {value!r}") from error
