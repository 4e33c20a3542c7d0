"""Errors of the serving layer as exception classes, each with its HTTP status and its metrics
outcome: the one place where refusals map to codes (KServe's ``errors.py``). Handlers raise; the
app turns any exception into a response with :func:`to_response_parts`; nothing matches message
text.

A request's own fault is a 4xx; a task that cannot be used is a 503 with ``Retry-After``; a fault of
the server itself is the only 500, and it never names a task.
"""

from __future__ import annotations

from typing import Optional

from liedeploy.errors import LieError, ServingError

__all__ = [
    "ProtocolError",
    "BadRequest",
    "Unauthorized",
    "Forbidden",
    "NotFound",
    "TooLarge",
    "Unavailable",
    "QueueFull",
    "Draining",
    "Busy",
    "ClientGone",
    "to_response_parts",
    "outcome_of",
]


class ProtocolError(ServingError):
    """A request refused with this class's ``status`` and a one-sentence message."""

    status = 400
    outcome = "bad_request"

    def __init__(self, message: str, *, retry_after: Optional[int] = None):
        super().__init__(message)
        self.retry_after = retry_after


class BadRequest(ProtocolError):
    status, outcome = 400, "bad_request"


class Unauthorized(ProtocolError):
    status, outcome = 401, "bad_request"


class Forbidden(ProtocolError):
    status, outcome = 403, "bad_request"


class NotFound(ProtocolError):
    status, outcome = 404, "not_found"


class TooLarge(ProtocolError):
    status, outcome = 413, "too_large"


class Unavailable(ProtocolError):
    """503 with ``Retry-After`` (1 s unless said otherwise)."""

    status, outcome = 503, "unavailable"

    def __init__(self, message: str, *, retry_after: Optional[int] = 1):
        super().__init__(message, retry_after=retry_after)


class QueueFull(Unavailable):
    outcome = "queue_full"


class Busy(Unavailable):
    """Too many request bytes are being read or decoded at once (the bytes-in-flight bound)."""

    outcome = "queue_full"


class Draining(Unavailable):
    outcome = "draining"


class ClientGone(ProtocolError):
    """The client hung up before its request was read: nobody to answer (counted, not an error)."""

    status, outcome = 499, "client_abort"


def outcome_of(exc: BaseException) -> str:
    """The ``liedeploy_requests{outcome=...}`` label of an exception."""
    if isinstance(exc, ProtocolError):
        return exc.outcome
    if isinstance(exc, LieError):
        return "unavailable"
    return "error"


def to_response_parts(exc: BaseException) -> tuple[int, dict, Optional[dict]]:
    """``(status, JSON body, headers)`` for an exception: its class decides the status."""
    if isinstance(exc, ProtocolError):
        headers = {"Retry-After": str(exc.retry_after)} if exc.retry_after is not None else None
        return exc.status, {"error": str(exc)}, headers
    return 500, {"error": f"internal error: {type(exc).__name__}"}, None
