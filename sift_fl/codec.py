"""Residual codec: a SIFT residual as a packed bitmask plus the magnitudes it selects.

Per tensor, the wire form is `mask` (uint8, `np.packbits` of m = 1{τ ≠ 0} over the
flattened tensor, big-endian bit order, zero padding) and `magnitude` (|τ| at the set
bits, in order, float32 by default or float16 when lossy). Signs are not sent: the sign
vector implies them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from sift_fl.layout import ParameterLayout
from sift_fl.sign import SignVector

MASK_SUFFIX = "/mask"
MAGNITUDE_SUFFIX = "/magnitude"
MAGNITUDE_DTYPES = ("float32", "float16")


class InvalidResidualError(ValueError):
    """An encoded or dense residual does not fit the layout, the sign vector or the format."""


@dataclass(frozen=True)
class EncodedTensor:
    """One tensor's residual on the wire: packed mask bits and the selected magnitudes."""

    mask: np.ndarray
    magnitude: np.ndarray

    @property
    def nbytes(self) -> int:
        return int(self.mask.nbytes + self.magnitude.nbytes)


@dataclass(frozen=True)
class EncodedResidual:
    """A client's residual on the wire, one `EncodedTensor` per layout tensor, in layout order."""

    tensors: dict[str, EncodedTensor]

    @property
    def nbytes(self) -> int:
        return sum(tensor.nbytes for tensor in self.tensors.values())

    def density(self) -> float:
        """Return the fraction of coordinates in the mask."""
        nonzero = sum(int(t.magnitude.size) for t in self.tensors.values())
        total = sum(int(t.mask.size) * 8 for t in self.tensors.values())
        return nonzero / max(total, 1)

    def unpacked_mask(self, name: str, numel: int) -> np.ndarray:
        """Return the flat bool mask of tensor `name`."""
        return np.unpackbits(self.tensors[name].mask, count=numel).view(bool)

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Return the flat `{name}/mask` and `{name}/magnitude` arrays of the wire format."""
        arrays: dict[str, np.ndarray] = {}
        for name, tensor in self.tensors.items():
            arrays[name + MASK_SUFFIX] = tensor.mask
            arrays[name + MAGNITUDE_SUFFIX] = tensor.magnitude
        return arrays


def dense_nbytes(layout: ParameterLayout) -> int:
    """Return the size in bytes of the same residual sent dense in float32."""
    return 4 * layout.num_parameters


def encode_residual(
    residual: Mapping[str, np.ndarray],
    layout: ParameterLayout,
    sign_vector: SignVector,
    magnitude_dtype: str = "float32",
) -> EncodedResidual:
    """Encode a dense SIFT residual, checking that it agrees with the sign vector.

    Raises
    ------
    InvalidResidualError
        If a tensor is missing, has the wrong shape, contains NaN or Inf, or has a nonzero
        coordinate whose sign disagrees with the sign vector.
    """
    if magnitude_dtype not in MAGNITUDE_DTYPES:
        raise ValueError(f"magnitude_dtype must be one of {MAGNITUDE_DTYPES}, got {magnitude_dtype!r}")
    _check_names(list(residual), layout, "residual")

    tensors: dict[str, EncodedTensor] = {}
    for spec in layout.tensors:
        values = np.asarray(residual[spec.name], dtype=np.float32)
        if tuple(values.shape) != spec.shape:
            raise InvalidResidualError(
                f"residual tensor {spec.name!r} has shape {tuple(values.shape)}, expected {spec.shape}"
            )
        flat = values.reshape(-1)
        if not np.isfinite(flat).all():
            raise InvalidResidualError(f"residual tensor {spec.name!r} contains NaN or Inf")

        positive = sign_vector.positive(spec.name)
        disagree = ((flat > 0) & ~positive) | ((flat < 0) & positive)
        if disagree.any():
            raise InvalidResidualError(
                f"residual tensor {spec.name!r} violates the sign vector at "
                f"{int(disagree.sum())} coordinates (first flat index {int(np.argmax(disagree))})"
            )

        mask = flat != 0
        magnitude = np.abs(flat[mask]).astype(magnitude_dtype)
        if magnitude_dtype == "float16" and not (np.isfinite(magnitude).all() and (magnitude > 0).all()):
            raise InvalidResidualError(
                f"residual tensor {spec.name!r} has magnitudes outside float16's range; use float32"
            )
        tensors[spec.name] = EncodedTensor(np.packbits(mask), magnitude)
    return EncodedResidual(tensors)


def decode_residual(encoded: EncodedResidual, layout: ParameterLayout, sign_vector: SignVector) -> dict[str, np.ndarray]:
    """Decode to dense float32 residual tensors shaped as in the layout."""
    residual: dict[str, np.ndarray] = {}
    for spec in layout.tensors:
        tensor = encoded.tensors[spec.name]
        mask = encoded.unpacked_mask(spec.name, spec.numel)
        flat = np.zeros(spec.numel, dtype=np.float32)
        signs = np.where(sign_vector.positive(spec.name)[mask], np.float32(1), np.float32(-1))
        flat[mask] = tensor.magnitude.astype(np.float32) * signs
        residual[spec.name] = flat.reshape(spec.shape)
    return residual


def from_arrays(
    arrays: Mapping[str, np.ndarray],
    layout: ParameterLayout,
    max_bytes: int | None = None,
) -> EncodedResidual:
    """Validate wire arrays against the layout and return the encoded residual.

    Raises
    ------
    InvalidResidualError
        Naming the tensor and field, if a key is missing or unexpected, a dtype or shape
        is wrong, the magnitude count differs from the mask's set bits, padding bits are
        set, a magnitude is NaN, Inf or not positive, or the payload exceeds `max_bytes`.
    """
    expected_keys = [name + suffix for name in layout.names for suffix in (MASK_SUFFIX, MAGNITUDE_SUFFIX)]
    _check_names(list(arrays), layout, "upload", expected_keys)

    total = sum(int(np.asarray(a).nbytes) for a in arrays.values())
    if max_bytes is not None and total > max_bytes:
        raise InvalidResidualError(f"upload is {total} bytes, more than the limit of {max_bytes} bytes")

    tensors: dict[str, EncodedTensor] = {}
    for spec in layout.tensors:
        mask = np.asarray(arrays[spec.name + MASK_SUFFIX])
        magnitude = np.asarray(arrays[spec.name + MAGNITUDE_SUFFIX])
        _check_mask(spec.name, spec.numel, mask)
        _check_magnitude(spec.name, mask, magnitude)
        tensors[spec.name] = EncodedTensor(mask, magnitude)
    return EncodedResidual(tensors)


def _check_names(keys: list[str], layout: ParameterLayout, what: str, expected: list[str] | None = None) -> None:
    expected = layout.names if expected is None else expected
    missing = [key for key in expected if key not in keys]
    unexpected = [key for key in keys if key not in set(expected)]
    if missing:
        raise InvalidResidualError(f"{what} is missing tensors {missing[:5]} ({len(missing)} in all)")
    if unexpected:
        raise InvalidResidualError(f"{what} has tensors not in the layout: {unexpected[:5]} ({len(unexpected)} in all)")


def _check_mask(name: str, numel: int, mask: np.ndarray) -> None:
    field = name + MASK_SUFFIX
    expected_len = (numel + 7) // 8
    if mask.dtype != np.uint8 or mask.ndim != 1:
        raise InvalidResidualError(f"{field}: expected a 1-D uint8 array, got {mask.ndim}-D {mask.dtype}")
    if mask.size != expected_len:
        raise InvalidResidualError(f"{field}: expected {expected_len} bytes for {numel} coordinates, got {mask.size}")

    padding = expected_len * 8 - numel
    if padding and int(mask[-1]) & ((1 << padding) - 1):
        raise InvalidResidualError(f"{field}: padding bits after coordinate {numel} must be zero")


def _check_magnitude(name: str, mask: np.ndarray, magnitude: np.ndarray) -> None:
    field = name + MAGNITUDE_SUFFIX
    if magnitude.dtype.name not in MAGNITUDE_DTYPES or magnitude.ndim != 1:
        raise InvalidResidualError(
            f"{field}: expected a 1-D float32 or float16 array, got {magnitude.ndim}-D {magnitude.dtype}"
        )

    set_bits = int(np.bitwise_count(mask).sum())
    if magnitude.size != set_bits:
        raise InvalidResidualError(f"{field}: mask has {set_bits} set bits but {magnitude.size} magnitudes were sent")
    if not magnitude.size:
        return

    # min and max propagate NaN, so two reductions check all values without a temporary array.
    low, high = float(magnitude.min()), float(magnitude.max())
    if not (np.isfinite(low) and np.isfinite(high)):
        raise InvalidResidualError(f"{field}: contains NaN or Inf")
    if not low > 0:
        raise InvalidResidualError(f"{field}: magnitudes at set mask bits must be positive")
