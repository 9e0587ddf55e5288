"""Identify query: a node reports its client id, whether it has its residual, and whether it withdraws.

At the start of every run the ServerApp sends `query.identify` to every node. The reply's
`meta` record carries `client-id`, `has-residual`, `residual-digest` and `withdraw-request`.
The client id comes from the node config, never from the server. The ServerApp acts on a
withdrawal request only from a node it admits for that client id. Without node-key
binding, that is any node that reports the id. With it, only a node whose authenticated
key is bound to the id is admitted (see `sift_fl.deployment.node_identity`). A node that still receives a
train message after asking to withdraw answers it with the same flag and no residual.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

IDENTIFY_ACTION = "identify"
IDENTIFY_MESSAGE_TYPE = "query." + IDENTIFY_ACTION

# Keys of the reply's meta record.
WITHDRAW_REQUEST = "withdraw-request"
HAS_RESIDUAL = "has-residual"
# Digest of the residual the node keeps (`sift_fl.deployment.client_state.residual_digest`), "" if none.
RESIDUAL_DIGEST = "residual-digest"

# Record with the client's own packed mask, sent in an evaluate message to a merged
# client whose node reports no residual, or one that differs from the merged residual.
OWN_MASK = "own-mask"

_TRUE = ("true", "1", "yes")


def wants_withdrawal(client_id: str, node_config: Mapping[str, Any], requested: Collection[str] = ()) -> bool:
    """Return True if this client asks to be unmerged.

    The request comes from the node config key `withdraw` (true/false), or, in a
    simulation, from the ids the ClientApp was built with (`make_client_app`).
    """
    if client_id in requested:
        return True
    return str(node_config.get("withdraw", "false")).strip().lower() in _TRUE
