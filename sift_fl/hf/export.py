"""Turn served values of the bbc setting into plain MiniLM weights that `save_pretrained` can write."""

from __future__ import annotations

import copy

import numpy as np
import torch

from sift_fl.run_spec import BaseModel
from sift_fl.training import load_values


def plain_model_values(base: BaseModel, values: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Return the served model's weights under plain module names (`encoder.layer.5.…`, `head.…`).

    In LoRA mode the served values are B matrices and the head. They are loaded into a copy of
    the PEFT model, and PEFT's `merge_and_unload` folds W + scaling · B · A into each adapted
    weight. The export is therefore the merged model, not an adapter directory. In the other modes
    the values already use plain names and are returned unchanged.
    """
    if getattr(base.setting, "mode", "") != "lora":
        return values

    model = copy.deepcopy(base.model)
    load_values(base.setting.trainable_parameters(model), values)
    with torch.no_grad():
        merged = model.merge_and_unload()
    return {name: parameter.detach().numpy().copy() for name, parameter in merged.named_parameters()}


@torch.no_grad()
def pooled_logits(encoder: torch.nn.Module, head: dict[str, np.ndarray], batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Return the bbc classifier's logits: head applied to the attention-masked mean of the last hidden state."""
    hidden = encoder(**batch).last_hidden_state
    weights = batch["attention_mask"].unsqueeze(-1).float()
    pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)
    return pooled @ torch.from_numpy(head["head.weight"]).T + torch.from_numpy(head["head.bias"])
