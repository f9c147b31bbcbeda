"""Serving an ASGI app from inside the daemon's event loop, with bounds on what clients hold.

uvicorn runs as a task of the current loop (the daemon owns the signals); the
socket is bound here, and connections, request time and header size are
bounded, so that idle or hostile clients cannot use up the descriptors the
ledger, the watcher and SMTP need.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import resource
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import uvicorn
from starlette.types import ASGIApp
from uvicorn.protocols.http.h11_impl import H11Protocol

from invite_mailer.errors import InviteMailerError

__all__ = [
    "MAX_CONNECTIONS",
    "MAX_HEADER_BYTES",
    "REQUEST_SECONDS",
    "RunningServer",
    "connection_limit",
    "start_server",
]

# The unsubscribe endpoint is the one server; its records keep the endpoint's name.
log = logging.getLogger("invite_mailer.service.web")

MAX_HEADER_BYTES = 8 * 1024
"""Request line and headers together; a client sending more is cut off (h11)."""

MAX_CONNECTIONS = 100
"""Open connections at once; more are closed as soon as they are accepted."""

REQUEST_SECONDS = 10.0
"""A connection must send a complete request within this time (slow clients)."""

KEEP_ALIVE_SECONDS = 5
"""An idle connection between two requests is closed after this time."""

STOP_SECONDS = 10.0
"""How long :meth:`RunningServer.stop` waits for requests in progress."""


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling: the daemon owns SIGTERM/SIGINT."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def connection_limit() -> int:
    """:data:`MAX_CONNECTIONS`, or a quarter of the descriptors still free.

    The listen backlog is as large, so at most half the free descriptors go
    to HTTP clients; the rest are for the ledger, the file watcher, SMTP
    connections and config files, which idle clients must never use up.
    Counted from what is free, not from the limit: the process already holds
    its libraries, the ledger and the watcher when the server starts.
    """
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return MAX_CONNECTIONS
    return max(4, min(MAX_CONNECTIONS, (soft - _open_descriptors()) // 4))


def _open_descriptors() -> int:
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:  # no /proc: assume a modest start-up use
        return 64


class _BoundedProtocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol with a bound on connections and on request time.

    uvicorn times out idle keep-alive connections only after a first
    response: a client that connects and sends nothing, or drips a request
    byte by byte (slowloris), would hold its descriptor for ever. Here every
    request must be complete within :data:`REQUEST_SECONDS`, and connections
    beyond the limit are closed at once instead of waiting for descriptors
    to run out.
    """

    limit = MAX_CONNECTIONS
    request_seconds = REQUEST_SECONDS
    _deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.limit:
            log.warning(
                "unsubscribe endpoint: more than %d connections at once; closing new ones",
                self.limit,
            )
            transport.abort()
            return
        self._arm()

    def _arm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        self._deadline = self.loop.call_later(self.request_seconds, self._too_slow)

    def _too_slow(self) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        if self.cycle is not None and not self.cycle.response_complete and not self.cycle.more_body:
            # The request is complete and the app is answering: not the client's fault.
            self._arm()
            return
        self.transport.close()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm()  # the next request on this connection gets the same time

    def connection_lost(self, exc: Exception | None) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        super().connection_lost(exc)


@dataclass
class RunningServer:
    """An HTTP server running as a task of the current event loop."""

    server: uvicorn.Server
    task: asyncio.Task[None]
    host: str
    port: int

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    async def stop(self) -> None:
        """Stop accepting, let running requests finish (up to 10 s), close."""
        self.server.should_exit = True
        try:
            async with asyncio.timeout(STOP_SECONDS):
                await asyncio.shield(self.task)
        except TimeoutError:
            self.server.force_exit = True
            await self.task


def _bind(host: str, port: int) -> socket.socket:
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, kind, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address)
        except BaseException:
            sock.close()
            raise
    except OSError as exc:
        raise InviteMailerError(
            f"cannot listen on {host}:{port} for the unsubscribe endpoint: "
            f"{exc.strerror or exc}; set unsubscribe.bind_host / bind_port "
            "(INVITE_MAILER_UNSUBSCRIBE__BIND_PORT) to a free address"
        ) from None
    sock.set_inheritable(True)
    return sock


async def start_server(
    app: ASGIApp,
    host: str,
    port: int,
    *,
    max_connections: int | None = None,
    request_seconds: float = REQUEST_SECONDS,
) -> RunningServer:
    """Serve *app* on *host*:*port* (0 = any free port) until :meth:`RunningServer.stop`.

    Returns once the socket listens. The socket is bound here rather than by
    uvicorn, which would exit the whole process when the port is taken.
    *max_connections* (default: :func:`connection_limit`) and
    *request_seconds* bound what clients can hold, see :class:`_BoundedProtocol`.
    """
    sock = _bind(host, port)
    limit = max_connections or connection_limit()
    protocol: Any = type(
        "BoundedProtocol",
        (_BoundedProtocol,),
        {"limit": limit, "request_seconds": request_seconds},
    )
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        lifespan="off",
        log_level="warning",
        # uvicorn's own logging set-up would replace the application's format.
        log_config=None,
        # The path holds the token, and the token the address: never logged.
        access_log=False,
        server_header=False,
        http=protocol,
        limit_concurrency=limit,
        timeout_keep_alive=KEEP_ALIVE_SECONDS,
        h11_max_incomplete_event_size=MAX_HEADER_BYTES,
        # asyncio accepts up to a backlog's worth of connections in one go,
        # before any of them can be refused: this bounds that burst too.
        backlog=limit,
    )
    server = _Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]), name="unsubscribe-endpoint")
    while not server.started:
        if task.done():
            sock.close()
            task.result()  # raises what stopped it
            raise InviteMailerError("the unsubscribe endpoint stopped while starting")
        await asyncio.sleep(0.01)
    return RunningServer(server, task, host, int(sock.getsockname()[1]))
