"""A deployed client's own copy of its residual, kept on the node's disk across runs.

The ClientApp writes the encoded residual it uploads (packed mask bits and magnitudes) to
`<state-dir>/residual.safetensors`, where `state-dir` is an absolute path in the node
config. In a later run the client evaluates with its own mask from that file, so the
server does not need to send the mask back. The residual digest lets the client compare
its own copy with what the server's store merged for it.

The file's metadata records the client id, the layout and base digests, the sign seed and
the residual digest. `load` ignores a file whose metadata belongs to another client or
model, or whose arrays no longer match the recorded digest, and logs why.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.numpy

from sift_fl.codec import EncodedResidual, InvalidResidualError, from_arrays
from sift_fl.layout import ParameterLayout
from sift_fl.store.files import write_atomically

logger = logging.getLogger(__name__)

STATE_DIR_KEY = "state-dir"
RESIDUAL_FILE = "residual.safetensors"


def residual_digest(arrays: Mapping[str, np.ndarray]) -> str:
    """Return a sha256 over the wire arrays of a residual (names, dtypes, shapes and bytes, sorted by name).

    The client and the server compute it from the same arrays, so equal digests mean the
    client has exactly the residual the store merged. Safetensors files are not compared
    byte for byte because their metadata order varies between writes.
    """
    hasher = hashlib.sha256()
    for name in sorted(arrays):
        array = np.ascontiguousarray(arrays[name])
        hasher.update(f"{name} {array.dtype.str} {list(array.shape)}\n".encode("utf-8"))
        hasher.update(array.tobytes())
    return hasher.hexdigest()


@dataclass(frozen=True)
class ModelBinding:
    """The client id and the model a residual was trained for."""

    client_id: str
    layout_digest: str
    base_digest: str
    sign_seed: int

    def to_metadata(self) -> dict[str, str]:
        return {
            "client-id": self.client_id,
            "layout-digest": self.layout_digest,
            "base-digest": self.base_digest,
            "sign-seed": str(self.sign_seed),
        }


class ClientState:
    """The directory where one client keeps its residual between runs."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.path = self.directory / RESIDUAL_FILE

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, Any]) -> ClientState | None:
        """Return the state of the node config's `state-dir`, or None if the key is missing or empty.

        Raises
        ------
        ValueError
            If `state-dir` is a relative path: the ClientApp runs from an installed copy of
            the app, not from the directory where the SuperNode was started.
        """
        value = str(node_config.get(STATE_DIR_KEY, "")).strip()
        if not value:
            return None
        if not os.path.isabs(value):
            raise ValueError(f"node config {STATE_DIR_KEY} must be an absolute path, got {value!r}; set it with --node-config")
        return cls(value)

    def save(self, binding: ModelBinding, residual: EncodedResidual) -> str:
        """Write the residual durably (temporary file, fsync, rename); return its residual digest."""
        arrays = {name: np.ascontiguousarray(array) for name, array in residual.to_arrays().items()}
        digest = residual_digest(arrays)
        self.directory.mkdir(parents=True, exist_ok=True)
        data = safetensors.numpy.save(arrays, metadata={**binding.to_metadata(), "residual-digest": digest})
        write_atomically(self.path, data)
        logger.info("client %s: saved its residual to %s (digest %s)", binding.client_id, self.path, digest[:16])
        return digest

    def load_arrays(self, binding: ModelBinding) -> tuple[dict[str, np.ndarray], str] | None:
        """Return the saved wire arrays and their digest, or None if there is no usable file for `binding`."""
        if not self.path.is_file():
            return None
        try:
            with safetensors.safe_open(str(self.path), framework="numpy") as handle:
                metadata = handle.metadata() or {}
                arrays = {name: handle.get_tensor(name) for name in handle.keys()}
        except (OSError, ValueError, safetensors.SafetensorError) as error:
            logger.warning("client %s: ignoring unreadable residual file %s: %s", binding.client_id, self.path, error)
            return None

        expected = binding.to_metadata()
        mismatched = sorted(key for key, value in expected.items() if metadata.get(key) != value)
        if mismatched:
            logger.warning("client %s: ignoring %s, saved for another client or model (%s differ)", binding.client_id, self.path, ", ".join(mismatched))
            return None
        digest = residual_digest(arrays)
        if digest != metadata.get("residual-digest"):
            logger.warning("client %s: ignoring %s: its arrays do not match the recorded residual digest", binding.client_id, self.path)
            return None
        return arrays, digest

    def load(self, binding: ModelBinding, layout: ParameterLayout) -> EncodedResidual | None:
        """Return the saved residual validated against `layout`, or None if there is no usable file."""
        loaded = self.load_arrays(binding)
        if loaded is None:
            return None
        try:
            return from_arrays(loaded[0], layout)
        except InvalidResidualError as error:
            logger.warning("client %s: ignoring %s: %s", binding.client_id, self.path, error)
            return None
