"""A minimal STAC API on 127.0.0.1 over items held in memory, and synthetic items to fill it.

For scale tests of the client side (search paging, planning thousands of grids) where no
pixels are read: `synthetic_items(1000, 10)` gives 10,000 Sentinel-2 L2A items (Earth Search
layout, one 10980 px UTM grid per MGRS-like tile, 10 dates each) whose assets point at a
closed port. `serve_items(items, page_size)` answers `GET /`, and `GET`/`POST /search` with
`collections`, `bbox`, `datetime` and `limit`, paged with `next` links (`numberMatched`
included), which is all pystac-client needs.
"""

from __future__ import annotations

import datetime as dt
import json
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from pipeline.catalogs import sensor

COLLECTION = "sentinel-2-c1-l2a"
_COG = "image/tiff; application=geotiff; profile=cloud-optimized"


def synthetic_items(n_grids: int, n_dates: int, *, start: dt.datetime | None = None) -> list[dict[str, Any]]:
    """`n_grids` x `n_dates` items over Europe (UTM zones 29-37 N), metadata only."""
    from pyproj import Transformer

    start = start or dt.datetime(2024, 5, 1, 10, 30, tzinfo=dt.timezone.utc)
    s = sensor()
    items: list[dict[str, Any]] = []
    per_zone = -(-n_grids // 9)
    side = int(per_zone ** 0.5) + 1
    for g in range(n_grids):
        zone = 29 + g // per_zone
        k = g % per_zone
        ulx = 300000.0 + (k % side) * 109800.0 / 4  # quarter-tile steps: grids overlap like real MGRS tiles
        uly = 6000000.0 - (k // side) * 109800.0 / 4
        epsg = 32600 + zone
        t = Transformer.from_crs(epsg, 4326, always_xy=True)
        corners = [t.transform(x, y) for x, y in ((ulx, uly), (ulx + 109800, uly), (ulx + 109800, uly - 109800), (ulx, uly - 109800))]
        lons, lats = [c[0] for c in corners], [c[1] for c in corners]
        ring = [[round(a, 6), round(b, 6)] for a, b in corners]
        tile = f"{zone}V{chr(65 + k // 26 % 26)}{chr(65 + k % 26)}"
        for d in range(n_dates):
            when = start + dt.timedelta(days=5 * d, minutes=g % 60)
            iid = f"S2A_T{tile}_{g:04d}_{when:%Y%m%dT%H%M%S}_L2A"
            assets = {}
            for b in [*s.bands, None]:
                gsd = 20 if b is None else int(b.gsd)
                n = -(-10980 * 10 // gsd)
                key = "scl" if b is None else b.asset_keys["earth_search"]
                assets[key] = {
                    "href": f"http://127.0.0.1:9/{iid}/{'SCL' if b is None else b.name}.tif", "type": _COG,
                    "proj:shape": [n, n], "proj:transform": [float(gsd), 0.0, ulx, 0.0, -float(gsd), uly],
                    "roles": ["data"],
                }
            items.append({
                "type": "Feature", "stac_version": "1.1.0", "id": iid, "collection": COLLECTION,
                "geometry": {"type": "Polygon", "coordinates": [[*ring, ring[0]]]},
                "bbox": [min(lons), min(lats), max(lons), max(lats)],
                "properties": {
                    "datetime": when.strftime("%Y-%m-%dT%H:%M:%SZ"), "eo:cloud_cover": 5.0, "proj:epsg": epsg,
                    "proj:code": f"EPSG:{epsg}", "s2:product_type": "S2MSI2A", "s2:processing_baseline": "05.10",
                    "grid:code": f"MGRS-{tile}", "platform": "sentinel-2a", "constellation": "sentinel-2",
                },
                "assets": assets, "links": [],
            })
    return items


def _matches(item: dict[str, Any], q: dict[str, Any]) -> bool:
    if q.get("collections") and item.get("collection") not in q["collections"]:
        return False
    bbox = q.get("bbox")
    if bbox:
        w, s, e, n = (float(v) for v in bbox)
        iw, is_, ie, in_ = item["bbox"]
        if ie < w or iw > e or in_ < s or is_ > n:
            return False
    when = q.get("datetime")
    if when and "/" in when:
        lo, hi = when.split("/")
        t = item["properties"]["datetime"]
        if lo not in ("", "..") and t < lo or hi not in ("", "..") and t > hi:
            return False
    return True


@contextmanager
def serve_items(items: Sequence[dict[str, Any]], page_size: int = 500) -> Iterator[str]:
    """Serve `items` as a STAC API on a free loopback port; yield its root URL ('.../')."""
    state: dict[str, Any] = {"base": ""}

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:  # quiet
            pass

        def _send(self, obj: Any) -> None:
            body = json.dumps(obj).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _search(self, q: dict[str, Any]) -> None:
            base = state["base"]
            hits = [it for it in items if _matches(it, q)]
            limit = min(int(q.get("limit") or page_size), page_size)
            token = int(q.get("token") or 0)
            page = hits[token : token + limit]
            links = [{"rel": "root", "href": base}]
            if token + limit < len(hits):
                links.append({"rel": "next", "href": f"{base}search", "method": "POST", "type": "application/geo+json",
                              "body": {**q, "token": token + limit}, "merge": False})
            self._send({"type": "FeatureCollection", "features": page, "links": links,
                        "numberMatched": len(hits), "numberReturned": len(page)})

        def do_GET(self) -> None:  # noqa: N802
            parts = urlsplit(self.path)
            base = state["base"]
            if parts.path in ("", "/"):
                self._send({
                    "type": "Catalog", "id": "synthetic", "stac_version": "1.1.0", "description": "synthetic items",
                    "conformsTo": ["https://api.stacspec.org/v1.0.0/core", "https://api.stacspec.org/v1.0.0/item-search"],
                    "links": [{"rel": "self", "href": base}, {"rel": "root", "href": base},
                              {"rel": "search", "href": f"{base}search", "method": "GET", "type": "application/geo+json"},
                              {"rel": "search", "href": f"{base}search", "method": "POST", "type": "application/geo+json"}],
                })
            elif parts.path == "/search":
                qs = {k: v[0] for k, v in parse_qs(parts.query).items()}
                q: dict[str, Any] = dict(qs)
                if "collections" in qs:
                    q["collections"] = qs["collections"].split(",")
                if "bbox" in qs:
                    q["bbox"] = qs["bbox"].split(",")
                self._search(q)
            else:
                self.send_error(404)

        def do_POST(self) -> None:  # noqa: N802
            if urlsplit(self.path).path != "/search":
                self.send_error(404)
                return
            n = int(self.headers.get("Content-Length") or 0)
            self._search(json.loads(self.rfile.read(n) or b"{}"))

    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    srv.daemon_threads = True
    state["base"] = f"http://127.0.0.1:{srv.server_address[1]}/"
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        yield state["base"]
    finally:
        srv.shutdown()
        srv.server_close()
