"""Limits that keep one server usable under hostile or broken clients.

- :class:`BytesInFlight`: a bound on the request bytes being read or decoded at once (503 beyond),
  on top of ``--max-body`` per request, so that many large bodies cannot exhaust memory;
- :func:`read_body`: a request body read against both limits; a client that hangs up is a
  :class:`~liedeploy.serving.errors.ClientGone`, not a server error;
- :func:`guarded_protocol`: uvicorn's h11 protocol with a deadline for the request head and one
  for the body (a client that sends half a header or half a body is cut off), and a cap on open
  connections that, when reached, closes the oldest connection that is idle or still sending its
  head, so that slow or idle connections never lock normal clients out.
"""

from __future__ import annotations

import threading
from typing import Optional

from liedeploy.serving.errors import BadRequest, Busy, ClientGone, TooLarge

__all__ = ["BytesInFlight", "read_body", "guarded_protocol", "ConnectionLimits"]


class BytesInFlight:
    """A counter of reserved bytes with a limit; a reservation over it is refused with 503
    (except the first one: a single request up to ``--max-body`` always gets through)."""

    def __init__(self, limit: int):
        self.limit = int(limit)
        self.used = 0
        self._lock = threading.Lock()

    def reserve(self, n: int) -> None:
        with self._lock:
            if self.used and self.used + n > self.limit:
                raise Busy(f"the server is reading {self.used} bytes of requests already (bound {self.limit}); retry")
            self.used += n

    def release(self, n: int) -> None:
        with self._lock:
            self.used = max(0, self.used - n)


async def read_body(request, limit: int, inflight: Optional[BytesInFlight] = None) -> tuple[bytes, int]:
    """``(body, bytes reserved)``: the whole body, at most ``limit`` bytes (413 beyond).

    The bytes stay reserved in ``inflight`` until the caller releases them (after decoding).
    """
    from starlette.requests import ClientDisconnect

    cl = request.headers.get("content-length")
    reserved = 0
    try:
        if cl is not None:
            if not cl.isdigit():
                raise BadRequest(f"Content-Length {cl!r} is not a number")
            if int(cl) > limit:
                raise TooLarge(f"the request body of {int(cl)} bytes is over the limit of {limit} bytes (--max-body)")
            if inflight is not None:
                inflight.reserve(int(cl))
                reserved = int(cl)
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise TooLarge(f"the request body is over the limit of {limit} bytes (--max-body)")
            if inflight is not None and size > reserved:
                inflight.reserve(size - reserved)
                reserved = size
            chunks.append(chunk)
        return b"".join(chunks), reserved
    except ClientDisconnect:
        if inflight is not None:
            inflight.release(reserved)
        raise ClientGone("the client closed the connection before sending its whole request") from None
    except BaseException:
        if inflight is not None:
            inflight.release(reserved)
        raise


class ConnectionLimits:
    """What :func:`guarded_protocol` enforces (seconds and counts; the CLI's defaults)."""

    def __init__(self, max_connections: int = 512, header_timeout: float = 10.0, body_timeout: float = 60.0):
        if max_connections < 1 or header_timeout <= 0 or body_timeout <= 0:
            from liedeploy.errors import ConfigError

            raise ConfigError("--max-connections, --header-timeout and --body-timeout must be positive")
        self.max_connections = int(max_connections)
        self.header_timeout = float(header_timeout)
        self.body_timeout = float(body_timeout)
        self.open: dict = {}  # protocol -> None, in the order connections were made


def guarded_protocol(limits: ConnectionLimits):
    """A uvicorn HTTP protocol class (``uvicorn.Config(http=...)``) enforcing ``limits``."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class GuardedH11Protocol(H11Protocol):
        def connection_made(self, transport):
            super().connection_made(transport)
            self._deadline = None
            self._deadline_kind = None
            limits.open[self] = None
            self._arm("head", limits.header_timeout)
            if len(limits.open) > limits.max_connections:
                victim = next((c for c in limits.open if c is not self and c._idle()), None)
                (victim or self)._cut()

        def connection_lost(self, exc):
            limits.open.pop(self, None)
            self._disarm()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            self._follow()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._disarm()  # uvicorn's keep-alive timer watches the idle connection now

        def _idle(self) -> bool:
            """Not being served: still sending a request head, or idle between requests."""
            return self.conn.their_state is h11.IDLE and (self.cycle is None or self.cycle.response_complete)

        def _follow(self) -> None:
            state = self.conn.their_state
            if state is h11.IDLE:
                if self._deadline_kind != "head":
                    self._arm("head", limits.header_timeout)
            elif state is h11.SEND_BODY:
                if self._deadline_kind != "body":
                    self._arm("body", limits.body_timeout)
            else:
                self._disarm()

        def _arm(self, kind: str, seconds: float) -> None:
            self._disarm()
            self._deadline_kind = kind
            self._deadline = self.loop.call_later(seconds, self._expire)

        def _disarm(self) -> None:
            if getattr(self, "_deadline", None) is not None:
                self._deadline.cancel()
            self._deadline, self._deadline_kind = None, None

        def _expire(self) -> None:
            self._deadline = None
            if self._deadline_kind == "head" and not self._idle():
                return
            self._cut()

        def _cut(self) -> None:
            if not self.transport.is_closing():
                if self.cycle is not None and not self.cycle.response_complete:
                    self.cycle.disconnected = True
                    self.cycle.message_event.set()
                self.transport.close()

    return GuardedH11Protocol
