"""How a request to the engine fails: the exceptions `Engine.submit` raises, and the Failure
an engine request ends with (its HTTP status, message and code)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .engine import Request


class QueueFull(Exception):
    pass


class Unavailable(Exception):
    """The engine is shutting down or its thread has died: nothing more can be served."""


@dataclass
class Failure:
    status: int  # the HTTP status it maps to
    message: str
    code: str


def expired(req: Request, now: float) -> bool:
    return req.timeout is not None and now - req.submitted > req.timeout


def timed_out(req: Request) -> Failure:
    return Failure(504, f"the request ran past its deadline of {req.timeout:g} s", "timeout")


def internal(e: Exception) -> Failure:
    return Failure(500, f"the engine failed on this request: {type(e).__name__}: {e}", "internal")
