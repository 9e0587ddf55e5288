"""ClientApp: SIFT finetuning once from θ0, sparse upload, masked evaluation and withdrawal requests.

A client keeps its own encoded residual (and so its mask) in the node's Flower state for
the rest of the run. With the node config key `state-dir` (an absolute path) it also
writes the residual to that directory, and in later runs it evaluates with the mask from
there (see `sift_fl.deployment.client_state`). A merged client whose node has neither
receives its own mask from the server in the evaluate message.

A client asks to be unmerged by answering the server's identify query with a withdrawal
request; see `sift_fl.flower.query`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from sift_fl.codec import MASK_SUFFIX, EncodedResidual, decode_residual, dense_nbytes, encode_residual
from sift_fl.deployment.client_state import ClientState, ModelBinding, residual_digest
from sift_fl.flower import protocol, query
from sift_fl.flower.records import arrays_to_record, record_to_arrays, record_to_residual, residual_to_record
from sift_fl.merge import apply_residual
from sift_fl.projection import SiftProjector
from sift_fl.run_spec import BaseModel, RunSpec, load_base_model
from sift_fl.sign import SignVector
from sift_fl.training import accuracy, finetune, load_values

logger = logging.getLogger(__name__)


class BaseModelMismatchError(RuntimeError):
    """The client's θ0 or parameter layout differs from the server's."""


def _load_checked(config: ConfigRecord, client_id: str) -> tuple[RunSpec, BaseModel]:
    spec = RunSpec.from_config(config)
    base = load_base_model(spec)
    if base.layout_digest != config["layout-digest"]:
        raise BaseModelMismatchError(
            f"client {client_id}: parameter layout digest {base.layout_digest[:16]} differs from the server's "
            f"{str(config['layout-digest'])[:16]}; install the same setting, model and package versions as the server"
        )
    if base.base_digest != config["base-digest"]:
        raise BaseModelMismatchError(
            f"client {client_id}: base model θ0 digest {base.base_digest[:16]} differs from the server's "
            f"{str(config['base-digest'])[:16]}; refusing to train on a different base model"
        )
    return spec, base


def _partition(context: Context, spec: RunSpec) -> int:
    partition_id = int(context.node_config.get("partition-id", -1))
    if partition_id < 0:
        raise ValueError("node config has no 'partition-id'; set it with --node-config")
    return partition_id


def _model_binding(config: ConfigRecord, client_id: str) -> ModelBinding:
    return ModelBinding(client_id, str(config["layout-digest"]), str(config["base-digest"]), int(config["sign-seed"]))


def _client_state(context: Context, client_id: str, state_root: Path | None) -> ClientState | None:
    # The node config's state-dir wins; a simulation may give a root with one directory per client.
    state = ClientState.from_node_config(context.node_config)
    if state is None and state_root is not None:
        state = ClientState(state_root / client_id)
    return state


def _own_residual_digest(context: Context, state: ClientState | None, binding: ModelBinding) -> str:
    own = context.state.array_records.get(protocol.SIFT_RESIDUAL)
    if own is not None:
        return residual_digest(record_to_arrays(own))
    loaded = state.load_arrays(binding) if state is not None else None
    return loaded[1] if loaded is not None else ""


def identify(message: Message, context: Context, withdraw_requests: Iterable[str] = (), state_root: Path | None = None) -> Message:
    """Reply to the identify query with the client id, the digest of the residual this node keeps, and any withdrawal request."""
    client_id = protocol.client_id_from_node_config(context.node_config)
    withdraw = query.wants_withdrawal(client_id, context.node_config, set(withdraw_requests))
    if withdraw:
        logger.info("client %s: asking the server to withdraw this client", client_id)
    binding = _model_binding(message.content[protocol.CONFIG], client_id)
    digest = _own_residual_digest(context, _client_state(context, client_id, state_root), binding)
    meta = ConfigRecord(
        {
            "client-id": client_id,
            query.HAS_RESIDUAL: bool(digest),
            query.RESIDUAL_DIGEST: digest,
            query.WITHDRAW_REQUEST: withdraw,
        }
    )
    return Message(content=RecordDict({protocol.META: meta}), reply_to=message)


def train(message: Message, context: Context, withdraw_requests: Iterable[str] = (), state_root: Path | None = None) -> Message:
    """Finetune with SIFT (and plain finetuning as a baseline), save the residual locally and upload it.

    A client that requests withdrawal does not train, and its reply carries the withdrawal request.
    """
    torch.set_num_threads(1)
    client_id = protocol.client_id_from_node_config(context.node_config)
    if query.wants_withdrawal(client_id, context.node_config, set(withdraw_requests)):
        meta = ConfigRecord({"client-id": client_id, query.WITHDRAW_REQUEST: True})
        return Message(content=RecordDict({protocol.META: meta}), reply_to=message)
    config = message.content[protocol.CONFIG]
    spec, base = _load_checked(config, client_id)
    partition_id = _partition(context, spec)
    num_partitions = int(context.node_config.get("num-partitions", spec.num_partitions))
    data = base.setting.client_data(partition_id, num_partitions, spec.data_seed)
    train_config = spec.train_config(base.setting, seed=spec.data_seed * 100_003 + partition_id)

    started = time.perf_counter()
    sign_vector = SignVector(spec.sign_seed, base.layout)
    load_values(base.parameters, base.theta0)
    projector = SiftProjector(base.parameters, sign_vector)
    sift_residual = finetune(base.model, base.parameters, data.train, train_config, projector)
    encoded = encode_residual(sift_residual, base.layout, sign_vector, spec.magnitude_dtype)
    sift_seconds = time.perf_counter() - started

    content = RecordDict({protocol.SIFT_RESIDUAL: residual_to_record(encoded)})
    context.state[protocol.SIFT_RESIDUAL] = residual_to_record(encoded)
    state = _client_state(context, client_id, state_root)
    if state is not None:
        state.save(_model_binding(config, client_id), encoded)
    if spec.baselines:
        load_values(base.parameters, base.theta0)
        ft_residual = finetune(base.model, base.parameters, data.train, train_config)
        content[protocol.FT_RESIDUAL] = arrays_to_record(ft_residual)
        context.state[protocol.FT_RESIDUAL] = arrays_to_record(ft_residual)
    load_values(base.parameters, base.theta0)

    content[protocol.META] = ConfigRecord(
        {
            "client-id": client_id,
            "layout-digest": base.layout_digest,
            "base-digest": base.base_digest,
            "sign-seed": spec.sign_seed,
        }
    )
    content[protocol.METRICS] = MetricRecord(
        {
            "num-examples": len(data.train),
            "density": encoded.density(),
            "upload-bytes": encoded.nbytes,
            "dense-bytes": dense_nbytes(base.layout),
            "train-seconds": sift_seconds,
        }
    )
    logger.info("client %s: SIFT density %.3f, upload %d bytes in %.1fs", client_id, encoded.density(), encoded.nbytes, sift_seconds)
    return Message(content=content, reply_to=message)


def evaluate(message: Message, context: Context, state_root: Path | None = None) -> Message:
    """Evaluate the local, merged and masked models on the client's local test split.

    The mask comes from the server's message if it sent one, else from this run's state,
    else from the residual file in the client's state directory.
    """
    torch.set_num_threads(1)
    client_id = protocol.client_id_from_node_config(context.node_config)
    config = message.content[protocol.CONFIG]
    spec, base = _load_checked(config, client_id)
    partition_id = _partition(context, spec)
    num_partitions = int(context.node_config.get("num-partitions", spec.num_partitions))
    test = base.setting.client_data(partition_id, num_partitions, spec.data_seed).test
    served = str(config["served"])

    def score(residual: dict[str, np.ndarray], mask: dict[str, np.ndarray] | None = None) -> float:
        load_values(base.parameters, apply_residual(base.theta0, residual, mask))
        return accuracy(base.model, test)

    metrics: dict[str, float] = {"num-examples": len(test)}
    sift_mean = record_to_arrays(message.content[protocol.SIFT_MEAN])
    coverage_mean = record_to_arrays(message.content[protocol.SIFT_COVERAGE_MEAN])
    metrics[protocol.ACCURACY_KEYS["sift_merge"]] = score(sift_mean)

    residual = _own_residual(context, _client_state(context, client_id, state_root), _model_binding(config, client_id), base)
    mask = None
    if residual is not None:
        sign_vector = SignVector(spec.sign_seed, base.layout)
        metrics[protocol.ACCURACY_KEYS["local_sift"]] = score(decode_residual(residual, base.layout, sign_vector))
    if served == protocol.SERVED_MASKED:
        if query.OWN_MASK in message.content.array_records or residual is None:
            mask = _own_mask_from_message(message, base, client_id)
        else:
            mask = {spec_.name: residual.unpacked_mask(spec_.name, spec_.numel) for spec_ in base.layout.tensors}

    metrics[protocol.ACCURACY_KEYS["sift_masks"]] = score(sift_mean, mask)
    metrics[protocol.ACCURACY_KEYS["sift_masks_coverage"]] = score(coverage_mean, mask)
    if protocol.FT_MEAN in message.content.array_records:
        metrics[protocol.ACCURACY_KEYS["ft_merge"]] = score(record_to_arrays(message.content[protocol.FT_MEAN]))
        own_ft = context.state.get(protocol.FT_RESIDUAL)
        if own_ft is not None:
            metrics[protocol.ACCURACY_KEYS["local"]] = score(record_to_arrays(own_ft))
    load_values(base.parameters, base.theta0)

    content = RecordDict(
        {
            protocol.METRICS: MetricRecord(metrics),
            protocol.META: ConfigRecord({"client-id": client_id, "served": served}),
        }
    )
    return Message(content=content, reply_to=message)


def _own_residual(context: Context, state: ClientState | None, binding: ModelBinding, base: BaseModel) -> EncodedResidual | None:
    own = context.state.array_records.get(protocol.SIFT_RESIDUAL)
    if own is not None:
        return record_to_residual(own, base.layout)
    return state.load(binding, base.layout) if state is not None else None


def _own_mask_from_message(message: Message, base: BaseModel, client_id: str) -> dict[str, np.ndarray]:
    if query.OWN_MASK not in message.content.array_records:
        raise RuntimeError(f"client {client_id}: the server serves a masked model, but the message has no mask and this node has no residual")
    packed = record_to_arrays(message.content[query.OWN_MASK])
    return {
        tensor.name: np.unpackbits(packed[tensor.name + MASK_SUFFIX], count=tensor.numel).astype(bool)
        for tensor in base.layout.tensors
    }


def make_client_app(withdraw_requests: Iterable[str] = (), state_root: str | Path | None = None) -> ClientApp:
    """Return the ClientApp; clients whose id is in `withdraw_requests` ask the server to unmerge them.

    Deployed nodes ask to withdraw with the node config key `withdraw=true` instead, and
    name their state directory with `state-dir`. `state_root` gives simulated clients,
    which have no such key, the state directory `state_root/<client id>`.
    """
    requested = frozenset(str(c) for c in withdraw_requests)
    root = Path(state_root) if state_root else None
    client_app = ClientApp()

    @client_app.query(query.IDENTIFY_ACTION)
    def identify_handler(message: Message, context: Context) -> Message:
        return identify(message, context, requested, root)

    @client_app.train()
    def train_handler(message: Message, context: Context) -> Message:
        return train(message, context, requested, root)

    @client_app.evaluate()
    def evaluate_handler(message: Message, context: Context) -> Message:
        return evaluate(message, context, root)

    return client_app


app = make_client_app()
