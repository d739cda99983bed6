"""A headless Chromium driven through the Chrome DevTools Protocol (CDP).

Just enough of CDP for the browser-client tests: start Chromium, open a
blank tab, evaluate JavaScript in it (awaiting promises, values back as
JSON), close everything. CDP is JSON over a WebSocket, spoken here with the
``websockets`` library the suite has anyway, so no browser-automation
package is needed.

Chromium is a system package (``scripts/system-deps.sh test`` installs
it). Without it the tests fail rather than skip: a suite that silently
skips its only check of the browser client proves nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
START_TIMEOUT = 30.0  # seconds Chromium gets to print its DevTools URL
CALL_TIMEOUT = 15.0  # seconds a CDP call (an evaluation included) gets by default
DEVTOOLS_LINE = re.compile(r"DevTools listening on (ws://\S+)")


def find_chromium() -> str:
    for name in NAMES:
        path = shutil.which(name)
        if path is not None:
            return path
    pytest.fail(
        "no Chromium on PATH (looked for " + ", ".join(NAMES) + "); "
        "`bash scripts/system-deps.sh test` installs Debian's `chromium`",
        pytrace=False,
    )


def _die_with_parent() -> None:
    """In the child: be killed when the test process dies, however it dies."""
    PR_SET_PDEATHSIG = 1
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


class Chromium:
    """One headless Chromium process and its throwaway profile."""

    def __init__(self) -> None:
        self.profile = tempfile.mkdtemp(prefix="fastws-chromium-")
        self.log = Path(self.profile) / "stderr.log"
        argv = [
            find_chromium(),
            "--headless=new",
            "--remote-debugging-port=0",
            f"--user-data-dir={self.profile}",
            "--no-sandbox",  # tests run as root in containers
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-extensions",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            # A headless tab counts as hidden; its timers must not be throttled
            # or the client's heartbeat and backoff timings would drift.
            "--disable-background-timer-throttling",
            "--disable-renderer-backgrounding",
            "--disable-backgrounding-occluded-windows",
            "about:blank",
        ]
        with open(self.log, "wb") as log:
            # Its own process group, so that stop() takes the renderers and
            # the zygote with it; output to a file that nothing has to drain.
            self.proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        try:
            self.devtools_url = self._wait_devtools_url()
        except BaseException:
            self.stop()
            raise

    def _wait_devtools_url(self) -> str:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            match = DEVTOOLS_LINE.search(self.output())
            if match:
                return match.group(1)
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        pytest.fail(
            f"Chromium printed no DevTools URL (exit code {self.proc.poll()}):\n"
            + self.output()[-3000:],
            pytrace=False,
        )

    def output(self) -> str:
        try:
            return self.log.read_text("utf-8", "replace")
        except OSError:
            return ""

    def stop(self) -> None:
        """SIGTERM the process group, SIGKILL it if it lingers, remove the profile."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=5)
        # Renderers may outlive the browser process by a moment.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        shutil.rmtree(self.profile, ignore_errors=True)


class JSError(Exception):
    """JavaScript threw (or a promise rejected) during an evaluation."""


class Page:
    """A tab, attached through a flat CDP session on the browser's connection."""

    def __init__(self, cdp: CDP, session_id: str, target_id: str) -> None:
        self.cdp = cdp
        self.session_id = session_id
        self.target_id = target_id
        self.console: list[str] = []

    async def evaluate(self, expression: str, timeout: float = CALL_TIMEOUT) -> Any:
        """The JSON value of ``expression``, awaited if it is a promise."""
        result = await self.cdp.call(
            "Runtime.evaluate",
            {"expression": expression, "awaitPromise": True, "returnByValue": True},
            session_id=self.session_id,
            timeout=timeout,
        )
        details = result.get("exceptionDetails")
        if details is not None:
            exception = details.get("exception", {})
            text = exception.get("description") or exception.get("value") or details.get("text")
            raise JSError(f"{text}\n--- console ---\n" + "\n".join(self.console[-30:]))
        return result["result"].get("value")

    async def run(self, body: str, timeout: float = CALL_TIMEOUT) -> Any:
        """Run ``body`` as the body of an async function (``await`` and ``return`` work)."""
        return await self.evaluate(f"(async () => {{\n{body}\n}})()", timeout)

    async def wait_for(self, expression: str, timeout: float = 10.0) -> Any:
        """Poll until ``expression`` is truthy; its value."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            value = await self.evaluate(expression)
            if value:
                return value
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError(
                    f"still falsy after {timeout} s: {expression}\n--- console ---\n"
                    + "\n".join(self.console[-30:])
                )
            await asyncio.sleep(0.05)


class CDP:
    """Calls and events over the browser's DevTools WebSocket."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self._ids = itertools.count(1)
        self._calls: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._pages: dict[str, Page] = {}
        self._reader = asyncio.get_running_loop().create_task(self._read())

    @classmethod
    async def connect(cls, url: str) -> CDP:
        from websockets.asyncio.client import connect

        return cls(await connect(url, max_size=None, open_timeout=10, ping_interval=None))

    async def call(
        self,
        method: str,
        params: dict[str, Any] | None = None,
        *,
        session_id: str | None = None,
        timeout: float = CALL_TIMEOUT,
    ) -> dict[str, Any]:
        call_id = next(self._ids)
        message: dict[str, Any] = {"id": call_id, "method": method, "params": params or {}}
        if session_id is not None:
            message["sessionId"] = session_id
        future = asyncio.get_running_loop().create_future()
        self._calls[call_id] = future
        try:
            await self.ws.send(json.dumps(message))
            return await asyncio.wait_for(future, timeout)
        finally:
            self._calls.pop(call_id, None)

    async def _read(self) -> None:
        try:
            async for raw in self.ws:
                message = json.loads(raw)
                if "id" in message:
                    future = self._calls.get(message["id"])
                    if future is None or future.done():
                        continue
                    if "error" in message:
                        future.set_exception(RuntimeError(f"CDP error: {message['error']}"))
                    else:
                        future.set_result(message.get("result", {}))
                else:
                    self._event(message)
        finally:
            for future in self._calls.values():
                if not future.done():
                    future.set_exception(ConnectionError("the DevTools connection closed"))

    def _event(self, message: dict[str, Any]) -> None:
        """Keep a page's console output and uncaught errors, for failure messages."""
        page = self._pages.get(message.get("sessionId", ""))
        if page is None:
            return
        params = message.get("params", {})
        if message.get("method") == "Runtime.consoleAPICalled":
            args = " ".join(
                str(a.get("value", a.get("description", ""))) for a in params.get("args", [])
            )
            page.console.append(f"console.{params.get('type')}: {args}")
        elif message.get("method") == "Runtime.exceptionThrown":
            details = params.get("exceptionDetails", {})
            text = details.get("exception", {}).get("description") or details.get("text")
            page.console.append(f"uncaught: {text}")

    @contextlib.asynccontextmanager
    async def page(self, url: str = "about:blank") -> AsyncIterator[Page]:
        """A new tab at ``url``, closed on the way out."""
        target_id = (await self.call("Target.createTarget", {"url": url}))["targetId"]
        try:
            attached = await self.call(
                "Target.attachToTarget", {"targetId": target_id, "flatten": True}
            )
            page = Page(self, attached["sessionId"], target_id)
            self._pages[page.session_id] = page
            await self.call("Runtime.enable", session_id=page.session_id)
            yield page
        finally:
            with contextlib.suppress(Exception):
                await self.call("Target.closeTarget", {"targetId": target_id}, timeout=5)

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.ws.close(), 3)
        self._reader.cancel()
        with contextlib.suppress(BaseException):
            await self._reader


@contextlib.asynccontextmanager
async def open_page(chromium: Chromium, url: str = "about:blank") -> AsyncIterator[Page]:
    """A fresh DevTools connection to ``chromium`` and a new tab on it."""
    cdp = await CDP.connect(chromium.devtools_url)
    try:
        async with cdp.page(url) as page:
            yield page
    finally:
        await cdp.close()
