"""A SAS token endpoint on 127.0.0.1, shaped like Planetary Computer's (`token`, `msft:expiry`)."""

from __future__ import annotations

import datetime as dt
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@contextmanager
def token_endpoint(*, first_expired: bool = False, prefix: str = "sig=secret-") -> Iterator[tuple[str, list[str]]]:
    """Yield (token URL, tokens issued so far). Token n is `<prefix>n`, valid for an hour;
    with `first_expired`, token 1 is issued already expired (as seen in PlanetaryComputer#463)."""
    issued: list[str] = []

    class H(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            tok = f"{prefix}{len(issued) + 1}"
            delta = dt.timedelta(minutes=-1) if first_expired and not issued else dt.timedelta(hours=1)
            issued.append(tok)
            exp = (dt.datetime.now(dt.timezone.utc) + delta).strftime("%Y-%m-%dT%H:%M:%SZ")
            body = json.dumps({"msft:expiry": exp, "token": tok}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a: object) -> None:
            pass

    srv = ThreadingHTTPServer(("127.0.0.1", 0), H)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}/api/sas/v1/token/sentinel-2-l2a", issued
    finally:
        srv.shutdown()
        srv.server_close()
