"""The SIFT sign vector: one ±1 value per trainable parameter, derived from a public seed.

Each value is a pure function of (seed, tensor name, flat index): a splitmix64 hash of a
per-tensor key and the index, whose top bit chooses the sign. The hash uses only uint64
arithmetic, so every client computes the same vector on any platform, without torch's
global RNG (whose streams differ by device and version).
"""

from __future__ import annotations

import hashlib

import numpy as np

from sift_fl.layout import ParameterLayout

_GOLDEN_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_MIX_1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX_2 = np.uint64(0x94D049BB133111EB)
_CHUNK = 1 << 20
MAX_SEED = 2**63 - 1


def _splitmix64_finalize(x: np.ndarray) -> np.ndarray:
    x = (x ^ (x >> np.uint64(30))) * _MIX_1
    x = (x ^ (x >> np.uint64(27))) * _MIX_2
    return x ^ (x >> np.uint64(31))


def _tensor_key(seed: int, name: str) -> np.uint64:
    digest = hashlib.sha256(f"{seed}:{name}".encode("utf-8")).digest()
    return np.uint64(int.from_bytes(digest[:8], "little"))


def check_seed(seed: int) -> int:
    """Return `seed` as an int, or raise ValueError if it is not in [0, 2**63 - 1]."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise ValueError(f"sign seed must be an integer, got {seed!r}")
    if not 0 <= int(seed) <= MAX_SEED:
        raise ValueError(f"sign seed must be in [0, 2**63 - 1], got {seed}")
    return int(seed)


def positive_signs(seed: int, name: str, numel: int) -> np.ndarray:
    """Return a flat bool array: True where the sign vector of tensor `name` is +1."""
    key = _tensor_key(check_seed(seed), name)
    out = np.empty(numel, dtype=bool)
    with np.errstate(over="ignore"):
        for start in range(0, numel, _CHUNK):
            stop = min(start + _CHUNK, numel)
            counter = np.arange(start + 1, stop + 1, dtype=np.uint64)
            hashed = _splitmix64_finalize(key + counter * _GOLDEN_GAMMA)
            out[start:stop] = (hashed >> np.uint64(63)).astype(bool)
    return out


class SignVector:
    """The sign vector of a parameter layout, as flat bool arrays (True = +1) per tensor."""

    def __init__(self, seed: int, layout: ParameterLayout) -> None:
        self.seed = check_seed(seed)
        self.layout = layout
        self._positive: dict[str, np.ndarray] = {}

    def positive(self, name: str) -> np.ndarray:
        """Return the flat bool array of tensor `name`, computed once and cached."""
        if name not in self._positive:
            spec = self.layout.spec(name)
            self._positive[name] = positive_signs(self.seed, name, spec.numel)
        return self._positive[name]

    def signs(self, name: str) -> np.ndarray:
        """Return the sign vector of tensor `name` as a flat int8 array of ±1."""
        return np.where(self.positive(name), np.int8(1), np.int8(-1))
