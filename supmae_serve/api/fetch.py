"""Fetching image URLs, off unless `allow_url_fetch` is set (it lets clients make the server send requests:
server-side request forgery).

When on: http and https only, at most `max_redirects` redirects, a size cap read incrementally, and one
deadline (`timeout_s`) for the whole fetch: resolving, connecting, TLS, every redirect, headers and body (a
server that sends a byte every few seconds is cut off at the deadline, not after each slow read). The host
is resolved first and every address it resolves to is checked, including IPv4 addresses embedded in IPv6
ones (IPv4-mapped and -compatible, 6to4, Teredo, NAT64): loopback, private, link-local (cloud metadata),
multicast, reserved and unspecified addresses are refused unless `allow_private` is set. The connection goes
to the address that was checked (so DNS rebinding cannot swap in another), with TLS still verifying the
host name. Every failure answers the same generic error, so the answers cannot be used to scan ports or map
which names resolve to internal addresses; the reason goes to the server log.
"""

from __future__ import annotations

import http.client
import ipaddress
import logging
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

from supmae_serve.preprocess import ImageError

log = logging.getLogger("supmae.fetch")

FETCH_FAILED = (
    "cannot fetch an image from this URL (unreachable, too slow, not a public address, or not a 200 answer); "
    "send the image itself"
)
_NAT64 = (ipaddress.ip_network("64:ff9b::/96"), ipaddress.ip_network("64:ff9b:1::/48"))
_IPV4_COMPATIBLE = ipaddress.ip_network("::/96")


@dataclass(frozen=True)
class FetchPolicy:
    allow_private: bool = False
    timeout_s: float = 5.0  # the whole fetch, redirects included
    max_bytes: int = 10 * 1024 * 1024
    max_redirects: int = 3


class _Refused(Exception):
    """Why a fetch failed (logged; the client gets FETCH_FAILED)."""


def _addresses(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> list:
    """The address and every IPv4 address embedded in it, each of which a packet may end up at."""
    out = [ip]
    if isinstance(ip, ipaddress.IPv6Address):
        out += [a for a in (ip.ipv4_mapped, ip.sixtofour) if a is not None]
        out += list(ip.teredo or ())
        if ip in _IPV4_COMPATIBLE or any(ip in net for net in _NAT64):
            out.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    return out


def address_allowed(host: str, allow_private: bool) -> bool:
    """Whether an IP address (text) may be fetched from: public, and so is every IPv4 address inside it."""
    ip = ipaddress.ip_address(host.split("%", 1)[0])
    return allow_private or all(a.is_global and not a.is_multicast for a in _addresses(ip))


def _resolve(host: str, port: int, policy: FetchPolicy) -> list[tuple]:
    """getaddrinfo, then every address checked; refused if any is not allowed."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as e:
        raise _Refused(f"cannot resolve {host!r}: {e}") from e
    for *_, sockaddr in infos:
        if not address_allowed(sockaddr[0], policy.allow_private):
            raise _Refused(f"{host!r} resolves to {sockaddr[0]}, a non-public address")
    if not infos:
        raise _Refused(f"{host!r} resolves to no address")
    return infos


def _pinned(conn_cls, infos: list[tuple], deadline: float, kill_at_deadline):
    """The connection class connecting to the checked addresses only (in order), within the deadline."""

    class Pinned(conn_cls):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._create_connection = self._connect_checked  # http.client sets it per instance

        def _connect_checked(self, address, timeout=None, source_address=None):
            last: Exception = _Refused("no address to connect to")
            for family, kind, proto, _, sockaddr in infos:
                sock = socket.socket(family, kind, proto)
                try:
                    sock.settimeout(max(0.001, deadline - time.monotonic()))
                    sock.connect(sockaddr)
                except OSError as e:
                    sock.close()
                    last = e
                    continue
                kill_at_deadline(sock)
                return sock
            raise last

    return Pinned


def _too_large(policy: FetchPolicy) -> ImageError:
    return ImageError(
        f"the URL's image is over the limit of {policy.max_bytes} bytes per image", 413, "image_too_large"
    )


def _get(url: str, policy: FetchPolicy, deadline: float) -> tuple[int, str | None, bytes]:
    """One GET under the deadline -> (status, Location header, body up to max_bytes + 1)."""
    try:
        parts = urlsplit(url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as e:  # a port out of 0..65535 or not a number, a malformed IPv6 literal
        raise ImageError(f"not a valid URL ({e}): {url[:200]!r}", 422, "url_invalid") from e
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ImageError(f"only http and https URLs can be fetched, got {url[:200]!r}", 422, "url_invalid")
    infos = _resolve(parts.hostname, port, policy)
    expired = threading.Event()
    timers: list[threading.Timer] = []

    def kill_at_deadline(sock: socket.socket) -> None:
        def kill():
            expired.set()
            try:
                sock.shutdown(socket.SHUT_RDWR)  # wakes a read blocked anywhere: TLS, headers, body
            except OSError:
                pass

        timer = threading.Timer(max(0.0, deadline - time.monotonic()), kill)
        timer.daemon = True
        timers.append(timer)
        timer.start()

    cls = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    kwargs = {"context": ssl.create_default_context()} if parts.scheme == "https" else {}
    conn = _pinned(cls, infos, deadline, kill_at_deadline)(
        parts.hostname, port, timeout=max(0.001, deadline - time.monotonic()), **kwargs
    )
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    try:
        conn.request("GET", path, headers={"User-Agent": "supmae-serve", "Accept": "image/*"})
        resp = conn.getresponse()
        length = resp.getheader("Content-Length")
        if resp.status == 200 and length and length.isdigit() and int(length) > policy.max_bytes:
            raise _too_large(policy)  # from the header, nothing read
        body = resp.read(policy.max_bytes + 1) if resp.status == 200 else b""
        if expired.is_set():
            raise _Refused(f"no complete answer within {policy.timeout_s:g} s")
        return resp.status, resp.getheader("Location"), body
    except (_Refused, ImageError):
        raise
    except (OSError, http.client.HTTPException, ValueError) as e:
        if expired.is_set():
            raise _Refused(f"no complete answer within {policy.timeout_s:g} s") from e
        raise _Refused(f"{type(e).__name__}: {e}") from e
    finally:
        for timer in timers:
            timer.cancel()
        conn.close()


def fetch_url(url: str, policy: FetchPolicy) -> bytes:
    """GET `url` under `policy` -> the body. Raises ImageError: 422 url_fetch_failed (the one generic answer
    for every network failure or refused address), 422 url_invalid (not an http(s) URL), 413
    image_too_large."""
    deadline = time.monotonic() + policy.timeout_s
    try:
        for _ in range(policy.max_redirects + 1):
            status, location, body = _get(url, policy, deadline)
            if status in (301, 302, 303, 307, 308) and location:
                url = urljoin(url, location)
                continue
            if status != 200:
                raise _Refused(f"HTTP {status}")
            if len(body) > policy.max_bytes:
                raise _too_large(policy)
            return body
        raise _Refused(f"more than {policy.max_redirects} redirects")
    except _Refused as e:
        log.info("URL fetch failed (%s): %s", url[:200], e)
        raise ImageError(FETCH_FAILED, 422, "url_fetch_failed") from None
