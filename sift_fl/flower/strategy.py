"""SIFT-Masks as a Flower strategy: one-shot sparse uploads, exact merge, masked serving, unlearning."""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from logging import ERROR, INFO, WARNING

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy

from sift_fl.codec import EncodedResidual, InvalidResidualError
from sift_fl.fixed_point import FixedPointFormat, OutOfRangeError
from sift_fl.flower import protocol
from sift_fl.flower.records import arrays_to_record, record_to_arrays, record_to_residual
from sift_fl.merge import MergeState
from sift_fl.run_spec import BaseModel, RunSpec
from sift_fl.sign import SignVector


@dataclass
class Withdrawal:
    """Outcome of unmerging one client."""

    client: str
    seconds: float
    bit_exact: bool
    status: str


class SiftMasksStrategy(Strategy):
    """Merge SIFT residuals exactly, serve each client through its own mask, unlearn on request.

    Every client trains once from θ0 and uploads once. Later rounds only admit clients
    that have not been merged yet, so no residual ever depends on another client.

    Parameters
    ----------
    spec : RunSpec
        Setting, seeds and hyperparameters sent to clients.
    base : BaseModel
        The server's θ0, used for the layout and base digests that clients must match.
    min_clients : int
        Number of connected nodes to wait for before the first round.
    withdraw : Iterable[str]
        Client ids to unmerge after the last admission round.
    number_format : FixedPointFormat, optional
        Fixed-point format of the exact accumulator.
    max_upload_bytes : int, optional
        Uploads larger than this are rejected. Defaults to twice the dense float32 size.
    node_wait_seconds : float
        How long to wait for `min_clients` nodes before giving up.
    """

    def __init__(
        self,
        spec: RunSpec,
        base: BaseModel,
        min_clients: int,
        withdraw: Iterable[str] = (),
        number_format: FixedPointFormat | None = None,
        max_upload_bytes: int | None = None,
        node_wait_seconds: float = 600.0,
    ) -> None:
        self.spec = spec
        self.base = base
        self.layout = base.layout
        self.min_clients = min_clients
        self.withdraw_ids = [str(c) for c in withdraw]
        self.max_upload_bytes = max_upload_bytes or 2 * 4 * self.layout.num_parameters
        self.node_wait_seconds = node_wait_seconds

        self.sign_vector = SignVector(spec.sign_seed, self.layout)
        self.merge = MergeState(self.layout, self.sign_vector, number_format)
        self.residuals: dict[str, EncodedResidual] = {}
        self.ft_residuals: dict[str, dict[str, np.ndarray]] = {}
        self.withdrawn: set[str] = set()
        self.node_clients: dict[int, str] = {}
        self.train_metrics: dict[str, dict[str, float]] = {}
        self.evaluations: dict[str, dict[str, dict[str, float | str]]] = {}
        self.withdrawals: list[Withdrawal] = []
        self.failures: list[dict[str, str]] = []
        self._phase = "merged"

    def summary(self) -> None:
        """Log the strategy's configuration."""
        log(INFO, "\t├── Setting: %s, %d trainable parameters", self.spec.setting, self.layout.num_parameters)
        log(INFO, "\t├── Sign seed: %d, layout digest %s", self.spec.sign_seed, self.base.layout_digest[:16])
        log(INFO, "\t├── Base model digest: %s", self.base.base_digest[:16])
        log(INFO, "\t├── Accumulator: int64 fixed point, resolution 2^-%d", self.merge.number_format.fraction_bits)
        log(INFO, "\t└── Withdraw after admission: %s", self.withdraw_ids or "none")

    def _base_config(self) -> dict:
        config = self.spec.to_config()
        config["layout-digest"] = self.base.layout_digest
        config["base-digest"] = self.base.base_digest
        return config

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        """Send the train config to every connected node whose client has not been merged."""
        merged_nodes = {node for node, client in self.node_clients.items() if client in self.merge.members}
        node_ids = [node for node in grid.get_node_ids() if node not in merged_nodes]
        log(INFO, "configure_train: %d nodes not yet merged (round %d)", len(node_ids), server_round)

        train_config = ConfigRecord({**self._base_config(), **dict(config), "server-round": server_round})
        content = RecordDict({protocol.CONFIG: train_config})
        return [Message(content=content, message_type=MessageType.TRAIN, dst_node_id=node) for node in node_ids]

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate and merge each reply; a rejected reply changes nothing and is logged."""
        merged_now = 0
        for reply in replies:
            node_id = reply.metadata.src_node_id
            if reply.has_error():
                self._fail(node_id, "?", f"client error: {reply.error.reason}")
                continue
            try:
                client_id = self.ingest(reply)
            except (InvalidResidualError, OutOfRangeError, ValueError, KeyError) as error:
                meta = reply.content.config_records.get(protocol.META)
                self._fail(node_id, str(meta.get("client-id", "?")) if meta else "?", str(error))
                continue
            self.node_clients[node_id] = client_id
            merged_now += 1

        log(INFO, "aggregate_train: merged %d clients this round, %d in all", merged_now, self.merge.count)
        return None, MetricRecord({"merged-clients": self.merge.count, "merged-this-round": merged_now})

    def ingest(self, reply: Message) -> str:
        """Check one train reply against the layout, digests and sign seed, then merge it."""
        meta = reply.content[protocol.META]
        client_id = str(meta["client-id"])
        for key, expected in (("layout-digest", self.base.layout_digest), ("base-digest", self.base.base_digest)):
            if meta.get(key) != expected:
                raise ValueError(f"client {client_id}: field {key} is {str(meta.get(key))[:16]}, expected {expected[:16]}")
        if int(meta.get("sign-seed", -1)) != self.spec.sign_seed:
            raise ValueError(f"client {client_id}: field sign-seed is {meta.get('sign-seed')}, expected {self.spec.sign_seed}")
        if client_id in self.merge.members:
            raise ValueError(f"client {client_id}: already merged; a second upload is rejected until it withdraws")

        try:
            residual = record_to_residual(reply.content[protocol.SIFT_RESIDUAL], self.layout, self.max_upload_bytes)
        except InvalidResidualError as error:
            raise InvalidResidualError(f"client {client_id}: {error}") from error
        ft_residual = None
        if self.spec.baselines:
            ft_residual = record_to_arrays(reply.content[protocol.FT_RESIDUAL])
            for tensor in self.layout.tensors:
                if ft_residual.get(tensor.name) is None or ft_residual[tensor.name].shape != tensor.shape:
                    raise InvalidResidualError(f"client {client_id}: field {protocol.FT_RESIDUAL}/{tensor.name} is missing or misshaped")

        self.merge.add(client_id, residual)
        self.residuals[client_id] = residual
        if ft_residual is not None:
            self.ft_residuals[client_id] = ft_residual
        self.withdrawn.discard(client_id)
        self.train_metrics[client_id] = {k: float(v) for k, v in reply.content[protocol.METRICS].items()}
        log(INFO, "merged client %s (density %.3f, %d bytes)", client_id, residual.density(), residual.nbytes)
        return client_id

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        """Send τ̄ (plain and coverage-normalised) and the FT+Merge mean; merged clients apply their own mask."""
        records = {
            protocol.SIFT_MEAN: arrays_to_record(self.merge.mean()),
            protocol.SIFT_COVERAGE_MEAN: arrays_to_record(self.merge.coverage_mean()),
        }
        if self.spec.baselines and self.ft_residuals:
            records[protocol.FT_MEAN] = arrays_to_record(self.ft_mean())

        messages = []
        for node in grid.get_node_ids():
            client = self.node_clients.get(node)
            served = protocol.SERVED_MASKED if client in self.merge.members else protocol.SERVED_UNMASKED
            eval_config = ConfigRecord({**self._base_config(), **dict(config), "served": served, "server-round": server_round})
            content = RecordDict({**records, protocol.CONFIG: eval_config})
            messages.append(Message(content=content, message_type=MessageType.EVALUATE, dst_node_id=node))
        return messages

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Store each client's accuracies under the current phase and return their means."""
        results: dict[str, dict[str, float | str]] = {}
        for reply in replies:
            if reply.has_error():
                self._fail(reply.metadata.src_node_id, "?", f"evaluation error: {reply.error.reason}")
                continue
            meta = reply.content[protocol.META]
            row: dict[str, float | str] = {k: float(v) for k, v in reply.content[protocol.METRICS].items()}
            row["served"] = str(meta["served"])
            results[str(meta["client-id"])] = row
        self.evaluations[self._phase] = results
        if not results:
            return None

        keys = sorted({k for row in results.values() for k, v in row.items() if isinstance(v, float)})
        means = {k: float(np.mean([row[k] for row in results.values() if k in row])) for k in keys}
        return MetricRecord(means)

    def ft_mean(self) -> dict[str, np.ndarray]:
        """Return the uniform mean of the merged clients' plain finetuning residuals."""
        members = sorted(c for c in self.merge.members if c in self.ft_residuals)
        return {
            tensor.name: np.mean([self.ft_residuals[c][tensor.name] for c in members], axis=0).astype(np.float32)
            if members else np.zeros(tensor.shape, np.float32)
            for tensor in self.layout.tensors
        }

    def withdraw(self, client_id: str) -> Withdrawal:
        """Unmerge a client: subtract its residual, delete its residual and mask, check exactness.

        Withdrawing a client twice is a no-op; an id that was never merged raises KeyError.
        """
        if client_id in self.withdrawn:
            log(INFO, "client %s was already withdrawn; nothing to do", client_id)
            return Withdrawal(client_id, 0.0, True, "already-withdrawn")
        if client_id not in self.merge.members:
            raise KeyError(f"client {client_id!r} is not merged; merged clients: {sorted(self.merge.members)}")

        started = time.perf_counter()
        residual = self.residuals.pop(client_id)
        self.merge.remove(client_id, residual)
        self.ft_residuals.pop(client_id, None)
        seconds = time.perf_counter() - started
        self.withdrawn.add(client_id)

        scratch = MergeState.from_scratch(self.layout, self.sign_vector, self.residuals, self.merge.number_format)
        bit_exact = self.merge.equals(scratch) and all(
            np.array_equal(a.view(np.uint32), b.view(np.uint32))
            for a, b in zip(self.merge.mean().values(), scratch.mean().values())
        )
        level = INFO if bit_exact else ERROR
        log(level, "withdrew client %s in %.4fs; merge equals a from-scratch merge of the retain set: %s", client_id, seconds, bit_exact)
        return Withdrawal(client_id, seconds, bit_exact, "withdrawn")

    def _fail(self, node_id: int, client_id: str, reason: str) -> None:
        log(WARNING, "node %s (client %s) rejected: %s", node_id, client_id, reason)
        self.failures.append({"node": str(node_id), "client": client_id, "reason": reason})

    def _wait_for_nodes(self, grid: Grid) -> None:
        deadline = time.monotonic() + self.node_wait_seconds
        while (connected := len(list(grid.get_node_ids()))) < self.min_clients:
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {connected} of {self.min_clients} nodes connected within {self.node_wait_seconds:.0f}s")
            log(INFO, "Waiting for nodes: %d connected, %d required", connected, self.min_clients)
            time.sleep(1.0)

    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord | None = None,
        num_rounds: int = 1,
        timeout: float = 3600,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: object = None,
    ) -> Result:
        """Run `num_rounds` admission rounds (train new clients, evaluate), then the withdrawals.

        After the withdrawals, every client is evaluated again, and the withdrawn ones are
        served the unmasked merge.
        """
        log(INFO, "Starting %s strategy:", self.__class__.__name__)
        self.summary()
        train_config = train_config or ConfigRecord()
        evaluate_config = evaluate_config or ConfigRecord()
        empty = ArrayRecord()
        result = Result()
        self._wait_for_nodes(grid)

        for server_round in range(1, num_rounds + 1):
            log(INFO, "[ROUND %d/%d] admitting clients that have not been merged", server_round, num_rounds)
            replies = grid.send_and_receive(self.configure_train(server_round, empty, train_config, grid), timeout=timeout)
            _, train_metrics = self.aggregate_train(server_round, replies)
            if train_metrics is not None:
                result.train_metrics_clientapp[server_round] = train_metrics

            self._phase = "merged"
            replies = grid.send_and_receive(self.configure_evaluate(server_round, empty, evaluate_config, grid), timeout=timeout)
            evaluate_metrics = self.aggregate_evaluate(server_round, replies)
            if evaluate_metrics is not None:
                log(INFO, "\t└──> mean accuracies: %s", evaluate_metrics)
                result.evaluate_metrics_clientapp[server_round] = evaluate_metrics

        if self.withdraw_ids:
            for client_id in self.withdraw_ids:
                self.withdrawals.append(self.withdraw(client_id))
            self._phase = "after-withdrawal"
            after_round = num_rounds + 1
            replies = grid.send_and_receive(self.configure_evaluate(after_round, empty, evaluate_config, grid), timeout=timeout)
            evaluate_metrics = self.aggregate_evaluate(after_round, replies)
            if evaluate_metrics is not None:
                result.evaluate_metrics_clientapp[after_round] = evaluate_metrics
        return result
