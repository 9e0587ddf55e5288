"""Names of the records and keys exchanged between the ServerApp and the ClientApp."""

from __future__ import annotations

# Records in message content.
CONFIG = "config"
META = "meta"
METRICS = "metrics"
SIFT_RESIDUAL = "sift-residual"
FT_RESIDUAL = "ft-residual"
SIFT_MEAN = "sift-mean"
SIFT_COVERAGE_MEAN = "sift-coverage-mean"
FT_MEAN = "ft-mean"

# Values of the `served` key: how the client must build the model it evaluates.
SERVED_MASKED = "masked"
SERVED_UNMASKED = "unmasked"

# Accuracy metrics returned by evaluation, one per method.
ACCURACY_KEYS = {
    "local": "accuracy-local",
    "local_sift": "accuracy-local-sift",
    "ft_merge": "accuracy-ft-merge",
    "sift_merge": "accuracy-sift-merge",
    "sift_masks": "accuracy-sift-masks",
    "sift_masks_coverage": "accuracy-sift-masks-coverage",
}


def client_id_from_node_config(node_config: dict) -> str:
    """Return the stable client id: `client-id` from node config, else the partition id."""
    if "client-id" in node_config:
        return str(node_config["client-id"])
    if "partition-id" in node_config:
        return str(int(node_config["partition-id"]))
    raise ValueError("node config has neither 'client-id' nor 'partition-id'; set one with --node-config")
