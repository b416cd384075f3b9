"""A SAS token endpoint on 127.0.0.1, shaped like Planetary Computer's (`token`, `msft:expiry`)."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterator
from contextlib import contextmanager

from tests.helpers.loopback import serve_get


@contextmanager
def token_endpoint(*, first_expired: bool = False, prefix: str = "sig=secret-") -> Iterator[tuple[str, list[str]]]:
    """Yield (token URL, tokens issued so far). Token n is `<prefix>n`, valid for an hour;
    with `first_expired`, token 1 is issued already expired (as seen in PlanetaryComputer#463)."""
    issued: list[str] = []

    def respond(_path: str) -> tuple[bytes, str]:
        tok = f"{prefix}{len(issued) + 1}"
        delta = dt.timedelta(minutes=-1) if first_expired and not issued else dt.timedelta(hours=1)
        issued.append(tok)
        exp = (dt.datetime.now(dt.timezone.utc) + delta).strftime("%Y-%m-%dT%H:%M:%SZ")
        return json.dumps({"msft:expiry": exp, "token": tok}).encode(), "application/json"

    with serve_get(respond) as url:
        yield f"{url}/api/sas/v1/token/sentinel-2-l2a", issued
