"""Export round trip: a served bbc model written by `sift-fl export` gives the in-memory model's logits."""

import numpy as np
import pytest
import safetensors.numpy
import torch
from test_cli_store import make_store, served_values

from sift_fl.cli import main
from sift_fl.hf.export import pooled_logits
from sift_fl.run_spec import RunSpec, load_base_model
from sift_fl.settings.bbc import NUM_LAYERS, extended_attention_mask, load_articles, load_encoder, model_dir
from sift_fl.training import load_values


def article_batch() -> dict[str, torch.Tensor]:
    from transformers import AutoTokenizer

    texts, _, _ = load_articles()
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir()))
    return dict(tokenizer([texts[0], texts[600], texts[1500]], padding="max_length", truncation=True, max_length=64, return_tensors="pt"))


@torch.no_grad()
def in_memory_logits(spec: RunSpec, values: dict[str, np.ndarray], batch: dict[str, torch.Tensor]) -> torch.Tensor:
    base = load_base_model(spec)
    encoder = load_encoder()
    hidden = encoder.embeddings(input_ids=batch["input_ids"], token_type_ids=batch["token_type_ids"])
    for layer in encoder.encoder.layer[: NUM_LAYERS - spec.trainable_layers]:
        hidden = layer(hidden, attention_mask=extended_attention_mask(batch["attention_mask"]))

    load_values(base.parameters, values)
    try:
        base.model.eval()
        return base.model(hidden, batch["attention_mask"])
    finally:
        load_values(base.parameters, base.theta0)


@pytest.mark.parametrize("mode", ["top-layers", "lora"])
def test_export_round_trip_logits(tmp_path, mode):
    from transformers import AutoModel

    spec = RunSpec(setting="bbc", mode=mode, num_partitions=4)
    store = make_store(tmp_path / "store", spec, ["0", "1"])
    out = tmp_path / "out"
    batch = article_batch()

    code = main(["export", "--store", str(store.directory), "--client", "1", "--out", str(out)])
    exported = AutoModel.from_pretrained(str(out), attn_implementation="eager").eval()
    head = safetensors.numpy.load_file(str(out / "head.safetensors"))
    expected = in_memory_logits(spec, served_values(store, spec, "1"), batch)
    logits = pooled_logits(exported, head, batch)
    store.close()

    assert code == 0
    assert torch.allclose(logits, expected, rtol=1e-4, atol=1e-5), (logits - expected).abs().max()
    assert not torch.allclose(logits, in_memory_logits(spec, load_base_model(spec).theta0, batch), atol=1e-6)
