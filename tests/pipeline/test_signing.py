"""Planetary-Computer-style SAS signing against a real token endpoint on loopback."""

from __future__ import annotations

import datetime as dt
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from pipeline.signing import TokenSigner, make_patch_url, strip_query


@pytest.fixture
def token_server() -> Iterator[tuple[str, list[int]]]:
    issued: list[int] = []
    state = {"expired": True}

    class H(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            issued.append(len(issued) + 1)
            # the first token is issued already expired (PlanetaryComputer#463), later ones last an hour
            delta = dt.timedelta(minutes=-1) if state["expired"] else dt.timedelta(hours=1)
            state["expired"] = False
            exp = (dt.datetime.now(dt.timezone.utc) + delta).strftime("%Y-%m-%dT%H:%M:%SZ")
            body = json.dumps({"msft:expiry": exp, "token": f"sv=2024&sig=secret{len(issued)}"}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a: object) -> None:
            pass

    srv = ThreadingHTTPServer(("127.0.0.1", 0), H)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}/api/sas/v1/token/sentinel-2-l2a", issued
    srv.shutdown()


def test_expired_token_is_renewed_not_fatal(token_server: tuple[str, list[int]]) -> None:
    url, issued = token_server
    s = TokenSigner(url)
    href = "https://example.blob.core.windows.net/c/B04.tif"
    first = s.sign(href)
    assert first.endswith("?sv=2024&sig=secret1")
    second = s.sign(href)  # token 1 was already expired: fetched again
    assert second.endswith("?sv=2024&sig=secret2") and len(issued) == 2
    assert s.sign(href).endswith("secret2") and len(issued) == 2  # valid token reused
    assert s.sign(href, force=True).endswith("secret3")  # e.g. after an HTTP 403
    assert strip_query(second) == href


def test_local_paths_are_not_signed(token_server: tuple[str, list[int]]) -> None:
    url, issued = token_server
    sign = make_patch_url("planetary_computer", url)
    assert sign is not None and sign("file:///data/B04.tif") == "file:///data/B04.tif" and not issued
    assert make_patch_url("none", None) is None
