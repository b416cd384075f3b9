"""Serve a static STAC catalog as a real STAC API on loopback (stac-fastapi-static + uvicorn).

    python -m pipeline.stac_server catalogs/sample/catalog.json [--port 8000]

or, from code (what `pipeline.search` does for the embedded sample and for local catalogs)::

    with serve_static_catalog(Path("catalogs/sample/catalog.json")) as url:
        pystac_client.Client.open(url).search(collections=["sentinel-2-l2a"], bbox=...)

The API offers item search (bbox, intersects, datetime, collections, ids, CQL2 filter) with
token pagination, so the same pystac-client code path runs for a shipped catalog and for a
live one.

Design choices:

- **A subprocess, not a thread.** uvicorn owns an asyncio event loop and signal handlers;
  in a child process it cannot clash with Dask, Jupyter or pytest loops in the caller, and
  stac-fastapi-static keeps a class-level cache of walked objects (`WalkResult._cache`)
  that must not leak between two catalogs served one after the other.
- **Race-free port choice.** The child binds the socket itself (port 0 = any free port),
  prints the URL on its first stdout line and hands the bound socket to uvicorn; the parent
  reads that line, then polls the landing page until it answers.
- **Asset hrefs stay local files.** stac-fastapi-static rewrites every local href into a URL
  of its own static-file mount (`core_client.resolve`), which would make every pixel read
  go through this HTTP server and die with it. In the server process we keep its rewriting
  for links (clients must walk the API) but return asset hrefs as `file://` + the absolute
  path, which GDAL/rasterio open directly and which stay valid after the server stops.
  Not a bare path: pystac resolves a scheme-less href against the item's `self` link, so
  `/a/b.tif` under `http://127.0.0.1:PORT/...` would turn back into an HTTP URL. The path
  is not percent-encoded because rasterio does not decode `file://` URLs (a path with a
  space stays openable; one with `?` or `#` is not supported).
- **Paths with spaces or non-ASCII characters.** stac-fastapi-static turns the catalog path
  into a `file://` URI and back without percent-decoding, so `my catalog é/` became
  `my%2520catalog%2520%25C3%25A9/` and the server died at start-up. In the server process its
  two converters are replaced by ones that encode once and decode once (`_decode_file_uris`).
- **Link loops are refused before serving.** A `child` (or `item`) link that leads back to a
  document already on the way from the root would make the server walk forever (it recurses
  per level until RecursionError, per request). `_check_links` walks the local links once,
  iteratively, with a visited set and bounds on depth and documents, and names the link.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import queue
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlparse

from pipeline.errors import CatalogError

log = logging.getLogger(__name__)

#: The first line the server process prints on stdout; the parent parses the URL from it.
_READY_LINE = re.compile(r"^STAC API (?P<url>http://\S+/) serving ")
_REPO_ROOT = Path(__file__).resolve().parent.parent


class StacServerError(CatalogError):
    """The static catalog cannot be served (missing file, not STAC, server did not start)."""


def _check_catalog(catalog_json: Path, *, links: bool = True) -> Path:
    """Resolve `catalog_json` and check it is a STAC Catalog or Collection JSON file whose
    local `child`/`item` links hold no loop (`links=False` skips that walk: done already)."""
    path = Path(catalog_json).expanduser().resolve()
    if not path.is_file():
        raise StacServerError(f"static STAC catalog {str(catalog_json)[:300]!r} not found: pass the path of a catalog.json")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise StacServerError(f"{path} is not readable JSON: {' '.join(str(e).split())[:200]}") from None
    if not isinstance(doc, dict) or doc.get("type") not in ("Catalog", "Collection"):
        kind = doc.get("type") if isinstance(doc, dict) else None
        raise StacServerError(f"{path} is not a STAC Catalog or Collection (type={str(kind)[:40]!r})")
    if links:
        _check_links(path)
    return path


#: Bounds of the link walk: deeper nesting than this is refused (the server's own walk
#: recurses per level), and a catalog with more catalogs/collections than this is not walked further.
MAX_LINK_DEPTH = 64
MAX_LINKED_DOCUMENTS = 100_000


def _linked(doc_path: str) -> list[tuple[str, str]]:
    """(rel, real path) of the local `child` and `item` links of one catalog/collection file.

    Hrefs are resolved as stac-fastapi-static resolves them (against the document's `self`
    link when it has one, else its own location); remote links and unreadable documents give
    nothing (the server skips those too).
    """
    try:
        doc = json.loads(Path(doc_path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    links = doc.get("links") if isinstance(doc, dict) else None
    if not isinstance(links, list):
        return []
    own = Path(doc_path).as_uri()
    base = own
    for link in links:
        if isinstance(link, dict) and link.get("rel") == "self" and isinstance(link.get("href"), str):
            base = urljoin(own, link["href"])
            break
    out = []
    for link in links:
        if not isinstance(link, dict) or link.get("rel") not in ("child", "item") or not isinstance(link.get("href"), str):
            continue
        target = urlparse(urljoin(base, link["href"]))
        if target.scheme not in ("file", ""):
            continue
        out.append((link["rel"], os.path.realpath(urllib.request.url2pathname(target.path))))
    return out


def _check_links(root: Path) -> None:
    """Refuse a static catalog whose local `child`/`item` links loop back (see module docstring).

    An iterative depth-first walk from the root over catalogs and collections: a link to a
    document on the current path from the root is a loop; a document reached twice by
    different paths is walked once (that is not a loop). Items are not opened, only their
    hrefs compared, so a catalog of many items costs one read per catalog/collection.

    Raises:
        StacServerError: one line naming the link that closes the loop, or the bound exceeded.
    """
    top = os.path.realpath(root)
    folder = os.path.dirname(top)

    def show(p: str) -> str:
        rel = os.path.relpath(p, folder)
        return (rel if not rel.startswith("..") else p)[-150:]

    on_path = {top}
    done: set[str] = set()
    stack = [(top, iter(_linked(top)))]
    while stack:
        doc, links = stack[-1]
        nxt = next(links, None)
        if nxt is None:
            stack.pop()
            on_path.discard(doc)
            done.add(doc)
            continue
        rel, target = nxt
        if target in on_path:
            raise StacServerError(
                f"static STAC catalog {root} has a link loop: the {rel!r} link of {show(doc)} points back to "
                f"{show(target)} (already on the way from the root); remove or fix that link")
        if rel == "item" or target in done or not os.path.isfile(target):
            continue
        if len(stack) >= MAX_LINK_DEPTH:
            raise StacServerError(f"static STAC catalog {root}: child links nest deeper than {MAX_LINK_DEPTH} levels "
                                  f"(at {show(target)}): flatten the catalog")
        if len(done) + len(stack) >= MAX_LINKED_DOCUMENTS:
            log.warning("static STAC catalog %s: more than %d catalogs/collections; links beyond them not checked for loops",
                        root, MAX_LINKED_DOCUMENTS)
            return
        on_path.add(target)
        stack.append((target, iter(_linked(target))))


# --------------------------------------------------------------------------------------------
# Server process side


def local_asset_href(href: str) -> str:
    """`file:///a/b%20c.tif` or `/a/b c.tif` -> `file:///a/b c.tif`, the form rasterio and pystac both keep.

    See the module docstring for why not a bare path and why not percent-encoded.
    """
    path = urllib.request.url2pathname(urlparse(href).path)
    return "file://" + Path(path).as_posix()


def _decode_file_uris() -> None:
    """Make stac-fastapi-static convert between paths and `file://` URIs correctly (server process only).

    Its `file_path_to_file_uri` percent-encodes an already encoded URI again and its
    `file_uri_to_file_path` never decodes, so any path with a space or a non-ASCII character
    ends up double encoded (`%2520`) and not found. The replacements encode a plain path
    once, keep a URI as it is (normalised), and decode a URI into the real path. Patched in
    every module that imported them by name.
    """
    from stac_fastapi.static.api import api, config, core_client
    from stac_fastapi.static.core import requests as static_requests
    from stac_fastapi.static.core.requests import file_href

    if getattr(file_href.file_uri_to_file_path, "_decodes", False):
        return

    def file_uri_to_file_path(href: str) -> str:
        if not file_href.is_file_uri(href):
            raise ValueError(f"Not a path or 'file://' URI : {href}")
        parsed = urlparse(href)
        # a plain path is a path (a literal '%' stays); a file:// URI is percent-decoded
        return urllib.request.url2pathname(parsed.path) if parsed.scheme == "file" else parsed.path

    def file_path_to_file_uri(path: str) -> str:
        return Path(file_uri_to_file_path(path)).as_uri()

    file_uri_to_file_path._decodes = True  # type: ignore[attr-defined]
    for module in (file_href, static_requests, api, config, core_client):
        if hasattr(module, "file_uri_to_file_path"):
            module.file_uri_to_file_path = file_uri_to_file_path  # type: ignore[attr-defined]
        if hasattr(module, "file_path_to_file_uri"):
            module.file_path_to_file_uri = file_path_to_file_uri  # type: ignore[attr-defined]


def _keep_local_asset_hrefs() -> None:
    """Make stac-fastapi-static return asset hrefs as absolute file paths (see module docstring).

    Wraps `stac_fastapi.static.api.core_client.resolve` through its own `pre_resolve` hook:
    the hook records each asset's local href before the library rewrites it, and the wrapper
    puts it back afterwards as a `file://` URL of the absolute path. Remote hrefs (https://, s3://) are untouched.
    Installed only in the server process.
    """
    from stac_fastapi.static.api import core_client
    from stac_fastapi.static.core.requests import is_file_uri

    original = core_client.resolve
    if getattr(original, "_keeps_local_assets", False):
        return

    def resolve(result: Any, *, pre_resolve: Callable[[Any], None] | None = None, **kwargs: Any) -> Any:
        saved: dict[str, str] = {}

        def hook(obj: Any) -> None:
            if pre_resolve is not None:
                pre_resolve(obj)
            for key, asset in (getattr(obj, "assets", None) or {}).items():
                if is_file_uri(asset.href):
                    saved[key] = local_asset_href(asset.href)

        obj = original(result, pre_resolve=hook, **kwargs)
        for key, path in saved.items():
            obj.assets[key].href = path
        return obj

    resolve._keeps_local_assets = True  # type: ignore[attr-defined]
    core_client.resolve = resolve


def build_app(catalog_json: Path, *, check_links: bool = True) -> Any:
    """The stac-fastapi-static ASGI app for a local static catalog (used by the server process)."""
    from stac_fastapi.static.api import Settings, make_api

    path = _check_catalog(catalog_json, links=check_links)
    title = json.loads(path.read_text(encoding="utf-8")).get("title") or path.parent.name
    _decode_file_uris()
    _keep_local_asset_hrefs()
    settings = Settings(
        _env_file=None,  # never pick up a stray .env from the working directory
        catalog_href=path.as_uri(),
        stac_fastapi_title=f"{title} (static catalog on loopback)",
        stac_fastapi_description=f"STAC API over the static catalog {path}",
        reload=False,
        log_level="warning",
    )
    return make_api(settings).app


def _bind(host: str, port: int) -> tuple[socket.socket, str]:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise StacServerError(f"cannot listen on {host}:{port}: {e.strerror or e}; choose another --port") from None
    bound = sock.getsockname()[1]
    shown = f"[{host}]" if family == socket.AF_INET6 else host
    return sock, f"http://{shown}:{bound}/"


def serve_forever(catalog_json: Path, host: str = "127.0.0.1", port: int = 0, *, check_links: bool = True) -> None:
    """Serve `catalog_json` on `host:port` until SIGINT/SIGTERM (blocking; the server process body).

    `check_links=False` skips the link-loop walk when the caller (`serve_static_catalog`) did it.
    """
    _check_catalog(catalog_json, links=check_links)  # fail fast, before the slow FastAPI imports
    import uvicorn

    app = build_app(catalog_json, check_links=False)
    sock, url = _bind(host, port)
    # The ready line is the contract with `serve_static_catalog` (and tells a CLI user the URL).
    sys.stdout.write(f"STAC API {url} serving {Path(catalog_json).resolve()} (Ctrl-C to stop)\n")
    sys.stdout.flush()
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on")
    uvicorn.Server(config).run(sockets=[sock])


# --------------------------------------------------------------------------------------------
# Caller side


def _no_proxy_opener() -> urllib.request.OpenerDirector:
    # Loopback must never go through an HTTP(S)_PROXY from the environment.
    return urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _tail(path: Path, n: int = 2000) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    return text[-n:].strip()


def _stop(proc: subprocess.Popen[str]) -> None:
    """Stop the server child at once: it serves a read-only catalog, holds nothing to flush,
    and its socket closes with it (uvicorn's graceful SIGTERM shutdown took ~0.2 s of every
    build's wall time)."""
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def _die_with_parent() -> None:
    """In the child: ask Linux to SIGTERM the server when the pipeline process dies, even by
    kill -9, so no orphaned server outlives an interrupted build (prctl PR_SET_PDEATHSIG)."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, int(signal.SIGTERM))  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the server still stops on normal exits
        pass


@contextlib.contextmanager
def serve_static_catalog(
    catalog_json: Path, host: str = "127.0.0.1", port: int = 0, *, timeout: float = 60.0
) -> Iterator[str]:
    """Serve a static STAC catalog as a STAC API while the `with` block runs; yield its root URL.

    Args:
        catalog_json: path of the static catalog's `catalog.json` (or a `collection.json`).
        host: interface to listen on; loopback by default (nothing else should see it).
        port: TCP port; 0 picks a free one.
        timeout: seconds to wait for the landing page to answer before giving up.

    Yields:
        The API root URL, e.g. ``http://127.0.0.1:41234/``. Items returned by its search have
        asset hrefs ``file:///absolute/path.tif`` that rasterio opens as they are (see the
        module docstring); remote hrefs (https://, s3://) are passed through.

    Raises:
        StacServerError: the catalog file is missing or not STAC, or the server did not come
            up within `timeout` (the message carries the end of the server's stderr).
    """
    path = _check_catalog(catalog_json)
    env = dict(os.environ)
    # The child imports `pipeline` from this checkout even when it is not pip-installed.
    env["PYTHONPATH"] = os.pathsep.join([str(_REPO_ROOT), *filter(None, [env.get("PYTHONPATH")])])
    # links were checked just now (`_check_catalog`): the server process need not walk them again
    cmd = [sys.executable, "-m", "pipeline.stac_server", str(path), "--host", host, "--port", str(port), "--links-checked"]
    with tempfile.NamedTemporaryFile("w+", prefix="stac-server-", suffix=".log", delete=False) as errf:
        err_path = Path(errf.name)
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=errf, stdin=subprocess.DEVNULL, text=True, env=env,
            preexec_fn=_die_with_parent,
        )
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:  # drain stdout so the child can never block on a full pipe
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, name="stac-server-stdout", daemon=True).start()
    try:
        url = _wait_ready(proc, lines, err_path, path, timeout)
        log.info("serving static STAC catalog %s at %s (pid %d)", path, url, proc.pid)
        yield url
    finally:
        _stop(proc)
        if proc.stdout is not None:
            proc.stdout.close()
        with contextlib.suppress(OSError):
            err_path.unlink()
        log.debug("STAC server pid %d stopped (exit %s)", proc.pid, proc.returncode)


def _wait_ready(
    proc: subprocess.Popen[str], lines: queue.Queue[str | None], err_path: Path, path: Path, timeout: float
) -> str:
    """Read the child's ready line, then poll the landing page; return the root URL."""
    deadline = time.monotonic() + timeout

    def fail(why: str) -> StacServerError:
        tail = _tail(err_path)
        return StacServerError(f"STAC server for {path} {why}" + (f"; server stderr:\n{tail}" if tail else ""))

    url: str | None = None
    while url is None:
        left = deadline - time.monotonic()
        if left <= 0:
            raise fail(f"printed no URL within {timeout:.0f} s")
        try:
            line = lines.get(timeout=min(left, 0.5))
        except queue.Empty:
            continue
        if line is None:
            proc.wait(5)
            raise fail(f"exited with code {proc.returncode} before serving")
        m = _READY_LINE.match(line)
        if m:
            url = m["url"]
    opener = _no_proxy_opener()
    last = "no answer"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise fail(f"exited with code {proc.returncode} while starting")
        try:
            with opener.open(url, timeout=5) as r:
                body = json.loads(r.read())
            if isinstance(body, dict) and body.get("links"):
                return url
            last = "landing page without links"
        except (urllib.error.URLError, OSError, ValueError) as e:
            last = str(e)
        time.sleep(0.1)
    raise fail(f"did not answer at {url} within {timeout:.0f} s ({last})")


def main(argv: list[str] | None = None) -> int:
    """CLI: serve a static catalog until Ctrl-C. Returns the exit code."""
    ap = argparse.ArgumentParser(
        prog="python -m pipeline.stac_server",
        description="Serve a static STAC catalog (catalog.json) as a STAC API with item search.",
    )
    ap.add_argument("catalog", type=Path, help="path of the static catalog.json (e.g. catalogs/sample/catalog.json)")
    ap.add_argument("--host", default="127.0.0.1", help="interface to listen on (default: loopback only)")
    ap.add_argument("--port", type=int, default=8000, help="TCP port (0 = any free port; default 8000)")
    ap.add_argument("--links-checked", action="store_true", help=argparse.SUPPRESS)  # set by serve_static_catalog
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        serve_forever(args.catalog, args.host, args.port, check_links=not args.links_checked)
    except StacServerError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
