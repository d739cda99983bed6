"""The channel protocol on /ws: welcome, sub/unsub/pub, ordering, malformed commands."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from conftest import NodeProcess, proto_client, unique

pytestmark = pytest.mark.timeout(30)


def assert_bad_request(reply: Any, expected_id: Any, *, id_may_echo: bool = False) -> None:
    assert isinstance(reply, dict), reply
    assert "id" in reply, f"error reply has no 'id' key: {reply!r}"
    if id_may_echo:
        # The command's id was not a valid id: null is expected; echoing the
        # raw value back is tolerated.
        assert reply["id"] is None or reply["id"] == expected_id, reply
    else:
        assert reply["id"] == expected_id and type(reply["id"]) is type(expected_id), reply
    assert "ok" not in reply or reply["ok"] is not True, reply
    err = reply.get("error")
    assert isinstance(err, dict), f"no error object: {reply!r}"
    assert err.get("code") == "bad_request", reply
    assert isinstance(err.get("message"), str), reply


# --------------------------------------------------------------------------
# welcome
# --------------------------------------------------------------------------


async def test_welcome_is_first_frame(node: NodeProcess) -> None:
    async with proto_client(node.ws_url(), welcome=False) as a:
        first = await a.recv()
        assert set(first) >= {"welcome"}, first
        w = first["welcome"]
        assert isinstance(w, dict), first
        assert isinstance(w.get("client"), str) and w["client"], first
        assert isinstance(w.get("node"), str) and w["node"], first


async def test_welcome_client_ids_differ_node_id_same(node: NodeProcess) -> None:
    async with proto_client(node.ws_url()) as a, proto_client(node.ws_url()) as b:
        assert a.welcome and b.welcome
        assert a.welcome["client"] != b.welcome["client"]
        assert a.welcome["node"] == b.welcome["node"]


# --------------------------------------------------------------------------
# replies
# --------------------------------------------------------------------------


async def test_sub_reply_shape_fresh_channel(node: NodeProcess) -> None:
    ch = unique()
    async with proto_client(node.ws_url()) as a:
        await a.send({"op": "sub", "ch": ch, "id": 1})
        r = await a.recv()
        assert r.get("id") == 1 and r.get("ok") is True, r
        assert r.get("ch") == ch, r
        assert isinstance(r.get("epoch"), str), r
        assert type(r.get("seq")) is int and r["seq"] == 0, r
        assert type(r.get("recovered")) is bool, r
        assert "error" not in r, r


async def test_sub_reply_seq_is_last_seq(node: NodeProcess) -> None:
    ch = unique()
    async with proto_client(node.ws_url()) as a, proto_client(node.ws_url()) as b:
        r1 = await a.sub(ch)
        for i in range(3):
            assert await a.pub(ch, i) == i + 1
        r2 = await b.sub(ch)
        assert r2["seq"] == 3, r2
        # one unbroken history: the epoch does not change
        assert r2["epoch"] == r1["epoch"], (r1, r2)


async def test_unsub_reply(node: NodeProcess) -> None:
    ch = unique()
    async with proto_client(node.ws_url()) as a:
        await a.sub(ch)
        await a.send({"op": "unsub", "ch": ch, "id": 2})
        r = await a.recv()
        assert r.get("id") == 2 and r.get("ok") is True, r
        assert "error" not in r, r


async def test_pub_reply(node: NodeProcess) -> None:
    ch = unique()
    async with proto_client(node.ws_url()) as a:
        # the publisher need not be subscribed
        await a.send({"op": "pub", "ch": ch, "data": {"hello": "world"}, "id": 3})
        r = await a.recv()
        assert r == {"id": 3, "ok": True, "seq": 1} or (
            r.get("id") == 3 and r.get("ok") is True and r.get("seq") == 1
        ), r
        await a.expect_silence(0.2)  # not subscribed: no publication back


# --------------------------------------------------------------------------
# delivery
# --------------------------------------------------------------------------


async def test_publication_delivered_to_subscribers_only(node: NodeProcess) -> None:
    ch = unique()
    url = node.ws_url()
    async with (
        proto_client(url) as pub,
        proto_client(url) as s1,
        proto_client(url) as s2,
        proto_client(url) as other,
    ):
        await s1.sub(ch)
        await s2.sub(ch)
        await other.sub(unique("elsewhere"))
        seq = await pub.pub(ch, {"n": 1})
        assert seq == 1
        for s in (s1, s2):
            m = await s.next_pub()
            assert m == {"ch": ch, "seq": 1, "data": {"n": 1}}, m
        await pub.expect_silence(0.1)
        await other.expect_silence(0.2)
        await s1.expect_silence(0.05)


async def test_publisher_subscribed_receives_own_publication(node: NodeProcess) -> None:
    ch = unique()
    async with proto_client(node.ws_url()) as a:
        await a.sub(ch)
        await a.send({"op": "pub", "ch": ch, "data": "me", "id": 7})
        # reply and publication may come in either order
        reply = await a.reply_to(7)
        assert reply.get("ok") is True and reply.get("seq") == 1, reply
        m = await a.next_pub(ch)
        assert m == {"ch": ch, "seq": 1, "data": "me"}, m
        await a.expect_silence(0.2)


async def test_no_delivery_after_unsub(node: NodeProcess) -> None:
    ch, ch2 = unique("gone"), unique("stay")
    url = node.ws_url()
    async with proto_client(url) as pub, proto_client(url) as a, proto_client(url) as b:
        await a.sub(ch)
        await a.sub(ch2)
        await b.sub(ch)
        assert await pub.pub(ch, "before") == 1
        assert (await a.next_pub(ch))["data"] == "before"
        assert (await b.next_pub(ch))["data"] == "before"

        await a.unsub(ch)
        assert await pub.pub(ch, "after") == 2
        # b is still subscribed and gets it
        m = await b.next_pub(ch)
        assert m == {"ch": ch, "seq": 2, "data": "after"}, m
        # a gets nothing on ch; a publication on ch2 (published after) is the
        # next thing it sees
        assert await pub.pub(ch2, "barrier") == 1
        m = await a.next_pub()
        assert m == {"ch": ch2, "seq": 1, "data": "barrier"}, m
        await a.expect_silence(0.2)


async def test_double_sub_does_not_duplicate(node: NodeProcess) -> None:
    ch = unique()
    async with proto_client(node.ws_url()) as pub, proto_client(node.ws_url()) as a:
        await a.sub(ch)
        r = await a.request({"op": "sub", "ch": ch})
        assert r.get("ok") is True or "error" in r, r
        await pub.pub(ch, "once")
        m = await a.next_pub(ch)
        assert m["seq"] == 1 and m["data"] == "once", m
        await a.expect_silence(0.3)


async def test_seq_starts_at_one_and_is_per_channel(node: NodeProcess) -> None:
    ca, cb = unique("a"), unique("b")
    url = node.ws_url()
    async with proto_client(url) as pub, proto_client(url) as sa, proto_client(url) as sb:
        await sa.sub(ca)
        await sb.sub(cb)
        order = [ca, cb, ca, ca, cb, ca, cb, cb, cb, ca]
        want = {ca: 0, cb: 0}
        for i, ch in enumerate(order):
            want[ch] += 1
            assert await pub.pub(ch, i) == want[ch]
        got_a = [await sa.next_pub(ca) for _ in range(want[ca])]
        got_b = [await sb.next_pub(cb) for _ in range(want[cb])]
        assert [m["seq"] for m in got_a] == list(range(1, want[ca] + 1))
        assert [m["seq"] for m in got_b] == list(range(1, want[cb] + 1))
        assert [m["data"] for m in got_a] == [i for i, c in enumerate(order) if c == ca]
        assert [m["data"] for m in got_b] == [i for i, c in enumerate(order) if c == cb]
        await sa.expect_silence(0.1)
        await sb.expect_silence(0.1)


async def test_pipelined_pubs_acked_and_delivered_in_order(node: NodeProcess) -> None:
    ch = unique()
    url = node.ws_url()
    async with proto_client(url) as pub, proto_client(url) as sub:
        await sub.sub(ch)
        n = 100
        for i in range(1, n + 1):
            await pub.send({"op": "pub", "ch": ch, "data": i, "id": i})
        acks = [await pub.recv() for _ in range(n)]
        assert [a.get("id") for a in acks] == list(range(1, n + 1)), acks[:5]
        assert all(a.get("ok") is True for a in acks)
        assert [a["seq"] for a in acks] == list(range(1, n + 1))
        got = [await sub.next_pub(ch) for _ in range(n)]
        assert [(m["seq"], m["data"]) for m in got] == [(i, i) for i in range(1, n + 1)]


async def test_commands_without_id_get_no_reply(node: NodeProcess) -> None:
    ch = unique()
    url = node.ws_url()
    async with proto_client(url) as pub, proto_client(url) as sub:
        # sub without id: no reply, but subscribed
        await sub.send({"op": "sub", "ch": ch})
        # (give the server time to process it; then check it said nothing)
        await sub.expect_silence(0.3)
        # pub without id: no reply, but published
        await pub.send({"op": "pub", "ch": ch, "data": {"quiet": True}})
        m = await sub.next_pub(ch)
        assert m == {"ch": ch, "seq": 1, "data": {"quiet": True}}, m
        await pub.expect_silence(0.3)
        # the next pub with an id gets the next seq
        assert await pub.pub(ch, "loud") == 2
        assert (await sub.next_pub(ch))["seq"] == 2
        # unsub without id: no reply, and no more deliveries
        await sub.send({"op": "unsub", "ch": ch})
        await sub.expect_silence(0.3)
        assert await pub.pub(ch, "unheard") == 3
        await sub.expect_silence(0.3)


@pytest.mark.parametrize(
    "data",
    [
        {"a": 1, "b": "two"},
        [1, "x", None, True, 2.5],
        None,
        0,
        -17,
        9007199254740993,
        3.25,
        "",
        "plain string",
        'unicode \u00e9\u4e2d\u6587 \U0001f600 "quotes" \\ \n\t',
        True,
        False,
        [],
        {},
        {"deep": [{"x": [1, {"y": {"z": [None, [[]], {"k": "v"}]}}]}]},
    ],
    ids=lambda d: type(d).__name__ + ":" + json.dumps(d)[:20],
)
async def test_data_any_json(node: NodeProcess, data: Any) -> None:
    ch = unique()
    async with proto_client(node.ws_url()) as pub, proto_client(node.ws_url()) as sub:
        await sub.sub(ch)
        seq = await pub.pub(ch, data)
        assert seq == 1
        m = await sub.next_pub(ch)
        assert m["ch"] == ch and m["seq"] == 1, m
        assert "data" in m, m
        assert m["data"] == data and type(m["data"]) is type(data), (m, data)


async def test_channel_name_max_length(node: NodeProcess) -> None:
    ok_name = "c" * 255
    async with proto_client(node.ws_url()) as a:
        r = await a.sub(ok_name)
        assert r["ch"] == ok_name
        r = await a.request({"op": "sub", "ch": "c" * 256})
        assert "error" in r, f"a 256-char channel name was accepted: {str(r)[:200]}"
        assert r["error"].get("code") in ("bad_request", "limit_exceeded"), r
        # still usable
        assert await a.pub(unique(), 1) == 1


# --------------------------------------------------------------------------
# malformed commands: each gets bad_request and the connection stays usable
# --------------------------------------------------------------------------

# (frame to send, id expected in the error reply, whether echoing the raw id is tolerated)
MALFORMED: list[tuple[str, Any, bool]] = [
    # not JSON
    ("{not json", None, False),
    ("", None, False),
    ('{"op": "sub", "ch": "x", "id": 1', None, False),
    # JSON but not an object
    ("[1, 2, 3]", None, False),
    ('"sub"', None, False),
    ("42", None, False),
    ("null", None, False),
    # unknown / missing op
    ('{"op": "frobnicate", "ch": "x", "id": 11}', 11, False),
    ('{"op": "SUB", "ch": "x", "id": 12}', 12, False),
    ('{"op": 5, "ch": "x", "id": 13}', 13, False),
    ('{"ch": "x", "id": 14}', 14, False),
    # missing ch
    ('{"op": "sub", "id": 21}', 21, False),
    ('{"op": "unsub", "id": 22}', 22, False),
    ('{"op": "pub", "data": 1, "id": 23}', 23, False),
    # ch not a string, or empty
    ('{"op": "sub", "ch": 5, "id": 31}', 31, False),
    ('{"op": "sub", "ch": null, "id": 32}', 32, False),
    ('{"op": "sub", "ch": ["x"], "id": 33}', 33, False),
    ('{"op": "pub", "ch": {"x": 1}, "data": 1, "id": 34}', 34, False),
    ('{"op": "sub", "ch": "", "id": 35}', 35, False),
    ('{"op": "pub", "ch": "", "data": 1, "id": 36}', 36, False),
    ('{"op": "unsub", "ch": 7, "id": 37}', 37, False),
    # id not an integer
    ('{"op": "sub", "ch": "x", "id": "41"}', "41", True),
    ('{"op": "sub", "ch": "x", "id": 4.5}', 4.5, True),
    ('{"op": "sub", "ch": "x", "id": true}', True, True),
    ('{"op": "sub", "ch": "x", "id": [1]}', [1], True),
    ('{"op": "pub", "ch": "x", "data": 1, "id": {"n": 1}}', {"n": 1}, True),
    # pub without data
    ('{"op": "pub", "ch": "x", "id": 51}', 51, False),
    # the error is reported even without an id
    ('{"op": "pub", "ch": "x"}', None, False),
    ('{"op": "sub"}', None, False),
]


@pytest.mark.parametrize(
    ("frame", "expected_id", "id_may_echo"), MALFORMED, ids=lambda v: repr(v)[:40]
)
async def test_malformed_command_gets_bad_request(
    node: NodeProcess, frame: str, expected_id: Any, id_may_echo: bool
) -> None:
    ch = unique()
    async with proto_client(node.ws_url()) as a:
        await a.send(frame)
        r = await a.recv()
        assert_bad_request(r, expected_id, id_may_echo=id_may_echo)
        # The failed command had no effect and the connection still works.
        await a.send({"op": "sub", "ch": ch, "id": 99})
        r = await a.recv()
        assert r.get("id") == 99 and r.get("ok") is True and r.get("seq") == 0, r
        assert await a.pub(ch, "still works") == 1
        m = await a.next_pub(ch)
        assert m["data"] == "still works"


async def test_malformed_pub_does_not_publish(node: NodeProcess) -> None:
    ch = unique()
    async with proto_client(node.ws_url()) as pub, proto_client(node.ws_url()) as sub:
        await sub.sub(ch)
        await pub.send({"op": "pub", "ch": ch, "id": 5})  # no data
        assert_bad_request(await pub.recv(), 5)
        await pub.send({"op": "pub", "ch": ch, "data": 1, "id": "6"})  # bad id
        assert_bad_request(await pub.recv(), "6", id_may_echo=True)
        await sub.expect_silence(0.2)
        assert await pub.pub(ch, "first real") == 1
        assert (await sub.next_pub(ch)) == {"ch": ch, "seq": 1, "data": "first real"}


async def test_binary_frame_gets_bad_request(node: NodeProcess) -> None:
    ch = unique()
    async with proto_client(node.ws_url()) as a:
        await a.send(json.dumps({"op": "sub", "ch": ch, "id": 1}).encode())
        r = await a.recv()
        # A binary frame is not a command at all, so null is the expected id;
        # a server that peeks inside and echoes id 1 is tolerated.
        assert_bad_request(r, 1, id_may_echo=True)
        # the binary "sub" must not have subscribed
        await a.send({"op": "sub", "ch": ch, "id": 2})
        r = await a.recv()
        assert r.get("id") == 2 and r.get("ok") is True, r
        assert await a.pub(ch, "x") == 1
        assert (await a.next_pub(ch))["seq"] == 1
        await a.expect_silence(0.2)  # exactly one delivery: subscribed once


async def test_several_errors_then_valid_on_one_connection(node: NodeProcess) -> None:
    """A handful of mistakes in a row must not cost the connection."""
    ch = unique()
    async with proto_client(node.ws_url()) as a:
        bad = ["nope", "[]", '{"op": "x", "id": 1}', '{"op": "sub", "id": 2}', b"\x00\x01"]
        for frame in bad:
            await a.send(frame)
        replies = [await a.recv() for _ in bad]
        assert all(r.get("error", {}).get("code") == "bad_request" for r in replies), replies
        assert [r["id"] for r in replies] == [None, None, 1, 2, None], replies
        r = await a.sub(ch)
        assert r["seq"] == 0


async def test_connections_are_independent(node: NodeProcess) -> None:
    """Closing one subscriber does not disturb another."""
    ch = unique()
    url = node.ws_url()
    async with proto_client(url) as pub, proto_client(url) as keep:
        await keep.sub(ch)
        for _ in range(3):
            async with proto_client(url) as brief:
                await brief.sub(ch)
        await asyncio.sleep(0.05)
        assert await pub.pub(ch, "after churn") == 1
        assert (await keep.next_pub(ch))["data"] == "after churn"


async def test_id_zero_and_negative_get_replies(node: NodeProcess) -> None:
    ch = unique()
    async with proto_client(node.ws_url()) as a:
        for cid in (0, -5, 2**53):
            await a.send({"op": "sub", "ch": ch, "id": cid})
            r = await a.recv()
            assert r.get("id") == cid and r.get("ok") is True, (cid, r)


async def test_fragmented_command(node: NodeProcess) -> None:
    """A command split over several WebSocket frames is one message."""
    ch = unique()
    cmd = json.dumps({"op": "pub", "ch": ch, "data": "x" * 300, "id": 4})
    async with proto_client(node.ws_url()) as a:
        await a.sub(ch)
        await a.ws.send([cmd[:10], cmd[10:200], cmd[200:]])  # TEXT + 2 continuations
        r = await a.reply_to(4)
        assert r.get("ok") is True and r.get("seq") == 1, r
        m = await a.next_pub(ch)
        assert m["data"] == "x" * 300
