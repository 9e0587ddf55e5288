"""SIFT with Hugging Face models: trainable-set selection, LoRA with frozen shared A, the Trainer callback."""

import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from sift_fl.codec import encode_residual
from sift_fl.hf.lora import frozen_a_lora, lora_delta_weights, lora_trainable_parameters
from sift_fl.hf.trainable import select_trainable, top_layers_patterns
from sift_fl.layout import ParameterLayout, frozen_digest
from sift_fl.merge import MergeState
from sift_fl.projection import SiftProjector
from sift_fl.sign import SignVector


class TinyEncoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.query = nn.Linear(6, 6)
        self.dense = nn.Linear(6, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None):
        logits = self.head(torch.relu(self.dense(torch.relu(self.query(x)))))
        if labels is None:
            return logits
        return {"loss": nn.functional.cross_entropy(logits, labels), "logits": logits}


def sift_train(model: nn.Module, parameters: dict, seed: int, steps: int = 15) -> SiftProjector:
    projector = SiftProjector(parameters, SignVector(5, ParameterLayout.from_arrays(parameters)))
    optimizer = torch.optim.Adam(list(parameters.values()), lr=1e-2)
    projector.attach(optimizer)
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(32, 6, generator=generator)
    y = torch.randint(0, 3, (32,), generator=generator)
    for _ in range(steps):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    return projector


def test_select_trainable_on_minilm_excludes_frozen():
    from sift_fl.settings.bbc import load_encoder
    import copy

    model = copy.deepcopy(load_encoder())
    patterns = top_layers_patterns(2, 6, head_pattern=r"^pooler\.")

    selected = select_trainable(model, patterns)
    layout = ParameterLayout.from_arrays(selected)

    assert all(name.startswith(("encoder.layer.4.", "encoder.layer.5.", "pooler.")) for name in layout.names)
    assert "embeddings.word_embeddings.weight" not in layout.names
    assert not model.embeddings.word_embeddings.weight.requires_grad
    assert layout.num_parameters == sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_select_trainable_residual_and_mask_cover_only_selection():
    model = TinyEncoder()
    frozen_before = model.query.weight.detach().clone()
    parameters = select_trainable(model, [r"^dense\.", r"^head\."])

    projector = sift_train(model, parameters, seed=1)
    residual = projector.residual()
    encoded = encode_residual(residual, projector.sign_vector.layout, projector.sign_vector)

    assert sorted(residual) == ["dense.bias", "dense.weight", "head.bias", "head.weight"]
    assert sorted(encoded.tensors) == sorted(residual)
    assert torch.equal(model.query.weight, frozen_before)


def test_select_trainable_rejects_no_match():
    with pytest.raises(ValueError, match="no parameter name matches"):
        select_trainable(TinyEncoder(), [r"^nosuch\."])


LORA_SCRIPT = """
import sys
from sift_fl.hf.lora import frozen_a_lora
from sift_fl.layout import frozen_digest
sys.path.insert(0, {tests!r})
from test_hf import TinyEncoder
model = frozen_a_lora(TinyEncoder(), ["query", "dense"], rank=2, alpha=4, seed=99, modules_to_save=["head"])
a = {{n: p for n, p in model.named_parameters() if "lora_A" in n}}
sys.stdout.write(frozen_digest(a))
"""


def test_lora_a_identical_across_processes():
    from pathlib import Path

    script = LORA_SCRIPT.format(tests=str(Path(__file__).parent))

    digests = [subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout for _ in range(2)]

    assert len(digests[0]) == 64
    assert digests[0] == digests[1]


def test_lora_trains_only_b_and_head():
    model = frozen_a_lora(TinyEncoder(), ["query", "dense"], rank=2, alpha=4, seed=99, modules_to_save=["head"])

    names = list(lora_trainable_parameters(model))

    assert all("lora_B" in name or "modules_to_save" in name for name in names)
    assert any("lora_B" in name for name in names)
    assert not any("lora_A" in name for name in names)


def test_lora_mean_of_b_gives_mean_delta_weight():
    deltas, b_values, state_residuals = [], [], {}
    for client in range(3):
        model = frozen_a_lora(TinyEncoder(), ["query", "dense"], rank=2, alpha=4, seed=99, modules_to_save=["head"])
        parameters = lora_trainable_parameters(model)
        projector = sift_train(model, parameters, seed=client)
        deltas.append({k: v.detach().clone() for k, v in lora_delta_weights(model).items()})
        b_values.append(projector.residual())
        state_residuals[str(client)] = encode_residual(b_values[-1], projector.sign_vector.layout, projector.sign_vector)

    merged = frozen_a_lora(TinyEncoder(), ["query", "dense"], rank=2, alpha=4, seed=99, modules_to_save=["head"])
    merged_parameters = lora_trainable_parameters(merged)
    layout = ParameterLayout.from_arrays(merged_parameters)
    state = MergeState.from_scratch(layout, SignVector(5, layout), state_residuals)
    mean = state.mean()
    with torch.no_grad():
        for name, parameter in merged_parameters.items():
            parameter.copy_(parameter + torch.from_numpy(mean[name]))

    for module_name, merged_delta in lora_delta_weights(merged).items():
        expected = torch.stack([delta[module_name] for delta in deltas]).mean(dim=0)
        assert torch.allclose(merged_delta, expected, rtol=1e-5, atol=1e-7), module_name


def test_lora_withdrawal_bit_exact():
    residuals = {}
    layout = None
    for client in range(4):
        model = frozen_a_lora(TinyEncoder(), ["query", "dense"], rank=2, alpha=4, seed=99, modules_to_save=["head"])
        projector = sift_train(model, lora_trainable_parameters(model), seed=10 + client)
        layout = projector.sign_vector.layout
        residuals[str(client)] = encode_residual(projector.residual(), layout, projector.sign_vector)
    signs = SignVector(5, layout)

    state = MergeState.from_scratch(layout, signs, residuals)
    state.remove("2", residuals["2"])
    scratch = MergeState.from_scratch(layout, signs, {c: r for c, r in residuals.items() if c != "2"})

    assert state.equals(scratch)


class ListDataset(torch.utils.data.Dataset):
    def __init__(self, n: int = 64) -> None:
        generator = torch.Generator().manual_seed(3)
        self.x = torch.randn(n, 6, generator=generator)
        self.y = torch.randint(0, 3, (n,), generator=generator)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, index: int) -> dict:
        return {"x": self.x[index], "labels": self.y[index]}


def test_trainer_projection_invariants_with_accumulation(tmp_path):
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from sift_fl.hf.trainer import SiftCallback

    model = TinyEncoder()
    parameters = dict(model.named_parameters())
    layout = ParameterLayout.from_arrays(parameters)
    projector = SiftProjector(parameters, SignVector(8, layout))
    violations: list[str] = []

    class CheckInvariants(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            for name, parameter in parameters.items():
                residual = (parameter - projector.base[name]).detach().numpy().reshape(-1)
                if (residual * projector.sign_vector.signs(name) < 0).any():
                    violations.append(f"step {state.global_step}: {name}")

    arguments = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=6,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=3,
        learning_rate=5e-2,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=arguments, train_dataset=ListDataset(), callbacks=[SiftCallback(projector), CheckInvariants()])

    trainer.train()

    assert violations == []
    assert projector.num_projections == 6
    assert any((r != 0).any() for r in projector.residual().values())


def test_bbc_lora_mode_digest_covers_shared_a():
    from sift_fl.run_spec import RunSpec, load_base_model

    first = load_base_model(RunSpec(setting="bbc", mode="lora", model_seed=0))
    a_matrices = {n: p for n, p in first.model.named_parameters() if "lora_A" in n}
    second = load_base_model(RunSpec(setting="bbc", mode="lora", model_seed=1))

    assert len(a_matrices) == 6
    assert first.layout_digest == second.layout_digest
    assert first.base_digest != second.base_digest
    assert frozen_digest(a_matrices) != frozen_digest({n: p for n, p in second.model.named_parameters() if "lora_A" in n})
