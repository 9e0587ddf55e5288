"""Tensor files of the store: safetensors written to a temporary name, fsynced, then renamed.

Every write goes to `<name>.tmp`, is fsynced, renamed over `<name>` with `os.replace`,
and the directory is fsynced, so a file under its final name is always complete. Each
step calls `step(label)` first, which lets crash tests stop the process between steps.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import safetensors.numpy

from sift_fl.codec import EncodedResidual, InvalidResidualError, from_arrays
from sift_fl.layout import ParameterLayout
from sift_fl.merge import MergeState
from sift_fl.store.identity import StoreError

SAFETENSORS_DTYPES = {"U8": np.uint8, "F16": np.float16, "F32": np.float32, "I32": np.int32, "I64": np.int64}

StepHook = Callable[[str], None]
TEMPORARY_SUFFIX = ".tmp"
SUMS_SUFFIX = "/sums"
COVERAGE_SUFFIX = "/coverage"


def no_step(label: str) -> None:
    """Do nothing; the default step hook."""


def fsync_directory(directory: Path) -> None:
    """Flush a directory's entries (new, renamed and deleted names) to disk."""
    descriptor = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def write_atomically(path: Path, data: bytes, step: StepHook = no_step) -> None:
    """Write `data` to `path` through a fsynced temporary file and an atomic rename."""
    temporary = path.with_name(path.name + TEMPORARY_SUFFIX)
    step(f"write {temporary.name}")
    with open(temporary, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())

    step(f"rename {temporary.name}")
    os.replace(temporary, path)
    step(f"fsync directory of {path.name}")
    fsync_directory(path.parent)


def shred(path: Path, step: StepHook = no_step) -> None:
    """Overwrite a file with zeros, fsync it, then delete it.

    On copy-on-write file systems and SSDs the old blocks may survive on the device. The
    overwrite only ensures that no file under the store directory keeps the bytes.
    """
    step(f"overwrite {path.name}")
    size = path.stat().st_size
    with open(path, "r+b") as handle:
        handle.write(bytes(size))
        handle.flush()
        os.fsync(handle.fileno())

    step(f"unlink {path.name}")
    path.unlink()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def residual_to_bytes(client_id: str, residual: EncodedResidual) -> bytes:
    """Serialize an encoded residual (packed mask bits and magnitudes per tensor) as safetensors."""
    arrays = {name: np.ascontiguousarray(array) for name, array in residual.to_arrays().items()}
    return safetensors.numpy.save(arrays, metadata={"client-id": client_id, "content": "sift-fl residual"})


def residual_from_file(path: Path, layout: ParameterLayout, expected_sha256: str) -> EncodedResidual:
    """Read a stored residual, check its checksum and validate it against the layout.

    Raises
    ------
    StoreError
        If the file is missing, its sha256 differs from the manifest's, or it does not fit the layout.
    """
    try:
        data = read_into_buffer(path)
    except FileNotFoundError as error:
        raise StoreError(f"residual file {path} listed in the manifest is missing") from error
    if sha256_bytes(data) != expected_sha256:
        raise StoreError(f"residual file {path} does not match the sha256 recorded in the manifest; it was modified")

    try:
        return from_arrays(safetensors_views(data), layout)
    except (InvalidResidualError, ValueError, KeyError) as error:
        raise StoreError(f"residual file {path} does not fit the store's layout: {error}") from error


def read_into_buffer(path: Path) -> bytearray:
    """Return the file's bytes in one preallocated buffer (`bytearray(path.read_bytes())` would copy them twice)."""
    with open(path, "rb") as handle:
        data = bytearray(os.fstat(handle.fileno()).st_size)
        handle.readinto(data)
    return data


def safetensors_views(data: bytearray | bytes) -> dict[str, np.ndarray]:
    """Return the tensors of a safetensors buffer as numpy views into `data`, without copying.

    `safetensors.numpy.load` (safetensors 0.8) copies every tensor out of the buffer, so a
    reader that keeps the buffer too holds each residual twice. Supports the dtypes residual
    files use: U8, F16, F32, I32 and I64.
    """
    header_size = int.from_bytes(bytes(data[:8]), "little")
    header = json.loads(bytes(data[8 : 8 + header_size]))
    body_offset = 8 + header_size

    arrays = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        dtype = np.dtype(SAFETENSORS_DTYPES[entry["dtype"]])
        start, stop = entry["data_offsets"]
        count = (stop - start) // dtype.itemsize
        arrays[name] = np.frombuffer(data, dtype=dtype, count=count, offset=body_offset + start).reshape(entry["shape"])
    return arrays


def accumulator_to_bytes(state: MergeState) -> bytes:
    """Serialize the int64 sums and int32 coverage of a merge state as safetensors."""
    arrays: dict[str, np.ndarray] = {}
    for name in state.layout.names:
        arrays[name + SUMS_SUFFIX] = np.ascontiguousarray(state.sums[name], dtype=np.int64)
        arrays[name + COVERAGE_SUFFIX] = np.ascontiguousarray(state.coverage[name], dtype=np.int32)
    return safetensors.numpy.save(arrays, metadata={"count": str(state.count), "content": "sift-fl accumulator"})


def load_accumulator(path: Path, state: MergeState) -> None:
    """Fill `state.sums` and `state.coverage` from an accumulator file.

    Raises
    ------
    StoreError
        If the file is missing or a tensor is absent or misshaped.
    """
    try:
        arrays = safetensors.numpy.load(path.read_bytes())
    except FileNotFoundError as error:
        raise StoreError(f"accumulator file {path} listed in the manifest is missing") from error

    for spec in state.layout.tensors:
        sums = arrays.get(spec.name + SUMS_SUFFIX)
        coverage = arrays.get(spec.name + COVERAGE_SUFFIX)
        if sums is None or coverage is None or sums.shape != (spec.numel,) or coverage.shape != (spec.numel,):
            raise StoreError(f"accumulator file {path} has no valid sums and coverage for tensor {spec.name!r}")
        state.sums[spec.name] = sums.astype(np.int64)
        state.coverage[spec.name] = coverage.astype(np.int32)
