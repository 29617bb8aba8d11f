"""A real HTTP server on loopback for tests that need one answering a certain way."""

from __future__ import annotations

import contextlib
import http.server
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

# How long leaving serving() waits for the request threads to end once their connections
# are shut down.
DRAIN_S = 10.0


class _Server(http.server.ThreadingHTTPServer):
    """Daemon request threads, each connection known while it is served, so that leaving
    serving() can end them: a request thread left waiting on a connection its client
    abandoned would count as a thread and a socket of the next test
    (tests/node/test_long_running.py holds the process to exact figures)."""

    daemon_threads = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.open: set[socket.socket] = set()
        self.lock = threading.Lock()

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        with self.lock:
            self.open.add(request)
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self.lock:
                self.open.discard(request)

    def drain(self) -> None:
        """Shut down every connection still served (a blocked read or write returns at
        once), then wait for their threads."""
        with self.lock:
            for request in self.open:
                with contextlib.suppress(OSError):
                    request.shutdown(socket.SHUT_RDWR)
        end = time.monotonic() + DRAIN_S
        while self.open and time.monotonic() < end:
            time.sleep(0.01)


@contextlib.contextmanager
def serving(handler: type[http.server.BaseHTTPRequestHandler]) -> Iterator[str]:
    """Serve *handler* on a free loopback port, in threads; yields the base URL."""
    httpd = _Server(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
        httpd.drain()
