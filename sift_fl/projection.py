"""Sign-fixed tuning (SIFT): the projection applied after every optimizer step.

After each step, every coordinate whose residual τ = θ − θ0 is zero or has the sign
opposite to the sign vector v is reset to θ0, so that τ ⊙ v ≥ 0 and the mask
m = 1{τ ≠ 0} holds exactly the coordinates that moved in v's direction.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from sift_fl.sign import SignVector

logger = logging.getLogger(__name__)


class SiftProjector:
    """Project named torch parameters onto the SIFT constraint set around θ0.

    Parameters
    ----------
    parameters : Mapping[str, torch.nn.Parameter]
        The trainable parameters, keyed by the names of the sign vector's layout.
    sign_vector : SignVector
        The public sign vector for that layout.
    base : Mapping[str, torch.Tensor], optional
        θ0 for each parameter. Defaults to a copy of the parameters' current values.
    """

    def __init__(
        self,
        parameters: Mapping[str, torch.nn.Parameter],
        sign_vector: SignVector,
        base: Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        layout_names = sign_vector.layout.names
        if list(parameters) != layout_names:
            raise ValueError(
                f"parameters {list(parameters)} do not match the sign vector's layout {layout_names}"
            )

        self.parameters = dict(parameters)
        self.sign_vector = sign_vector
        self.base: dict[str, torch.Tensor] = {}
        self.positive: dict[str, torch.Tensor] = {}
        for name, parameter in self.parameters.items():
            source = parameter if base is None else base[name]
            self.base[name] = source.detach().clone()
            positive = torch.from_numpy(sign_vector.positive(name).reshape(parameter.shape))
            self.positive[name] = positive.to(parameter.device)
        self.num_projections = 0

    @torch.no_grad()
    def project(self) -> None:
        """Reset every coordinate whose residual is zero or disagrees with the sign vector."""
        for name, parameter in self.parameters.items():
            residual = parameter - self.base[name]
            keep = torch.where(self.positive[name], residual > 0, residual < 0)
            parameter.copy_(torch.where(keep, parameter, self.base[name]))
        self.num_projections += 1

    def attach(self, optimizer: torch.optim.Optimizer) -> Any:
        """Register `project` as a step post-hook of `optimizer` and return the hook handle.

        The hook runs after every `optimizer.step()`, including those issued by the
        Hugging Face `Trainer`, so no training loop needs to call `project` itself.
        """
        return optimizer.register_step_post_hook(lambda _optimizer, _args, _kwargs: self.project())

    @torch.no_grad()
    def residual(self) -> dict[str, np.ndarray]:
        """Return τ = θ − θ0 per tensor as float32 numpy arrays in layout order."""
        return {
            name: (parameter - self.base[name]).to(torch.float32).cpu().numpy()
            for name, parameter in self.parameters.items()
        }
