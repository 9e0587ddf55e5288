"""SIFT-Masks as a Flower strategy: one-shot sparse uploads, durable exact merge, masked serving, unlearning."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from logging import ERROR, INFO, WARNING

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy

from sift_fl.codec import MASK_SUFFIX
from sift_fl.deployment.client_state import residual_digest
from sift_fl.deployment.node_identity import NodeRegistry
from sift_fl.flower import protocol, query
from sift_fl.flower.exchange import send_and_collect, wait_for_nodes
from sift_fl.flower.records import arrays_to_record, record_to_arrays
from sift_fl.run_spec import BaseModel, RunSpec
from sift_fl.store import MergeStore, NodeKeyMismatchError, RejectedUploadError, UnknownClientError, Upload, verify_store


@dataclass
class Withdrawal:
    """Outcome of one withdrawal: `status` is "withdrawn" or "already-withdrawn"."""

    client: str
    seconds: float
    bit_exact: bool
    status: str
    requested_by: str


class SiftMasksStrategy(Strategy):
    """Merge SIFT residuals into a durable store, serve each client through its own mask, unlearn on request.

    Every client trains once from θ0 and uploads once. Rounds only admit clients that the
    store lists neither as merged nor as withdrawn, so no residual ever depends on another
    client, and a later run on the same store does not retrain anyone.

    Parameters
    ----------
    spec : RunSpec
        Setting, seeds and hyperparameters sent to clients.
    base : BaseModel
        The server's θ0, whose layout and base digests clients must match.
    store : MergeStore
        The durable merge store; it validates every upload and performs every withdrawal.
    min_clients : int
        Number of connected nodes to wait for before the first round.
    withdraw : Iterable[str]
        Client ids to unmerge after the last admission round (the `withdraw` run config key).
    node_wait_seconds : float
        How long to wait for `min_clients` nodes before giving up.
    bind_node_keys : bool
        Bind each client id to its node's public key at its first upload, and admit a
        node only for the client id bound to its key (see `sift_fl.deployment.node_identity`).
        Needs a SuperLink with `--enable-supernode-auth`; in a simulation, nodes get new
        keys in every run, so leave it off there.
    """

    def __init__(
        self,
        spec: RunSpec,
        base: BaseModel,
        store: MergeStore,
        min_clients: int,
        withdraw: Iterable[str] = (),
        node_wait_seconds: float = 600.0,
        bind_node_keys: bool = False,
    ) -> None:
        self.spec = spec
        self.base = base
        self.store = store
        self.layout = base.layout
        self.min_clients = min_clients
        self.withdraw_ids = [str(c) for c in withdraw]
        self.node_wait_seconds = node_wait_seconds

        self.ft_residuals: dict[str, dict[str, np.ndarray]] = {}
        self.nodes = NodeRegistry(store, bind_node_keys)
        self.nodes_with_residual: set[int] = set()
        self.own_masks_sent: list[str] = []
        self.declined: set[str] = set()
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
        log(INFO, "\t├── Store: %s, %d clients merged, %d withdrawn", self.store.directory, len(self.store.members), len(self.store.withdrawn))
        log(INFO, "\t├── Node keys bound to client ids: %s", "yes" if self.nodes.bind_node_keys else "no")
        log(INFO, "\t└── Withdraw after admission: %s", self.withdraw_ids or "none")

    @property
    def node_clients(self) -> dict[int, str]:
        """Client id of every node admitted in this run, by node id."""
        return self.nodes.clients

    def _base_config(self) -> dict:
        config = self.spec.to_config()
        config["layout-digest"] = self.base.layout_digest
        config["base-digest"] = self.base.base_digest
        return config

    def identify(self, grid: Grid, timeout: float) -> None:
        """Query every node for its client id, admit it, and unmerge the admitted clients that request withdrawal.

        A node that is not admitted (see `NodeRegistry.admit`) gets no further message in
        this run, and its withdrawal request is ignored.
        """
        self.nodes.read_keys(grid)
        content = RecordDict({protocol.CONFIG: ConfigRecord(self._base_config())})
        messages = [Message(content=content, message_type=query.IDENTIFY_MESSAGE_TYPE, dst_node_id=node) for node in grid.get_node_ids()]
        for reply in self._collect(grid, messages, timeout, "identify"):
            node_id = reply.metadata.src_node_id
            meta = reply.content[protocol.META]
            client_id = str(meta["client-id"])
            reason = self.nodes.admit(node_id, client_id)
            if reason is not None:
                self._fail(node_id, client_id, f"not admitted: {reason}")
                continue
            if self._holds_merged_residual(client_id, meta):
                self.nodes_with_residual.add(node_id)
            if bool(meta.get(query.WITHDRAW_REQUEST, False)):
                self.honour_withdraw_request(client_id)
        log(INFO, "identify: %d nodes admitted, %d clients already merged", len(self.node_clients), len(self.store.members))

    def _holds_merged_residual(self, client_id: str, meta: ConfigRecord) -> bool:
        # A node has its residual if the digest it reports equals that of the residual the store merged.
        reported = str(meta.get(query.RESIDUAL_DIGEST, ""))
        if not reported or client_id not in self.store.members:
            return False
        merged = residual_digest(self.store.load_residual(client_id).to_arrays())
        if reported != merged:
            log(WARNING, "client %s holds a residual (digest %s) that differs from the merged one (%s); sending its mask", client_id, reported[:16], merged[:16])
        return reported == merged

    def _admitted_online(self, grid: Grid) -> list[int]:
        return [node for node in grid.get_node_ids() if node in self.node_clients]

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        """Send the train config to every node whose client is neither stored nor declined."""
        done = self.store.members | set(self.store.withdrawn) | self.declined
        node_ids = [node for node in self._admitted_online(grid) if self.node_clients[node] not in done]
        log(INFO, "configure_train: %d nodes to train (round %d)", len(node_ids), server_round)

        train_config = ConfigRecord({**self._base_config(), **dict(config), "server-round": server_round})
        content = RecordDict({protocol.CONFIG: train_config})
        return [Message(content=content, message_type=MessageType.TRAIN, dst_node_id=node) for node in node_ids]

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Merge each valid reply into the store; a rejected reply changes nothing and is logged."""
        merged_now = 0
        for reply in replies:
            node_id = reply.metadata.src_node_id
            if reply.has_error():
                self._fail(node_id, self.node_clients.get(node_id, "?"), f"client error: {reply.error.reason}")
                continue
            meta = reply.content.config_records.get(protocol.META)
            client_id = str(meta.get("client-id", "?")) if meta else "?"
            if (reason := self.nodes.check_reply(node_id, client_id)) is not None:
                self._fail(node_id, client_id, f"train reply rejected: {reason}")
                continue
            if meta is not None and bool(meta.get(query.WITHDRAW_REQUEST, False)):
                self.honour_withdraw_request(client_id)
                continue
            try:
                self.nodes.bind_before_join(node_id, client_id)
                self.ingest(reply)
            except (RejectedUploadError, NodeKeyMismatchError, KeyError, TypeError, ValueError) as error:
                self._fail(node_id, client_id, str(error))
                continue
            self.nodes_with_residual.add(node_id)
            merged_now += 1

        count = len(self.store.members)
        log(INFO, "aggregate_train: merged %d clients this round, %d in the store", merged_now, count)
        return None, MetricRecord({"merged-clients": count, "merged-this-round": merged_now})

    def ingest(self, reply: Message) -> str:
        """Check one train reply and merge it durably through `MergeStore.join`."""
        meta = reply.content[protocol.META]
        client_id = str(meta["client-id"])
        ft_residual = None
        if self.spec.baselines:
            ft_residual = record_to_arrays(reply.content[protocol.FT_RESIDUAL])
            for tensor in self.layout.tensors:
                if ft_residual.get(tensor.name) is None or ft_residual[tensor.name].shape != tensor.shape:
                    raise RejectedUploadError(client_id, f"{protocol.FT_RESIDUAL}/{tensor.name}", "is missing or misshaped")

        upload = Upload(
            client_id,
            record_to_arrays(reply.content[protocol.SIFT_RESIDUAL]),
            str(meta.get("layout-digest", "")),
            str(meta.get("base-digest", "")),
            int(meta.get("sign-seed", -1)),
        )
        self.store.join(upload)
        if ft_residual is not None:
            self.ft_residuals[client_id] = ft_residual
        self.train_metrics[client_id] = {k: float(v) for k, v in reply.content[protocol.METRICS].items()}
        return client_id

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        """Send τ̄ (plain and coverage-normalised) and the FT+Merge mean; merged clients apply their own mask."""
        state = self.store.state
        records = {
            protocol.SIFT_MEAN: arrays_to_record(state.mean()),
            protocol.SIFT_COVERAGE_MEAN: arrays_to_record(state.coverage_mean()),
        }
        if self.spec.baselines and self.ft_residuals:
            records[protocol.FT_MEAN] = arrays_to_record(self.ft_mean())

        messages = []
        for node in self._admitted_online(grid):
            client = self.node_clients[node]
            served = protocol.SERVED_MASKED if client in state.members else protocol.SERVED_UNMASKED
            eval_config = ConfigRecord({**self._base_config(), **dict(config), "served": served, "server-round": server_round})
            content = RecordDict({**records, protocol.CONFIG: eval_config})
            if served == protocol.SERVED_MASKED and node not in self.nodes_with_residual:
                content[query.OWN_MASK] = self._own_mask(client)
                self.own_masks_sent.append(client)
            messages.append(Message(content=content, message_type=MessageType.EVALUATE, dst_node_id=node))
        return messages

    def _own_mask(self, client_id: str) -> ArrayRecord:
        residual = self.store.load_residual(client_id)
        return arrays_to_record({name + MASK_SUFFIX: tensor.mask for name, tensor in residual.tensors.items()})

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Store each client's accuracies under the current phase and return their means."""
        results: dict[str, dict[str, float | str]] = {}
        for reply in replies:
            node_id = reply.metadata.src_node_id
            if reply.has_error():
                self._fail(node_id, self.node_clients.get(node_id, "?"), f"evaluation error: {reply.error.reason}")
                continue
            meta = reply.content[protocol.META]
            client_id = str(meta["client-id"])
            if (reason := self.nodes.check_reply(node_id, client_id)) is not None:
                self._fail(node_id, client_id, f"evaluate reply rejected: {reason}")
                continue
            row: dict[str, float | str] = {k: float(v) for k, v in reply.content[protocol.METRICS].items()}
            row["served"] = str(meta["served"])
            results[client_id] = row
        self.evaluations[self._phase] = results
        if not results:
            return None

        keys = sorted({k for row in results.values() for k, v in row.items() if isinstance(v, float)})
        means = {k: float(np.mean([row[k] for row in results.values() if k in row])) for k in keys}
        return MetricRecord(means)

    def ft_mean(self) -> dict[str, np.ndarray]:
        """Return the uniform mean of the plain finetuning residuals of merged clients trained in this run."""
        members = sorted(c for c in self.store.members if c in self.ft_residuals)
        return {
            tensor.name: np.mean([self.ft_residuals[c][tensor.name] for c in members], axis=0).astype(np.float32)
            if members else np.zeros(tensor.shape, np.float32)
            for tensor in self.layout.tensors
        }

    def withdraw(self, client_id: str, requested_by: str = "run-config") -> Withdrawal:
        """Unmerge a client through `MergeStore.withdraw`, then verify the store against a from-scratch merge.

        Withdrawing a client twice is a no-op; an id the store never merged raises UnknownClientError.
        """
        outcome = self.store.withdraw(client_id)
        self.ft_residuals.pop(client_id, None)
        bit_exact = verify_store(self.store).ok
        level = INFO if bit_exact else ERROR
        log(level, "%s (requested by %s); store equals a from-scratch merge of the retain set: %s", outcome.message, requested_by, bit_exact)
        withdrawal = Withdrawal(client_id, outcome.seconds, bit_exact, outcome.status, requested_by)
        self.withdrawals.append(withdrawal)
        return withdrawal

    def honour_withdraw_request(self, client_id: str) -> None:
        """Handle a withdrawal the client asked for itself: unmerge it if merged, and never train it in this run."""
        self.declined.add(client_id)
        try:
            self.withdraw(client_id, requested_by="client")
        except UnknownClientError:
            log(INFO, "client %s asked to withdraw but was never merged; it will not be trained", client_id)

    def _collect(self, grid: Grid, messages: Iterable[Message], timeout: float, label: str) -> list[Message]:
        # Send and wait; record a failure for every node whose reply is an error or missing, and return the other replies.
        messages = list(messages)
        replies = send_and_collect(grid, messages, timeout, label)
        for message in messages:
            node_id = message.metadata.dst_node_id
            client_id = self.node_clients.get(node_id, "?")
            if node_id not in replies:
                self._fail(node_id, client_id, f"no {label} reply within {timeout:.0f}s; nothing from this node is used")
            elif replies[node_id].has_error():
                self._fail(node_id, client_id, f"{label} failed: {replies[node_id].error.reason}")
        return [reply for reply in replies.values() if not reply.has_error()]

    def _fail(self, node_id: int | str, client_id: str, reason: str) -> None:
        log(WARNING, "node %s (client %s) failed: %s", node_id, client_id, reason)
        self.failures.append({"node": str(node_id), "client": client_id, "reason": reason})

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
        """Identify nodes, run `num_rounds` admission rounds (train new clients, evaluate), then the withdrawals.

        After the run-config withdrawals, every client is evaluated again, and the
        withdrawn ones are served the unmasked merge.
        """
        log(INFO, "Starting %s strategy:", self.__class__.__name__)
        self.summary()
        train_config = train_config or ConfigRecord()
        evaluate_config = evaluate_config or ConfigRecord()
        empty = ArrayRecord()
        result = Result()
        wait_for_nodes(grid, self.min_clients, self.node_wait_seconds)
        self.identify(grid, timeout)

        for server_round in range(1, num_rounds + 1):
            log(INFO, "[ROUND %d/%d] admitting clients that are not in the store", server_round, num_rounds)
            replies = self._collect(grid, self.configure_train(server_round, empty, train_config, grid), timeout, "train")
            _, train_metrics = self.aggregate_train(server_round, replies)
            if train_metrics is not None:
                result.train_metrics_clientapp[server_round] = train_metrics

            self._phase = "merged"
            replies = self._collect(grid, self.configure_evaluate(server_round, empty, evaluate_config, grid), timeout, "evaluate")
            evaluate_metrics = self.aggregate_evaluate(server_round, replies)
            if evaluate_metrics is not None:
                log(INFO, "\t└──> mean accuracies: %s", evaluate_metrics)
                result.evaluate_metrics_clientapp[server_round] = evaluate_metrics

        if self.withdraw_ids:
            for client_id in self.withdraw_ids:
                try:
                    self.withdraw(client_id)
                except UnknownClientError as error:
                    self._fail("-", client_id, f"withdrawal requested by the run config failed: {error}")
            self._phase = "after-withdrawal"
            after_round = num_rounds + 1
            replies = self._collect(grid, self.configure_evaluate(after_round, empty, evaluate_config, grid), timeout, "evaluate after withdrawal")
            evaluate_metrics = self.aggregate_evaluate(after_round, replies)
            if evaluate_metrics is not None:
                result.evaluate_metrics_clientapp[after_round] = evaluate_metrics
        return result
