"""MergeStore: the server's durable, exact merge state under one directory.

The store keeps every merged client's residual (packed mask bits and magnitudes), the
exact accumulator and an SQLite manifest (see `sift_fl.store.paths` for the files).
Joins and withdrawals follow the crash-safe sequences of `sift_fl.store.transactions`.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sift_fl.codec import EncodedResidual
from sift_fl.merge import MergeState
from sift_fl.sign import SignVector
from sift_fl.store.files import StepHook, load_accumulator, no_step, residual_from_file
from sift_fl.store.identity import StoreError, StoreIdentity, StoreMismatchError, describe_format
from sift_fl.store.lock import StoreLock
from sift_fl.store.manifest import ClientRow, Manifest, Snapshot
from sift_fl.store.node_keys import bind, read_bindings
from sift_fl.store.paths import LOCK_NAME, MANIFEST_NAME, RESIDUAL_DIR, tensor_files
from sift_fl.store.transactions import referenced_files, remove_unreferenced, write_creation, write_join, write_withdrawal
from sift_fl.store.validation import RejectedUploadError, Upload, validate_upload

logger = logging.getLogger(__name__)


class UnknownClientError(KeyError):
    """The client id has never been merged into this store."""

    def __str__(self) -> str:
        return str(self.args[0])


@dataclass(frozen=True)
class WithdrawalOutcome:
    """Result of `MergeStore.withdraw`: status is "withdrawn" or "already-withdrawn"."""

    client_id: str
    status: str
    seconds: float
    message: str


class MergeStore:
    """Durable store of merged residuals and the exact accumulator; see the module docstring.

    Create one with `create`, `open` or `open_or_create`. Every public method takes the
    directory's lock and first reloads the state if another process changed the manifest.

    Parameters
    ----------
    directory : Path
        The store directory.
    manifest : Manifest
        The open SQLite manifest.
    step_hook : callable, optional
        Called with a label before every write, rename, fsync, commit and delete; crash
        tests use it to kill the process between steps.
    """

    def __init__(self, directory: Path, manifest: Manifest, step_hook: StepHook | None = None) -> None:
        self.directory = directory
        self.manifest = manifest
        self._step = step_hook or no_step
        self._lock = StoreLock(directory / LOCK_NAME)

        meta = manifest.meta()
        self.identity = StoreIdentity.from_meta(meta)
        self.run_spec: dict[str, Any] = json.loads(meta.get("run-spec", "{}"))
        self.sign_vector = SignVector(self.identity.sign_seed, self.identity.layout)
        self.max_upload_bytes = 2 * 4 * self.identity.layout.num_parameters
        self._snapshot: Snapshot | None = None
        self._state: MergeState | None = None

    @classmethod
    def create(
        cls,
        directory: str | Path,
        identity: StoreIdentity,
        run_spec: dict[str, Any] | None = None,
        step_hook: StepHook | None = None,
    ) -> MergeStore:
        """Create an empty store in `directory` (created if missing).

        Raises
        ------
        StoreError
            If the directory already contains a store.
        """
        directory = Path(directory)
        (directory / RESIDUAL_DIR).mkdir(parents=True, exist_ok=True)
        lock = StoreLock(directory / LOCK_NAME)
        try:
            with lock.held():
                write_creation(directory, identity, {"run-spec": json.dumps(run_spec or {}, sort_keys=True)})
        finally:
            lock.close()
        logger.info("created store %s (%s)", directory, describe_format(identity.number_format))
        return cls.open(directory, identity, step_hook)

    @classmethod
    def open(
        cls,
        directory: str | Path,
        expected: StoreIdentity | None = None,
        step_hook: StepHook | None = None,
    ) -> MergeStore:
        """Open a store, finish any interrupted operation and load the accumulator.

        Raises
        ------
        StoreError
            If `directory` contains no complete store or its files do not match the manifest.
        StoreMismatchError
            If `expected` is given and differs from the identity the store was created with.
        """
        directory = Path(directory)
        if not (directory / MANIFEST_NAME).is_file():
            raise StoreError(f"no store at {directory}: {MANIFEST_NAME} not found; check the path given as --store or store-dir")
        manifest = Manifest(directory / MANIFEST_NAME)
        if not manifest.initialised():
            manifest.close()
            raise StoreError(f"the store at {directory} was never completely created; delete the directory and create it again")

        store = cls(directory, manifest, step_hook)
        if expected is not None and (problems := store.identity.mismatches(expected)):
            store.close()
            raise StoreMismatchError(
                f"the store at {directory} was created for a different model or number format:\n  "
                + "\n  ".join(problems)
                + "\nUse another store directory, or run with the settings the store was created with."
            )

        with store._locked():
            store.recover()
            store._reload()
        return store

    @classmethod
    def open_or_create(
        cls,
        directory: str | Path,
        identity: StoreIdentity,
        run_spec: dict[str, Any] | None = None,
        step_hook: StepHook | None = None,
    ) -> MergeStore:
        """Open the store in `directory` if it contains one, else create it."""
        directory = Path(directory)
        manifest_path = directory / MANIFEST_NAME
        if manifest_path.is_file():
            probe = Manifest(manifest_path)
            initialised = probe.initialised()
            probe.close()
            if initialised:
                return cls.open(directory, identity, step_hook)
        return cls.create(directory, identity, run_spec, step_hook)

    def close(self) -> None:
        self.manifest.close()
        self._lock.close()

    def __enter__(self) -> MergeStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # Reading.

    @contextmanager
    def reading(self) -> Iterator[None]:
        """Hold the shared lock, so that reads inside the block see one committed state."""
        with self._locked(exclusive=False):
            self._refresh()
            yield

    @property
    def state(self) -> MergeState:
        """The current merge state (sums, coverage, members); callers must not modify it."""
        return self._current()[1]

    @property
    def members(self) -> set[str]:
        return set(self._current()[1].members)

    @property
    def clients(self) -> dict[str, ClientRow]:
        """Manifest rows of the merged clients, by client id."""
        return dict(self._current()[0].clients)

    @property
    def withdrawn(self) -> dict[str, float]:
        """Withdrawal time (Unix seconds) of every withdrawn client that has not joined again."""
        return dict(self._current()[0].tombstones)

    @property
    def generation(self) -> int:
        return self._current()[0].generation

    def load_residual(self, client_id: str) -> EncodedResidual:
        """Read a merged client's residual from its file, checking the recorded sha256."""
        with self._locked(exclusive=False):
            row = self._current()[0].clients.get(client_id)
            if row is None:
                raise UnknownClientError(f"client {client_id!r} is not merged in the store at {self.directory}")
            return residual_from_file(self.directory / row.residual_file, self.identity.layout, row.sha256)

    def load_residuals(self) -> dict[str, EncodedResidual]:
        """Read every merged client's residual, by client id."""
        with self._locked(exclusive=False):
            return {client_id: self.load_residual(client_id) for client_id in sorted(self.clients)}

    def tensor_files(self) -> list[Path]:
        """Return the accumulator and residual files in the directory, including leftover temporary files."""
        return tensor_files(self.directory)

    def referenced_files(self) -> set[Path]:
        """Return the tensor files that the committed manifest references."""
        return referenced_files(self.directory, self.manifest.snapshot())

    # Writing.

    def join(self, upload: Upload) -> ClientRow:
        """Validate an upload and merge it durably; return the client's manifest row.

        The method returns only after the residual, the new accumulator and the manifest
        transaction are on disk.

        Raises
        ------
        RejectedUploadError
            Naming the client and the field, if the upload fails validation, the client is
            already merged, or the store holds the most clients its number format allows.
            The store is unchanged.
        """
        with self._locked():
            self._refresh()
            assert self._state is not None
            residual = validate_upload(upload, self.identity, self.max_upload_bytes)
            client_id = upload.client_id
            if client_id in self._state.members:
                raise RejectedUploadError(client_id, "client-id", "is already merged; the client must withdraw before it uploads again")
            if self._state.count + 1 > self.identity.number_format.max_clients:
                raise RejectedUploadError(
                    client_id, "client-id", f"the store is full; its format is {describe_format(self.identity.number_format)}"
                )
            try:
                return self._join(client_id, residual)
            except BaseException:
                self._discard_changes()
                raise

    def withdraw(self, client_id: str) -> WithdrawalOutcome:
        """Unmerge a client in one transaction and delete its residual and mask files.

        Withdrawing a client that was already withdrawn is a no-op that returns status
        "already-withdrawn".

        Raises
        ------
        UnknownClientError
            If the client was never merged into this store.
        """
        with self._locked():
            self._refresh()
            assert self._state is not None and self._snapshot is not None
            if client_id not in self._state.members:
                if client_id in self._snapshot.tombstones:
                    when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self._snapshot.tombstones[client_id]))
                    message = f"client {client_id!r} was already withdrawn at {when}; nothing to do"
                    logger.info("%s", message)
                    return WithdrawalOutcome(client_id, "already-withdrawn", 0.0, message)
                merged = sorted(self._state.members)
                raise UnknownClientError(
                    f"client {client_id!r} is not in the store at {self.directory}; "
                    f"merged clients: {merged[:10]}{' ...' if len(merged) > 10 else ''}"
                )
            try:
                return self._withdraw(client_id)
            except BaseException:
                self._discard_changes()
                raise

    def node_keys(self) -> dict[str, str]:
        """Return the node-key sha256 bound to each client id; see `sift_fl.store.node_keys`."""
        with self._locked(exclusive=False):
            return read_bindings(self.manifest.connection)

    def bind_node_key(self, client_id: str, key_sha256: str) -> bool:
        """Bind a client id to a node key's sha256; return True if the binding is new.

        Raises
        ------
        NodeKeyMismatchError
            If the client id is bound to another key or the key to another client id; nothing changes.
        """
        with self._locked():
            return bind(self.manifest.connection, client_id, key_sha256)

    def recover(self) -> list[Path]:
        """Delete tensor files that the committed manifest does not reference; return them.

        Such files are left when a join or withdrawal stopped before its manifest commit
        (new files) or after it (replaced files).

        Raises
        ------
        StoreError
            If a file the manifest references is missing.
        """
        with self._locked():
            return remove_unreferenced(self.directory, self.manifest, self._step)

    def _join(self, client_id: str, residual: EncodedResidual) -> ClientRow:
        assert self._state is not None and self._snapshot is not None
        row = write_join(self.directory, self.manifest, self._state, self._snapshot, client_id, residual, self._step)
        self._snapshot = self.manifest.snapshot()
        logger.info("merged client %s (density %.3f, %d bytes), %d clients in the store", client_id, row.density, row.nbytes, self._state.count)
        return row

    def _withdraw(self, client_id: str) -> WithdrawalOutcome:
        assert self._state is not None and self._snapshot is not None
        row = self._snapshot.clients[client_id]
        residual = residual_from_file(self.directory / row.residual_file, self.identity.layout, row.sha256)
        seconds = write_withdrawal(self.directory, self.manifest, self._state, self._snapshot, client_id, residual, self._step)
        self._snapshot = self.manifest.snapshot()

        message = (
            f"withdrew client {client_id!r}: residual subtracted, residual and mask files deleted, "
            f"{self._state.count} {'client remains' if self._state.count == 1 else 'clients remain'}"
        )
        logger.info("%s", message)
        return WithdrawalOutcome(client_id, "withdrawn", seconds, message)

    # Internals.

    def _current(self) -> tuple[Snapshot, MergeState]:
        with self._locked(exclusive=False):
            self._refresh()
            assert self._snapshot is not None and self._state is not None
            return self._snapshot, self._state

    def _refresh(self) -> None:
        if self._snapshot is None or self.manifest.generation() != self._snapshot.generation:
            self._reload()

    def _reload(self) -> None:
        snapshot = self.manifest.snapshot()
        state = MergeState(self.identity.layout, self.sign_vector, self.identity.number_format)
        load_accumulator(self.directory / snapshot.accumulator_file, state)
        state.members = set(snapshot.clients)
        if state.digest() != snapshot.digest:
            raise StoreError(
                f"accumulator file {self.directory / snapshot.accumulator_file} does not match the digest in the manifest; "
                "the file was modified or damaged"
            )
        self._snapshot, self._state = snapshot, state

    def _discard_changes(self) -> None:
        # After a failed write: forget the in-memory change and delete the new files.
        self._snapshot = self._state = None
        self.recover()
        self._reload()

    def _locked(self, exclusive: bool = True) -> Any:
        return self._lock.held(exclusive)
