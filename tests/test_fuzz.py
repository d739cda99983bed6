"""Fuzzing the channel protocol over a real WebSocket.

Random and mutated commands (wrong types, huge numbers, deep nesting, long
strings, missing and extra fields, random bytes, invalid UTF-8, BINARY
frames, commands split into fragments with continuation frames, pings in
between) are sent one case at a time to a node that neither rate-limits nor
counts strikes. After each case a valid ``sub`` must get its reply (so the
connection is still usable and nothing hung), and what came back in between
must fit the contract: at most one reply per command, exactly one
``bad_request`` error for a malformed one, no close unless the case broke
the WebSocket protocol (then 1002), was oversize (1009) or was invalid
UTF-8 in a TEXT frame (1007, or a ``bad_request`` reply). A closed
connection is replaced and the run goes on; anomalies are collected and
reported together at the end. Finally the node must be alive, answer
/healthz, and its log must hold no traceback.

Longer runs::

    FASTWS_FUZZ_CASES=200000 FASTWS_FUZZ_SEED=7 .venv/bin/pytest tests/test_fuzz.py -s

FASTWS_FUZZ_CASES (default 2000) is the number of cases, FASTWS_FUZZ_SEED
(default 20240601) the seed of the random.Random that makes them; the same
seed gives the same cases. The test's timeout grows with the case count.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import random
import re
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from conftest import (
    OP_BINARY,
    OP_CLOSE,
    OP_CONT,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    NodeProcess,
    PeerClosed,
    RawWS,
    ahttp_get,
    ascrape,
    metric,
    start_node,
    ws_frame,
)

CASES = int(os.environ.get("FASTWS_FUZZ_CASES", "2000"))
SEED = int(os.environ.get("FASTWS_FUZZ_SEED", "20240601"))
MAX_MESSAGE = 65536
CASE_TIMEOUT = 5.0
SYNC_BASE = 7_000_000_000  # ids of the sync probes; the generator never makes these
ERROR_CODES = {
    "bad_request",
    "forbidden",
    "not_found",
    "limit_exceeded",
    "unrecoverable",
    "not_available",
    "internal_error",
}

pytestmark = pytest.mark.timeout(max(90, int(CASES * 0.05)))

NODE_ARGS = [
    "--max-bad-commands", "1000000000",
    "--rate-limit", "1000000000",
    "--rate-burst", "1000000000",
    "--max-message-size", str(MAX_MESSAGE),
]  # fmt: skip


# --------------------------------------------------------------------------
# case generation
# --------------------------------------------------------------------------

CHANNELS = ["fz-a", "fz-b", "fz-\u00e9\u4e2d\U0001f600", "x" * 255]


def _deep(m: re.Match[str]) -> str:
    depth, kind = int(m.group(1)), m.group(2)
    if kind == "0":
        return "[" * depth + "0" + "]" * depth
    return '{"k":' * depth + "0" + "}" * depth


def encode(doc: Any, ensure_ascii: bool = True) -> bytes:
    """JSON of doc, with nesting placeholders expanded (json.dumps recurses; this does not)."""
    text = json.dumps(doc, ensure_ascii=ensure_ascii)
    return re.sub(r'"@@DEEP(\d+):([01])@@"', _deep, text).encode()


class Gen:
    def __init__(self, rng: random.Random) -> None:
        self.r = rng

    def scalar(self) -> Any:
        r = self.r
        return r.choice(
            [
                lambda: r.randint(-(2**31), 2**31),
                lambda: 10**30,
                lambda: -(10**30),
                lambda: 2**63,
                lambda: 2**64,
                lambda: -(2**63) - 1,
                lambda: r.random() * 10 ** r.randint(-5, 300),
                lambda: 1.5,
                lambda: True,
                lambda: False,
                lambda: None,
                lambda: "",
                lambda: self.text(r.randint(1, 40)),
                lambda: "y" * r.randint(1000, 20000),
                lambda: "\u0000\ud7ff\ue000\uffff",
            ]
        )()

    def text(self, n: int) -> str:
        alphabet = 'abc "\\/\n\t\u00e9\u4e2d\U0001f600{}[]:,'
        return "".join(self.r.choice(alphabet) for _ in range(n))

    def value(self, depth: int = 0) -> Any:
        r = self.r
        x = r.random()
        if depth > 3 or x < 0.5:
            return self.scalar()
        if x < 0.7:
            return [self.value(depth + 1) for _ in range(r.randint(0, 4))]
        if x < 0.9:
            return {
                self.text(r.randint(0, 6)): self.value(depth + 1) for _ in range(r.randint(0, 4))
            }
        return self.nested(r.choice([10, 100, 254, 255, 256, 300, 600, 1000, 1100]))

    def nested(self, depth: int) -> str:
        """A placeholder that :func:`encode` turns into ``depth`` nested arrays/objects."""
        return f"@@DEEP{depth}:{self.r.randint(0, 1)}@@"

    def valid(self) -> dict[str, Any]:
        r = self.r
        ch = r.choice(CHANNELS)
        cmd: dict[str, Any] = r.choice(
            [
                {"op": "sub", "ch": ch},
                {"op": "sub", "ch": ch, "since": {"epoch": "e0", "seq": r.randint(0, 9)}},
                {"op": "unsub", "ch": ch},
                {"op": "pub", "ch": ch, "data": self.value()},
                {"op": "history", "ch": ch, "limit": r.randint(0, 9)},
                {"op": "presence", "ch": ch},
            ]
        )
        if r.random() < 0.85:
            cmd["id"] = r.randint(-1000, 10**6)
        return cmd

    def mutate(self, cmd: dict[str, Any]) -> Any:
        r = self.r
        for _ in range(r.randint(1, 3)):
            keys = list(cmd)
            m = r.randint(0, 9)
            if m == 0 and keys:
                del cmd[r.choice(keys)]
            elif m == 1:
                cmd[self.text(r.randint(1, 8))] = self.value()
            elif m in (2, 3) and keys:
                cmd[r.choice(keys)] = self.value()
            elif m == 4:
                cmd["op"] = r.choice(["SUB", "pubx", "", " sub", None, 1, ["sub"], self.text(5)])
            elif m == 5:
                cmd["id"] = r.choice(
                    [True, "1", 1.0, 1.5, 10**30, 2**63, -(2**63), None, [], {}, -1, 0]
                )
            elif m == 6:
                cmd["ch"] = r.choice(["", "x" * 256, 5, None, ["a"], {"a": 1}, "\u0000", "z"])
            elif m == 7:
                cmd["since"] = r.choice(
                    [
                        {"epoch": 1, "seq": 1},
                        {"epoch": "e", "seq": -1},
                        {"epoch": "e", "seq": "1"},
                        {"epoch": "e", "seq": 10**30},
                        {"epoch": "e"},
                        [],
                        "e:1",
                    ]
                )
            elif m == 8:
                cmd["limit"] = r.choice([-1, "5", 1.5, 10**30, None, True])
            else:
                cmd["data"] = self.nested(r.choice([200, 254, 255, 300, 800]))
        if r.random() < 0.05:
            return r.choice([[cmd], cmd.get("op"), 1, None, "str"])
        return cmd

    def payload(self) -> tuple[bytes, str]:
        """The bytes of one message, and how they were made."""
        r = self.r
        x = r.random()
        if x < 0.15:
            return encode(self.valid()), "valid"
        if x < 0.75:
            doc = self.mutate(self.valid())
            return encode(doc, ensure_ascii=r.random() < 0.5), "mutated"
        raw = encode(self.valid())
        y = r.random()
        if y < 0.2 and raw:
            cut = r.randint(0, len(raw) - 1)
            return raw[:cut], "truncated"
        if y < 0.4:
            i = r.randint(0, len(raw))
            return raw[:i] + bytes([r.randint(0, 255)]) + raw[i:], "byte-inserted"
        if y < 0.55:
            b = bytearray(raw)
            i = r.randrange(len(b))
            b[i] ^= 1 << r.randint(0, 7)
            return bytes(b), "bit-flipped"
        if y < 0.7:
            bad = r.choice(
                [b"\xff", b"\xc0\xaf", b"\xed\xa0\x80", b"\xe2\x82", b"\xf8\x88\x80\x80\x80"]
            )
            i = r.randint(0, len(raw))
            return raw[:i] + bad + raw[i:], "invalid-utf8"
        if y < 0.8:
            return bytes(r.randint(0, 255) for _ in range(r.randint(0, 200))), "random-bytes"
        if y < 0.9:
            return raw + r.choice([b" ", b"\n", b"x", b"{}", b",", b"\x00"]), "trailing"
        return r.choice([b"", b"null", b"[]", b"{}", b"0", b'"x"', b"NaN", b"{" * 2000]), "odd"


class Case:
    def __init__(self, n: int, payload: bytes, how: str, wire: bytes, opcode: int, shape: str):
        self.n, self.payload, self.how, self.wire, self.opcode, self.shape = (
            n,
            payload,
            how,
            wire,
            opcode,
            shape,
        )
        self.expect_close: tuple[int, ...] = ()
        self.ping: bytes | None = None

    def __repr__(self) -> str:
        return f"case {self.n} ({self.how}, {self.shape}, {self.payload[:160]!r})"


def make_case(g: Gen, n: int) -> Case:
    r = g.r
    x = r.random()
    if x < 0.02:  # protocol violations: the node must close with 1002
        kind = r.choice(["cont-first", "text-in-fragments", "opcode", "frag-ping", "big-ping"])
        wire = {
            "cont-first": ws_frame(OP_CONT, b'{"op":"sub"}'),
            "text-in-fragments": ws_frame(OP_TEXT, b'{"op"', fin=False) + ws_frame(OP_TEXT, b"{}"),
            "opcode": ws_frame(r.choice([3, 4, 5, 6, 7, 0xB, 0xC, 0xD, 0xE, 0xF]), b"x"),
            "frag-ping": ws_frame(OP_PING, b"p", fin=False),
            "big-ping": ws_frame(OP_PING, b"p" * 126),
        }[kind]
        c = Case(n, b"", "violation", wire, OP_TEXT, kind)
        c.expect_close = (1002,)
        return c
    if x < 0.03:  # oversize, in one frame or reassembled
        payload = b'{"op":"pub","ch":"fz-a","data":"' + b"o" * MAX_MESSAGE + b'"}'
        if r.random() < 0.5:
            wire = ws_frame(OP_TEXT, payload)
            shape = "one-frame"
        else:
            half = len(payload) // 2
            wire = ws_frame(OP_TEXT, payload[:half], fin=False) + ws_frame(OP_CONT, payload[half:])
            shape = "fragments"
        c = Case(n, payload, "oversize", wire, OP_TEXT, shape)
        c.expect_close = (1009,)
        return c
    if x < 0.06:
        ping = bytes(r.randint(0, 255) for _ in range(r.randint(0, 125)))
        c = Case(n, b"", "ping", ws_frame(OP_PING, ping), OP_TEXT, "ping")
        c.ping = ping
        return c
    payload, how = g.payload()
    opcode = OP_BINARY if r.random() < 0.07 else OP_TEXT
    y = r.random()
    if y < 0.7 or not payload:
        return Case(n, payload, how, ws_frame(opcode, payload), opcode, "one-frame")
    # fragments: split anywhere (also inside a UTF-8 sequence), maybe empty parts, maybe a ping
    k = r.randint(2, min(8, len(payload) + 1))
    cuts = sorted(r.randint(0, len(payload)) for _ in range(k - 1))
    parts = [payload[a:b] for a, b in zip([0, *cuts], [*cuts, len(payload)], strict=True)]
    wire = b""
    ping = None
    for i, part in enumerate(parts):
        wire += ws_frame(opcode if i == 0 else OP_CONT, part, fin=i == len(parts) - 1)
        if i < len(parts) - 1 and ping is None and r.random() < 0.2:
            ping = b"mid-" + str(n).encode()
            wire += ws_frame(OP_PING, ping)
    c = Case(n, payload, how, wire, opcode, f"{len(parts)}-fragments")
    c.ping = ping
    return c


# --------------------------------------------------------------------------
# the oracle: what the contract (docs/protocol.md) says a payload is
# --------------------------------------------------------------------------

MALFORMED, VALID, AMBIGUOUS, BAD_UTF8 = "malformed", "valid", "ambiguous", "bad-utf8"


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _odd_numbers_or_strings(v: Any, depth: int = 0) -> bool:
    """Numbers past 64 bits, non-finite floats, lone surrogates: parsers may differ."""
    if depth > 200:
        return True
    if _is_int(v):
        return not (-(2**63) <= v < 2**64)
    if isinstance(v, float):
        return not math.isfinite(v)
    if isinstance(v, str):
        return any(0xD800 <= ord(ch) <= 0xDFFF for ch in v)
    if isinstance(v, list):
        return any(_odd_numbers_or_strings(x, depth + 1) for x in v)
    if isinstance(v, dict):
        return any(
            _odd_numbers_or_strings(k, depth + 1) or _odd_numbers_or_strings(x, depth + 1)
            for k, x in v.items()
        )
    return False


def _depth(v: Any) -> int:
    d = 0
    stack = [(v, 1)]
    while stack:
        x, n = stack.pop()
        d = max(d, n)
        if isinstance(x, list):
            stack += [(y, n + 1) for y in x]
        elif isinstance(x, dict):
            stack += [(y, n + 1) for y in x.values()]
    return d


def classify(opcode: int, payload: bytes) -> tuple[str, Any]:
    """(verdict, id the reply must carry or None)."""
    if opcode == OP_BINARY:
        return MALFORMED, None
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        return BAD_UTF8, None

    def no_constants(name: str) -> Any:
        raise ValueError(name)

    try:
        doc = json.loads(text, parse_constant=no_constants)
    except RecursionError:
        return AMBIGUOUS, None
    except ValueError:
        return MALFORMED, None
    if _odd_numbers_or_strings(doc) or _depth(doc) > 250:
        return AMBIGUOUS, None
    if not isinstance(doc, dict):
        return MALFORMED, None
    cid = doc.get("id")
    if cid is not None and not _is_int(cid):
        return MALFORMED, None
    op = doc.get("op")
    if op not in ("sub", "unsub", "pub", "history", "presence"):
        return MALFORMED, cid
    ch = doc.get("ch")
    if not isinstance(ch, str) or not 1 <= len(ch) <= 255:
        return MALFORMED, cid
    if op in ("sub", "history") and doc.get("since") is not None:
        s = doc["since"]
        if not (
            isinstance(s, dict)
            and isinstance(s.get("epoch"), str)
            and _is_int(s.get("seq"))
            and s["seq"] >= 0
        ):
            return MALFORMED, cid
    if op == "history" and doc.get("limit") is not None:
        lim = doc["limit"]
        if not _is_int(lim) or lim < 0:
            return MALFORMED, cid
    if op == "pub" and "data" not in doc:
        return MALFORMED, cid
    return VALID, cid


# --------------------------------------------------------------------------
# running the cases
# --------------------------------------------------------------------------


class Fuzzer:
    def __init__(self, node: NodeProcess) -> None:
        self.node = node
        self.ws: RawWS | None = None
        self.sync = SYNC_BASE
        self.anomalies: list[str] = []
        self.by_kind: Counter[str] = Counter()
        self.stats: Counter[str] = Counter()

    def anomaly(self, kind: str, case: Case, detail: str) -> None:
        self.by_kind[kind] += 1
        if sum(1 for a in self.anomalies if a.startswith(kind)) < 5:
            self.anomalies.append(f"{kind}: {case!r}: {detail}")

    async def connect(self) -> RawWS:
        if self.ws is not None:
            self.ws.close()
        self.ws = await RawWS.open(self.node.port)
        await self.ws.welcome()
        self.stats["connections"] += 1
        return self.ws

    async def run_case(self, case: Case) -> None:
        ws = self.ws or await self.connect()
        self.sync += 1
        sync_id = self.sync
        await ws.send_raw(case.wire)
        await ws.send_json({"op": "sub", "ch": "fz-sync", "id": sync_id})
        replies: list[Any] = []
        pongs: list[bytes] = []
        closed: int | str | None = "open"
        deadline = time.monotonic() + CASE_TIMEOUT
        try:
            while True:
                f = await ws.recv_frame(deadline - time.monotonic())
                if f.opcode == OP_PONG:
                    pongs.append(f.payload)
                    continue
                if f.opcode == OP_PING:
                    await ws.send_frame(OP_PONG, f.payload)
                    continue
                if f.opcode == OP_CLOSE:
                    closed = f.close_code
                    break
                if f.opcode != OP_TEXT or not f.fin:
                    self.anomaly("non-text-frame", case, repr(f))
                    continue
                m = json.loads(f.payload)
                if isinstance(m, dict) and m.get("id") == sync_id and "ok" in m:
                    break
                if isinstance(m, dict) and ("ok" in m or "error" in m) and "id" in m:
                    replies.append(m)
                elif not (isinstance(m, dict) and {"ch", "seq", "data"} <= set(m)):
                    self.anomaly("unexpected-message", case, repr(m)[:200])
        except PeerClosed as exc:
            closed = None
            self.anomaly("dropped-without-close-frame", case, exc.how)
        except TimeoutError:
            self.anomaly("hung", case, f"no sync reply in {CASE_TIMEOUT} s; replies {replies}")
            await self.connect()
            return

        if closed != "open":
            self.stats[f"closed-{closed}"] += 1
            if self.ws is not None and closed is not None:
                with contextlib.suppress(OSError):
                    await self.ws.send_frame(OP_CLOSE, (1000).to_bytes(2, "big"))
            await self.connect()

        if case.ping is not None and closed == "open" and case.ping not in pongs:
            self.anomaly("no-pong", case, f"pongs {pongs}")

        if case.expect_close:
            self.stats[case.how] += 1
            if closed not in case.expect_close:
                self.anomaly(
                    f"{case.how}-not-closed-as-expected",
                    case,
                    f"expected close {case.expect_close}, got {closed}; replies {replies}",
                )
            return
        if case.how == "ping":
            self.stats["ping"] += 1
            if replies:
                self.anomaly("reply-to-ping", case, repr(replies))
            return

        verdict, cid = classify(case.opcode, case.payload)
        self.stats[verdict] += 1
        if closed != "open":
            if verdict == BAD_UTF8 and closed == 1007:
                return
            self.anomaly(f"closed-{closed}-on-{verdict}", case, f"replies {replies}")
            return
        if len(replies) > 1:
            self.anomaly("several-replies", case, repr(replies)[:300])
            return
        for rep in replies:
            err = rep.get("error")
            if err is not None and (
                not isinstance(err, dict)
                or err.get("code") not in ERROR_CODES
                or not isinstance(err.get("message"), str)
            ):
                self.anomaly("bad-error-shape", case, repr(rep)[:300])
        if verdict in (MALFORMED, BAD_UTF8):
            if len(replies) != 1:
                self.anomaly(f"{verdict}-without-exactly-one-reply", case, repr(replies)[:300])
            elif replies[0].get("error", {}).get("code") != "bad_request":
                self.anomaly(f"{verdict}-not-bad_request", case, repr(replies)[:300])
            elif replies[0]["id"] not in (None, cid):
                self.anomaly(f"{verdict}-wrong-id", case, repr(replies)[:300])
        elif verdict == VALID:
            if cid is not None:
                if len(replies) != 1 or replies[0].get("id") != cid:
                    self.anomaly("valid-with-id-not-answered-once", case, repr(replies)[:300])
                elif replies[0].get("error", {}).get("code") in ("bad_request", "internal_error"):
                    self.anomaly("valid-refused", case, repr(replies)[:300])
            elif replies and "error" not in replies[0]:
                self.anomaly("valid-without-id-got-ok", case, repr(replies)[:300])
            elif replies and replies[0].get("error", {}).get("code") in (
                "bad_request",
                "internal_error",
            ):
                self.anomaly("valid-refused", case, repr(replies)[:300])
        else:  # AMBIGUOUS: answered at most once (checked), and the connection is usable
            pass


async def test_fuzz_commands(node_factory: Callable[..., NodeProcess]) -> None:
    node = node_factory(args=NODE_ARGS)
    g = Gen(random.Random(SEED))
    fz = Fuzzer(node)
    t0 = time.monotonic()
    for n in range(CASES):
        case = make_case(g, n)
        try:
            await asyncio.wait_for(fz.run_case(case), CASE_TIMEOUT + 5)
        except TimeoutError:
            fz.anomaly("hung", case, "the case itself did not finish")
            await fz.connect()
        if not node.alive():
            pytest.fail(f"node died at {case!r}\n{node.output_tail()}")
    elapsed = time.monotonic() - t0
    if fz.ws is not None:
        fz.ws.close()
    print(
        f"\nfuzz: {CASES} cases (seed {SEED}) in {elapsed:.1f} s; {dict(fz.stats)}; "
        f"anomalies {dict(fz.by_kind)}"
    )

    assert node.alive(), node.output_tail()
    assert (await ahttp_get(node.port, "/healthz")).status == 200
    await asyncio.sleep(0.3)
    samples = await ascrape(node.port)
    assert metric(samples, "fastws_connections_open") == 0, samples
    problems = list(fz.anomalies)
    if "Traceback" in node.stderr():
        err = node.stderr()
        i = err.index("Traceback")
        problems.append(f"traceback in the node's log: {err[max(0, i - 300) : i + 1500]}")
    assert not problems, (
        f"{sum(fz.by_kind.values())} anomalies by kind {dict(fz.by_kind)}; examples:\n"
        + "\n".join(problems)
    )


# --------------------------------------------------------------------------
# the same findings, one at a time
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fuzz_node() -> Iterator[NodeProcess]:
    n = start_node(args=NODE_ARGS)
    yield n
    n.stop()
    n.cleanup_files()


VIOLATIONS = {
    "continuation-first": ws_frame(OP_CONT, b"{}"),
    "text-inside-fragments": ws_frame(OP_TEXT, b"{", fin=False) + ws_frame(OP_TEXT, b"{}"),
    "reserved-opcode": ws_frame(0x3, b"x"),
    "fragmented-ping": ws_frame(OP_PING, b"x", fin=False),
    "ping-over-125": ws_frame(OP_PING, b"x" * 126),
    "unmasked": ws_frame(OP_TEXT, b'{"op":"sub","ch":"a","id":1}', mask=False),
    "rsv1": ws_frame(OP_TEXT, b'{"op":"sub","ch":"a","id":1}', rsv=4),
    "rsv2": ws_frame(OP_TEXT, b'{"op":"sub","ch":"a","id":1}', rsv=2),
    "rsv3": ws_frame(OP_TEXT, b'{"op":"sub","ch":"a","id":1}', rsv=1),
}


@pytest.mark.parametrize("name", list(VIOLATIONS))
async def test_protocol_violation_closes_1002(fuzz_node: NodeProcess, name: str) -> None:
    """RFC 6455: these fail the connection; docs/protocol.md: with 1002."""
    ws = await RawWS.open(fuzz_node.port)
    try:
        await ws.welcome()
        await ws.send_raw(VIOLATIONS[name])
        await ws.send_json({"op": "sub", "ch": "after", "id": 2})
        code, frames = await ws.wait_close(timeout=3)
        assert code == 1002, (code, frames)
    finally:
        ws.close()


@pytest.mark.parametrize("depth", [100, 254, 300, 1000])
async def test_deeply_nested_pub_data_is_answered_not_1011(
    fuzz_node: NodeProcess, depth: int
) -> None:
    """Valid JSON the node cannot re-encode is a failed command, not a server error."""
    data = "[" * depth + "]" * depth
    ws = await RawWS.open(fuzz_node.port)
    try:
        await ws.welcome()
        await ws.send_text(f'{{"op":"pub","ch":"deep-{depth}","data":{data},"id":1}}')
        f = await ws.recv_msg()
        assert f.opcode != OP_CLOSE, f"closed with {f.close_code} {f.payload[2:]!r}"
        r = f.json()
        assert r.get("id") == 1 and ("ok" in r or r["error"]["code"] == "bad_request"), r
        r = await ws.request({"op": "sub", "ch": "after", "id": 2})
        assert r.get("ok") is True, r
    finally:
        ws.close()


async def test_failed_pub_leaves_no_gap_in_seq(fuzz_node: NodeProcess) -> None:
    """A pub that fails must not use up a seq: subscribers would see a gap."""
    ch = "gap-after-deep"
    deep = "[" * 300 + "]" * 300
    sub = await RawWS.open(fuzz_node.port)
    ws = await RawWS.open(fuzz_node.port)
    try:
        await sub.welcome()
        await ws.welcome()
        assert (await sub.request({"op": "sub", "ch": ch, "id": 1})).get("ok") is True
        await ws.send_text(f'{{"op":"pub","ch":"{ch}","data":{deep},"id":1}}')
        f = await ws.recv_msg()
        if f.opcode == OP_CLOSE:  # the node failed the connection; carry on with another
            ws.close()
            ws = await RawWS.open(fuzz_node.port)
            await ws.welcome()
        r = await ws.request({"op": "pub", "ch": ch, "data": "next", "id": 2})
        assert r.get("ok") is True, r
        m = await sub.recv_json()
        assert m == {"ch": ch, "seq": 1, "data": "next"}, (
            f"after one failed pub the next publication is {m}"
        )
    finally:
        sub.close()
        ws.close()
