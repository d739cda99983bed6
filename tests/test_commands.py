"""The channel protocol without a socket: bytes in, commands or errors out."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from fastws import protocol
from fastws.protocol import CommandError, ErrorCode, Position


def parse_error(payload: bytes | str) -> CommandError:
    with pytest.raises(CommandError) as info:
        protocol.parse(payload)
    return info.value


def test_each_op_parses_to_its_command() -> None:
    assert protocol.parse(b'{"op":"sub","ch":"a","id":1}') == protocol.Sub(1, "a")
    assert protocol.parse('{"op":"unsub","ch":"a"}') == protocol.Unsub(None, "a")
    assert protocol.parse(b'{"op":"pub","ch":"a","data":null,"id":3}') == protocol.Pub(3, "a", None)
    assert protocol.parse(
        b'{"op":"history","ch":"a","since":{"epoch":"e","seq":4},"limit":10}'
    ) == protocol.History(None, "a", Position("e", 4), 10)
    assert protocol.parse(b'{"op":"presence","ch":"a","id":9}') == protocol.Presence(9, "a")


def test_sub_carries_its_recovery_position() -> None:
    command = protocol.parse(b'{"op":"sub","ch":"a","since":{"epoch":"x1","seq":0}}')
    assert command == protocol.Sub(None, "a", Position("x1", 0))


@pytest.mark.parametrize(
    ("payload", "expected_id"),
    [
        (b"not json", None),
        (b"\xff\xfe", None),
        (b"[1,2]", None),
        (b'"text"', None),
        (b'{"op":"sub","ch":"a","id":"7"}', None),
        (b'{"op":"sub","ch":"a","id":true}', None),
        (b'{"op":"nope","id":2}', 2),
        (b'{"ch":"a","id":3}', 3),
        (b'{"op":7,"id":3}', 3),
        (b'{"op":"sub","id":4}', 4),
        (b'{"op":"sub","ch":"","id":5}', 5),
        (b'{"op":"sub","ch":12,"id":6}', 6),
        (b'{"op":"pub","ch":"a","id":7}', 7),
        (b'{"op":"sub","ch":"a","since":{"epoch":"e"},"id":8}', 8),
        (b'{"op":"sub","ch":"a","since":{"epoch":"e","seq":-1},"id":9}', 9),
        (b'{"op":"history","ch":"a","limit":-1,"id":10}', 10),
        (b'{"op":"history","ch":"a","limit":"5","id":11}', 11),
    ],
)
def test_malformed_commands_are_bad_requests_with_the_id_when_readable(
    payload: bytes, expected_id: int | None
) -> None:
    error = parse_error(payload)
    assert error.code is ErrorCode.BAD_REQUEST
    assert error.id == expected_id
    assert error.message


def test_channel_names_are_bounded() -> None:
    name = "x" * protocol.MAX_CHANNEL_LENGTH
    assert protocol.parse(orjson.dumps({"op": "sub", "ch": name})) == protocol.Sub(None, name)
    error = parse_error(orjson.dumps({"op": "sub", "ch": name + "x", "id": 1}))
    assert error.code is ErrorCode.BAD_REQUEST


def test_deeply_nested_data_is_refused_not_crashed() -> None:
    payload = b'{"op":"pub","ch":"a","data":' + b"[" * 2000 + b"]" * 2000 + b"}"
    assert parse_error(payload).code is ErrorCode.BAD_REQUEST


@pytest.mark.parametrize("data", [None, 1, -2.5, "s", [1, {"a": []}], {"k": {"n": None}}])
def test_publication_encoding_round_trips_any_json(data: Any) -> None:
    decoded = orjson.loads(protocol.encode_publication("ch", 5, data))
    assert decoded == {"ch": "ch", "seq": 5, "data": data}


def test_replies_and_errors_have_the_documented_shape() -> None:
    assert orjson.loads(protocol.encode_ok(3, seq=9)) == {"id": 3, "ok": True, "seq": 9}
    assert orjson.loads(protocol.encode_error(None, ErrorCode.BAD_REQUEST, "no")) == {
        "id": None,
        "error": {"code": "bad_request", "message": "no"},
    }
    assert orjson.loads(protocol.encode_welcome("c1", "n1")) == {
        "welcome": {"client": "c1", "node": "n1"}
    }
