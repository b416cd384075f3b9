"""A real HTTP file server on 127.0.0.1 with range requests and injectable faults.

Serves a directory the way object stores serve COGs (HEAD, GET, single `Range: bytes=a-b`
with 206 + Content-Range), and injects faults on a seeded fraction of requests:

    http500, http503   an error status instead of the body
    reset              the connection is closed without a response
    slow               the response is delayed (`slow_s`) but correct
    truncated          full headers, then half the body, then the connection closes

`always_fail` paths answer 500 to every request (a scene that keeps failing). With
`token_check`, requests whose query fails the check get 403 (expired signatures).
Counters record what was served and injected, for the reliability report.
"""

from __future__ import annotations

import os
import random
import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

FAULT_KINDS = ("http500", "http503", "reset", "slow", "truncated")


@dataclass
class FaultPolicy:
    rate: float = 0.0
    kinds: tuple[str, ...] = FAULT_KINDS
    seed: int = 0
    slow_s: float = 0.3
    always_fail: set[str] = field(default_factory=set)  # path suffixes
    token_check: Callable[[dict[str, list[str]]], bool] | None = None
    requests: int = 0
    injected: Counter[str] = field(default_factory=Counter)
    forbidden: int = 0

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)
        self._lock = threading.Lock()

    def draw(self) -> str | None:
        with self._lock:
            self.requests += 1
            if self.rate and self._rng.random() < self.rate:
                kind = self._rng.choice(self.kinds)
                self.injected[kind] += 1
                return kind
            return None


def _handler(root: Path, policy: FaultPolicy) -> type[BaseHTTPRequestHandler]:
    class H(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a: object) -> None:
            pass

        def _target(self) -> Path | None:
            path = unquote(urlsplit(self.path).path).lstrip("/")
            p = (root / path).resolve()
            return p if p.is_file() and root in p.parents else None

        def _drop(self) -> None:
            """Close the connection abruptly (a reset, or a body cut short)."""
            self.close_connection = True
            try:
                self.connection.shutdown(2)
            except OSError:
                pass

        def _fail(self, code: int) -> None:
            body = b"injected fault"
            self.send_response(code)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _serve(self, head: bool) -> None:
            q = parse_qs(urlsplit(self.path).query)
            if policy.token_check is not None and not policy.token_check(q):
                policy.forbidden += 1
                self._fail(403)
                return
            if any(self.path.split("?")[0].endswith(s) for s in policy.always_fail):
                policy.injected["always_fail"] += 1
                self._fail(500)
                return
            kind = policy.draw()
            if kind == "http500":
                return self._fail(500)
            if kind == "http503":
                return self._fail(503)
            if kind == "reset":
                return self._drop()
            if kind == "slow":
                time.sleep(policy.slow_s)
            p = self._target()
            if p is None:
                return self._fail(404)
            data = p.read_bytes()
            size = len(data)
            rng = self.headers.get("Range")
            status, start, end = 200, 0, size - 1
            m = re.match(r"bytes=(\d+)-(\d*)", rng or "")
            if m:
                start = int(m.group(1))
                end = min(int(m.group(2)) if m.group(2) else size - 1, size - 1)
                if start >= size:
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{size}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                status = 206
            body = data[start : end + 1]
            self.send_response(status)
            self.send_header("Content-Type", "image/tiff")
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("Content-Length", str(len(body)))
            if status == 206:
                self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
            self.end_headers()
            if head:
                return
            if kind == "truncated":
                self.wfile.write(body[: len(body) // 2])
                self.wfile.flush()
                return self._drop()
            self.wfile.write(body)

        def do_GET(self) -> None:  # noqa: N802
            self._serve(head=False)

        def do_HEAD(self) -> None:  # noqa: N802
            self._serve(head=True)

    return H


@contextmanager
def serve_files(root: Path, policy: FaultPolicy | None = None) -> Iterator[tuple[str, FaultPolicy]]:
    """Serve `root` on a free loopback port; yield (base URL, policy). Stops on exit."""
    policy = policy or FaultPolicy()
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _handler(Path(root).resolve(), policy))
    srv.daemon_threads = True
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}", policy
    finally:
        srv.shutdown()
        srv.server_close()


def rewrite_hrefs_to_http(catalog_dir: Path, base_url: str) -> None:
    """Point every local asset href of a static catalog at `base_url` + its path under the catalog."""
    import json

    root = Path(catalog_dir).resolve()
    for p in root.rglob("*.json"):
        d = json.loads(p.read_text())
        if d.get("type") != "Feature":
            continue
        for a in d.get("assets", {}).values():
            href = a["href"]
            if "://" in href:
                continue
            rel = os.path.relpath((p.parent / href).resolve(), root)
            a["href"] = f"{base_url}/{rel}"
        p.write_text(json.dumps(d))
