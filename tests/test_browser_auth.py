"""The browser client, fastws.js, against a node that checks tokens (docs/auth.md).

Browsers cannot set headers on a WebSocket upgrade, so the page's url
function puts a fresh `?token=` on each attempt; the tokens are made in
Python (the page would get them from its backend) and handed to the page.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from typing import Any

import jwt
import pytest
from browser import Page
from conftest import HOST, NodeProcess, proto_client, start_node, unique

pytestmark = pytest.mark.timeout(60)

SECRET = "browser-secret-" + "b" * 40


def token(sub: str, ttl: float) -> str:
    return jwt.encode({"sub": sub, "exp": time.time() + ttl}, SECRET, algorithm="HS256")


def js(value: Any) -> str:
    return json.dumps(value)


@pytest.fixture(scope="module")
def node() -> Iterator[NodeProcess]:
    # The blank tab's opaque origin is sent as "null"; never allow it in production.
    n = start_node(
        args=["--token-leeway", "0"],
        env={"FASTWS_TOKEN_SECRET": SECRET, "FASTWS_ALLOWED_ORIGINS": "null"},
    )
    yield n
    n.stop()
    n.cleanup_files()


async def test_a_url_function_reconnects_after_expiry_and_refresh_is_answered(
    page: Page, node: NodeProcess
) -> None:
    ch = unique("browser-auth")
    # What the page's backend would hand out: the first expires at once, the
    # next (made at the same time) a few seconds later.
    made = time.monotonic()
    fresh = [token("pat", ttl=1.5)] + [token("pat", ttl=4.5) for _ in range(10)]
    await page.run(
        f"""
        window.fastws = await import({js(f"http://{HOST}:{node.port}/fastws.js")});
        window.tokens = {js(fresh)};
        window.run = {{ states: [], seen: [] }};
        run.client = fastws.connect(() => {js(node.ws_url())} + "?token=" + tokens.shift(), {{
          minDelay: 20, maxDelay: 200, onState: (s) => run.states.push(s),
        }});
        run.sub = run.client.subscribe({js(ch)});
        (async () => {{ for await (const item of run.sub) run.seen.push(item); }})();
        return true;
        """
    )
    # The node closes at the first token's expiry; the function's next token
    # opens a new connection, and the subscription goes on.
    opened = "run.states.filter((s) => s === 'open').length"
    assert await page.wait_for(f"{opened} >= 2 && {opened}") >= 2
    assert "closed" not in await page.evaluate("run.states")
    async with proto_client(node.ws_url() + "?token=" + token("server", ttl=30)) as publisher:
        await publisher.pub(ch, "after the reconnect")
    seen = await page.wait_for("run.seen.length >= 1 && run.seen")
    assert seen[-1]["data"] == "after the reconnect"

    refused = await page.run(
        f"try {{ await run.client.refresh({js(token('mallory', 30))}); return 'ok'; }}"
        " catch (e) { return e.code; }"
    )
    assert refused == "forbidden"
    before = await page.evaluate(opened)
    answered = await page.run(f"await run.client.refresh({js(token('pat', 30))}); return 'ok';")
    assert answered == "ok"
    # past the current connection's own token: the refresh kept it open
    await asyncio.sleep(made + 5.5 - time.monotonic())
    assert await page.evaluate(opened) == before
    assert await page.evaluate("run.client.state") == "open"
    await page.run("run.client.close(); return true;")
