"""Run context: the setting, model at θ0, layout and residual store shared by the phases of one client count N."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch import nn

from sift_fl.experiment.config import ExperimentConfig
from sift_fl.experiment.store import ResidualStore
from sift_fl.layout import ParameterLayout
from sift_fl.settings import Setting, Split, get_setting
from sift_fl.settings.base import train_only
from sift_fl.sign import SignVector
from sift_fl.training import accuracy, load_values


@dataclass
class RunContext:
    """The setting's model, its trainable parameters at θ0, the sign vector and the residual store."""

    config: ExperimentConfig
    setting: Setting
    model: nn.Module
    parameters: dict[str, nn.Parameter]
    theta0: dict[str, np.ndarray]
    layout: ParameterLayout
    sign_vector: SignVector
    store: ResidualStore

    @property
    def num_parameters(self) -> int:
        return self.layout.num_parameters

    def score(self, values: dict[str, np.ndarray], data: Split) -> float:
        """Load `values` into the model and return its accuracy on `data`."""
        load_values(self.parameters, values)
        return accuracy(self.model, data)


def build_context(config: ExperimentConfig, residual_dir: Path) -> RunContext:
    """Build the setting's model at θ0 and an empty residual store under `residual_dir`."""
    setting = get_setting(config.setting, **config.setting_options)
    model = setting.build_model(config.model_seed)
    parameters = setting.trainable_parameters(model)
    train_only(model, parameters)

    theta0 = {name: parameter.detach().numpy().copy() for name, parameter in parameters.items()}
    layout = ParameterLayout.from_arrays(theta0)
    sign_vector = SignVector(config.sign_seed, layout)
    return RunContext(config, setting, model, parameters, theta0, layout, sign_vector, ResidualStore(residual_dir, layout))
