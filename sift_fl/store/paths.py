"""Names of the files in a store directory.

- `manifest.sqlite` (+ `-wal`, `-shm`): metadata, the state row (generation, accumulator
  file, digest), one row per merged client and a tombstone per withdrawn client.
- `accumulator.g<generation>.safetensors`: int64 sums and int32 coverage per tensor.
- `residuals/<sha256(client id)[:16]>.g<generation>.safetensors`: a client's packed mask
  bits and magnitudes, as uploaded.
- `store.lock`: the flock that serialises writers across processes.

Generation numbers in the names mean that a new file never overwrites a committed one.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

MANIFEST_NAME = "manifest.sqlite"
LOCK_NAME = "store.lock"
RESIDUAL_DIR = "residuals"


def accumulator_name(generation: int) -> str:
    return f"accumulator.g{generation:08d}.safetensors"


def residual_name(client_id: str, generation: int) -> str:
    """Return the residual file's path relative to the store directory."""
    key = hashlib.sha256(client_id.encode("utf-8")).hexdigest()[:16]
    return f"{RESIDUAL_DIR}/{key}.g{generation:08d}.safetensors"


def tensor_files(directory: Path) -> list[Path]:
    """Return the accumulator and residual files in the directory, including leftover temporary files."""
    files = sorted(directory.glob("accumulator.g*.safetensors*"))
    return files + sorted((directory / RESIDUAL_DIR).glob("*.safetensors*"))
