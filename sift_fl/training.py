"""Local finetuning (plain or sign-fixed) and evaluation of a model on a client's data."""

from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

from sift_fl.projection import SiftProjector
from sift_fl.settings.base import Split, TrainConfig

logger = logging.getLogger(__name__)

OPTIMIZERS = ("adam", "adamw", "sgd")


def make_optimizer(parameters: list[nn.Parameter], config: TrainConfig) -> torch.optim.Optimizer:
    """Return the optimizer named by `config.optimizer`."""
    if config.optimizer == "adam":
        return torch.optim.Adam(parameters, lr=config.learning_rate, weight_decay=config.weight_decay)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(parameters, lr=config.learning_rate, weight_decay=config.weight_decay)
    if config.optimizer == "sgd":
        return torch.optim.SGD(parameters, lr=config.learning_rate, weight_decay=config.weight_decay, momentum=0.9)
    raise ValueError(f"unknown optimizer {config.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")


@torch.no_grad()
def load_values(parameters: Mapping[str, nn.Parameter], values: Mapping[str, np.ndarray | torch.Tensor]) -> None:
    """Copy `values` into the named parameters."""
    for name, parameter in parameters.items():
        value = values[name]
        tensor = value if isinstance(value, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(value))
        parameter.copy_(tensor.reshape(parameter.shape))


def finetune(
    model: nn.Module,
    parameters: Mapping[str, nn.Parameter],
    data: Split,
    config: TrainConfig,
    projector: SiftProjector | None = None,
) -> dict[str, np.ndarray]:
    """Finetune `parameters` for `config.steps` minibatch steps and return the residual θ − θ0.

    The parameters must hold θ0 on entry. With a `projector`, the SIFT projection runs
    after every optimizer step through a step post-hook.
    """
    if len(data) == 0:
        raise ValueError("cannot finetune on an empty training split")
    base = {name: p.detach().clone() for name, p in parameters.items()}

    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    optimizer = make_optimizer(list(parameters.values()), config)
    handle = projector.attach(optimizer) if projector is not None else None
    loss_fn = nn.CrossEntropyLoss()

    model.train()
    order = torch.randperm(len(data), generator=generator)
    position = 0
    for _ in range(config.steps):
        if position + config.batch_size > len(order):
            order = torch.randperm(len(data), generator=generator)
            position = 0
        batch = data.subset(order[position : position + config.batch_size])
        position += config.batch_size

        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(*batch.inputs), batch.labels)
        loss.backward()
        optimizer.step()

    if handle is not None:
        handle.remove()
    model.eval()
    with torch.no_grad():
        return {name: (p - base[name]).to(torch.float32).numpy().copy() for name, p in parameters.items()}


@torch.no_grad()
def accuracy(model: nn.Module, data: Split, batch_size: int = 128) -> float:
    """Return the fraction of examples in `data` whose argmax prediction equals the label."""
    if len(data) == 0:
        return float("nan")
    model.eval()
    correct = 0
    for start in range(0, len(data), batch_size):
        batch = data.subset(torch.arange(start, min(start + batch_size, len(data))))
        correct += int((model(*batch.inputs).argmax(dim=-1) == batch.labels).sum())
    return correct / len(data)
