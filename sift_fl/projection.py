"""Sign-fixed tuning (SIFT): the projection applied after every optimizer step.

After each step, every coordinate whose residual τ = θ − θ0 is zero or has the sign
opposite to the sign vector v is reset to θ0. Then τ ⊙ v ≥ 0, and the mask m = 1{τ ≠ 0}
contains exactly the coordinates that moved in v's direction.
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

    Notes
    -----
    Besides θ0 and the sign vector, the projector keeps a lower and an upper bound per
    parameter (θ0 or ∓inf), so it stores about three copies of the trainable parameters.
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
        self._lower: dict[str, torch.Tensor] = {}
        self._upper: dict[str, torch.Tensor] = {}
        self._zero_index: dict[str, torch.Tensor] = {}
        for name, parameter in self.parameters.items():
            source = parameter if base is None else base[name]
            self.base[name] = source.detach().clone()
            positive = torch.from_numpy(sign_vector.positive(name).reshape(parameter.shape))
            self.positive[name] = positive.to(parameter.device)
            self._lower[name], self._upper[name] = _clamp_bounds(self.base[name], self.positive[name])
            zero_index = torch.nonzero(self.base[name].reshape(-1) == 0).reshape(-1)
            if zero_index.numel():
                self._zero_index[name] = zero_index
        self.num_projections = 0

    @torch.no_grad()
    def project(self) -> None:
        """Reset every coordinate whose residual is zero or disagrees with the sign vector.

        Where v = +1 the projection is θ ← max(θ, θ0), and where v = −1 it is θ ← min(θ, θ0),
        so one in-place `clamp` per tensor does it. A NaN coordinate is reset to θ0, as a
        NaN residual neither agrees nor disagrees with v. The result is bit for bit the same
        as resetting where τ·v ≤ 0 or τ is NaN, signed zeros included.
        """
        maxima = []
        for name, parameter in self.parameters.items():
            torch.clamp(parameter, self._lower[name], self._upper[name], out=parameter)
            if name in self._zero_index:
                self._restore_zero_signs(name, parameter)
            if parameter.numel():
                maxima.append(parameter.max())

        # `max` propagates NaN, so one check covers every tensor and costs one device sync.
        if maxima and bool(torch.isnan(torch.stack(maxima)).any()):
            for name, parameter in self.parameters.items():
                parameter.copy_(torch.where(torch.isnan(parameter), self.base[name], parameter))
        self.num_projections += 1

    def _restore_zero_signs(self, name: str, parameter: torch.Tensor) -> None:
        # Where θ0 is ±0 and θ is the other zero, `clamp` may return either zero (its CPU
        # vectorised and scalar paths differ), but the reset value is θ0's own bits.
        base = self.base[name]
        if not parameter.is_contiguous():
            parameter.copy_(torch.where((parameter == 0) & (base == 0), base, parameter))
            return

        index = self._zero_index[name]
        flat = parameter.view(-1)
        values = flat[index]
        flat[index] = torch.where(values == 0, base.reshape(-1)[index], values)

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


def _clamp_bounds(base: torch.Tensor, positive: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the (lower, upper) bounds that clamp θ onto the SIFT constraint set.

    Where v = +1 the bounds are (θ0, +inf); where v = −1 they are (−inf, θ0).
    """
    infinity = torch.full((), float("inf"), dtype=base.dtype, device=base.device)
    lower = torch.where(positive, base, -infinity)
    upper = torch.where(positive, infinity, base)
    return lower, upper
