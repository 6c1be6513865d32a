"""What one client can hold on to: a connection without a request, a request without its body, body bytes.

uvicorn bounds neither the time a request head may take to arrive (its keep-alive timeout starts only after
a response) nor the time a body may take, and reads bodies before anything can refuse them. So:

- `HeaderTimeoutProtocol`: uvicorn's own HTTP protocol (httptools, or h11 where httptools is missing) that
  closes a connection whose request head has not arrived `header_timeout_s` after the connection opened or
  the previous response ended: idle connections and slowloris clients dripping header bytes.
- `ClientLimits` (ASGI middleware): a request body must arrive within `body_timeout_s` of the request head
  (a client that drips or stalls gets 408 and the connection closes), and the bodies being received or held
  by requests in progress are bounded by `max_bytes_in_flight`: each request reserves its Content-Length (a
  chunked body: `max_request_bytes`) before a byte of it is read, and a request that does not fit gets 503
  with Retry-After at once. The reservation is released when the request ends.

Both sit below anything a reverse proxy does (docs/deployment.md, "Security").
"""

from __future__ import annotations

import asyncio
import json
import logging

from uvicorn.protocols.http.auto import AutoHTTPProtocol

log = logging.getLogger("supmae.limits")


class HeaderTimeoutProtocol(AutoHTTPProtocol):
    """uvicorn's HTTP protocol plus a deadline for each request head (pass it to uvicorn as
    `http=functools.partial(HeaderTimeoutProtocol, header_timeout_s=...)`)."""

    def __init__(self, *args, header_timeout_s: float = 10.0, **kwargs):
        super().__init__(*args, **kwargs)
        self._header_timeout_s = header_timeout_s
        self._header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._arm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm()  # the next request's head (uvicorn's keep-alive timeout may close it sooner)

    def connection_lost(self, exc) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _arm(self) -> None:
        self._disarm()
        if not self.transport.is_closing():
            self._header_timer = self.loop.call_later(self._header_timeout_s, self._expire, self.cycle)

    def _expire(self, cycle) -> None:
        # a request head has arrived since arming iff the protocol has a new cycle (one per request head);
        # a cycle still answering (a pipelined request) is not idle either
        self._header_timer = None
        idle = self.cycle is cycle and (cycle is None or cycle.response_complete)
        if idle and not self.transport.is_closing():
            log.debug("closing a connection without a request head after %.1f s", self._header_timeout_s)
            self.transport.close()


def _error(status: int, code: str, message: str, headers: dict[str, str]) -> tuple[dict, dict]:
    body = json.dumps({"error": {"status": status, "code": code, "message": message}}).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in headers.items()]
    start = {"type": "http.response.start", "status": status, "headers": raw}
    return start, {"type": "http.response.body", "body": body, "more_body": False}


class ClientLimits:
    """Pure ASGI middleware: a deadline for each request body and a bound on body bytes in flight."""

    def __init__(self, app, max_bytes_in_flight: int, max_request_bytes: int, body_timeout_s: float):
        self.app = app
        self.max_bytes_in_flight = max_bytes_in_flight
        self.max_request_bytes = max_request_bytes
        self.body_timeout_s = body_timeout_s
        self.in_flight = 0  # bytes reserved by requests in progress (one event loop: no lock needed)

    def _reservation(self, scope) -> int:
        length, chunked = None, False
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                length = int(value) if value.isdigit() else self.max_request_bytes
            elif name == b"transfer-encoding" and b"chunked" in value.lower():
                chunked = True
        if length is None:
            return self.max_request_bytes if chunked else 0
        return min(length, self.max_request_bytes)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        reserve = self._reservation(scope)
        if reserve and self.in_flight + reserve > self.max_bytes_in_flight:
            start, body = _error(
                503,
                "too_many_bytes_in_flight",
                f"the server is receiving or holding {self.in_flight} bytes of request bodies and this one "
                f"declares {reserve} more; the limit is {self.max_bytes_in_flight} bytes: retry shortly",
                {"Retry-After": "1", "Connection": "close"},  # the body is never read: no reuse
            )
            await send(start)
            await send(body)
            return
        self.in_flight += reserve
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.body_timeout_s
        state = {"body_done": reserve == 0, "timed_out": False, "started": False}

        async def send_tracked(message):
            if state["timed_out"]:
                return  # the 408 has been sent: the app's own answer is dropped
            if message["type"] == "http.response.start":
                state["started"] = True
            await send(message)

        async def receive_limited():
            if state["body_done"] or state["timed_out"]:
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(deadline - loop.time(), 0.0))
            except asyncio.TimeoutError:
                state["timed_out"] = True
                if not state["started"]:
                    start, body = _error(
                        408,
                        "body_timeout",
                        f"the request body did not arrive within {self.body_timeout_s:g} s",
                        {"Connection": "close"},
                    )
                    await send(start)
                    await send(body)
                return {"type": "http.disconnect"}
            if message["type"] != "http.request" or not message.get("more_body", False):
                state["body_done"] = True
            return message

        try:
            await self.app(scope, receive_limited, send_tracked)
        except Exception:
            if not state["timed_out"]:
                raise  # the app stopped reading a body we cut off: nothing more to say
        finally:
            self.in_flight -= reserve
