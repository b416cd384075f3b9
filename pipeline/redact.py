"""Secrets out of logs: one filter that masks signed URLs, SAS tokens and URL credentials.

What it removes from every log record (message, arguments, traceback text, stack text):

- credentials in URLs: `https://user:pass@host/...` -> `https://***@host/...`;
- the query string of a URL that carries a signature or a token (a Planetary Computer SAS
  token `?st=...&se=...&sig=...`, an S3 presigned URL `?X-Amz-Credential=...&X-Amz-Signature=...`,
  `?token=...`): `https://host/a.tif?<redacted>` (the path stays, so the log still says which file);
- the same parameters outside a URL (a SAS token on its own, `sig=...`, `token=...`):
  `sig=<redacted>`;
- `Bearer ...` / `Basic ...` authorization values.

Why a filter on records and not care at each call site: the secrets reach logs through
third-party code we do not control (GDAL/rasterio error messages quote the signed URL they
failed to open, urllib3 logs retried URLs, distributed logs task errors, warnings quote
paths), at every verbosity. `install()` therefore redacts in three places, so no route is
missed:

1. a filter on every handler that exists (the root logger's, and handlers that libraries
   such as distributed attach to their own non-propagating loggers);
2. the log record factory, so records reaching handlers added later (distributed attaches
   its handler when it is first imported, after the CLI has started) are redacted when made;
3. `warnings` are routed through logging (`logging.captureWarnings`), so they pass through 1 and 2.

    from pipeline.redact import install_redaction
    logging.basicConfig(...)
    install_redaction()          # right after the CLI configured logging

Redaction is idempotent and leaves a record untouched (same `msg` and `args`) when it holds
nothing to mask.
"""

from __future__ import annotations

import logging
import re
from typing import Any

REDACTED = "<redacted>"

# Query parameters whose value is (part of) a credential. Planetary Computer SAS tokens are
# Azure service SAS: `sig` is the secret, `skoid`/`sktid`/`skt`/`ske`/`sks`/`skv` describe the
# signing key (user delegation); S3 presigned URLs carry X-Amz-Credential/Signature/Security-Token;
# Google signed URLs X-Goog-Signature/Credential.
_SECRET_KEYS = (
    "sig", "signature", "skoid", "sktid", "skt", "ske", "sks", "skv",
    "x-amz-signature", "x-amz-credential", "x-amz-security-token",
    "x-goog-signature", "x-goog-credential",
    "token", "access_token", "id_token", "refresh_token", "sas_token", "api_key", "apikey",
    "password", "passwd", "secret", "client_secret",
    "subscription-key", "subscription_key", "ocp-apim-subscription-key",  # Planetary Computer API keys
)
# in a URL's query these also mark it as signed (an API key, an OAuth code); outside a URL
# they are too common in ordinary messages ("exit code=2") to be masked
_QUERY_ONLY_KEYS = ("key", "code", "auth")


def _alternatives(keys: tuple[str, ...]) -> str:
    return "|".join(re.escape(k) for k in sorted(keys, key=len, reverse=True))

# scheme://userinfo@ : userinfo cannot hold '/', so a path with an '@' is not taken for credentials
_USERINFO = re.compile(r"(?P<scheme>\b[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<userinfo>[^/\s@?#'\"<>]+)@")
# a URL with a query string: the query ends at whitespace, quotes, brackets or a fragment
_URL_QUERY = re.compile(r"(?P<head>\b[a-zA-Z][a-zA-Z0-9+.-]*://[^\s?#'\"<>]*)\?(?P<query>[^\s#'\"<>]*)")
_SECRET_IN_QUERY = re.compile(rf"(?i)(?:^|[&;])(?:{_alternatives(_SECRET_KEYS + _QUERY_ONLY_KEYS)})(?:=|%3D)")
# a bare query string of several parameters (a SAS token on its own: st=...&se=...&sig=...)
_PARAM_RUN = re.compile(r"(?<![\w.%/&=-])[A-Za-z][\w.-]*=[^&\s'\"<>]*(?:&[A-Za-z][\w.-]*=[^&\s'\"<>]*)+")
# key=value anywhere else (a bare SAS token, `token=...` in a message), also percent-encoded `=`
_BARE = re.compile(rf"(?i)(?<![\w.-])(?P<key>{_alternatives(_SECRET_KEYS)})(?P<eq>=|%3D)(?P<value>[^&\s'\"<>,;)\]}}]+)")
_AUTH = re.compile(r"(?i)\b(?P<kind>bearer|basic)\s+(?P<value>[A-Za-z0-9._~+/=-]{8,})")


def _mask_query(m: re.Match[str]) -> str:
    if _SECRET_IN_QUERY.search(m["query"]):
        return f"{m['head']}?{REDACTED}"
    return m[0]


def _mask_run(m: re.Match[str]) -> str:
    return REDACTED if _SECRET_IN_QUERY.search(m[0]) else m[0]


def redact(text: str) -> str:
    """`text` with URL credentials, signed query strings and token values masked."""
    if not text:
        return text
    out = _USERINFO.sub(r"\g<scheme>***@", text)
    out = _URL_QUERY.sub(_mask_query, out)
    out = _PARAM_RUN.sub(_mask_run, out)
    out = _BARE.sub(rf"\g<key>\g<eq>{REDACTED}", out)
    return _AUTH.sub(rf"\g<kind> {REDACTED}", out)


def redact_record(record: logging.LogRecord) -> logging.LogRecord:
    """Mask secrets in `record` in place (message with its arguments, traceback and stack text).

    The message is formatted with its arguments first, because a secret is usually in an
    argument (`log.warning("cannot read %s", signed_url)`); a record is changed only when
    something was masked, and only once.
    """
    done = getattr(record, "_redacted", None)
    # identity, not a flag: `logging.makeLogRecord` (distributed forwards worker logs with it)
    # fills a record made by the factory with another message afterwards
    if done is not None and done[0] is record.msg and done[1] is record.args:
        return record
    try:
        msg = record.getMessage()
    except Exception:  # arguments that do not fit the format: logging reports it; keep secrets out of that report
        msg = f"{record.msg} {record.args!r}"
    clean = redact(msg)
    if clean != msg:
        record.msg, record.args = clean, ()
    if record.exc_info and not record.exc_text:
        # formatted here (as logging.Formatter would) so every handler prints the masked text
        text = logging.Formatter().formatException(record.exc_info)
        clean = redact(text)
        if clean != text:
            record.exc_text = clean
    elif record.exc_text:
        record.exc_text = redact(record.exc_text)
    if record.stack_info:
        record.stack_info = redact(record.stack_info)
    record._redacted = (record.msg, record.args)  # type: ignore[attr-defined]
    return record


class RedactFilter(logging.Filter):
    """A handler filter that masks secrets in every record it sees and drops none."""

    def filter(self, record: logging.LogRecord) -> bool:
        redact_record(record)
        return True


#: The one filter instance `install_redaction` attaches (so it is attached at most once per handler).
FILTER = RedactFilter()


def _all_handlers() -> list[logging.Handler]:
    loggers: list[logging.Logger] = [logging.getLogger()]
    loggers += [lg for lg in list(logging.Logger.manager.loggerDict.values()) if isinstance(lg, logging.Logger)]
    return [h for lg in loggers for h in lg.handlers]


def install_redaction() -> None:
    """Redact every log record of this process from now on: ours and third-party ones.

    Call it after logging is configured (`logging.basicConfig`), at the start of each CLI.
    Safe to call more than once.
    """
    logging.captureWarnings(True)  # warnings shown through logging ("py.warnings"), hence redacted too
    for handler in _all_handlers():
        if FILTER not in handler.filters:
            handler.addFilter(FILTER)
    factory = logging.getLogRecordFactory()
    if not getattr(factory, "_redacts", False):
        def make_record(*args: Any, **kwargs: Any) -> logging.LogRecord:
            return redact_record(factory(*args, **kwargs))

        make_record._redacts = True  # type: ignore[attr-defined]
        logging.setLogRecordFactory(make_record)

