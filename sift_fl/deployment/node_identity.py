"""Node admission for one run: node-config client ids checked against node-key bindings.

A node reports its client id from its node config. With `bind_node_keys` on, the ServerApp
also reads each node's public key from the SuperLink: in Flower 1.42, `grid.get_nodes()`
returns a `NodeInfo` whose `public_key` is the key the node signs its Fleet API requests
with. With `flower-superlink --enable-supernode-auth`, only keys registered with `flwr
supernode register` can connect. A node is admitted for a client id only if the store binds that id
to the sha256 of the node's key, or binds neither the id nor the key yet. The binding is
written when the node's first upload for the id is merged (`bind_before_join`).

A rejected node receives no train and no evaluate message, so it can neither withdraw,
overwrite nor read another client's contribution or mask.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field

from flwr.serverapp import Grid

from sift_fl.store import MergeStore, NodeKeyMismatchError, RejectedUploadError
from sift_fl.store.node_keys import check_binding
from sift_fl.store.validation import check_client_id

logger = logging.getLogger(__name__)


def key_sha256(public_key: bytes) -> str:
    """Return the sha256 (hex) of a node's public key bytes as the SuperLink stores them."""
    return hashlib.sha256(public_key).hexdigest()


def node_key_digests(grid: Grid) -> dict[int, str]:
    """Return the sha256 of each connected node's public key, by node id; nodes without a key are left out."""
    return {int(node.node_id): key_sha256(bytes(node.public_key)) for node in grid.get_nodes() if node.public_key}


@dataclass
class Rejection:
    """A node that was refused for the client id it reported."""

    node: str
    client: str
    reason: str


@dataclass
class NodeRegistry:
    """The nodes admitted in this run, with their client ids and key digests.

    Parameters
    ----------
    store : MergeStore
        The store whose node-key bindings decide admission.
    bind_node_keys : bool
        Check and record node-key bindings. Off, the registry only rejects a client id
        that two nodes report in the same run, and trusts the reported id otherwise.
    """

    store: MergeStore
    bind_node_keys: bool = False
    clients: dict[int, str] = field(default_factory=dict)
    keys: dict[int, str] = field(default_factory=dict)
    rejections: list[Rejection] = field(default_factory=list)

    def read_keys(self, grid: Grid) -> None:
        """Read the key digests of the connected nodes from the SuperLink (only with `bind_node_keys`)."""
        if self.bind_node_keys:
            self.keys.update(node_key_digests(grid))

    def admit(self, node_id: int, client_id: str) -> str | None:
        """Admit `node_id` for `client_id`; return None if admitted, else the reason for the rejection (also logged)."""
        reason = self._check(node_id, client_id)
        if reason is None:
            self.clients[node_id] = client_id
            return None
        logger.warning("node %s rejected for client %r: %s", node_id, client_id, reason)
        self.rejections.append(Rejection(str(node_id), client_id, reason))
        return reason

    def _check(self, node_id: int, client_id: str) -> str | None:
        try:
            check_client_id(client_id)
        except RejectedUploadError as error:
            return str(error)
        if self.bind_node_keys and (reason := self._check_key(node_id, client_id)) is not None:
            return reason
        for other_node, other_client in self.clients.items():
            if other_client == client_id and other_node != node_id:
                return f"node {other_node} already reported client id {client_id!r} in this run"
        return None

    def _check_key(self, node_id: int, client_id: str) -> str | None:
        # The key checks come first, so a node claiming a bound id is rejected for its key whatever the reply order.
        key = self.keys.get(node_id)
        if key is None:
            return "the SuperLink reports no public key for this node; start the SuperLink with --enable-supernode-auth"
        try:
            bound = check_binding(self.store.node_keys(), client_id, key)
        except NodeKeyMismatchError as error:
            return error.reason
        known = client_id in self.store.members or client_id in self.store.withdrawn
        if known and not bound:
            return (
                f"client {client_id!r} is in the store without a node-key binding, so no node can prove it owns the id; "
                "unmerge it with `sift-fl withdraw` if needed"
            )
        return None

    def client_of(self, node_id: int) -> str | None:
        """Return the client id admitted for `node_id`, or None."""
        return self.clients.get(node_id)

    def check_reply(self, node_id: int, client_id: str) -> str | None:
        """Return None if a reply from `node_id` may speak for `client_id`, else the reason it may not."""
        admitted = self.clients.get(node_id)
        if admitted is None:
            return "the node was not admitted in this run's identify step"
        if admitted != client_id:
            return f"the node was admitted as client {admitted!r} but its reply names client {client_id!r}"
        return None

    def bind_before_join(self, node_id: int, client_id: str) -> None:
        """Record the binding of `client_id` to the node's key before its first upload is merged.

        Raises
        ------
        NodeKeyMismatchError
            If another key claimed the id, or this key claimed another id, since admission.
        """
        if self.bind_node_keys:
            if self.store.bind_node_key(client_id, self.keys[node_id]):
                logger.info("bound client %r to node key %s", client_id, self.keys[node_id][:16])
