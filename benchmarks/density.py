"""SIFT residual density as training produces it: bbc setting clients finetuned with the projection."""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np

from sift_fl.codec import dense_nbytes, encode_residual
from sift_fl.projection import SiftProjector
from sift_fl.run_spec import RunSpec, load_base_model
from sift_fl.sign import SignVector
from sift_fl.training import finetune, load_values

logger = logging.getLogger(__name__)


def measure_bbc_density(num_clients: int) -> dict[str, Any]:
    """Finetune clients 0..num_clients-1 of the default bbc run with SIFT and return their densities.

    Uses the defaults of `RunSpec` (top encoder layer + head, 20 partitions, 20 Adam steps)
    and the client's training seed as the ClientApp derives it. The first call on a
    machine computes the frozen-layer feature cache, which takes minutes.
    """
    spec = RunSpec()
    base = load_base_model(spec)
    sign_vector = SignVector(spec.sign_seed, base.layout)

    clients = []
    for partition_id in range(num_clients):
        data = base.setting.client_data(partition_id, spec.num_partitions, spec.data_seed)
        train_config = spec.train_config(base.setting, seed=spec.data_seed * 100_003 + partition_id)
        load_values(base.parameters, base.theta0)

        start = time.perf_counter()
        projector = SiftProjector(base.parameters, sign_vector)
        residual = finetune(base.model, base.parameters, data.train, train_config, projector)
        seconds = time.perf_counter() - start

        nonzero = sum(int(np.count_nonzero(values)) for values in residual.values())
        encoded = encode_residual(residual, base.layout, sign_vector)
        clients.append(
            {
                "partition_id": partition_id,
                "density": nonzero / base.layout.num_parameters,
                "upload_ratio_fp32": encoded.nbytes / dense_nbytes(base.layout),
                "train_seconds": seconds,
            }
        )
        logger.info("density: bbc client %d has density %.4f", partition_id, clients[-1]["density"])
    load_values(base.parameters, base.theta0)

    return {
        "value": float(np.mean([c["density"] for c in clients])),
        "source": (
            f"bbc setting ({base.setting.mode}, {spec.trainable_layers} trainable layer + head, "
            f"{base.layout.num_parameters} parameters), clients 0..{num_clients - 1} of {spec.num_partitions}, "
            f"{train_config.steps} {train_config.optimizer} steps, lr {train_config.learning_rate}"
        ),
        "clients": clients,
    }
