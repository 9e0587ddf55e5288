"""Flower's Deployment Engine with real processes: a SuperLink and five SuperNodes on 127.0.0.1, TLS and node keys.

The scenario drives the scripts in `scripts/deploy/` exactly as `docs/deployment.md` shows them:

- run 1: sites 0, 1 and 2 train. Site 2's SuperNode is killed after it receives its train
  message, so only clients 0 and 1 are merged.
- run 2: site 1 restarts with `withdraw=true` and is unmerged at its own request, site 2
  restarts and joins, and site 3 joins late;
- run 3: a rogue node with its own registered key claims client id 0 and requests its
  withdrawal. It is rejected, the store does not change, and every legitimate client is evaluated
  with the mask it keeps on its own disk.

Every process is started in its own session and stopped by process group and PID at the
end, also when the scenario fails.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from sift_fl.deployment.client_state import ClientState, ModelBinding, residual_digest
from sift_fl.store import MergeStore, content_digest

pytestmark = pytest.mark.deployment

PROJECT = Path(__file__).resolve().parents[1]
SCRIPTS = PROJECT / "scripts" / "deploy"
CONNECTION = "sift-fl"
PARTITIONS = 4
SITES = {"site-0": ("0", 0), "site-1": ("1", 1), "site-2": ("2", 2), "site-3": ("3", 3), "rogue": ("0", 0)}
RUN_TIMEOUT = 600
ROUND_TIMEOUT = 150


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def alive(process: psutil.Process) -> bool:
    # Orphans that exit stay zombies here, because PID 1 of the container need not reap them.
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


class Processes:
    """Processes started by the test, each the leader of its own session, stopped by process group and PID."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.running: dict[str, subprocess.Popen] = {}
        self.seen: dict[int, psutil.Process] = {}

    def start(self, name: str, argv: list[str], env: dict[str, str]) -> subprocess.Popen:
        with open(self.log_dir / f"{name}.log", "ab") as log:
            process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=PROJECT, start_new_session=True)
        self.running[name] = process
        self.seen[process.pid] = psutil.Process(process.pid)
        return process

    def family(self, process: subprocess.Popen) -> list[psutil.Process]:
        """Return the process and its descendants now, remembering each PID for the final check."""
        try:
            members = [psutil.Process(process.pid), *psutil.Process(process.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            return []
        self.seen.update((member.pid, member) for member in members)
        return members

    def stop(self, name: str, sig: signal.Signals = signal.SIGTERM, grace: float = 15.0) -> None:
        """Send `sig` once to the process group and to each descendant outside it; SIGKILL what is left after `grace` seconds.

        Each process gets the signal once: Flower's handler restores the default action after
        the first SIGTERM, so a second one would kill a SuperNode before it deactivates.
        """
        process = self.running.pop(name)
        members = self.family(process)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        for member in members:
            with contextlib.suppress(psutil.NoSuchProcess, ProcessLookupError):
                if os.getpgid(member.pid) != process.pid:
                    member.send_signal(sig)

        deadline = time.monotonic() + grace
        while any(alive(member) for member in members) and time.monotonic() < deadline:
            time.sleep(0.2)
        for member in members:
            if alive(member):
                with contextlib.suppress(psutil.NoSuchProcess):
                    member.kill()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)

    def stop_all(self) -> list[int]:
        """Stop every running process; return the PIDs (started or descendants) still alive afterwards."""
        for name in list(self.running):
            self.stop(name)
        time.sleep(1.0)
        return sorted(pid for pid, process in self.seen.items() if alive(process))

    def pids(self) -> set[int]:
        """Return the PIDs of the running processes and their descendants."""
        return {member.pid for process in self.running.values() for member in self.family(process)}


class Deployment:
    """One SuperLink, its connection, registered SuperNode keys, and helpers that call the deployment scripts."""

    def __init__(self, root: Path, processes: Processes) -> None:
        self.root = root
        self.processes = processes
        self.certs = root / "certs"
        self.keys = root / "keys"
        self.store = root / "store"
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.env = {
            **os.environ,
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
            "FLWR_HOME": str(root / "operator"),
            "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "HF_HUB_OFFLINE": "1",
        }

    def script(self, name: str, *args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
        completed = subprocess.run(
            [str(SCRIPTS / name), *args], env=env or self.env, cwd=PROJECT, capture_output=True, text=True, timeout=timeout
        )
        assert completed.returncode == 0, f"{name} {args} failed:\n{completed.stdout[-2000:]}\n{completed.stderr[-2000:]}"
        return completed

    def start_superlink(self) -> None:
        env = {**self.env, "FLWR_HOME": str(self.root / "superlink" / "flwr")}
        argv = [str(SCRIPTS / "start-superlink.sh"), str(self.certs), str(self.root / "superlink"), "127.0.0.1", str(self.port)]
        self.processes.start("superlink", argv, env)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.5)
        raise TimeoutError(f"the SuperLink did not listen on {self.address} within 60 s")

    def state_dir(self, site: str) -> Path:
        return self.root / "sites" / site / "state"

    def start_site(self, site: str, withdraw: bool = False) -> None:
        client_id, partition = SITES[site]
        node_config = f'client-id="{client_id}" partition-id={partition} num-partitions={PARTITIONS} state-dir="{self.state_dir(site)}"'
        if withdraw:
            node_config += " withdraw=true"
        env = {**self.env, "FLWR_HOME": str(self.root / "sites" / site / "flwr")}
        argv = [str(SCRIPTS / "start-supernode.sh"), str(self.certs / "ca.crt"), self.address, str(self.keys / site), str(free_port()), node_config]
        self.processes.start(site, argv, env)

    def site_log(self, site: str) -> str:
        return (self.processes.log_dir / f"{site}.log").read_text(errors="replace")

    def run(self, index: int, num_clients: int, kill_site: str | None = None) -> dict:
        """Run the app once; with `kill_site`, SIGKILL that SuperNode once it receives its train message."""
        report = self.root / f"report-{index}.json"
        run_config = (
            f"setting='digits' num-clients={num_clients} withdraw='' bind-node-keys=true timeout={ROUND_TIMEOUT} "
            f"node-wait-seconds=300 store-dir='{self.store}' report='{report}'"
        )
        process = self.processes.start(f"run-{index}", [str(SCRIPTS / "run.sh"), CONNECTION, run_config], self.env)
        killed_after = None
        deadline = time.monotonic() + RUN_TIMEOUT
        while process.poll() is None and time.monotonic() < deadline:
            if kill_site and killed_after is None and "Receiving: train message" in self.site_log(kill_site):
                self.processes.stop(kill_site, signal.SIGKILL, grace=5)
                killed_after = "train message received"
            time.sleep(0.2)
        if process.poll() is None:
            self.processes.stop(f"run-{index}")
            raise TimeoutError(f"flwr run {index} did not finish within {RUN_TIMEOUT} s")
        self.processes.running.pop(f"run-{index}", None)
        return {
            "report": json.loads(report.read_text()) if report.exists() else {},
            "killed": killed_after,
            "verify": subprocess.run(["sift-fl", "verify", "--store", str(self.store)], env=self.env, capture_output=True, text=True, timeout=120),
            "log": (self.processes.log_dir / f"run-{index}.log").read_text(errors="replace"),
        }


def store_snapshot(store_dir: Path) -> dict:
    with MergeStore.open(store_dir) as store:
        return {
            "content": content_digest(store),
            "generation": store.generation,
            "members": sorted(store.members),
            "withdrawn": sorted(store.withdrawn),
            "bindings": store.node_keys(),
            "digests": {c: residual_digest(store.load_residual(c).to_arrays()) for c in store.members},
            "identity": store.identity,
        }


def listening_addresses(pids: set[int]) -> set[str]:
    addresses = set()
    for connection in psutil.net_connections(kind="inet"):
        if connection.status == psutil.CONN_LISTEN and connection.pid in pids:
            addresses.add(connection.laddr.ip)
    return addresses


@pytest.fixture(scope="module")
def scenario(tmp_path_factory):
    root = tmp_path_factory.mktemp("deployment")
    (root / "logs").mkdir()
    processes = Processes(root / "logs")
    deployment = Deployment(root, processes)
    outcome: dict = {"root": root}
    try:
        deployment.script("make-certificates.sh", str(deployment.certs), "127.0.0.1", "localhost")
        for site in SITES:
            deployment.script("make-node-key.sh", str(deployment.keys / site), site)
        deployment.start_superlink()
        deployment.script("add-connection.sh", CONNECTION, deployment.address, str(deployment.certs / "ca.crt"))
        for site in SITES:
            deployment.script("register-supernode.sh", CONNECTION, str(deployment.keys / f"{site}.pub"), site)

        for site in ("site-0", "site-1", "site-2"):
            deployment.start_site(site)
        outcome["run1"] = deployment.run(1, num_clients=3, kill_site="site-2")
        outcome["store1"] = store_snapshot(deployment.store)

        processes.stop("site-1")
        deployment.start_site("site-1", withdraw=True)
        deployment.start_site("site-2")
        deployment.start_site("site-3")
        outcome["run2"] = deployment.run(2, num_clients=4)
        outcome["store2"] = store_snapshot(deployment.store)

        deployment.start_site("rogue", withdraw=True)
        outcome["listening"] = listening_addresses(processes.pids())
        outcome["run3"] = deployment.run(3, num_clients=5)
        outcome["store3"] = store_snapshot(deployment.store)
        outcome["rogue_log"] = deployment.site_log("rogue")
        outcome["client_states"] = {site: deployment.state_dir(site) for site in SITES}
        yield outcome
    finally:
        outcome["left_running"] = processes.stop_all()
        assert outcome["left_running"] == [], f"processes still running after the test: {outcome['left_running']}"


def disk_residual_digest(state_dir: Path, client_id: str, identity) -> str | None:
    loaded = ClientState(state_dir).load_arrays(ModelBinding(client_id, identity.layout_digest, identity.base_digest, identity.sign_seed))
    return loaded[1] if loaded else None


def failed_clients(report: dict) -> set[str]:
    return {failure["client"] for failure in report["failures"]}


def test_deployment_listens_on_loopback_only(scenario):
    assert scenario["listening"] == {"127.0.0.1"}


def test_run1_verify_passes(scenario):
    assert scenario["run1"]["verify"].returncode == 0, scenario["run1"]["verify"].stdout


def test_run1_killed_site_mid_training(scenario):
    assert scenario["run1"]["killed"] == "train message received"


def test_run1_merges_surviving_clients(scenario):
    assert scenario["store1"]["members"] == ["0", "1"]


def test_run1_reports_killed_node(scenario):
    assert failed_clients(scenario["run1"]["report"]) == {"2"}, scenario["run1"]["report"]["failures"]


def test_run1_masks_beat_unmasked_merge(scenario):
    methods = scenario["run1"]["report"]["methods"]

    assert methods["sift_masks"]["clients"] == 2
    assert methods["sift_masks"]["mean_accuracy"] > methods["sift_merge"]["mean_accuracy"]


def test_run1_binds_merged_clients(scenario):
    assert sorted(scenario["store1"]["bindings"]) == ["0", "1"]


def test_run2_verify_passes(scenario):
    assert scenario["run2"]["verify"].returncode == 0, scenario["run2"]["verify"].stdout


def test_run2_withdraws_at_client_request(scenario):
    withdrawals = scenario["run2"]["report"]["withdrawals"]

    assert [(w["client"], w["status"], w["requested_by"], w["bit_exact"]) for w in withdrawals] == [("1", "withdrawn", "client", True)]


def test_run2_admits_rejoined_and_late_clients(scenario):
    assert scenario["store2"]["members"] == ["0", "2", "3"]
    assert scenario["store2"]["withdrawn"] == ["1"]


def test_run2_has_no_failures(scenario):
    assert scenario["run2"]["report"]["failures"] == []


def test_run3_verify_passes(scenario):
    assert scenario["run3"]["verify"].returncode == 0, scenario["run3"]["verify"].stdout


def test_run3_rejects_rogue_claim(scenario):
    rejected = scenario["run3"]["report"]["rejected_nodes"]

    assert [r["client"] for r in rejected] == ["0"]
    assert "bound to node key" in rejected[0]["reason"]


def test_run3_rogue_changes_nothing(scenario):
    before, after = scenario["store2"], scenario["store3"]

    assert after["content"] == before["content"]
    assert after["generation"] == before["generation"]
    assert after["bindings"] == before["bindings"]


def test_run3_keeps_withdrawn_client_out(scenario):
    withdrawals = scenario["run3"]["report"]["withdrawals"]

    assert [(w["client"], w["status"]) for w in withdrawals] == [("1", "already-withdrawn")]


def test_run3_rogue_gets_no_train_or_evaluate(scenario):
    assert "Receiving: train message" not in scenario["rogue_log"]
    assert "Receiving: evaluate message" not in scenario["rogue_log"]
    assert not (scenario["client_states"]["rogue"] / "residual.safetensors").exists()


def test_run3_evaluates_every_client(scenario):
    served = {row["client"]: row["served"] for row in scenario["run3"]["report"]["clients"]}

    assert served == {"0": "masked", "1": "unmasked", "2": "masked", "3": "masked"}


def test_run3_uses_masks_from_client_disks(scenario):
    assert scenario["run3"]["report"]["own_masks_sent"] == []


def test_client_disk_residuals_match_store(scenario):
    store = scenario["store3"]
    sites = {"0": "site-0", "2": "site-2", "3": "site-3"}

    on_disk = {client: disk_residual_digest(scenario["client_states"][site], client, store["identity"]) for client, site in sites.items()}

    assert on_disk == store["digests"]
