import numpy as np
import pytest
import torch
from torch import nn

from sift_fl.layout import ParameterLayout
from sift_fl.projection import SiftProjector
from sift_fl.sign import SignVector


def make_problem(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    parameters = dict(model.named_parameters())
    layout = ParameterLayout.from_arrays(parameters)
    x = torch.randn(64, 8)
    y = torch.randint(0, 3, (64,))
    return model, parameters, layout, x, y


def check_invariants(projector: SiftProjector) -> None:
    for name, parameter in projector.parameters.items():
        residual = (parameter - projector.base[name]).detach().numpy().reshape(-1)
        signs = projector.sign_vector.signs(name).astype(np.float32)
        assert (residual * signs >= 0).all(), f"{name}: residual disagrees with the sign vector"
        mask = residual != 0
        assert np.array_equal(mask, (residual * signs) > 0), f"{name}: mask is not 1{{residual != 0}}"


@pytest.mark.parametrize(
    "make_optimizer",
    [
        lambda p: torch.optim.Adam(p, lr=1e-2),
        lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=1e-3),
    ],
    ids=["adam", "adamw-weight-decay", "sgd-momentum-weight-decay"],
)
def test_projection_invariants_after_every_step(make_optimizer):
    model, parameters, layout, x, y = make_problem()
    projector = SiftProjector(parameters, SignVector(11, layout))
    optimizer = make_optimizer(list(parameters.values()))
    projector.attach(optimizer)

    for _ in range(25):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        check_invariants(projector)

    assert projector.num_projections == 25
    density = np.mean(np.concatenate([(r != 0).reshape(-1) for r in projector.residual().values()]))
    assert 0.05 < density < 0.95


def test_projection_resets_to_exact_base_bytes():
    model, parameters, layout, x, y = make_problem(1)
    projector = SiftProjector(parameters, SignVector(3, layout))
    optimizer = torch.optim.Adam(list(parameters.values()), lr=1e-2)
    projector.attach(optimizer)

    optimizer.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()

    for name, parameter in parameters.items():
        reset = projector.residual()[name] == 0
        assert np.array_equal(parameter.detach().numpy()[reset], projector.base[name].numpy()[reset])


def test_projection_detached_hook_stops_projecting():
    model, parameters, layout, x, y = make_problem(2)
    projector = SiftProjector(parameters, SignVector(3, layout))
    optimizer = torch.optim.SGD(list(parameters.values()), lr=0.1)
    handle = projector.attach(optimizer)
    handle.remove()

    optimizer.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()

    assert projector.num_projections == 0


def test_projector_rejects_layout_mismatch():
    _, parameters, layout, _, _ = make_problem()
    parameters.pop("2.bias")

    with pytest.raises(ValueError, match="do not match"):
        SiftProjector(parameters, SignVector(3, layout))
