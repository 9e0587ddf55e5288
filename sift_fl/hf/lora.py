"""LoRA whose A matrices are shared by all clients, so that merging stays exactly linear.

A LoRA update is ΔW = s · B · A. Averaging A and B separately does not average the ΔW,
because the product is bilinear. Here every client initialises each A from the public seed
and freezes it, and only B (plus `modules_to_save`, such as a classification head) is
trained under SIFT. Then mean_c(s · B_c · A) = s · mean_c(B_c) · A exactly, and masks,
signs and unmerging all live on B.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from torch import nn

ADAPTER_NAME = "default"


def _module_seed(seed: int, module_name: str) -> int:
    digest = hashlib.sha256(f"{seed}:lora_A:{module_name}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little")


def shared_lora_a(seed: int, module_name: str, rank: int, in_features: int) -> torch.Tensor:
    """Return the A matrix of one LoRA module: U(-1/√in, 1/√in) from numpy's Philox generator."""
    generator = np.random.Generator(np.random.Philox(_module_seed(seed, module_name)))
    bound = 1.0 / np.sqrt(in_features)
    return torch.from_numpy(generator.uniform(-bound, bound, size=(rank, in_features)).astype(np.float32))


def frozen_a_lora(
    model: nn.Module,
    target_modules: Sequence[str],
    rank: int,
    alpha: float,
    seed: int,
    modules_to_save: Sequence[str] = (),
) -> PeftModel:
    """Wrap `model` with PEFT LoRA adapters whose A matrices come from `seed` and are frozen.

    B starts at zero (PEFT's default), so the wrapped model computes exactly the base model
    at θ0. Trainable parameters afterwards: every `lora_B` and every module in `modules_to_save`.
    """
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=0.0,
        target_modules=list(target_modules),
        modules_to_save=list(modules_to_save) or None,
        init_lora_weights=True,
    )
    peft_model = get_peft_model(model, config)

    with torch.no_grad():
        for name, module in peft_model.named_modules():
            if not isinstance(module, LoraLayer) or ADAPTER_NAME not in module.lora_A:
                continue
            weight = module.lora_A[ADAPTER_NAME].weight
            weight.copy_(shared_lora_a(seed, name, weight.shape[0], weight.shape[1]))
            weight.requires_grad_(False)
    return peft_model


def lora_trainable_parameters(peft_model: nn.Module) -> dict[str, nn.Parameter]:
    """Return the parameters SIFT trains in LoRA mode (every B and `modules_to_save`), in layout order."""
    trainable = {name: p for name, p in peft_model.named_parameters() if p.requires_grad}
    if any("lora_A" in name for name in trainable):
        raise ValueError("a LoRA A matrix is trainable; A must stay frozen for the merge to be linear")
    return trainable


def lora_delta_weights(peft_model: nn.Module) -> dict[str, torch.Tensor]:
    """Return ΔW = scaling · B · A for every LoRA module, keyed by module name."""
    deltas = {}
    for name, module in peft_model.named_modules():
        if isinstance(module, LoraLayer) and ADAPTER_NAME in module.lora_A:
            a = module.lora_A[ADAPTER_NAME].weight
            b = module.lora_B[ADAPTER_NAME].weight
            deltas[name] = module.scaling[ADAPTER_NAME] * (b @ a)
    return deltas
