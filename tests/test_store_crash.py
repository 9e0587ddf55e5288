"""Crash safety: a real process is SIGKILLed at every step of a join and a withdrawal, then the store is reopened."""

import shutil
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from sift_fl.codec import encode_residual
from sift_fl.layout import ParameterLayout, TensorSpec
from sift_fl.sign import SignVector
from sift_fl.store import MergeStore, StoreIdentity, Upload, verify_store

# Shared by the test and the child process, which runs this code first.
FIXTURES = textwrap.dedent(
    """
    import numpy as np
    from sift_fl.codec import encode_residual
    from sift_fl.layout import ParameterLayout, TensorSpec
    from sift_fl.sign import SignVector
    from sift_fl.store import Upload

    LAYOUT = ParameterLayout((TensorSpec("w", (16, 12), "float32"), TensorSpec("b", (16,), "float32")))
    SIGNS = SignVector(3, LAYOUT)
    BASE = "d" * 64

    def upload(client_id):
        generator = np.random.default_rng(sum(map(ord, client_id)))
        dense = {}
        for spec in LAYOUT.tensors:
            magnitude = generator.uniform(1e-3, 1.0, spec.numel).astype(np.float32)
            keep = generator.random(spec.numel) < 0.5
            signed = np.where(keep, magnitude, 0) * SIGNS.signs(spec.name)
            dense[spec.name] = signed.astype(np.float32).reshape(spec.shape)
        arrays = encode_residual(dense, LAYOUT, SIGNS).to_arrays()
        return Upload(client_id, arrays, LAYOUT.digest(), BASE, 3)
    """
)

CHILD = FIXTURES + textwrap.dedent(
    """
    import os, signal, sys
    from sift_fl.store import MergeStore

    kill_at = int(sys.argv[2])
    steps = 0

    def step(label):
        global steps
        steps += 1
        if steps == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    store = MergeStore.open(sys.argv[1], step_hook=step)
    store.join(upload("c"))
    print("ack join c", flush=True)
    store.withdraw("a")
    print("ack withdraw a", flush=True)
    print("steps", steps, flush=True)
    """
)

namespace: dict = {}
exec(FIXTURES, namespace)
upload = namespace["upload"]
LAYOUT = namespace["LAYOUT"]


def run_child(directory, kill_at: int) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", CHILD, str(directory), str(kill_at)], capture_output=True, text=True, timeout=60)


def secret_byte_strings(client_id: str) -> list[bytes]:
    return [np.ascontiguousarray(a).tobytes() for a in upload(client_id).arrays.values() if a.nbytes >= 16]


def files_containing(directory, needles: list[bytes]) -> list[str]:
    return [p.name for p in directory.rglob("*") if p.is_file() and any(n in p.read_bytes() for n in needles)]


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    directory = tmp_path_factory.mktemp("template")
    identity = StoreIdentity(LAYOUT, namespace["BASE"], 3)
    with MergeStore.create(directory, identity) as store:
        store.join(upload("a"))
        store.join(upload("b"))
    return directory


@pytest.fixture(scope="module")
def step_count(template, tmp_path_factory):
    directory = tmp_path_factory.mktemp("uninterrupted") / "store"
    shutil.copytree(template, directory)
    completed = run_child(directory, kill_at=0)
    assert completed.returncode == 0, completed.stderr
    return int(completed.stdout.split()[-1])


def candidate_members(acknowledged: list[str]) -> list[set[str]]:
    """Return the member sets allowed after a crash: acknowledged operations done, the next one done or not."""
    if "ack withdraw a" in acknowledged:
        return [{"b", "c"}]
    if "ack join c" in acknowledged:
        return [{"a", "b", "c"}, {"b", "c"}]
    return [{"a", "b"}, {"a", "b", "c"}]


def test_crash_child_covers_join_and_withdrawal(step_count):
    # A join and a withdrawal take several writes, renames, fsyncs, a commit and deletes each.
    assert step_count >= 15


def test_crash_at_every_step_recovers(template, step_count, tmp_path):
    for kill_at in range(1, step_count + 1):
        directory = tmp_path / f"kill-{kill_at}"
        shutil.copytree(template, directory)

        completed = run_child(directory, kill_at)
        acknowledged = [line for line in completed.stdout.splitlines() if line.startswith("ack")]
        store = MergeStore.open(directory)
        report = verify_store(store)
        members = store.members

        assert completed.returncode == -signal.SIGKILL, (kill_at, completed.stderr)
        assert report.ok, (kill_at, report.problems)
        assert members in candidate_members(acknowledged), (kill_at, members)
        if "ack join c" in acknowledged:
            assert store.clients["c"].generation == 3, kill_at
        if "a" not in members:
            assert files_containing(directory, secret_byte_strings("a")) == [], kill_at
        store.close()


def test_crash_then_retry_completes(template, tmp_path):
    directory = tmp_path / "store"
    shutil.copytree(template, directory)
    run_child(directory, kill_at=2)
    leftovers = list((directory / "residuals").glob("*.tmp"))

    completed = run_child(directory, kill_at=0)
    store = MergeStore.open(directory)

    assert len(leftovers) == 1
    assert completed.returncode == 0, completed.stderr
    assert store.members == {"b", "c"}
    assert not any(path.exists() for path in leftovers)
    assert verify_store(store).ok
