"""A client of the channel protocol: the commands of docs/protocol.md, executed.

Parsing and encoding live in :mod:`fastws.protocol`; this module is what a
command does to the node: join or leave a channel in the fanout core, hand a
publication to the broker, answer. A command that fails is answered with an
error and the connection stays open.
"""

from __future__ import annotations

import asyncio

from fastws import auth, protocol
from fastws.brokers.base import Unavailable
from fastws.connection import Connection, Step
from fastws.limits import RateLimit, Strikes
from fastws.protocol import CommandError, ErrorCode, Position


def _is_utf8(payload: bytes) -> bool:
    try:
        payload.decode()
    except UnicodeDecodeError:
        return False
    return True


class ChannelSession(Connection):
    """One connection speaking the channel protocol."""

    __slots__ = ("_publishing", "_rate", "_strikes")
    eager = True

    def opened(self) -> None:
        config = self.app.config
        self.request = None  # everything the channel protocol needs was read at the upgrade
        self._strikes: Strikes | None = None
        # The last pub sent to the broker without waiting (see _pipeline).
        self._publishing: asyncio.Future[int] | None = None
        self._rate: RateLimit | None = None
        if config.rate_limit > 0:
            self._rate = RateLimit(
                config.rate_limit, config.rate_burst, asyncio.get_running_loop().time()
            )
        self.send_text(protocol.encode_welcome(self.id, self.app.node_name, trace=self.trace))
        return None

    def received(self, payload: bytes, text: bool) -> Step | None:
        verdict = RateLimit.ALLOWED
        if self._rate is not None:
            verdict = self._rate.take(asyncio.get_running_loop().time())
            if verdict == RateLimit.EXHAUSTED:
                self.app.stats.policy_closes += 1
                self.app.stats.rate_limit_closes += 1
                self.close(1008, "rate limit exceeded")
                return None
        try:
            if not text:
                raise CommandError(ErrorCode.BAD_REQUEST, "commands are JSON in TEXT frames")
            command = protocol.parse(payload)
        except CommandError as exc:
            if text and not _is_utf8(payload):
                self._protocol_error(1007, "invalid UTF-8 in a text message")
                return None
            self._answer_error(exc)
            self._strike()
            return None
        if verdict == RateLimit.REFUSED:
            self.app.stats.rate_limited += 1
            self._answer_error(
                CommandError(ErrorCode.LIMIT_EXCEEDED, "too many commands", command.id)
            )
            return None
        if isinstance(command, protocol.Pub) and self._queue is None and self.app.broker.pipelines:
            self._pipeline(command)
            return None
        return self._execute(command)

    def _pipeline(self, command: protocol.Pub) -> None:
        """Hand a pub to the broker without waiting for its seq.

        With nothing else of this connection's under way, the next pubs go
        out right behind it: the broker numbers them in this order and
        answers in this order, and many reach Redis, and the nodes, in one
        batch. Any other command waits until they are answered
        (:meth:`_execute`), so commands still take effect in the order sent.
        """
        try:
            self._check_publish(command.ch)
            future = self.app.publish_soon(command.ch, command.data)
        except (CommandError, Unavailable) as exc:
            self._answer_failure(exc, command.id)
            return
        self._publishing = future
        future.add_done_callback(lambda done: self._published(command.id, done))

    def _published(self, id: int | None, future: asyncio.Future[int]) -> None:
        if future.cancelled():
            return
        exc = future.exception()
        if isinstance(exc, Unavailable):
            self._answer_failure(exc, id)
        elif exc is not None:
            self.fail(exc)
        elif id is not None:
            self.send_text(protocol.encode_ok(id, seq=future.result()))

    def _strike(self) -> None:
        """Count a malformed command; too many close the connection with 1008."""
        if self._strikes is None:
            self._strikes = Strikes(self.app.config.max_bad_commands)
        if self._strikes.add(asyncio.get_running_loop().time()):
            self.app.stats.policy_closes += 1
            self.close(1008, "too many malformed commands")

    async def _execute(self, command: protocol.Command) -> None:
        if self._publishing is not None and not self._publishing.done():
            await asyncio.wait([self._publishing])
        try:
            if isinstance(command, protocol.Pub):
                self._check_publish(command.ch)
                await self._pub(command)
            elif isinstance(command, protocol.Sub):
                self._check_read(command.ch)
                await self._sub(command)
            elif isinstance(command, protocol.Unsub):
                await self._unsub(command)
            elif isinstance(command, protocol.History):
                self._check_read(command.ch)
                await self._history(command)
            elif isinstance(command, protocol.Presence):
                self._check_read(command.ch)
                await self._presence(command)
            else:
                self._refresh(command)
        except (CommandError, Unavailable) as exc:
            self._answer_failure(exc, command.id)

    def _check_read(self, channel: str) -> None:
        """sub, history and presence: the token's `subs` patterns, when it has them."""
        if self.grant is not None and not self.grant.may_subscribe(channel):
            raise CommandError(ErrorCode.FORBIDDEN, "the token does not allow this channel")

    def _check_publish(self, channel: str) -> None:
        """pub: the namespace must let clients publish, and the token's `pubs` allow it."""
        if not self.app.namespaces(channel).client_publish:
            raise CommandError(
                ErrorCode.FORBIDDEN, "clients may not publish to this channel's namespace"
            )
        if self.grant is not None and not self.grant.may_publish(channel):
            raise CommandError(ErrorCode.FORBIDDEN, "the token does not allow publishing here")

    def _refresh(self, command: protocol.Refresh) -> None:
        """Replace the connection's token with a fresh one for the same user.

        A token that does not verify, or names another user, is refused with
        ``forbidden`` and the connection keeps its old token, and with it
        its old expiry. The new token's patterns apply to later commands.
        """
        verifier = self.app.verifier
        if verifier is None or self.grant is None:
            raise CommandError(ErrorCode.NOT_AVAILABLE, "this node does not authenticate clients")
        try:
            grant = verifier.verify(command.token)
        except auth.Unauthorized as exc:
            raise CommandError(ErrorCode.FORBIDDEN, f"refresh refused: {exc}") from None
        if grant.user != self.grant.user:
            raise CommandError(
                ErrorCode.FORBIDDEN, "refresh refused: the token is for another user"
            )
        self.authorize(grant)
        if command.id is not None:
            self.send_text(protocol.encode_ok(command.id))

    async def _pub(self, command: protocol.Pub) -> None:
        seq = await self.app.publish(command.ch, command.data)
        if command.id is not None:
            self.send_text(protocol.encode_ok(command.id, seq=seq))

    async def _sub(self, command: protocol.Sub) -> None:
        # The reply and the replay are queued before the connection joins the
        # channel's fanout, and the join starts live delivery right after the
        # position they reached (App.join): none is lost or sent twice.
        if await self.app.join(self, command.ch, lambda: self._greet(command)):
            await self.app.announce_join(self, command.ch)
        else:
            await self._greet(command, replay=False)

    async def _greet(self, command: protocol.Sub, replay: bool = True) -> Position:
        """Queue the sub reply and, with ``since``, the missed publications."""
        if command.since is None:
            position, missed = await self.app.broker.position(command.ch), None
        else:
            position, missed = await self.app.broker.history(command.ch, command.since)
            if missed is None:
                self.app.stats.not_recovered += 1
            else:
                self.app.stats.recovered += 1
        if command.id is not None:
            self.send_text(
                protocol.encode_ok(
                    command.id,
                    ch=command.ch,
                    epoch=position.epoch,
                    seq=position.seq,
                    recovered=missed is not None,
                )
            )
        if replay:
            for stored in missed or ():
                self.send_text(stored.payload)
        return position

    async def _history(self, command: protocol.History) -> None:
        position, kept = await self.app.broker.history(command.ch, command.since, command.limit)
        if kept is None:
            raise CommandError(
                ErrorCode.UNRECOVERABLE, "the history does not reach back to that position"
            )
        if command.id is not None:
            self.send_text(
                protocol.encode_history(
                    command.id, position.epoch, position.seq, [s.payload for s in kept]
                )
            )

    async def _presence(self, command: protocol.Presence) -> None:
        if not self.app.namespaces(command.ch).presence:
            raise CommandError(
                ErrorCode.NOT_AVAILABLE, "presence is not enabled for this channel's namespace"
            )
        clients = await self.app.broker.presence(command.ch)
        if command.id is not None:
            self.send_text(protocol.encode_ok(command.id, clients=clients))

    async def _unsub(self, command: protocol.Unsub) -> None:
        await self.app.leave(self, command.ch)
        if command.id is not None:
            self.send_text(protocol.encode_ok(command.id))

    def _answer_failure(self, exc: CommandError | Unavailable, id: int | None) -> None:
        """Answer command id with why it failed: its own error, or the broker's absence."""
        if isinstance(exc, Unavailable):
            exc = CommandError(ErrorCode.UNAVAILABLE, str(exc))
        exc.id = id
        self._answer_error(exc)

    def _answer_error(self, exc: CommandError) -> None:
        self.app.stats.command_errors += 1
        self.send_text(protocol.encode_error(exc.id, exc.code, exc.message))
