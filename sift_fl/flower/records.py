"""Conversion between the core's numpy structures and Flower records."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from flwr.app import Array, ArrayRecord

from sift_fl.codec import EncodedResidual, from_arrays
from sift_fl.layout import ParameterLayout


def arrays_to_record(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    """Return an `ArrayRecord` holding the named numpy arrays."""
    return ArrayRecord(array_dict={name: Array(np.ascontiguousarray(value)) for name, value in arrays.items()})


def record_to_arrays(record: ArrayRecord) -> dict[str, np.ndarray]:
    """Return the named numpy arrays of an `ArrayRecord`."""
    return {name: array.numpy() for name, array in record.items()}


def residual_to_record(residual: EncodedResidual) -> ArrayRecord:
    """Return the wire form of an encoded residual as an `ArrayRecord`."""
    return arrays_to_record(residual.to_arrays())


def record_to_residual(record: ArrayRecord, layout: ParameterLayout, max_bytes: int | None = None) -> EncodedResidual:
    """Validate an uploaded `ArrayRecord` against the layout and return the encoded residual."""
    return from_arrays(record_to_arrays(record), layout, max_bytes=max_bytes)
