"""A real HTTP receiver for webhook tests: http.server in a thread on a free port.

Each request takes the next scripted answer (``"500"``, ``"timeout"``: answer 200 only after
``hang_s``, when the sender has given up, or an HTTP status as text); once the script is used
up it answers 204. Every request is recorded, with its headers and raw body, whatever the
answer.
"""

from __future__ import annotations

import importlib.util
import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import ModuleType
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def example_receiver() -> ModuleType:
    """``examples/webhooks/receiver.py`` as a module (its ``verify`` is what tests check
    signatures with)."""
    path = ROOT / "examples" / "webhooks" / "receiver.py"
    spec = importlib.util.spec_from_file_location("webhook_receiver_example", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@dataclass(frozen=True)
class Received:
    at: float
    headers: dict[str, str]
    body: bytes
    answer: str

    @property
    def event(self) -> dict[str, Any]:
        doc: dict[str, Any] = json.loads(self.body)
        return doc


class Receiver:
    def __init__(self, script: list[str] | None = None, hang_s: float = 1.5) -> None:
        self.script = list(script or [])
        self.hang_s = hang_s
        self.received: list[Received] = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with receiver.lock:
                    answer = receiver.script.pop(0) if receiver.script else "204"
                    receiver.received.append(
                        Received(time.time(), dict(self.headers.items()), body, answer)
                    )
                if answer == "timeout":
                    time.sleep(receiver.hang_s)
                    answer = "200"
                try:
                    self.send_response(int(answer))
                    self.end_headers()
                except OSError:
                    pass  # the sender gave up and closed

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_port}/hooks"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def events(self) -> list[dict[str, Any]]:
        with self.lock:
            return [r.event for r in self.received]

    def delivered(self) -> list[Received]:
        """The requests answered 2xx (those the sender counts as delivered)."""
        with self.lock:
            return [r for r in self.received if r.answer.startswith("2")]

    def wait_for(self, done: Callable[[Receiver], bool], timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if done(self):
                return
            time.sleep(0.05)
        raise AssertionError(f"not received in {timeout} s: {self.events()}")


@contextmanager
def receiver(script: list[str] | None = None, hang_s: float = 1.5) -> Iterator[Receiver]:
    r = Receiver(script, hang_s)
    r.thread.start()
    try:
        yield r
    finally:
        r.server.shutdown()
        r.server.server_close()
