"""Unlearning cost: what each method must redo, exactly, to withdraw one client out of N.

Every method withdraws the same client, timed with `time.perf_counter`, and is charged an
operation count by the same rules:

- parameters read and written: parameter values (residual entries, sums, counts, served
  weights); packed masks and sparse indices are not counted;
- finetuning steps re-run and the examples they trained on;
- forward examples: inference on validation data (TALL's threshold selection).

`operations` = read + written + 6·P·trained examples + 2·P·forward examples, with the usual
estimate of 6·P floating-point operations per training example and 2·P per forward pass.
Shared state is restored after each timed withdrawal, so each method starts from all N clients.
Withdrawals that only subtract a residual are timed five times (the median is reported); the
recomputations (TIES, TALL masks, central) are timed once.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

from sift_fl.baselines.central import train_central
from sift_fl.baselines.ft_merge import ResidualSum
from sift_fl.baselines.mask_only import tensor_scales
from sift_fl.baselines.ties import TiesAccumulator
from sift_fl.experiment.clients import ClientSplits, TrainingResult
from sift_fl.experiment.context import RunContext
from sift_fl.experiment.evaluation import central_config, tall_masks_for_client
from sift_fl.merge import MergeState

logger = logging.getLogger(__name__)

TRAIN_FLOPS_PER_PARAMETER = 6
FORWARD_FLOPS_PER_PARAMETER = 2
TIMING_REPEATS = 5


@dataclass
class UnlearningCost:
    """Measured seconds and counted work of one exact withdrawal."""

    seconds: float
    num_parameters: int
    params_read: int = 0
    params_written: int = 0
    finetune_steps: int = 0
    trained_examples: int = 0
    forward_examples: int = 0
    bit_exact: bool | None = None
    # TIES and TALL masks only: the operations if the server kept no residuals and every
    # remaining client had to finetune again before the recomputation.
    operations_without_stored_residuals: int | None = None

    @property
    def operations(self) -> int:
        """Return the estimated operation count (see the module docstring)."""
        compute = TRAIN_FLOPS_PER_PARAMETER * self.trained_examples + FORWARD_FLOPS_PER_PARAMETER * self.forward_examples
        return self.params_read + self.params_written + compute * self.num_parameters

    def to_json(self) -> dict[str, object]:
        return {**asdict(self), "operations": self.operations}


def measure_unlearning(context: RunContext, training: TrainingResult) -> dict[str, UnlearningCost]:
    """Withdraw `config.withdraw_client` from every selected method and return each method's cost."""
    config = context.config
    num_clients = len(training.clients)
    if config.withdraw_client >= num_clients:
        logger.warning("withdraw_client %d is not among the %d clients; unlearning is not measured", config.withdraw_client, num_clients)
        return {}

    client_id = str(config.withdraw_client)
    retained = [client for client in training.clients if client.client_id != client_id]
    methods = config.methods
    costs: dict[str, UnlearningCost] = {}

    if "ft_merge" in methods:
        costs["ft_merge"] = _ft_merge(context, training.ft_sum, client_id)
    for method in ("sift_merge", "sift_masks", "sift_masks_coverage", "mask_only"):
        if method in methods:
            costs[method] = _sift(context, training.sift_state, client_id, method)
    if "ties" in methods:
        costs["ties"] = _ties(context, retained)
    if "tall_masks" in methods:
        costs["tall_masks"] = _tall_masks(context, training.ft_sum, client_id, retained)
    if "central" in methods:
        costs["central"] = _central(context, retained)

    _check_bit_exact(context, training, client_id, retained, costs)
    for method, kind in (("local", "ft"), ("local_sift", "sift")):
        if method in methods:
            costs[method] = _delete_local(context, kind, client_id)
    return costs


def _median_seconds(withdraw: Callable[[], Callable[[], None]]) -> float:
    # Withdrawals that take milliseconds are timed TIMING_REPEATS times and the median is kept,
    # because single timings that short vary with the load of a shared machine.
    # `withdraw` returns a function that merges the client back, which is not timed.
    timings = []
    for _ in range(TIMING_REPEATS):
        start = time.perf_counter()
        restore = withdraw()
        timings.append(time.perf_counter() - start)
        restore()
    return statistics.median(timings)


def _ft_merge(context: RunContext, ft_sum: ResidualSum, client_id: str) -> UnlearningCost:
    # Read τ_c, subtract it from S (read and write P), recompute S / n (read and write P).
    def withdraw() -> Callable[[], None]:
        residual = context.store.read_dense("ft", client_id)
        ft_sum.remove(client_id, residual)
        ft_sum.mean()
        return lambda: ft_sum.add(client_id, residual)

    seconds = _median_seconds(withdraw)
    size = context.num_parameters
    return UnlearningCost(seconds, size, params_read=3 * size, params_written=2 * size)


def _sift(context: RunContext, state: MergeState, client_id: str, method: str) -> UnlearningCost:
    # Read the client's nnz magnitudes, update sums and coverage at those nnz coordinates,
    # then recompute what the method serves from the sums.
    def withdraw() -> Callable[[], None]:
        encoded = context.store.read_encoded("sift", client_id)
        state.remove(client_id, encoded)
        if method == "sift_masks_coverage":
            state.coverage_mean()
        elif method == "mask_only":
            tensor_scales(state)
        else:
            state.mean()
        return lambda: state.add(client_id, encoded)

    seconds = _median_seconds(withdraw)
    encoded = context.store.read_encoded("sift", client_id)
    size = context.num_parameters
    nonzero = sum(int(tensor.magnitude.size) for tensor in encoded.tensors.values())
    read, written = 3 * nonzero, 2 * nonzero
    if method == "sift_masks_coverage":
        read, written = read + 2 * size, written + size
    elif method == "mask_only":
        read += 2 * size
    else:
        read, written = read + size, written + size
    return UnlearningCost(seconds, size, params_read=read, params_written=written)


def _ties(context: RunContext, retained: list[ClientSplits]) -> UnlearningCost:
    # The elected sign and the disjoint mean depend on every client, so the merge is rebuilt
    # from the stored trimmed residuals of the retain set.
    start = time.perf_counter()
    shapes = {spec.name: spec.shape for spec in context.layout.tensors}
    accumulator = TiesAccumulator(shapes, context.config.ties_sign_method)
    nonzero = 0
    for client in retained:
        trimmed = context.store.read_sparse("trimmed", client.client_id)
        accumulator.add_sparse(trimmed)
        nonzero += sum(int(values.size) for _, values in trimmed.values())
    accumulator.merged(context.config.ties_scale)
    seconds = time.perf_counter() - start

    size = context.num_parameters
    cost = UnlearningCost(seconds, size, params_read=nonzero + 4 * size, params_written=2 * nonzero + size)
    cost.operations_without_stored_residuals = cost.operations + _refinetune_operations(context, len(retained))
    return cost


def _tall_masks(context: RunContext, ft_sum: ResidualSum, client_id: str, retained: list[ClientSplits]) -> UnlearningCost:
    # τ_MTL loses τ_c, which changes every remaining mask: each remaining client's threshold
    # is selected again on its validation split.
    start = time.perf_counter()
    residual = context.store.read_dense("ft", client_id)
    ft_sum.remove(client_id, residual)
    total = ft_sum.total()
    for client in retained:
        tall_masks_for_client(context, client, total)
    seconds = time.perf_counter() - start

    ft_sum.add(client_id, residual)
    size = context.num_parameters
    candidates = len(context.config.tall_lambdas)
    per_client_read = size + candidates * 4 * size
    per_client_written = candidates * 2 * size
    cost = UnlearningCost(
        seconds,
        size,
        params_read=3 * size + len(retained) * per_client_read,
        params_written=2 * size + len(retained) * per_client_written,
        forward_examples=candidates * sum(len(client.validation) for client in retained),
    )
    cost.operations_without_stored_residuals = cost.operations + _refinetune_operations(context, len(retained))
    return cost


def _refinetune_operations(context: RunContext, num_clients: int) -> int:
    config = context.config.train_config(context.setting, seed=0)
    return TRAIN_FLOPS_PER_PARAMETER * context.num_parameters * num_clients * config.steps * config.batch_size


def _central(context: RunContext, retained: list[ClientSplits]) -> UnlearningCost:
    # Exact unlearning of the central model is retraining from θ0 on the retain set.
    size = context.num_parameters
    if not retained:
        return UnlearningCost(0.0, size)

    start = time.perf_counter()
    splits = [client.train for client in retained]
    config = central_config(context, sum(len(split) for split in splits))
    train_central(context.model, context.parameters, context.theta0, splits, config)
    seconds = time.perf_counter() - start
    return UnlearningCost(
        seconds,
        size,
        params_read=config.steps * size,
        params_written=config.steps * size,
        finetune_steps=config.steps,
        trained_examples=config.steps * config.batch_size,
    )


def _delete_local(context: RunContext, kind: str, client_id: str) -> UnlearningCost:
    # A local model involves no other client: withdrawal deletes its file.
    start = time.perf_counter()
    context.store.delete(kind, client_id)
    seconds = time.perf_counter() - start
    return UnlearningCost(seconds, context.num_parameters)


def _check_bit_exact(
    context: RunContext,
    training: TrainingResult,
    client_id: str,
    retained: list[ClientSplits],
    costs: dict[str, UnlearningCost],
) -> None:
    # Compare the state after the withdrawal with a merge of the retain set from scratch.
    store = context.store
    if training.ft_sum is not None and ({"ft_merge", "tall_masks"} & costs.keys()):
        training.ft_sum.remove(client_id, store.read_dense("ft", client_id))
        scratch = ResidualSum(training.ft_sum.shapes, training.ft_sum.number_format)
        for client in retained:
            scratch.add(client.client_id, store.read_dense("ft", client.client_id))
        exact = training.ft_sum.equals(scratch)
        for method in ("ft_merge", "tall_masks"):
            if method in costs:
                costs[method].bit_exact = exact

    sift_methods = [m for m in ("sift_merge", "sift_masks", "sift_masks_coverage", "mask_only") if m in costs]
    if training.sift_state is not None and sift_methods:
        state = training.sift_state
        state.remove(client_id, store.read_encoded("sift", client_id))
        scratch = MergeState(context.layout, context.sign_vector, state.number_format)
        for client in retained:
            scratch.add(client.client_id, store.read_encoded("sift", client.client_id))
        exact = state.equals(scratch)
        for method in sift_methods:
            costs[method].bit_exact = exact
