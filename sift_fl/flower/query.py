"""Identify query: a node reports its client id, whether it has its residual, and whether it withdraws.

At the start of every run the ServerApp sends `query.identify` to every node. The reply's
`meta` record carries `client-id`, `has-residual` and `withdraw-request`. A withdrawal
request is authorised by the identity the node itself reports, which comes from its node
config, never from the server. A node that still receives a train message after asking
to withdraw answers it with the same flag and no residual.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

IDENTIFY_ACTION = "identify"
IDENTIFY_MESSAGE_TYPE = "query." + IDENTIFY_ACTION

# Keys of the reply's meta record.
WITHDRAW_REQUEST = "withdraw-request"
HAS_RESIDUAL = "has-residual"

# Record with the client's own packed mask, sent in an evaluate message to a merged
# client whose node no longer has its residual (a later run or a restarted node).
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
