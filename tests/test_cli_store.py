"""`sift-fl status | verify | withdraw | export` on real stores, in-process and as a real console process."""

import json
import subprocess
import sys

import numpy as np
import pytest
import safetensors.numpy
import safetensors.torch

from sift_fl.cli import main
from sift_fl.codec import encode_residual
from sift_fl.merge import MergeState, apply_residual
from sift_fl.run_spec import RunSpec, load_base_model
from sift_fl.sign import SignVector
from sift_fl.store import MergeStore, StoreIdentity, Upload


def make_store(directory, spec: RunSpec, clients: list[str]) -> MergeStore:
    """Create a store for `spec`'s real base model and merge synthetic SIFT residuals."""
    base = load_base_model(spec)
    signs = SignVector(spec.sign_seed, base.layout)
    store = MergeStore.create(directory, StoreIdentity(base.layout, base.base_digest, spec.sign_seed), spec.to_config())
    for client_id in clients:
        generator = np.random.default_rng(int(client_id) + 1)
        dense = {}
        for tensor in base.layout.tensors:
            magnitude = generator.uniform(1e-4, 1e-2, tensor.numel).astype(np.float32)
            keep = generator.random(tensor.numel) < 0.5
            dense[tensor.name] = (np.where(keep, magnitude, 0) * signs.signs(tensor.name)).astype(np.float32).reshape(tensor.shape)
        arrays = encode_residual(dense, base.layout, signs).to_arrays()
        store.join(Upload(client_id, arrays, base.layout_digest, base.base_digest, spec.sign_seed))
    return store


def served_values(store: MergeStore, spec: RunSpec, client_id: str | None) -> dict[str, np.ndarray]:
    """Return θ0 + m_c ⊙ τ̄ (or θ0 + τ̄ for None), computed here from a from-scratch merge."""
    base = load_base_model(spec)
    residuals = store.load_residuals()
    scratch = MergeState.from_scratch(base.layout, store.sign_vector, residuals)
    mask = None
    if client_id is not None:
        mask = {t.name: residuals[client_id].unpacked_mask(t.name, t.numel) for t in base.layout.tensors}
    return apply_residual(base.theta0, scratch.mean(), mask)


DIGITS = RunSpec(setting="digits", num_partitions=4)


@pytest.fixture
def digits_store(tmp_path):
    store = make_store(tmp_path / "store", DIGITS, ["0", "1", "2"])
    yield store
    store.close()


def test_status_lists_clients(digits_store, capsys):
    code = main(["status", "--store", str(digits_store.directory), "--json"])
    summary = json.loads(capsys.readouterr().out)

    assert code == 0
    assert [row["client"] for row in summary["clients"]] == ["0", "1", "2"]
    assert all(0.4 < row["density"] < 0.6 for row in summary["clients"])
    assert summary["size_bytes"] > 0
    assert summary["base_digest"] == digits_store.identity.base_digest


def test_status_text_states_number_format(digits_store, capsys):
    code = main(["status", "--store", str(digits_store.directory)])
    output = capsys.readouterr().out

    assert code == 0
    assert "clients merged: 3" in output
    assert "resolution 2^-40" in output


def test_verify_exits_zero_on_consistent_store(digits_store, capsys):
    code = main(["verify", "--store", str(digits_store.directory)])
    output = capsys.readouterr().out

    assert code == 0
    assert "bit for bit" in output
    assert "store is consistent" in output


def test_verify_exits_one_on_modified_residual(digits_store, capsys):
    path = digits_store.directory / digits_store.clients["1"].residual_file
    arrays = safetensors.numpy.load(path.read_bytes())
    arrays["fc1.bias/magnitude"] = arrays["fc1.bias/magnitude"] * np.float32(2)
    path.write_bytes(safetensors.numpy.save(arrays))

    code = main(["verify", "--store", str(digits_store.directory)])
    output = capsys.readouterr().out

    assert code == 1
    assert "FAILED: client '1'" in output


def test_withdraw_command_unmerges(digits_store, capsys):
    code = main(["withdraw", "--store", str(digits_store.directory), "1"])
    output = capsys.readouterr().out

    assert code == 0
    assert "withdrew client '1'" in output
    assert digits_store.members == {"0", "2"}


def test_withdraw_command_twice_is_noop(digits_store, capsys):
    main(["withdraw", "--store", str(digits_store.directory), "1"])

    code = main(["withdraw", "--store", str(digits_store.directory), "1"])

    assert code == 0
    assert "already withdrawn" in capsys.readouterr().out


def test_withdraw_command_unknown_client_exits_nonzero(digits_store):
    command = [sys.executable, "-m", "sift_fl.cli", "withdraw", "--store", str(digits_store.directory), "nobody"]

    completed = subprocess.run(command, capture_output=True, text=True, timeout=60)

    assert completed.returncode == 1
    assert "'nobody' is not in the store" in completed.stderr


def test_status_missing_store_exits_nonzero(tmp_path, capsys):
    code = main(["status", "--store", str(tmp_path / "absent")])

    assert code == 1
    assert "no store at" in capsys.readouterr().err


def test_export_digits_masked_model(digits_store, tmp_path):
    code = main(["export", "--store", str(digits_store.directory), "--client", "2", "--out", str(tmp_path / "out")])
    exported = safetensors.torch.load_file(tmp_path / "out" / "model.safetensors")
    expected = served_values(digits_store, DIGITS, "2")
    description = json.loads((tmp_path / "out" / "sift-fl-served.json").read_text())

    assert code == 0
    assert description["served"] == "masked"
    for name, values in expected.items():
        assert exported[name].numpy().tobytes() == values.tobytes(), name


def test_export_withdrawn_client_needs_flag(digits_store, tmp_path, capsys):
    digits_store.withdraw("2")

    code = main(["export", "--store", str(digits_store.directory), "--client", "2", "--out", str(tmp_path / "out")])

    assert code == 1
    assert "--allow-unmasked" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_export_unmasked_with_flag(digits_store, tmp_path):
    digits_store.withdraw("2")
    out = tmp_path / "out"

    code = main(["export", "--store", str(digits_store.directory), "--client", "2", "--out", str(out), "--allow-unmasked"])
    exported = safetensors.torch.load_file(out / "model.safetensors")
    expected = served_values(digits_store, DIGITS, None)

    assert code == 0
    assert json.loads((out / "sift-fl-served.json").read_text())["served"] == "unmasked"
    for name, values in expected.items():
        assert exported[name].numpy().tobytes() == values.tobytes(), name


def test_export_bbc_loads_with_auto_model(tmp_path):
    from transformers import AutoModel

    from sift_fl.settings.bbc import load_encoder

    spec = RunSpec(setting="bbc", num_partitions=4)
    store = make_store(tmp_path / "store", spec, ["0", "1"])
    out = tmp_path / "out"

    code = main(["export", "--store", str(store.directory), "--client", "0", "--out", str(out)])
    model = AutoModel.from_pretrained(str(out))
    state = model.state_dict()
    expected = served_values(store, spec, "0")
    head = safetensors.numpy.load_file(str(out / "head.safetensors"))

    assert code == 0
    name = "encoder.layer.5.attention.self.query.weight"
    assert state[name].numpy().tobytes() == expected[name].tobytes()
    lower = "encoder.layer.0.attention.self.query.weight"
    assert state[lower].numpy().tobytes() == load_encoder().state_dict()[lower].numpy().tobytes()
    assert head["head.weight"].tobytes() == expected["head.weight"].tobytes()
    assert (out / "tokenizer.json").exists() or (out / "vocab.txt").exists()
