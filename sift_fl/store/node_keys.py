"""Node-key bindings: which node key may act for which client id.

A deployment with SuperNode authentication binds each client id to the sha256 of the
public key of the node that first uploaded for it, in the manifest table `node_keys`.
From then on, only a node with that key may upload, withdraw or receive served models
for the client id, and that key may act for no other client id. A binding outlives the
client's withdrawal, so no other node can join under the withdrawn id. A binding row contains the key's
sha256, the client id and the time, and no residual data.

The table is created by the first binding, so stores that never bind keep the schema
they were created with. Bindings change neither the accumulator, the generation number
nor the content digest.
"""

from __future__ import annotations

import sqlite3
import time

from sift_fl.store.identity import StoreError

TABLE = "node_keys"
_SCHEMA = (
    f"CREATE TABLE IF NOT EXISTS {TABLE} (client_id TEXT PRIMARY KEY, key_sha256 TEXT NOT NULL UNIQUE, bound_at REAL NOT NULL)"
)


class NodeKeyMismatchError(StoreError):
    """A node key tried to act for a client id bound to another key, or is already bound to another client id."""

    def __init__(self, client_id: str, key_sha256: str, reason: str) -> None:
        super().__init__(f"node key {key_sha256[:16]} rejected for client {client_id!r}: {reason}")
        self.client_id = client_id
        self.key_sha256 = key_sha256
        self.reason = reason


def read_bindings(connection: sqlite3.Connection) -> dict[str, str]:
    """Return the key sha256 bound to each client id (empty if the table does not exist)."""
    exists = connection.execute("SELECT count(*) FROM sqlite_master WHERE type='table' AND name=?", (TABLE,)).fetchone()[0]
    if not exists:
        return {}
    return dict(connection.execute(f"SELECT client_id, key_sha256 FROM {TABLE}").fetchall())


def check_binding(bindings: dict[str, str], client_id: str, key_sha256: str) -> bool:
    """Return True if `client_id` is already bound to `key_sha256`, False if neither is bound yet.

    Raises
    ------
    NodeKeyMismatchError
        If the client id is bound to another key, or the key is bound to another client id.
    """
    bound_key = bindings.get(client_id)
    if bound_key is not None and bound_key != key_sha256:
        raise NodeKeyMismatchError(client_id, key_sha256, f"the client id is bound to node key {bound_key[:16]}")
    if bound_key is None:
        for other_client, other_key in bindings.items():
            if other_key == key_sha256:
                raise NodeKeyMismatchError(client_id, key_sha256, f"the key is bound to client {other_client!r}")
    return bound_key is not None


def bind(connection: sqlite3.Connection, client_id: str, key_sha256: str) -> bool:
    """Bind `client_id` to `key_sha256` in one transaction; return True if the binding is new.

    The caller holds the store's exclusive lock.

    Raises
    ------
    NodeKeyMismatchError
        If the client id or the key is bound otherwise (see `check_binding`); nothing is written.
    """
    if len(key_sha256) != 64 or any(c not in "0123456789abcdef" for c in key_sha256):
        raise ValueError(f"key_sha256 must be 64 lowercase hex digits, got {key_sha256!r}")
    connection.execute("BEGIN IMMEDIATE")
    try:
        if check_binding(read_bindings(connection), client_id, key_sha256):
            connection.execute("ROLLBACK")
            return False
        connection.execute(_SCHEMA)
        connection.execute(f"INSERT INTO {TABLE} (client_id, key_sha256, bound_at) VALUES (?, ?, ?)", (client_id, key_sha256, time.time()))
    except BaseException:
        connection.execute("ROLLBACK")
        raise
    connection.execute("COMMIT")
    return True
