"""Inter-process lock of a store directory: exclusive for writers, shared for readers."""

from __future__ import annotations

import fcntl
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class StoreLock:
    """An flock on one lock file, re-entrant within the object that holds it.

    A nested `held` call reuses the outer lock in the outer lock's mode, so callers
    must not request an exclusive lock inside a shared one.
    """

    def __init__(self, path: Path) -> None:
        self._file = open(path, "a+b")  # noqa: SIM115 (held until close)
        self._depth = 0

    @contextmanager
    def held(self, exclusive: bool = True) -> Iterator[None]:
        if self._depth:
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
            return

        fcntl.flock(self._file, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        self._depth = 1
        try:
            yield
        finally:
            self._depth = 0
            fcntl.flock(self._file, fcntl.LOCK_UN)

    def close(self) -> None:
        self._file.close()
