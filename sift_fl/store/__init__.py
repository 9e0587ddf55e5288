"""Durable, exact merge store: SQLite manifest plus safetensors files, crash-safe joins and withdrawals."""

from sift_fl.store.identity import StoreError, StoreIdentity, StoreMismatchError, describe_format
from sift_fl.store.node_keys import NodeKeyMismatchError
from sift_fl.store.store import MergeStore, UnknownClientError, WithdrawalOutcome
from sift_fl.store.validation import RejectedUploadError, Upload
from sift_fl.store.verify import VerifyReport, content_digest, verify_store

__all__ = [
    "MergeStore",
    "NodeKeyMismatchError",
    "RejectedUploadError",
    "StoreError",
    "StoreIdentity",
    "StoreMismatchError",
    "UnknownClientError",
    "Upload",
    "VerifyReport",
    "WithdrawalOutcome",
    "content_digest",
    "describe_format",
    "verify_store",
]
