"""Fetching image URLs, off unless `allow_url_fetch` is set (it lets clients make the server send requests:
server-side request forgery).

When on: http and https only, at most `max_redirects` redirects (each target checked again), a timeout, a size
cap read incrementally, and the address actually connected to is checked after connecting (so DNS rebinding
cannot slip a private address past a check made earlier): loopback, private, link-local (cloud metadata),
multicast, reserved and unspecified addresses are refused unless `allow_private` is set.
"""

from __future__ import annotations

import http.client
import ipaddress
import ssl
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

from supmae_serve.preprocess import ImageError


@dataclass(frozen=True)
class FetchPolicy:
    allow_private: bool = False
    timeout_s: float = 5.0
    max_bytes: int = 10 * 1024 * 1024
    max_redirects: int = 3


def address_allowed(host: str, allow_private: bool) -> bool:
    ip = ipaddress.ip_address(host.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return allow_private or ip.is_global


def _checked(conn_cls, allow_private: bool):
    """The connection class with its socket factory wrapped: the peer address is checked right after the TCP
    connect, before TLS or any request byte."""

    class Checked(conn_cls):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            create = self._create_connection
            host = self.host

            def create_checked(*a, **kw):
                sock = create(*a, **kw)
                peer = sock.getpeername()[0]
                if not address_allowed(peer, allow_private):
                    sock.close()
                    raise ImageError(
                        f"URL host {host} resolves to {peer}, a non-public address; fetching it is not allowed",
                        422,
                        "url_blocked",
                    )
                return sock

            self._create_connection = create_checked

    return Checked


def fetch_url(url: str, policy: FetchPolicy) -> bytes:
    """GET `url` under `policy`; raises ImageError (422 url_blocked / url_fetch_failed, 413 image_too_large)."""
    for _ in range(policy.max_redirects + 1):
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ImageError(
                f"only http and https URLs can be fetched, got {url[:200]!r}", 422, "url_invalid"
            )
        cls = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        kwargs = {"context": ssl.create_default_context()} if parts.scheme == "https" else {}
        conn = _checked(cls, policy.allow_private)(
            parts.hostname, parts.port, timeout=policy.timeout_s, **kwargs
        )
        path = parts.path or "/"
        if parts.query:
            path += "?" + parts.query
        try:
            conn.request("GET", path, headers={"User-Agent": "supmae-serve", "Accept": "image/*"})
            resp = conn.getresponse()
            if resp.status in (301, 302, 303, 307, 308) and resp.getheader("Location"):
                url = urljoin(url, resp.getheader("Location"))
                continue
            if resp.status != 200:
                raise ImageError(f"fetching the URL gave HTTP {resp.status}", 422, "url_fetch_failed")
            length = resp.getheader("Content-Length")
            if length and length.isdigit() and int(length) > policy.max_bytes:
                raise ImageError(
                    f"the URL's image is {length} bytes; the limit is {policy.max_bytes} bytes per image",
                    413,
                    "image_too_large",
                )
            data = resp.read(policy.max_bytes + 1)
            if len(data) > policy.max_bytes:
                raise ImageError(
                    f"the URL's image is over the limit of {policy.max_bytes} bytes per image",
                    413,
                    "image_too_large",
                )
            return data
        except ImageError:
            raise
        except (OSError, http.client.HTTPException, ValueError) as e:
            raise ImageError(f"cannot fetch the URL: {e}", 422, "url_fetch_failed") from e
        finally:
            conn.close()
    raise ImageError(f"more than {policy.max_redirects} redirects", 422, "url_fetch_failed")
