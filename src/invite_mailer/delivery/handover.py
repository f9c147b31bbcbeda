"""Whether a message's bytes have begun to leave this machine.

From that moment on a mail may arrive, so a send stopped afterwards is
uncertain; a send stopped before it is simply not sent yet. The transports
mark the moment, the dispatcher reads it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

__all__ = ["Handover", "check_fence", "mark_handover", "track_handover"]


class Handover:
    """Whether a message's bytes have begun to leave: from then on it may arrive.

    Before that moment (waiting for a connection or a rate-limit slot,
    connecting, TLS, login, MAIL, RCPT, a local error) nothing can have been
    delivered, so a mail stopped there is simply not sent yet.
    """

    __slots__ = ("fence", "started")

    def __init__(self, fence: Callable[[], None] | None = None) -> None:
        self.started = False
        # Raises when the mail may no longer go out (several nodes: its lease).
        self.fence = fence


# The transports mark the handover of the send running in the current task;
# a context variable, so that everything between the dispatcher and the socket
# (or the outbox file) need not pass it along.
_handover: ContextVar[Handover | None] = ContextVar("invite_mailer_handover", default=None)


@contextmanager
def track_handover(fence: Callable[[], None] | None = None) -> Iterator[Handover]:
    """Watch whether the sends made inside the block hand any bytes over; *fence*
    is asked by the transport just before they would (see :func:`check_fence`)."""
    handover = Handover(fence)
    token = _handover.set(handover)
    try:
        yield handover
    finally:
        _handover.reset(token)


def mark_handover() -> None:
    """Called by a transport the moment a message's bytes start to leave."""
    handover = _handover.get()
    if handover is not None:
        handover.started = True


def check_fence() -> None:
    """Called by a transport after its last wait, just before the bytes leave."""
    handover = _handover.get()
    if handover is not None and handover.fence is not None:
        handover.fence()
