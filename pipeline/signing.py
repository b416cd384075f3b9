"""URL signing for providers whose COG hrefs need a token (Planetary Computer SAS).

Planetary Computer tokens expire after about 45 minutes (PlanetaryComputer#388) and have
been issued already expired (PlanetaryComputer#463), so hrefs are signed just before each
read, from a token cached until shortly before its stated expiry. Tokens never reach logs
or manifests: only unsigned hrefs are stored, the token endpoint is named by its host alone
(its URL may carry a subscription key or credentials), and an error fetching a token says
which host failed without quoting the URL. `pipeline.redact` masks what third-party code logs.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
from collections.abc import Callable
from urllib.parse import urlsplit, urlunsplit

import requests

from pipeline.redact import redact

log = logging.getLogger(__name__)

_REFRESH_MARGIN = dt.timedelta(minutes=5)


class TokenSigner:
    """Append a SAS token from `token_url` to hrefs; thread-safe, refreshes before expiry."""

    def __init__(self, token_url: str, *, timeout: float = 30.0) -> None:
        self.token_url = token_url
        self.timeout = timeout
        self._token: str | None = None
        self._expiry: dt.datetime | None = None
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, object]:
        # Dask pickles the read tasks (and this signer with them) to send them to workers;
        # a lock does not pickle, and each worker needs only its own
        state = dict(self.__dict__)
        state.pop("_lock")
        return state

    def __setstate__(self, state: dict[str, object]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def _fetch(self) -> None:
        try:
            r = requests.get(self.token_url, timeout=self.timeout)
            r.raise_for_status()
        except requests.RequestException as e:
            # requests quotes the whole URL ("403 ... for url: https://...?subscription-key=..."),
            # and this message travels into failure reasons and the manifest: same type, masked text
            raise type(e)(f"token request to {_host(self.token_url)} failed: {redact(str(e))}",
                          request=e.request, response=e.response) from None
        body = r.json()
        self._token = str(body["token"]).lstrip("?")
        exp = body.get("msft:expiry")
        self._expiry = (
            dt.datetime.fromisoformat(str(exp).replace("Z", "+00:00"))
            if exp
            else dt.datetime.now(dt.timezone.utc) + dt.timedelta(minutes=30)
        )
        log.info("signing token from %s valid until %s", _host(self.token_url), self._expiry.isoformat())

    def token(self, *, force: bool = False) -> str:
        with self._lock:
            now = dt.datetime.now(dt.timezone.utc)
            if force or self._token is None or self._expiry is None or self._expiry - now < _REFRESH_MARGIN:
                self._fetch()
            assert self._token is not None
            return self._token

    def sign(self, href: str, *, force: bool = False) -> str:
        """`href` with the current token as its query (an existing query is replaced)."""
        if not href.startswith(("http://", "https://")):
            return href
        parts = urlsplit(href)
        return urlunsplit((parts.scheme, parts.netloc, parts.path, self.token(force=force), parts.fragment))


def make_patch_url(sign: str, token_url: str | None) -> Callable[[str], str] | None:
    """The href rewriter for a source's `sign` mode (None when hrefs are read as they are)."""
    if sign == "none":
        return None
    if sign == "planetary_computer":
        if not token_url:
            raise ValueError("planetary_computer signing needs a token_url in catalogs/sources.yaml")
        return TokenSigner(token_url).sign
    raise ValueError(f"unknown signing mode {sign!r} in catalogs/sources.yaml")


def strip_query(href: str) -> str:
    """An href without its query string and without credentials (`user:pass@`): what may be logged or stored."""
    parts = urlsplit(href)
    netloc = parts.netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, netloc, parts.path, "", parts.fragment))


def _host(url: str) -> str:
    """`host[:port]` of `url`, without credentials: how the token endpoint is named in messages."""
    return urlsplit(url).netloc.rpartition("@")[2] or "?"
