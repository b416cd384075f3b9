"""A minimal HTTP server on 127.0.0.1 answering every GET with a body from a callback, and a
free (closed) loopback port."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (just bound and released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def serve_get(respond: Callable[[str], tuple[bytes, str]]) -> Iterator[str]:
    """Yield the base URL (`http://127.0.0.1:PORT`) of a server whose GETs answer 200 with
    `respond(request_path)` = (body, content type); it stops when the block ends."""

    class H(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            body, ctype = respond(self.path)
            self.send_response(200)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a: object) -> None:
            pass

    srv = ThreadingHTTPServer(("127.0.0.1", 0), H)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}"
    finally:
        srv.shutdown()
        srv.server_close()
