"""Per-client residuals on disk, so the server keeps merge sums in memory and never N dense models.

Files are plain `.npz` archives (no pickled objects) under `root/<kind>/<client>.npz`:
SIFT residuals in the wire format (packed mask and magnitudes), TIES-trimmed residuals as flat
indices and values, and plain finetuning residuals dense in float32, since plain finetuning
moves almost every coordinate.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from sift_fl.codec import MAGNITUDE_SUFFIX, MASK_SUFFIX, EncodedResidual, from_arrays
from sift_fl.layout import ParameterLayout

SparseResidual = dict[str, tuple[np.ndarray, np.ndarray]]


class ResidualStore:
    """Write, read and delete per-client residuals of one kind ("ft", "sift", "trimmed") under `root`."""

    def __init__(self, root: Path, layout: ParameterLayout) -> None:
        self.root = Path(root)
        self.layout = layout
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, kind: str, client_id: str) -> Path:
        return self.root / kind / f"{client_id}.npz"

    def _write(self, kind: str, client_id: str, arrays: Mapping[str, np.ndarray]) -> None:
        path = self.path(kind, client_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as handle:
            np.savez(handle, **arrays)

    def _read(self, kind: str, client_id: str) -> dict[str, np.ndarray]:
        path = self.path(kind, client_id)
        if not path.exists():
            raise FileNotFoundError(f"no stored {kind} residual for client {client_id!r} at {path}")
        with np.load(path, allow_pickle=False) as stored:
            return {key: stored[key] for key in stored.files}

    def write_encoded(self, kind: str, client_id: str, encoded: EncodedResidual) -> None:
        arrays = {}
        for index, name in enumerate(self.layout.names):
            arrays[f"t{index}_mask"] = encoded.tensors[name].mask
            arrays[f"t{index}_magnitude"] = encoded.tensors[name].magnitude
        self._write(kind, client_id, arrays)

    def read_encoded(self, kind: str, client_id: str) -> EncodedResidual:
        """Read an encoded residual back and validate it against the layout."""
        stored = self._read(kind, client_id)
        arrays = {}
        for index, name in enumerate(self.layout.names):
            arrays[name + MASK_SUFFIX] = stored[f"t{index}_mask"]
            arrays[name + MAGNITUDE_SUFFIX] = stored[f"t{index}_magnitude"]
        return from_arrays(arrays, self.layout)

    def write_dense(self, kind: str, client_id: str, residual: Mapping[str, np.ndarray]) -> None:
        arrays = {f"t{index}": np.asarray(residual[name], dtype=np.float32) for index, name in enumerate(self.layout.names)}
        self._write(kind, client_id, arrays)

    def read_dense(self, kind: str, client_id: str) -> dict[str, np.ndarray]:
        stored = self._read(kind, client_id)
        return {name: stored[f"t{index}"].reshape(self.layout.spec(name).shape) for index, name in enumerate(self.layout.names)}

    def write_sparse(self, kind: str, client_id: str, residual: Mapping[str, np.ndarray]) -> None:
        """Store the nonzero entries of a dense residual as flat int64 indices and float32 values."""
        arrays = {}
        for index, name in enumerate(self.layout.names):
            flat = np.asarray(residual[name], dtype=np.float32).reshape(-1)
            nonzero = np.flatnonzero(flat)
            arrays[f"t{index}_index"] = nonzero
            arrays[f"t{index}_value"] = flat[nonzero]
        self._write(kind, client_id, arrays)

    def read_sparse(self, kind: str, client_id: str) -> SparseResidual:
        """Return {name: (flat indices, values)} of a residual stored with `write_sparse`."""
        stored = self._read(kind, client_id)
        return {name: (stored[f"t{index}_index"], stored[f"t{index}_value"]) for index, name in enumerate(self.layout.names)}

    def delete(self, kind: str, client_id: str) -> None:
        self.path(kind, client_id).unlink(missing_ok=True)

    def nbytes(self, kind: str) -> int:
        """Return the bytes on disk of all residuals of `kind`."""
        folder = self.root / kind
        return sum(path.stat().st_size for path in folder.glob("*.npz")) if folder.exists() else 0

    def remove_all(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
