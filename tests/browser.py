"""Headless Chromium driven over the DevTools protocol on a pipe, for the status page test.

``--remote-debugging-pipe`` makes Chromium read protocol commands from its fd 3 and write
replies and events to its fd 4, as JSON messages each ended by a NUL byte: no websocket, no
driver, no Node package, nothing downloaded. Chromium is Debian's ``chromium`` package
(``scripts/setup-chromium.sh``), started with a new empty profile and every background service
off, so that the only requests it makes are the ones the page makes.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--hide-scrollbars",
    "--mute-audio",
    "--remote-debugging-pipe",
)


def chromium_binary() -> str | None:
    return shutil.which("chromium")


def _above(fd: int, low: int) -> int:
    """``fd`` moved to a number of at least ``low`` (the old number is closed)."""
    moved = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, low)
    os.close(fd)
    return moved


class BrowserError(RuntimeError):
    pass


class Chromium:
    """One headless Chromium process; ``call`` sends a command and waits for its reply,
    ``wait_event`` waits for an event (of a session: an attached tab)."""

    def __init__(self, profile: Path, *, width: int = 1280, height: int = 900) -> None:
        binary = chromium_binary()
        if binary is None:
            raise BrowserError("no chromium on PATH: run scripts/setup-chromium.sh")
        profile.mkdir(parents=True, exist_ok=True)
        commands_r, self._commands = os.pipe()
        self._replies, replies_w = os.pipe()
        # above 4, so that putting one end on fd 3 or 4 cannot overwrite the other
        commands_r, replies_w = (_above(fd, 10) for fd in (commands_r, replies_w))
        # bash puts the two pipe ends on fds 3 and 4, where Chromium looks for them
        self.process = subprocess.Popen(
            [
                "bash",
                "-c",
                f'exec "$0" "$@" 3<&{commands_r} 4>&{replies_w} {commands_r}<&- {replies_w}>&-',
                binary,
                *FLAGS,
                f"--user-data-dir={profile}",
                f"--window-size={width},{height}",
                "about:blank",
            ],
            pass_fds=(commands_r, replies_w),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.close(commands_r)
        os.close(replies_w)
        self._next_id = 0
        self._replies_by_id: dict[int, dict[str, Any]] = {}
        self.events: list[dict[str, Any]] = []
        self._changed = threading.Condition()
        self._closed = False
        self._reader = threading.Thread(target=self._read, name="chromium-pipe", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        buffer = b""
        while True:
            try:
                chunk = os.read(self._replies, 1 << 16)
            except OSError:
                chunk = b""
            if not chunk:
                break
            buffer += chunk
            *messages, buffer = buffer.split(b"\0")
            with self._changed:
                for raw in messages:
                    message = json.loads(raw)
                    if "id" in message:
                        self._replies_by_id[message["id"]] = message
                    else:
                        self.events.append(message)
                self._changed.notify_all()
        with self._changed:
            self._closed = True
            self._changed.notify_all()

    def call(
        self,
        method: str,
        params: dict[str, Any] | None = None,
        *,
        session: str | None = None,
        timeout: float = 30.0,
    ) -> dict[str, Any]:
        with self._changed:
            self._next_id += 1
            ident = self._next_id
        message: dict[str, Any] = {"id": ident, "method": method, "params": params or {}}
        if session is not None:
            message["sessionId"] = session
        os.write(self._commands, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        with self._changed:
            while ident not in self._replies_by_id:
                left = deadline - time.monotonic()
                if self._closed or left <= 0:
                    raise BrowserError(f"{method}: no reply (closed={self._closed})")
                self._changed.wait(left)
            reply = self._replies_by_id.pop(ident)
        if "error" in reply:
            raise BrowserError(f"{method}: {reply['error']}")
        result: dict[str, Any] = reply.get("result", {})
        return result

    def wait_event(
        self, method: str, *, session: str | None, after: int = 0, timeout: float = 30.0
    ) -> dict[str, Any]:
        """The first event ``method`` of ``session`` at index ``after`` or later in
        :attr:`events`."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for event in self.events[after:]:
                    if event["method"] == method and event.get("sessionId") == session:
                        params: dict[str, Any] = event.get("params", {})
                        return params
                left = deadline - time.monotonic()
                if self._closed or left <= 0:
                    raise BrowserError(f"no {method} event within {timeout} s")
                self._changed.wait(left)

    def close(self) -> None:
        if self.process.poll() is None:
            with contextlib.suppress(BrowserError):
                self.call("Browser.close", timeout=5)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        os.close(self._commands)
        self._reader.join(5)
        os.close(self._replies)

    def __enter__(self) -> Chromium:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


class Tab:
    """A page of a :class:`Chromium`, with a fixed viewport of ``width`` x ``height`` CSS
    pixels at a device scale of 1 (so a screenshot is that many pixels)."""

    def __init__(self, browser: Chromium, *, width: int = 1280, height: int = 900) -> None:
        self.browser = browser
        target = browser.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        self.session = browser.call("Target.attachToTarget", {"targetId": target, "flatten": True})[
            "sessionId"
        ]
        for domain in ("Page.enable", "Runtime.enable", "Network.enable"):
            self.call(domain)
        self.call(
            "Emulation.setDeviceMetricsOverride",
            {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False},
        )

    def call(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        return self.browser.call(method, params, session=self.session)

    def load(self, action: str, params: dict[str, Any], timeout: float = 30.0) -> None:
        """Run ``action`` (a command that navigates) and wait until the page has loaded."""
        mark = len(self.browser.events)
        self.call(action, params)
        self.browser.wait_event(
            "Page.loadEventFired", session=self.session, after=mark, timeout=timeout
        )

    def navigate(self, url: str) -> None:
        self.load("Page.navigate", {"url": url})

    def submit(self, expression: str) -> None:
        """Evaluate ``expression`` (which submits a form) and wait for the next page."""
        mark = len(self.browser.events)
        self.evaluate(expression)
        self.browser.wait_event("Page.loadEventFired", session=self.session, after=mark)

    def evaluate(self, expression: str) -> Any:
        reply = self.call(
            "Runtime.evaluate",
            {"expression": expression, "returnByValue": True, "awaitPromise": True},
        )
        if "exceptionDetails" in reply:
            raise BrowserError(f"{expression}: {reply['exceptionDetails']}")
        return reply["result"].get("value")

    def wait_until(self, expression: str, timeout: float = 20.0) -> Any:
        """The value of ``expression`` once it is truthy (polled every 100 ms)."""
        deadline = time.monotonic() + timeout
        while True:
            value = self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise BrowserError(f"still falsy after {timeout} s: {expression}")
            time.sleep(0.1)

    def dom(self) -> str:
        """The DOM as it is now, serialized (what ``--dump-dom`` prints)."""
        value: str = self.evaluate("document.documentElement.outerHTML")
        return value

    def screenshot(self) -> bytes:
        data = self.call("Page.captureScreenshot", {"format": "png"})["data"]
        return base64.b64decode(data)

    def requested_urls(self) -> list[str]:
        """Every URL this page asked for so far (its document, scripts, styles, images,
        event streams, form posts)."""
        return [
            e["params"]["request"]["url"]
            for e in list(self.browser.events)
            if e["method"] == "Network.requestWillBeSent" and e.get("sessionId") == self.session
        ]
