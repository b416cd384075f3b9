"""Planetary-Computer-style SAS signing against a real token endpoint on loopback."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from pipeline.signing import TokenSigner, make_patch_url, strip_query
from tests.helpers.tokens import token_endpoint


@pytest.fixture
def token_server() -> Iterator[tuple[str, list[str]]]:
    with token_endpoint(first_expired=True, prefix="sv=2024&sig=secret") as t:
        yield t


def test_expired_token_is_renewed_not_fatal(token_server: tuple[str, list[str]]) -> None:
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


def test_local_paths_are_not_signed(token_server: tuple[str, list[str]]) -> None:
    url, issued = token_server
    sign = make_patch_url("planetary_computer", url)
    assert sign is not None and sign("file:///data/B04.tif") == "file:///data/B04.tif" and not issued
    assert make_patch_url("none", None) is None


def test_signer_pickles_for_dask_workers(token_server: tuple[str, list[str]]) -> None:
    import pickle

    url, issued = token_server
    s = TokenSigner(url)
    s.sign("https://example.blob.core.windows.net/c/B04.tif")
    s.sign("https://example.blob.core.windows.net/c/B04.tif")  # token 2 (token 1 was issued expired)
    copy = pickle.loads(pickle.dumps(s))
    assert copy.sign("https://x.example/B02.tif").endswith("secret2") and len(issued) == 2
