"""Validation of a client's upload before it may touch the store.

Every check runs before any file is written, so a rejected upload leaves the store
unchanged. Each rejection names the client and the field that failed.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from sift_fl.codec import MAGNITUDE_SUFFIX, EncodedResidual, InvalidResidualError, from_arrays
from sift_fl.fixed_point import OutOfRangeError
from sift_fl.store.identity import StoreIdentity, describe_format

MAX_CLIENT_ID_LENGTH = 200
_FIELD_PREFIX = re.compile(r"^(?P<field>[^\s:]+/(mask|magnitude)): ")


class RejectedUploadError(ValueError):
    """An upload failed validation; `client_id` and `field` name the client and the offending field."""

    def __init__(self, client_id: str, field: str, reason: str) -> None:
        super().__init__(f"upload from client {client_id!r} rejected, field {field}: {reason}")
        self.client_id = client_id
        self.field = field
        self.reason = reason


@dataclass(frozen=True)
class Upload:
    """One client's upload: its id, the wire arrays of its residual and the digests it trained against.

    `arrays` contains `{name}/mask` (uint8 packbits of the mask) and `{name}/magnitude`
    (float32 or float16 |τ| at the set bits) for every tensor of the layout.
    """

    client_id: str
    arrays: Mapping[str, np.ndarray]
    layout_digest: str
    base_digest: str
    sign_seed: int


def check_client_id(client_id: object) -> str:
    """Return the client id, or raise RejectedUploadError if it is empty, too long or has control characters."""
    text = client_id if isinstance(client_id, str) else repr(client_id)
    if not isinstance(client_id, str) or not client_id:
        raise RejectedUploadError(text, "client-id", "must be a non-empty string")
    if len(client_id) > MAX_CLIENT_ID_LENGTH:
        raise RejectedUploadError(text[:40], "client-id", f"is {len(client_id)} characters, the limit is {MAX_CLIENT_ID_LENGTH}")
    if not client_id.isprintable():
        raise RejectedUploadError(text, "client-id", "contains control characters")
    return client_id


def validate_upload(upload: Upload, identity: StoreIdentity, max_bytes: int) -> EncodedResidual:
    """Check an upload against the store's identity and number format; return its encoded residual.

    Raises
    ------
    RejectedUploadError
        If the client id is invalid, or a digest or the sign seed differs from the store's.
        If a tensor name, dtype or shape is wrong, or the magnitude count differs from the
        mask's set bits. If a magnitude is NaN, Inf, not positive (a sign opposite to the sign
        vector) or above the number format's max magnitude, or the payload exceeds `max_bytes`.
    """
    client_id = check_client_id(upload.client_id)
    _check_binding(upload, identity)

    try:
        residual = from_arrays(upload.arrays, identity.layout, max_bytes=max_bytes)
    except InvalidResidualError as error:
        raise RejectedUploadError(client_id, *_split_field(str(error))) from error

    number_format = identity.number_format
    for name, tensor in residual.tensors.items():
        field = name + MAGNITUDE_SUFFIX
        try:
            number_format.quantize(tensor.magnitude, field)
        except OutOfRangeError as error:
            reason = f"{error}; the store's number format is {describe_format(number_format)}"
            raise RejectedUploadError(client_id, field, reason) from error
    return residual


def _check_binding(upload: Upload, identity: StoreIdentity) -> None:
    expected = {
        "layout-digest": identity.layout_digest,
        "base-digest": identity.base_digest,
    }
    received = {"layout-digest": upload.layout_digest, "base-digest": upload.base_digest}
    for field, value in expected.items():
        if received[field] != value:
            raise RejectedUploadError(
                upload.client_id, field, f"is {str(received[field])[:16]}, the store expects {value[:16]}; "
                "the client trained against a different model"
            )

    if isinstance(upload.sign_seed, bool) or not isinstance(upload.sign_seed, (int, np.integer)):
        raise RejectedUploadError(upload.client_id, "sign-seed", f"must be an integer, got {upload.sign_seed!r}")
    if int(upload.sign_seed) != identity.sign_seed:
        raise RejectedUploadError(
            upload.client_id, "sign-seed", f"is {upload.sign_seed}, the store expects {identity.sign_seed}"
        )


def _split_field(message: str) -> tuple[str, str]:
    # The codec starts tensor-level messages with "<tensor>/mask: " or "<tensor>/magnitude: ".
    match = _FIELD_PREFIX.match(message)
    if match:
        return match.group("field"), message[match.end():]
    if message.startswith("upload is ") and "bytes" in message:
        return "payload size", message
    return "tensor names", message
