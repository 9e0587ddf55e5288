"""Export the model that a store serves to one client, in the model's own file format.

A merged client is served θ0 + m_c ⊙ τ̄, where m_c is its stored mask and τ̄ = S / n.
A withdrawn or unknown client can only be exported unmasked (θ0 + τ̄), and only on request.
θ0 is rebuilt from the run spec recorded in the store and checked against the store's
base digest, so the export fails rather than apply τ̄ to a different base model.
"""

from __future__ import annotations

import copy
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import safetensors.numpy
import torch

from sift_fl.hf.export import plain_model_values
from sift_fl.merge import apply_residual
from sift_fl.run_spec import BaseModel, RunSpec, load_base_model
from sift_fl.store.identity import StoreError
from sift_fl.store.store import MergeStore
from sift_fl.store.verify import content_digest
from sift_fl.training import load_values

logger = logging.getLogger(__name__)

SERVED_MASKED = "masked"
SERVED_UNMASKED = "unmasked"
DESCRIPTION_FILE = "sift-fl-served.json"
HEAD_FILE = "head.safetensors"
STATE_DICT_FILE = "model.safetensors"


class ExportError(StoreError):
    """The served model cannot be exported as requested."""


@dataclass(frozen=True)
class ExportResult:
    """Output directory, served kind (masked or unmasked) and the files in the directory."""

    directory: Path
    served: str
    files: list[str]


def export_served_model(store: MergeStore, client_id: str, out_dir: str | Path, allow_unmasked: bool = False) -> ExportResult:
    """Write the model served to `client_id` into `out_dir`.

    For the bbc setting, `out_dir` receives the full MiniLM `BertModel` with the served
    top encoder layers (`save_pretrained`, loadable with `AutoModel.from_pretrained`),
    its tokenizer, and the classification head as `head.safetensors`; in LoRA mode the
    adapters are merged into the encoder weights first. For other settings
    it receives the model's full state dict as `model.safetensors`. Both get a
    `sift-fl-served.json` that records the client, the served kind and the store digests.

    Raises
    ------
    ExportError
        If the client is not merged and `allow_unmasked` is False, the store records no
        run spec, or the rebuilt θ0 does not match the store's base digest.
    """
    base = _rebuild_base(store)
    with store.reading():
        state = store.state
        if client_id in state.members:
            residual = store.load_residual(client_id)
            mask = {spec.name: residual.unpacked_mask(spec.name, spec.numel) for spec in store.identity.layout.tensors}
            served = SERVED_MASKED
        elif allow_unmasked:
            mask, served = None, SERVED_UNMASKED
        else:
            status = "was withdrawn" if client_id in store.withdrawn else "never joined this store"
            raise ExportError(
                f"client {client_id!r} {status}, so it has no mask; pass --allow-unmasked to export θ0 + τ̄ without a mask"
            )
        values = apply_residual(base.theta0, state.mean(), mask)
        description = {
            "client": client_id,
            "served": served,
            "setting": base.setting.name,
            "merged_clients": state.count,
            "accumulator_digest": state.digest(),
            "content_digest": content_digest(store),
            "layout_digest": base.layout_digest,
            "base_digest": base.base_digest,
            "run_spec": store.run_spec,
        }

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if base.setting.name == "bbc":
        _write_transformers(plain_model_values(base, values), out)
    else:
        _write_state_dict(base, values, out)
    (out / DESCRIPTION_FILE).write_text(json.dumps(description, indent=2) + "\n", encoding="utf-8")
    logger.info("exported the %s model of client %s to %s", served, client_id, out)
    return ExportResult(out, served, sorted(path.name for path in out.iterdir()))


def _rebuild_base(store: MergeStore) -> BaseModel:
    if not store.run_spec:
        raise ExportError(f"the store at {store.directory} records no run spec, so θ0 cannot be rebuilt for export")

    base = load_base_model(RunSpec.from_config(store.run_spec))
    if base.layout_digest != store.identity.layout_digest or base.base_digest != store.identity.base_digest:
        raise ExportError(
            f"θ0 rebuilt from the store's run spec has layout digest {base.layout_digest[:16]} and base digest "
            f"{base.base_digest[:16]}, but the store has {store.identity.layout_digest[:16]} and "
            f"{store.identity.base_digest[:16]}; install the setting, model and package versions the store was built with"
        )
    return base


def _write_state_dict(base: BaseModel, values: dict[str, np.ndarray], out: Path) -> None:
    import safetensors.torch

    model = copy.deepcopy(base.model)
    load_values(base.setting.trainable_parameters(model), values)
    state_dict = {name: tensor.detach().contiguous() for name, tensor in model.state_dict().items()}
    safetensors.torch.save_file(state_dict, str(out / STATE_DICT_FILE), metadata={"format": "pt"})


def _write_transformers(values: dict[str, np.ndarray], out: Path) -> None:
    from transformers import AutoTokenizer

    from sift_fl.settings.bbc import load_encoder, model_dir

    encoder = copy.deepcopy(load_encoder())
    encoder_state = encoder.state_dict()
    head = {name: value for name, value in values.items() if name not in encoder_state}
    unexpected = [name for name in head if not name.startswith("head.")]
    if unexpected:
        raise ExportError(f"trainable tensors {unexpected[:3]} are neither MiniLM encoder weights nor head weights")

    with torch.no_grad():
        for name, value in values.items():
            if name in encoder_state:
                encoder_state[name].copy_(torch.from_numpy(np.ascontiguousarray(value)))
    encoder.save_pretrained(str(out))
    AutoTokenizer.from_pretrained(str(model_dir())).save_pretrained(str(out))
    safetensors.numpy.save_file({name: np.ascontiguousarray(v) for name, v in head.items()}, str(out / HEAD_FILE))
