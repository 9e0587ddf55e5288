"""SQLite manifest of a merge store: metadata, the current accumulator, merged clients, tombstones.

The manifest runs in WAL mode with `synchronous=FULL`, so a commit is durable once it
returns, and with `secure_delete=ON`, so deleted rows are overwritten with zeros. Each
join and each withdrawal is one transaction that also advances the generation number
and points the state row at the accumulator file of that generation.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from pathlib import Path

from sift_fl.store.files import StepHook, no_step
from sift_fl.store.identity import StoreError

SCHEMA = (
    "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    "CREATE TABLE state (id INTEGER PRIMARY KEY CHECK (id = 1), generation INTEGER NOT NULL, "
    "accumulator TEXT NOT NULL, digest TEXT NOT NULL)",
    "CREATE TABLE clients (client_id TEXT PRIMARY KEY, residual TEXT NOT NULL UNIQUE, sha256 TEXT NOT NULL, "
    "density REAL NOT NULL, nbytes INTEGER NOT NULL, joined_at REAL NOT NULL, generation INTEGER NOT NULL)",
    "CREATE TABLE tombstones (client_id TEXT PRIMARY KEY, withdrawn_at REAL NOT NULL)",
)


@dataclass(frozen=True)
class ClientRow:
    """Manifest row of one merged client: its residual file, checksum and upload statistics."""

    client_id: str
    residual_file: str
    sha256: str
    density: float
    nbytes: int
    joined_at: float
    generation: int


@dataclass(frozen=True)
class Snapshot:
    """A consistent read of the manifest: generation, accumulator file, clients and tombstones."""

    generation: int
    accumulator_file: str
    digest: str
    clients: dict[str, ClientRow]
    tombstones: dict[str, float]


class GenerationConflictError(StoreError):
    """Another process changed the manifest between this process's read and its commit."""


class Manifest:
    """The store's SQLite database, opened with durable and secure-delete settings."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.connection = sqlite3.connect(path, isolation_level=None, timeout=60.0)
        self.connection.execute("PRAGMA journal_mode=WAL")
        self.connection.execute("PRAGMA synchronous=FULL")
        self.connection.execute("PRAGMA secure_delete=ON")

    def close(self) -> None:
        self.connection.close()

    def initialised(self) -> bool:
        """Return True if the schema and the state row have been committed."""
        row = self.connection.execute("SELECT count(*) FROM sqlite_master WHERE type='table' AND name='state'").fetchone()
        if not row[0]:
            return False
        return self.connection.execute("SELECT count(*) FROM state").fetchone()[0] == 1

    def initialise(self, meta: dict[str, str], accumulator_file: str, digest: str) -> None:
        """Create the schema, the metadata and the generation-0 state row in one transaction."""
        with self._transaction():
            for statement in SCHEMA:
                self.connection.execute(statement)
            self.connection.executemany("INSERT INTO meta (key, value) VALUES (?, ?)", sorted(meta.items()))
            self.connection.execute(
                "INSERT INTO state (id, generation, accumulator, digest) VALUES (1, 0, ?, ?)", (accumulator_file, digest)
            )

    def meta(self) -> dict[str, str]:
        return dict(self.connection.execute("SELECT key, value FROM meta").fetchall())

    def generation(self) -> int:
        return int(self.connection.execute("SELECT generation FROM state WHERE id = 1").fetchone()[0])

    def snapshot(self) -> Snapshot:
        """Read the state row, the clients and the tombstones in one read transaction."""
        self.connection.execute("BEGIN")
        try:
            generation, accumulator, digest = self.connection.execute(
                "SELECT generation, accumulator, digest FROM state WHERE id = 1"
            ).fetchone()
            clients = {
                row[0]: ClientRow(*row)
                for row in self.connection.execute(
                    "SELECT client_id, residual, sha256, density, nbytes, joined_at, generation FROM clients"
                )
            }
            tombstones = dict(self.connection.execute("SELECT client_id, withdrawn_at FROM tombstones").fetchall())
        finally:
            self.connection.execute("COMMIT")
        return Snapshot(int(generation), accumulator, digest, clients, tombstones)

    def commit_join(self, row: ClientRow, accumulator_file: str, digest: str, step: StepHook = no_step) -> None:
        """Insert a client row, drop its tombstone if any and advance the state, in one transaction."""
        with self._transaction(step):
            self._advance(row.generation, accumulator_file, digest)
            self.connection.execute(
                "INSERT INTO clients (client_id, residual, sha256, density, nbytes, joined_at, generation) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (row.client_id, row.residual_file, row.sha256, row.density, row.nbytes, row.joined_at, row.generation),
            )
            self.connection.execute("DELETE FROM tombstones WHERE client_id = ?", (row.client_id,))

    def commit_withdrawal(
        self,
        client_id: str,
        withdrawn_at: float,
        generation: int,
        accumulator_file: str,
        digest: str,
        step: StepHook = no_step,
    ) -> None:
        """Delete a client row, record its tombstone and advance the state, in one transaction."""
        with self._transaction(step):
            self._advance(generation, accumulator_file, digest)
            deleted = self.connection.execute("DELETE FROM clients WHERE client_id = ?", (client_id,)).rowcount
            if deleted != 1:
                raise StoreError(f"client {client_id!r} has no manifest row to delete")
            self.connection.execute(
                "INSERT OR REPLACE INTO tombstones (client_id, withdrawn_at) VALUES (?, ?)", (client_id, withdrawn_at)
            )

    def checkpoint(self) -> None:
        """Copy the WAL into the database file and truncate the WAL to zero bytes."""
        busy, _, _ = self.connection.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        if busy:
            raise StoreError(f"could not checkpoint the WAL of {self.path}: another connection is reading it; retry")

    def _advance(self, generation: int, accumulator_file: str, digest: str) -> None:
        current = self.generation()
        if current != generation - 1:
            raise GenerationConflictError(
                f"manifest is at generation {current}, expected {generation - 1}; another process changed the store"
            )
        self.connection.execute(
            "UPDATE state SET generation = ?, accumulator = ?, digest = ? WHERE id = 1", (generation, accumulator_file, digest)
        )

    def _transaction(self, step: StepHook = no_step) -> _Transaction:
        return _Transaction(self.connection, step)


class _Transaction:
    """BEGIN IMMEDIATE on entry; COMMIT on a clean exit, ROLLBACK on an exception."""

    def __init__(self, connection: sqlite3.Connection, step: StepHook) -> None:
        self.connection = connection
        self.step = step

    def __enter__(self) -> None:
        self.connection.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, exc: object, traceback: object) -> None:
        if exc_type is not None:
            self.connection.execute("ROLLBACK")
            return
        try:
            self.step("commit manifest")
        except BaseException:
            self.connection.execute("ROLLBACK")
            raise
        self.connection.execute("COMMIT")
