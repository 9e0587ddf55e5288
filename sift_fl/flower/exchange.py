"""Wait for nodes, send messages and collect replies, logging progress and the nodes that never replied."""

from __future__ import annotations

import time
from collections.abc import Iterable
from logging import INFO, WARNING

from flwr.app import Message
from flwr.common.logger import log
from flwr.serverapp import Grid

POLL_SECONDS = 1.0


def send_and_collect(grid: Grid, messages: Iterable[Message], timeout: float, label: str) -> dict[int, Message]:
    """Push `messages`, then pull replies until all arrived or `timeout` seconds passed; return replies by destination node.

    Replies are keyed by the node each message was sent to, because an error reply that
    the SuperLink creates for an unreachable node carries the SuperLink's node id as its
    source. Logs each time new replies arrive ("train: 5/20 replies after 12s"), so a
    long round is not silent, and logs a warning naming the nodes whose replies are
    missing at the timeout.
    """
    messages = list(messages)
    destinations = {}
    started = time.monotonic()
    pending = set()
    for message_id, message in zip(grid.push_messages(messages), messages):
        pending.add(message_id)
        destinations[message_id] = message.metadata.dst_node_id

    total = len(pending)
    replies: dict[int, Message] = {}
    while pending and time.monotonic() - started < timeout:
        new = [reply for reply in grid.pull_messages(pending) if reply.metadata.reply_to_message_id in pending]
        if new:
            for reply in new:
                replies[destinations[reply.metadata.reply_to_message_id]] = reply
                pending.discard(reply.metadata.reply_to_message_id)
            log(INFO, "%s: %d/%d replies after %.0fs", label, len(replies), total, time.monotonic() - started)
        elif pending:
            time.sleep(POLL_SECONDS)

    if pending:
        missing = sorted(str(destinations[message_id]) for message_id in pending)
        log(WARNING, "%s: timed out after %.0fs waiting for nodes %s", label, timeout, ", ".join(missing))
    return replies


def wait_for_nodes(grid: Grid, min_nodes: int, timeout: float) -> None:
    """Wait until at least `min_nodes` nodes are connected, logging the count every second.

    Raises
    ------
    TimeoutError
        If fewer than `min_nodes` nodes are connected after `timeout` seconds.
    """
    deadline = time.monotonic() + timeout
    while (connected := len(list(grid.get_node_ids()))) < min_nodes:
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {connected} of {min_nodes} nodes connected within {timeout:.0f}s")
        log(INFO, "Waiting for nodes: %d connected, %d required", connected, min_nodes)
        time.sleep(POLL_SECONDS)
