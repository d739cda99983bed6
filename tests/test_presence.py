"""Namespaces, presence, join and leave, on a real node with real clients."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import NodeProcess, proto_client, unique

from fastws import config

CHAT = json.dumps({"chat": {"presence": True, "join_leave": True}, "cursor": {"history_size": 0}})


async def next_event(c: Any, kind: str, ch: str) -> dict[str, Any]:
    """The next join or leave message on ch; anything else stays pending."""
    for i, m in enumerate(c.pending):
        if kind in m and m.get("ch") == ch:
            return dict(c.pending.pop(i))
    while True:
        m = await c.recv()
        if kind in m and m.get("ch") == ch:
            return dict(m)
        c.pending.append(m)


async def test_presence_is_off_by_default_and_says_so(node: NodeProcess) -> None:
    async with proto_client(node.ws_url()) as c:
        ch = unique("plain")
        await c.sub(ch)
        r = await c.request({"op": "presence", "ch": ch, "id": 7})
        assert r["id"] == 7 and r["error"]["code"] == "not_available"
        assert (await c.sub(unique("plain")))["ok"] is True  # the connection goes on


async def test_join_leave_and_presence_where_the_namespace_enables_them(
    node_factory: Callable[..., NodeProcess],
) -> None:
    node = node_factory(args=["--namespaces", CHAT])
    ch = f"chat:{unique()}"
    async with proto_client(node.ws_url()) as a, proto_client(node.ws_url()) as b:
        me_a = {"client": a.welcome["client"], "user": ""}
        me_b = {"client": b.welcome["client"], "user": ""}
        await a.sub(ch)
        assert await next_event(a, "join", ch) == {"ch": ch, "join": me_a}
        await b.sub(ch)
        assert await next_event(b, "join", ch) == {"ch": ch, "join": me_b}
        assert await next_event(a, "join", ch) == {"ch": ch, "join": me_b}
        r = await a.request({"op": "presence", "ch": ch})
        assert r["clients"] == {me_a["client"]: me_a, me_b["client"]: me_b}

        # Subscribing again changes nothing and announces nothing.
        await b.sub(ch)
        await b.unsub(ch)
        assert await next_event(a, "leave", ch) == {"ch": ch, "leave": me_b}
        r = await a.request({"op": "presence", "ch": ch})
        assert r["clients"] == {me_a["client"]: me_a}

        async with proto_client(node.ws_url()) as c:
            await c.sub(ch)
            me_c = {"client": c.welcome["client"], "user": ""}
            assert await next_event(a, "join", ch) == {"ch": ch, "join": me_c}
        # c disconnected without unsubscribing.
        assert await next_event(a, "leave", ch) == {"ch": ch, "leave": me_c}
        r = await a.request({"op": "presence", "ch": ch})
        assert r["clients"] == {me_a["client"]: me_a}
        assert not [m for m in a.pending if "join" in m or "leave" in m]


async def test_join_comes_after_the_sub_reply_and_replay(
    node_factory: Callable[..., NodeProcess],
) -> None:
    node = node_factory(args=["--namespaces", CHAT])
    ch = f"chat:{unique()}"
    async with proto_client(node.ws_url()) as a:
        first = await a.sub(ch)
        await next_event(a, "join", ch)
        await a.pub(ch, "one")
        await a.next_pub(ch)
    async with proto_client(node.ws_url()) as a:
        since = {"epoch": first["epoch"], "seq": 0}
        await a.send({"op": "sub", "ch": ch, "id": 1, "since": since})
        reply, replayed, join = [await a.recv() for _ in range(3)]
        assert reply["id"] == 1 and reply["recovered"] is True
        assert (replayed["seq"], replayed["data"]) == (1, "one")
        assert join == {"ch": ch, "join": {"client": a.welcome["client"], "user": ""}}


async def test_namespace_history_options_override_the_defaults(
    node_factory: Callable[..., NodeProcess],
) -> None:
    node = node_factory(args=["--namespaces", CHAT])
    cursor, plain = f"cursor:{unique()}", unique("plain")
    async with proto_client(node.ws_url()) as c:
        for ch in (cursor, plain):
            for n in range(3):
                await c.pub(ch, n)
        kept = {
            ch: (await c.request({"op": "history", "ch": ch}))["pubs"] for ch in (cursor, plain)
        }
    assert kept[cursor] == []
    assert [p["data"] for p in kept[plain]] == [0, 1, 2]
    # Options of other namespaces do not leak: chat keeps history by default.
    async with proto_client(node.ws_url()) as c:
        ch = f"chat:{unique()}"
        await c.pub(ch, "kept")
        assert [p["data"] for p in (await c.request({"op": "history", "ch": ch}))["pubs"]] == [
            "kept"
        ]


def test_namespaces_from_toml_environment_and_flag_agree(tmp_path: Path) -> None:
    toml = tmp_path / "fastws.toml"
    toml.write_text(
        "[namespaces.chat]\npresence = true\njoin_leave = true\n"
        "[namespaces.cursor]\nhistory_size = 0\n"
    )
    expected = json.loads(CHAT)
    assert config.load(config_file=str(toml), environ={}).namespaces == expected
    assert config.load(environ={"FASTWS_NAMESPACES": CHAT}).namespaces == expected
    assert config.load({"namespaces": CHAT}, environ={}).namespaces == expected


@pytest.mark.parametrize(
    ("value", "complaint"),
    [
        ("not json", "not JSON"),
        ('{"chat": {"presense": true}}', "unknown option 'presense'"),
        ('{"chat": {"history_size": -1}}', "at least 0"),
        ('{"chat": {"presence": 1}}', "true or false"),
        ('{"a:b": {}}', "has no ':'"),
    ],
)
def test_bad_namespaces_are_refused_with_the_reason(value: str, complaint: str) -> None:
    with pytest.raises(config.ConfigError, match=complaint):
        config.load(environ={"FASTWS_NAMESPACES": value})
