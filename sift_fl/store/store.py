"""MergeStore: the server's durable, exact merge state under one directory.

Directory contents:

- `manifest.sqlite` (+ `-wal`, `-shm`): metadata, the state row (generation, accumulator
  file, digest), one row per merged client and a tombstone per withdrawn client.
- `accumulator.g<generation>.safetensors`: int64 sums and int32 coverage per tensor.
- `residuals/<sha256(client id)[:16]>.g<generation>.safetensors`: a client's packed mask
  bits and magnitudes, as uploaded.
- `store.lock`: an flock that serialises writers across processes.

A join or a withdrawal writes the new files under fresh names, fsyncs them, then commits
one manifest transaction that points at them, and only then deletes the files it replaced.
Opening the store deletes every tensor file that the committed manifest does not reference,
so after a crash at any step the store holds exactly the committed state.
"""

from __future__ import annotations

import fcntl
import hashlib
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
from sift_fl.store.files import (
    StepHook,
    accumulator_to_bytes,
    fsync_directory,
    load_accumulator,
    no_step,
    residual_from_file,
    residual_to_bytes,
    sha256_bytes,
    shred,
    write_atomically,
)
from sift_fl.store.identity import StoreError, StoreIdentity, StoreMismatchError, describe_format
from sift_fl.store.manifest import ClientRow, Manifest, Snapshot
from sift_fl.store.validation import RejectedUploadError, Upload, validate_upload

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.sqlite"
LOCK_NAME = "store.lock"
RESIDUAL_DIR = "residuals"


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


def accumulator_name(generation: int) -> str:
    return f"accumulator.g{generation:08d}.safetensors"


def residual_name(client_id: str, generation: int) -> str:
    key = hashlib.sha256(client_id.encode("utf-8")).hexdigest()[:16]
    return f"{RESIDUAL_DIR}/{key}.g{generation:08d}.safetensors"


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
        self._lock_file = open(directory / LOCK_NAME, "a+b")  # noqa: SIM115 (held for the store's lifetime)
        self._lock_depth = 0

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
            If the directory already holds a store.
        """
        directory = Path(directory)
        (directory / RESIDUAL_DIR).mkdir(parents=True, exist_ok=True)
        with _flock(directory / LOCK_NAME):
            manifest = Manifest(directory / MANIFEST_NAME)
            if manifest.initialised():
                manifest.close()
                raise StoreError(f"{directory} already holds a store; open it instead of creating a new one")

            state = MergeState(identity.layout, SignVector(identity.sign_seed, identity.layout), identity.number_format)
            write_atomically(directory / accumulator_name(0), accumulator_to_bytes(state))
            meta = {**identity.to_meta(), "run-spec": json.dumps(run_spec or {}, sort_keys=True), "created-at": repr(time.time())}
            manifest.initialise(meta, accumulator_name(0), state.digest())
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
            If `directory` holds no complete store or its files do not match the manifest.
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
        """Open the store in `directory` if it holds one, else create it."""
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
        self._lock_file.close()

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
        with self._locked(exclusive=False):
            self._refresh()
            assert self._state is not None
            return self._state

    @property
    def members(self) -> set[str]:
        return set(self.state.members)

    @property
    def clients(self) -> dict[str, ClientRow]:
        """Manifest rows of the merged clients, by client id."""
        with self._locked(exclusive=False):
            self._refresh()
            assert self._snapshot is not None
            return dict(self._snapshot.clients)

    @property
    def withdrawn(self) -> dict[str, float]:
        """Withdrawal time (Unix seconds) of every withdrawn client that has not joined again."""
        with self._locked(exclusive=False):
            self._refresh()
            assert self._snapshot is not None
            return dict(self._snapshot.tombstones)

    @property
    def generation(self) -> int:
        with self._locked(exclusive=False):
            self._refresh()
            assert self._snapshot is not None
            return self._snapshot.generation

    def load_residual(self, client_id: str) -> EncodedResidual:
        """Read a merged client's residual from its file, checking the recorded sha256."""
        with self._locked(exclusive=False):
            self._refresh()
            assert self._snapshot is not None
            row = self._snapshot.clients.get(client_id)
            if row is None:
                raise UnknownClientError(f"client {client_id!r} is not merged in the store at {self.directory}")
            return residual_from_file(self.directory / row.residual_file, self.identity.layout, row.sha256)

    def load_residuals(self) -> dict[str, EncodedResidual]:
        """Read every merged client's residual, by client id."""
        with self._locked(exclusive=False):
            return {client_id: self.load_residual(client_id) for client_id in sorted(self.clients)}

    def tensor_files(self) -> list[Path]:
        """Return the accumulator and residual files in the directory, including leftover temporary files."""
        files = sorted(self.directory.glob("accumulator.g*.safetensors*"))
        return files + sorted((self.directory / RESIDUAL_DIR).glob("*.safetensors*"))

    def referenced_files(self) -> set[Path]:
        """Return the tensor files that the committed manifest references."""
        snapshot = self.manifest.snapshot()
        names = [snapshot.accumulator_file] + [row.residual_file for row in snapshot.clients.values()]
        return {self.directory / name for name in names}

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
            referenced = self.referenced_files()
            missing = sorted(str(path) for path in referenced if not path.is_file())
            if missing:
                raise StoreError(f"files listed in the manifest of {self.directory} are missing: {missing[:5]}")

            stale = [path for path in self.tensor_files() if path not in referenced]
            for path in stale:
                shred(path, self._step)
            if stale:
                self._fsync_directories()
                logger.warning("store %s: deleted %d files left by an interrupted operation", self.directory, len(stale))
            return stale

    def _join(self, client_id: str, residual: EncodedResidual) -> ClientRow:
        assert self._state is not None and self._snapshot is not None
        generation = self._snapshot.generation + 1
        self._state.add(client_id, residual)

        data = residual_to_bytes(client_id, residual)
        row = ClientRow(
            client_id, residual_name(client_id, generation), sha256_bytes(data), residual.density(), residual.nbytes, time.time(), generation
        )
        write_atomically(self.directory / row.residual_file, data, self._step)
        write_atomically(self.directory / accumulator_name(generation), accumulator_to_bytes(self._state), self._step)

        self.manifest.commit_join(row, accumulator_name(generation), self._state.digest(), self._step)
        replaced = self._snapshot.accumulator_file
        self._snapshot = self.manifest.snapshot()

        shred(self.directory / replaced, self._step)
        self._step("fsync store directory")
        fsync_directory(self.directory)
        logger.info("merged client %s (density %.3f, %d bytes), %d clients in the store", client_id, row.density, row.nbytes, self._state.count)
        return row

    def _withdraw(self, client_id: str) -> WithdrawalOutcome:
        assert self._state is not None and self._snapshot is not None
        row = self._snapshot.clients[client_id]
        residual = residual_from_file(self.directory / row.residual_file, self.identity.layout, row.sha256)

        started = time.perf_counter()
        generation = self._snapshot.generation + 1
        self._state.remove(client_id, residual)
        write_atomically(self.directory / accumulator_name(generation), accumulator_to_bytes(self._state), self._step)
        self.manifest.commit_withdrawal(
            client_id, time.time(), generation, accumulator_name(generation), self._state.digest(), self._step
        )
        seconds = time.perf_counter() - started
        replaced = self._snapshot.accumulator_file
        self._snapshot = self.manifest.snapshot()

        # The old accumulator minus the new one is the client's residual, so it is shredded too.
        self._step("checkpoint manifest")
        self.manifest.checkpoint()
        shred(self.directory / row.residual_file, self._step)
        shred(self.directory / replaced, self._step)
        self._fsync_directories()

        message = (
            f"withdrew client {client_id!r}: residual subtracted, residual and mask files deleted, "
            f"{self._state.count} clients remain"
        )
        logger.info("%s", message)
        return WithdrawalOutcome(client_id, "withdrawn", seconds, message)

    # Internals.

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

    def _fsync_directories(self) -> None:
        self._step("fsync store directories")
        fsync_directory(self.directory / RESIDUAL_DIR)
        fsync_directory(self.directory)

    @contextmanager
    def _locked(self, exclusive: bool = True) -> Iterator[None]:
        # Re-entrant within one store object; an outer shared lock must not be upgraded.
        if self._lock_depth:
            self._lock_depth += 1
            try:
                yield
            finally:
                self._lock_depth -= 1
            return

        fcntl.flock(self._lock_file, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        self._lock_depth = 1
        try:
            yield
        finally:
            self._lock_depth = 0
            fcntl.flock(self._lock_file, fcntl.LOCK_UN)


@contextmanager
def _flock(path: Path) -> Iterator[None]:
    with open(path, "a+b") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
