"""Checks of a merge store: recompute the merge from the stored residuals and compare bit for bit."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np

from sift_fl.merge import MergeState
from sift_fl.store.identity import StoreError, describe_format
from sift_fl.store.store import MergeStore


@dataclass
class VerifyReport:
    """Lines describing each passed check, and one line per problem found."""

    checks: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_store(store: MergeStore) -> VerifyReport:
    """Recompute the merge from the stored residuals in sorted client-id order and compare.

    The checks: every residual file matches the sha256 in the manifest and fits the layout.
    The persisted accumulator (sums, coverage, members) equals a from-scratch merge of those
    residuals bit for bit, and τ̄ computed from both is bit-identical. The directory contains
    no tensor file that the manifest does not reference.
    """
    report = VerifyReport()
    identity = store.identity
    with store.reading():
        state = store.state
        clients = store.clients
        report.checks.append(
            f"identity: layout {identity.layout_digest[:16]}, base {identity.base_digest[:16]}, "
            f"sign seed {identity.sign_seed}, {describe_format(identity.number_format)}"
        )
        report.checks.append(f"manifest: generation {store.generation}, {len(clients)} merged, {len(store.withdrawn)} withdrawn")

        # The from-scratch merge streams the residuals in sorted client-id order (as
        # MergeState.from_scratch does), so only one residual is in memory at a time.
        scratch = MergeState(identity.layout, store.sign_vector, identity.number_format)
        for client_id in sorted(clients):
            try:
                scratch.add(client_id, store.load_residual(client_id))
            except StoreError as error:
                report.problems.append(f"client {client_id!r}: {error}")
        if not report.problems:
            report.checks.append(f"residual files: {scratch.count} match their sha256 and the layout")
            _compare_with_scratch(store, state, scratch, report)

        unreferenced = sorted(set(store.tensor_files()) - store.referenced_files())
        if unreferenced:
            report.problems.append(f"{len(unreferenced)} tensor files are not in the manifest: {[p.name for p in unreferenced[:5]]}")
        else:
            report.checks.append("directory: every tensor file is referenced by the manifest")
    return report


def _compare_with_scratch(store: MergeStore, state: MergeState, scratch: MergeState, report: VerifyReport) -> None:
    identity = store.identity
    if state.equals(scratch) and state.digest() == scratch.digest():
        report.checks.append(
            f"accumulator: equals a from-scratch merge of {scratch.count} residuals in sorted client-id order, "
            f"bit for bit (digest {state.digest()[:16]})"
        )
    else:
        for name in identity.layout.names:
            if not np.array_equal(state.sums[name], scratch.sums[name]):
                report.problems.append(f"accumulator sums of tensor {name!r} differ from the from-scratch merge")
            if not np.array_equal(state.coverage[name], scratch.coverage[name]):
                report.problems.append(f"accumulator coverage of tensor {name!r} differs from the from-scratch merge")
        if state.members != scratch.members:
            report.problems.append("accumulator members differ from the manifest's clients")
        return

    stored_mean, scratch_mean = state.mean(), scratch.mean()
    if all(stored_mean[name].tobytes() == scratch_mean[name].tobytes() for name in identity.layout.names):
        report.checks.append("merged residual τ̄ = S / n: bit-identical float32 values")
    else:
        report.problems.append("merged residual τ̄ differs from the from-scratch merge")


def content_digest(store: MergeStore) -> str:
    """Return a sha256 over the identity, each merged client's residual arrays and the accumulator.

    The digest ignores file names, generation numbers, times and tombstones, so two stores
    holding the same clients with the same residuals have the same digest, whatever order
    or history produced them.
    """
    identity = store.identity
    hasher = hashlib.sha256()
    for key, value in sorted(identity.to_meta().items()):
        hasher.update(f"{key}={value}\n".encode("utf-8"))

    with store.reading():
        state = store.state
        for client_id in sorted(state.members):
            hasher.update(f"client {client_id}\n".encode("utf-8"))
            for name, array in store.load_residual(client_id).to_arrays().items():
                hasher.update(f"{name} {array.dtype.str} {array.size}\n".encode("utf-8"))
                hasher.update(np.ascontiguousarray(array).tobytes())
        for name in identity.layout.names:
            hasher.update(state.sums[name].astype("<i8").tobytes())
            hasher.update(state.coverage[name].astype("<i4").tobytes())
    return hasher.hexdigest()
