"""Crash-safe write sequences of a join, a withdrawal and recovery.

A join or a withdrawal writes its new files under fresh names (fsynced, then renamed),
commits one manifest transaction that points at them, and only then deletes the files
it replaced. Recovery deletes every tensor file that the committed manifest does not
reference. So a process killed at any step leaves, after recovery, exactly the state of
the last committed transaction. The caller holds the store's exclusive lock throughout.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from sift_fl.codec import EncodedResidual
from sift_fl.merge import MergeState
from sift_fl.store.files import (
    StepHook,
    accumulator_to_bytes,
    fsync_directory,
    residual_to_bytes,
    sha256_bytes,
    shred,
    write_atomically,
)
from sift_fl.sign import SignVector
from sift_fl.store.identity import StoreError, StoreIdentity
from sift_fl.store.manifest import ClientRow, Manifest, Snapshot
from sift_fl.store.paths import MANIFEST_NAME, RESIDUAL_DIR, accumulator_name, residual_name, tensor_files

logger = logging.getLogger(__name__)


def write_creation(directory: Path, identity: StoreIdentity, extra_meta: dict[str, str]) -> None:
    """Write the empty accumulator, then commit the manifest's schema, metadata and state row.

    Raises
    ------
    StoreError
        If the directory already contains a store.
    """
    manifest = Manifest(directory / MANIFEST_NAME)
    try:
        if manifest.initialised():
            raise StoreError(f"{directory} already contains a store; open it with MergeStore.open instead of creating one")
        state = MergeState(identity.layout, SignVector(identity.sign_seed, identity.layout), identity.number_format)
        write_atomically(directory / accumulator_name(0), accumulator_to_bytes(state))
        meta = {**identity.to_meta(), **extra_meta, "created-at": repr(time.time())}
        manifest.initialise(meta, accumulator_name(0), state.digest())
    finally:
        manifest.close()


def write_join(
    directory: Path, manifest: Manifest, state: MergeState, snapshot: Snapshot, client_id: str, residual: EncodedResidual, step: StepHook
) -> ClientRow:
    """Add a validated residual to `state` and make the join durable; return the new manifest row."""
    generation = snapshot.generation + 1
    state.add(client_id, residual)

    data = residual_to_bytes(client_id, residual)
    row = ClientRow(
        client_id, residual_name(client_id, generation), sha256_bytes(data), residual.density(), residual.nbytes, time.time(), generation
    )
    write_atomically(directory / row.residual_file, data, step)
    write_atomically(directory / accumulator_name(generation), accumulator_to_bytes(state), step)
    manifest.commit_join(row, accumulator_name(generation), state.digest(), step)

    shred(directory / snapshot.accumulator_file, step)
    step("fsync store directory")
    fsync_directory(directory)
    return row


def write_withdrawal(
    directory: Path, manifest: Manifest, state: MergeState, snapshot: Snapshot, client_id: str, residual: EncodedResidual, step: StepHook
) -> float:
    """Subtract a client's residual from `state`, commit, then shred its files; return the unmerge seconds.

    The seconds cover the subtraction, the new accumulator file and the manifest commit.
    """
    started = time.perf_counter()
    generation = snapshot.generation + 1
    state.remove(client_id, residual)
    write_atomically(directory / accumulator_name(generation), accumulator_to_bytes(state), step)
    manifest.commit_withdrawal(client_id, time.time(), generation, accumulator_name(generation), state.digest(), step)
    seconds = time.perf_counter() - started

    # The WAL still contains the deleted manifest row until it is checkpointed. The replaced
    # accumulator minus the new one equals the client's residual, so it is shredded too.
    step("checkpoint manifest")
    manifest.checkpoint()
    shred(directory / snapshot.clients[client_id].residual_file, step)
    shred(directory / snapshot.accumulator_file, step)
    fsync_store_directories(directory, step)
    return seconds


def remove_unreferenced(directory: Path, manifest: Manifest, step: StepHook) -> list[Path]:
    """Shred the tensor files that the committed manifest does not reference; return them.

    Raises
    ------
    StoreError
        If a file the manifest references is missing.
    """
    referenced = referenced_files(directory, manifest.snapshot())
    missing = sorted(str(path) for path in referenced if not path.is_file())
    if missing:
        raise StoreError(f"files listed in the manifest of {directory} are missing: {missing[:5]}")

    stale = [path for path in tensor_files(directory) if path not in referenced]
    for path in stale:
        shred(path, step)
    if stale:
        fsync_store_directories(directory, step)
        logger.warning("store %s: deleted %d files left by an interrupted join or withdrawal", directory, len(stale))
    return stale


def referenced_files(directory: Path, snapshot: Snapshot) -> set[Path]:
    """Return the accumulator and residual files that a manifest snapshot references."""
    names = [snapshot.accumulator_file] + [row.residual_file for row in snapshot.clients.values()]
    return {directory / name for name in names}


def fsync_store_directories(directory: Path, step: StepHook) -> None:
    step("fsync store directories")
    fsync_directory(directory / RESIDUAL_DIR)
    fsync_directory(directory)
