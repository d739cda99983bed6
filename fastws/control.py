"""Orders between the nodes of a deployment: close a user's connections everywhere.

Every node listens to one reserved channel, :data:`CONTROL`, the empty name,
which no client and no API call can use (a channel name has 1 to 255
characters). Orders travel on it as join and leave messages do: the
broker's ``announce``, a message with no seq that nothing keeps, which
reaches every node that listens (with Redis, the pub/sub channel
``fastws:{}``; with the memory broker, this node only). So there is
nothing new in the brokers: the node subscribes to the channel once at
start, a Redis broker subscribes again after a reconnect as it does for
every channel, and ``App._deliver`` hands the channel's messages here.

An order is a JSON object. ``disconnect`` names a user, a close code and a
reason; a node that receives one closes that user's open connections and
answers ``disconnected`` with how many, on the same channel. The node that
gave the order closes its own at once and waits, up to
:data:`ANSWER_TIMEOUT`, for an answer from each other node of the registry.
A node that does not answer in time (it died but its registry entry has not
expired yet, or it runs a version without this) is reported as such: the
order may or may not have reached it. An order with an ``op`` a node does
not know is ignored, so that nodes of two versions can share a deployment
during a rolling upgrade.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from typing import TYPE_CHECKING, Any

import orjson

from fastws.brokers.base import Unavailable
from fastws.connection import OPEN

if TYPE_CHECKING:
    from fastws.app import App

logger = logging.getLogger("fastws.control")

# The reserved channel: a name no client command and no API call accepts.
CONTROL = ""

# The close codes a disconnect may use: normal closure, going away, policy,
# internal error, service restart, try again later, and those of the
# registered (3000-3999) and private (4000-4999) ranges. Codes that report
# a fault in the client's own frames (1002, 1003, 1007, 1009, 1010) would
# mislead it, and the others may not be sent at all.
CLOSE_CODES = frozenset({1000, 1001, 1008, 1011, 1012, 1013, *range(3000, 5000)})

# Seconds the node that ordered a disconnect waits for the other nodes' answers.
ANSWER_TIMEOUT = 2.0


# The longest close reason, in UTF-8 bytes: what a close frame has room for.
MAX_REASON = 123


def refusal(user: Any, code: Any, reason: Any) -> str | None:
    """Why a disconnect order cannot be given (for an error message), or None."""
    if not isinstance(user, str) or not user:
        return "'user' must be a non-empty string"
    if isinstance(code, bool) or not isinstance(code, int) or code not in CLOSE_CODES:
        return "'code' must be 1000, 1001, 1008, 1011, 1012, 1013 or 3000 to 4999"
    problem = f"'reason' must be a string of at most {MAX_REASON} bytes in UTF-8"
    if not isinstance(reason, str):
        return problem
    try:
        if len(reason.encode()) > MAX_REASON:
            return problem
    except UnicodeEncodeError:  # a lone surrogate
        return problem
    return None


class _Order:
    """An order this node gave, waiting for the other nodes' answers."""

    def __init__(self, expected: set[str]) -> None:
        self.expected = expected
        self.counts: dict[str, int] = {}
        self.done = asyncio.Event()
        if not expected:
            self.done.set()

    def answered(self, node: str, count: int) -> None:
        self.counts[node] = count
        if self.expected <= self.counts.keys():
            self.done.set()


class Control:
    """This node's end of the control channel (see the module doc)."""

    def __init__(self, app: App) -> None:
        self.app = app
        self._orders: dict[str, _Order] = {}  # by order id: the orders this node gave

    async def start(self) -> None:
        """Listen to the control channel; before the node accepts clients."""
        await self.app.broker.subscribe(CONTROL)

    async def disconnect(self, user: str, code: int, reason: str) -> dict[str, Any]:
        """Close every open connection of user, on every node, with code and reason.

        Returns ``{"disconnected": total, "nodes": {node: count},
        "unanswered": [node, ...]}``. Raises Unavailable, having closed
        nothing, when the order cannot be sent.
        """
        problem = refusal(user, code, reason)
        if problem is not None:
            raise ValueError(problem)
        app = self.app
        others = set(await app.broker.nodes()) - {app.node_name}
        id = secrets.token_hex(8)
        order = self._orders[id] = _Order(others)
        try:
            message = {"op": "disconnect", "id": id, "user": user, "code": code, "reason": reason}
            await app.broker.announce(CONTROL, orjson.dumps(message))
            counts = {app.node_name: self.close(user, code, reason)}
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(order.done.wait(), ANSWER_TIMEOUT)
        finally:
            del self._orders[id]
        counts.update(order.counts)
        return {
            "disconnected": sum(counts.values()),
            "nodes": counts,
            "unanswered": sorted(others - counts.keys()),
        }

    def close(self, user: str, code: int, reason: str) -> int:
        """Close this node's open connections of user; how many."""
        closed = 0
        for conn in list(self.app.connections):
            if conn.user == user and conn.state is OPEN:
                conn.close(code, reason)
                closed += 1
        if closed:
            logger.info("closed %d connections of user %r with %d", closed, user, code)
        return closed

    def received(self, payload: bytes) -> None:
        """A message on the control channel, from any node, this one included."""
        try:
            message = orjson.loads(payload)
            op, id = message["op"], message["id"]
            if op == "disconnect":
                if id in self._orders:
                    return  # this node's own order, carried out already
                user, code, reason = message["user"], message["code"], message["reason"]
                problem = refusal(user, code, reason)
                if problem is not None:
                    raise ValueError(problem)
                closed = self.close(user, code, reason)
                self.app.start(self._answer(id, closed))
            elif op == "disconnected":
                order = self._orders.get(id)
                if order is not None:
                    order.answered(str(message["node"]), int(message["count"]))
            else:
                logger.debug("ignoring a control message with op %r", op)
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            logger.warning("ignoring a malformed control message %r: %r", payload[:200], exc)

    async def _answer(self, id: str, closed: int) -> None:
        answer = {"op": "disconnected", "id": id, "node": self.app.node_name, "count": closed}
        try:
            await self.app.broker.announce(CONTROL, orjson.dumps(answer))
        except Unavailable as exc:
            logger.warning("answering disconnect order %s: %s", id, exc)
