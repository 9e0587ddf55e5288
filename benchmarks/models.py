"""The benchmark models: full MiniLM with a classification head, or a small MLP for smoke runs."""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

logger = logging.getLogger(__name__)

NUM_CLASSES = 5


@dataclass
class ModelBatch:
    """A model whose parameters are all trainable, and one fixed training batch for it."""

    model: nn.Module
    inputs: tuple[torch.Tensor, ...]
    labels: torch.Tensor
    description: str

    def parameters(self) -> dict[str, nn.Parameter]:
        return dict(self.model.named_parameters())

    def theta0(self) -> dict[str, np.ndarray]:
        """Return a float32 copy of every parameter, in layout order."""
        return {name: p.detach().numpy().copy() for name, p in self.model.named_parameters()}


class MiniLMClassifier(nn.Module):
    """all-MiniLM-L6-v2 (embeddings and all six layers) with a linear head on mean-pooled states."""

    def __init__(self, encoder: nn.Module, num_classes: int, head_seed: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.config.hidden_size, num_classes)
        generator = torch.Generator().manual_seed(head_seed)
        with torch.no_grad():
            self.head.weight.normal_(0.0, 0.02, generator=generator)
            self.head.bias.zero_()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)
        return self.head(pooled)


def build_model_batch(kind: str, batch_size: int, max_length: int) -> ModelBatch:
    """Return the model named by `kind` ("minilm" or "mlp") and a fixed batch of `batch_size` examples."""
    if kind == "minilm":
        return _minilm_batch(batch_size, max_length)
    if kind == "mlp":
        return _mlp_batch(batch_size)
    raise ValueError(f"unknown benchmark model {kind!r}; choose minilm or mlp")


def _minilm_batch(batch_size: int, max_length: int) -> ModelBatch:
    from transformers import AutoTokenizer

    from sift_fl.settings.bbc import load_articles, load_encoder, model_dir

    encoder = copy.deepcopy(load_encoder()).train()
    model = MiniLMClassifier(encoder, NUM_CLASSES, head_seed=0)
    for parameter in model.parameters():
        parameter.requires_grad_(True)

    texts, labels, _ = load_articles()
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir()))
    batch = tokenizer(
        texts[:batch_size], padding="max_length", truncation=True, max_length=max_length, return_tensors="pt"
    )
    description = f"all-MiniLM-L6-v2 + linear head, all parameters trainable, BBC News batch {batch_size} x {max_length} tokens"
    return ModelBatch(model, (batch["input_ids"], batch["attention_mask"]), torch.from_numpy(labels[:batch_size]), description)


def _mlp_batch(batch_size: int) -> ModelBatch:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 256), nn.ReLU(), nn.Linear(256, NUM_CLASSES))
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(batch_size, 256, generator=generator)
    labels = torch.randint(0, NUM_CLASSES, (batch_size,), generator=generator)
    return ModelBatch(model, (inputs,), labels, f"MLP 256-512-256-{NUM_CLASSES}, random batch {batch_size}")
