"""Parameter layout of the trainable set and the digests that pin it down.

A layout is the ordered list of trainable tensors (name, shape, dtype). Every
flat vector in sift-fl (sign vector, residual, mask, merge sums) follows it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class TensorSpec:
    """Name, shape and numpy dtype name of one trainable tensor."""

    name: str
    shape: tuple[int, ...]
    dtype: str

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))


@dataclass(frozen=True)
class ParameterLayout:
    """Ordered description of the trainable tensors of a model."""

    tensors: tuple[TensorSpec, ...]

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, Any]) -> ParameterLayout:
        """Build a layout from named arrays (numpy arrays or torch tensors), in mapping order."""
        specs = []
        for name, array in arrays.items():
            numpy_array = as_numpy(array)
            specs.append(TensorSpec(name, tuple(int(d) for d in numpy_array.shape), numpy_array.dtype.name))
        return cls(tuple(specs))

    @property
    def names(self) -> list[str]:
        return [spec.name for spec in self.tensors]

    @property
    def num_parameters(self) -> int:
        return sum(spec.numel for spec in self.tensors)

    def spec(self, name: str) -> TensorSpec:
        for spec in self.tensors:
            if spec.name == name:
                return spec
        raise KeyError(f"tensor {name!r} is not in the parameter layout")

    def to_json(self) -> str:
        rows = [[spec.name, list(spec.shape), spec.dtype] for spec in self.tensors]
        return json.dumps(rows, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> ParameterLayout:
        rows = json.loads(text)
        return cls(tuple(TensorSpec(name, tuple(shape), dtype) for name, shape, dtype in rows))

    def digest(self) -> str:
        """Return the sha256 hex digest of the canonical JSON form of the layout."""
        return hashlib.sha256(self.to_json().encode("utf-8")).hexdigest()


def as_numpy(array: Any) -> np.ndarray:
    """Return a numpy view or copy of a numpy array or CPU/GPU torch tensor."""
    if isinstance(array, np.ndarray):
        return array
    if hasattr(array, "detach"):
        return array.detach().cpu().numpy()
    return np.asarray(array)


def base_digest(layout: ParameterLayout, arrays: Mapping[str, Any]) -> str:
    """Return the sha256 hex digest of the base model's trainable tensors in layout order.

    The digest covers the layout digest and each tensor's little-endian C-order bytes,
    so two clients agree on it only if their θ0 is bit-identical.
    """
    hasher = hashlib.sha256(layout.digest().encode("ascii"))
    for spec in layout.tensors:
        if spec.name not in arrays:
            raise KeyError(f"base model has no tensor {spec.name!r} from the layout")

        array = np.ascontiguousarray(as_numpy(arrays[spec.name]))
        if tuple(array.shape) != spec.shape or array.dtype.name != spec.dtype:
            raise ValueError(
                f"base tensor {spec.name!r} has shape {tuple(array.shape)} and dtype "
                f"{array.dtype.name}, but the layout expects {spec.shape} and {spec.dtype}"
            )
        hasher.update(array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes())
    return hasher.hexdigest()


def frozen_digest(arrays: Mapping[str, Any]) -> str:
    """Return the sha256 hex digest of frozen tensors (names, shapes, dtypes and bytes, sorted by name).

    Frozen weights are not in the layout, but the merge is only meaningful if every client
    has the same ones (for example the shared LoRA A matrices), so θ0's digest covers them too.
    """
    hasher = hashlib.sha256()
    for name in sorted(arrays):
        array = np.ascontiguousarray(as_numpy(arrays[name]))
        hasher.update(f"{name}:{list(array.shape)}:{array.dtype.name};".encode("utf-8"))
        hasher.update(array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes())
    return hasher.hexdigest()


def combined_digest(*digests: str) -> str:
    """Return the sha256 hex digest of several hex digests joined in order."""
    return hashlib.sha256(":".join(digests).encode("ascii")).hexdigest()
