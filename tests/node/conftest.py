"""Fixtures shared by the node's tests."""

from __future__ import annotations

import contextlib
import http.server
import threading
import time
from collections.abc import Iterator

import pytest


class _Drip(http.server.BaseHTTPRequestHandler):
    """Answers 200 with a long body, one byte every 0.1 s (or nothing at all, at /stall)."""

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "100000")
        self.end_headers()
        with contextlib.suppress(OSError):  # the client gave up: the point of the test
            if self.path == "/stall":
                time.sleep(30)
            for _ in range(100_000):
                self.wfile.write(b"x")
                self.wfile.flush()
                time.sleep(0.1)

    def log_message(self, *_args: object) -> None:
        return None


@pytest.fixture(scope="module")
def drip() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Drip)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
