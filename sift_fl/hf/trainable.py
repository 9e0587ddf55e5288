"""Select the trainable parameters of a model by regular expressions and freeze the rest."""

from __future__ import annotations

import re
from collections.abc import Sequence

from torch import nn


def select_trainable(model: nn.Module, patterns: Sequence[str]) -> dict[str, nn.Parameter]:
    """Make trainable exactly the parameters whose full name matches one of `patterns`.

    Every other parameter gets `requires_grad=False`, so it is excluded from the sign
    vector, the residual, the mask and the layout digest. Patterns are matched with
    `re.search` against names from `model.named_parameters()`.

    Returns
    -------
    dict[str, nn.Parameter]
        The selected parameters in `named_parameters()` order (the layout order).

    Raises
    ------
    ValueError
        If a pattern is not a valid regular expression or nothing matches.
    """
    compiled = []
    for pattern in patterns:
        try:
            compiled.append(re.compile(pattern))
        except re.error as error:
            raise ValueError(f"invalid trainable-parameter pattern {pattern!r}: {error}") from error

    selected: dict[str, nn.Parameter] = {}
    for name, parameter in model.named_parameters():
        trainable = any(regex.search(name) for regex in compiled)
        parameter.requires_grad_(trainable)
        if trainable:
            selected[name] = parameter

    if not selected:
        raise ValueError(f"no parameter name matches the trainable-parameter patterns {list(patterns)}")
    return selected


def top_layers_patterns(num_layers: int, total_layers: int, head_pattern: str = r"^head\.") -> list[str]:
    """Return patterns for the top `num_layers` BERT encoder layers plus the classification head."""
    if not 0 <= num_layers <= total_layers:
        raise ValueError(f"num_layers must be in [0, {total_layers}], got {num_layers}")
    layers = [rf"(^|\.)encoder\.layer\.{index}\." for index in range(total_layers - num_layers, total_layers)]
    return layers + [head_pattern]
