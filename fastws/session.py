"""A client of the channel protocol: the commands of docs/protocol.md, executed.

Parsing and encoding live in :mod:`fastws.protocol`; this module is what a
command does to the node: join or leave a channel in the fanout core, hand a
publication to the broker, answer. A command that fails is answered with an
error and the connection stays open.
"""

from __future__ import annotations

from fastws import protocol
from fastws.connection import Connection, Step
from fastws.protocol import CommandError, ErrorCode


class ChannelSession(Connection):
    """One connection speaking the channel protocol."""

    def opened(self) -> None:
        self.send_text(protocol.encode_welcome(self.id, self.app.node_name))
        return None

    def received(self, payload: bytes, text: bool) -> Step | None:
        if not text:
            self._answer_error(
                CommandError(ErrorCode.BAD_REQUEST, "commands are JSON in TEXT frames")
            )
            return None
        try:
            command = protocol.parse(payload)
        except CommandError as exc:
            self._answer_error(exc)
            return None
        return self._execute(command)

    async def _execute(self, command: protocol.Command) -> None:
        try:
            if isinstance(command, protocol.Pub):
                await self._pub(command)
            elif isinstance(command, protocol.Sub):
                await self._sub(command)
            elif isinstance(command, protocol.Unsub):
                await self._unsub(command)
            else:
                raise CommandError(
                    ErrorCode.NOT_AVAILABLE, "this node keeps no history or presence yet"
                )
        except CommandError as exc:
            exc.id = command.id
            self._answer_error(exc)

    async def _pub(self, command: protocol.Pub) -> None:
        seq = await self.app.publish(command.ch, command.data)
        if command.id is not None:
            self.send_text(protocol.encode_ok(command.id, seq=seq))

    async def _sub(self, command: protocol.Sub) -> None:
        # With a broker that does not wait (the memory broker), the join, the
        # position and the reply all happen in one loop turn, so the reply is
        # queued before any publication the join lets through.
        await self.app.join(self, command.ch)
        position = await self.app.broker.position(command.ch)
        since = command.since
        recovered = since is not None and since == position
        if command.id is not None:
            self.send_text(
                protocol.encode_ok(
                    command.id,
                    ch=command.ch,
                    epoch=position.epoch,
                    seq=position.seq,
                    recovered=recovered,
                )
            )

    async def _unsub(self, command: protocol.Unsub) -> None:
        await self.app.leave(self, command.ch)
        if command.id is not None:
            self.send_text(protocol.encode_ok(command.id))

    def _answer_error(self, exc: CommandError) -> None:
        self.app.stats.command_errors += 1
        self.send_text(protocol.encode_error(exc.id, exc.code, exc.message))
