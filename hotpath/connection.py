"""One auto-pipelined Redis connection for the hot path's script calls.

Every command issued during one turn of the event loop is written to the socket in
one `write` (one per `flush_at` commands), and the replies, which Redis sends back in
order, are parsed by hiredis and handed to the waiting callers in the same order.
Fifty concurrent requests cost a few system calls each way instead of fifty, and there
is no pool, no lock and no per-call retry or timeout wrapper on the way.

Why not a library: redis-py (5.x and 6.x) has no auto-pipelining: each command takes a
pooled connection, writes, and waits for its own reply. coredis 6 runs on anyio and
requires context-managed clients; valkey-glide's asyncio client hands every command
to its Rust core. Measured on this 2-core machine, 50 concurrent callers each looping
FCALL of a trivial function with the hot path's 11 keys and 16 arguments (uvloop;
Python CPU per call, which is what the sidecar runs out of):

    redis-py 5.3.1 (pool)    104 us    8.2k calls/s
    coredis 6.9.0            144 us    5.2k calls/s
    valkey-glide 2.6.0        87 us   12.1k calls/s   (plus its Rust thread)
    this module                7 us   62.7k calls/s

redis-py stays the client for everything else.

Guarantees:
- A command that may have reached Redis is never sent twice, and a caller is always
  told which of the two it was: when the connection drops, every command written and
  not yet answered fails with `ReplyLost` (it may have run, or may still run: Redis
  executes what it has read even after the client left), every command not yet
  written with `NotSent` (a `ConnectionError`: it never ran).
- No reply for `timeout_s` while commands are waiting: the connection is presumed
  hung, every waiting command fails with `ReplyTimeout` (a `ReplyLost` and a
  `TimeoutError`) and the connection is closed (a reply that came later could not be
  matched to its caller).
- At most `pending_max` commands wait at once; past that a call fails at once with
  `ConnectionError` (back-pressure instead of an unbounded queue).
- A lost connection is re-opened by the next command, never in the background.
- A caller that is cancelled while waiting does not disturb the order: its reply is
  read and dropped.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ssl
import time
from collections.abc import Iterable, Sequence
from typing import Any

import hiredis
from redis.asyncio.connection import parse_url
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

__all__ = [
    "NotSent",
    "PipelinedRedis",
    "RedisConnectionError",
    "RedisTimeoutError",
    "ReplyLost",
    "ReplyTimeout",
    "ResponseError",
]


class NotSent(RedisConnectionError):
    """The command was never written to Redis: it did not run."""


class ReplyLost(RedisConnectionError):
    """The command was written and its reply never came: it may have run."""


class ReplyTimeout(ReplyLost, RedisTimeoutError):
    """No reply within the timeout: the command was written and may have run."""


# Commands queued in one loop turn beyond this go out at once, not at the end of the
# turn: Redis starts on them while the sidecar is still handling the turn's other
# requests (with one write per turn, the two took turns and the sidecar idled ~15% of
# the time waiting for Redis). Each write costs ~20 us of the sidecar's CPU on TCP
# loopback. Measured on /use at 50 connections: 4 to 16 keep the sidecar at ~99% CPU,
# 16 with the least CPU per request (94 us vs 97 us at 8); at 32 it idles again (90%).
FLUSH_AT = 16
PENDING_MAX = 16_384  # commands waiting at once (written or not), per connection
TIMEOUT_S = 5.0  # longest wait for the next reply while commands are waiting
CONNECT_TIMEOUT_S = 5.0
WATCHDOG_TICKS_PER_TIMEOUT = 4  # how often, per timeout, the watchdog looks

_NOT_ENOUGH_DATA = object()
_pack_command = hiredis.pack_command


def pack_command(args: tuple[Any, ...]) -> bytes:
    """One command in RESP (hiredis, in C): str, bytes, int and float arguments."""
    packed: bytes = _pack_command(args)
    return packed


_ASKING = b"*1\r\n$6\r\nASKING\r\n"


def _consume_outcome(future: asyncio.Future[Any]) -> None:
    """Mark a reply nobody waits for (ASKING's) as seen."""
    if not future.cancelled():
        future.exception()


def _fail(futures: Iterable[asyncio.Future[Any]], exc: Exception) -> None:
    """Each waiting caller gets its own exception object (tracebacks stay apart)."""
    for future in futures:
        if not future.done():
            future.set_exception(type(exc)(*exc.args))


class _Protocol(asyncio.Protocol):
    """Socket events of one connection, forwarded to its PipelinedRedis."""

    def __init__(self, owner: PipelinedRedis) -> None:
        self.owner = owner
        self.reader = hiredis.Reader(replyError=ResponseError, notEnoughData=_NOT_ENOUGH_DATA)

    def data_received(self, data: bytes) -> None:
        self.owner._received(self, data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.owner._lost(self, exc)


class PipelinedRedis:
    """Commands in, replies out, in order, over one connection (see the module doc)."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 6379,
        *,
        path: str | None = None,
        db: int = 0,
        username: str | None = None,
        password: str | None = None,
        ssl_context: ssl.SSLContext | None = None,
        timeout_s: float = TIMEOUT_S,
        connect_timeout_s: float = CONNECT_TIMEOUT_S,
        pending_max: int = PENDING_MAX,
        flush_at: int = FLUSH_AT,
    ) -> None:
        if pending_max < 1 or flush_at < 1 or timeout_s <= 0 or connect_timeout_s <= 0:
            raise ValueError("pending_max, flush_at, timeout_s and connect_timeout_s must be positive")
        self.host = host
        self.port = port
        self.path = path
        self.db = db
        self.username = username
        self.password = password
        self.ssl_context = ssl_context
        self.timeout_s = timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.pending_max = pending_max
        self.flush_at = flush_at
        self._loop: asyncio.AbstractEventLoop | None = None  # the connection's
        self._transport: asyncio.Transport | None = None
        self._protocol: _Protocol | None = None
        self._connecting: asyncio.Task[None] | None = None
        self._closed = False
        # Not written yet: encoded commands and their futures (same length).
        self._outbox: list[bytes] = []
        self._outbox_futures: list[asyncio.Future[Any]] = []
        self._flush_scheduled = False
        # Written, waiting for a reply, oldest first.
        self._pending: collections.deque[asyncio.Future[Any]] = collections.deque()
        self._last_progress = 0.0  # monotonic time of the last reply (or first wait)
        self._watchdog: asyncio.TimerHandle | None = None

    @classmethod
    def from_url(cls, url: str, **kwargs: Any) -> PipelinedRedis:
        """redis://[user:password@]host:port/db, rediss://…, unix:///path?db=N."""
        options = parse_url(url)
        ssl_context = ssl.create_default_context() if url.startswith("rediss://") else None
        return cls(
            host=str(options.get("host", "127.0.0.1")),
            port=int(options.get("port", 6379)),
            path=options.get("path"),
            db=int(options.get("db", 0) or 0),
            username=options.get("username"),
            password=options.get("password"),
            ssl_context=ssl_context,
            **kwargs,
        )

    # -- the one call ----------------------------------------------------------------
    def execute(self, *args: Any) -> asyncio.Future[Any]:
        """Queue one command; the future gets its reply (or ConnectionError,
        TimeoutError, ResponseError). Not a coroutine: no frame per call."""
        return self.execute_packed(pack_command(args))

    def execute_packed(self, command: bytes, *, asking: bool = False) -> asyncio.Future[Any]:
        """Queue one command already encoded in RESP (see `pack_command`). asking: right
        after ASKING, with nothing between them (a cluster's ASK redirect); the future
        is the command's."""
        loop = self._loop
        if loop is None or (self._transport is None and self._connecting is None):
            # Bound while a connection is open or opening (Python 3.11 asks the OS for
            # its pid on every get_running_loop(): a system call per request).
            loop = self._loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        if self._closed:
            future.set_exception(NotSent("the hot path's Redis connection is closed"))
            return future
        if len(self._pending) + len(self._outbox) >= self.pending_max:
            future.set_exception(NotSent(f"more than {self.pending_max} Redis commands waiting"))
            return future
        if asking:  # queued together, written together: nothing comes between them
            seen: asyncio.Future[Any] = loop.create_future()
            seen.add_done_callback(_consume_outcome)
            self._outbox.append(_ASKING)
            self._outbox_futures.append(seen)
        self._outbox.append(command)
        self._outbox_futures.append(future)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            if self._transport is not None:
                loop.call_soon(self._flush)
            elif self._connecting is None:
                self._connecting = loop.create_task(self._connect())
        elif len(self._outbox) >= self.flush_at and self._transport is not None:
            self._write()
        return future

    async def close(self) -> None:
        """Fail whatever waits and close the connection; later calls fail at once."""
        self._closed = True
        if self._connecting is not None:
            self._connecting.cancel()
            # Closing: how the connect attempt ended no longer matters.
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._connecting
        self._fail_outbox(RedisConnectionError("the hot path's Redis connection was closed"))
        self._drop(RedisConnectionError("the hot path's Redis connection was closed"))

    @property
    def connected(self) -> bool:
        return self._transport is not None

    # -- writing -----------------------------------------------------------------------
    def _flush(self) -> None:
        self._flush_scheduled = False
        self._write()

    def _write(self) -> None:
        transport = self._transport
        if not self._outbox or transport is None:
            return
        data = b"".join(self._outbox) if len(self._outbox) > 1 else self._outbox[0]
        futures = self._outbox_futures
        self._outbox = []
        self._outbox_futures = []
        if not self._pending:
            self._last_progress = time.monotonic()
        self._pending.extend(futures)
        transport.write(data)

    def _fail_outbox(self, exc: Exception) -> None:
        """Fail what was never written: with NotSent, whatever went wrong."""
        futures = self._outbox_futures
        self._outbox = []
        self._outbox_futures = []
        self._flush_scheduled = False
        _fail(futures, exc if isinstance(exc, NotSent) else NotSent(*exc.args))

    # -- connecting --------------------------------------------------------------------
    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        protocol = _Protocol(self)
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                if self.path is not None:
                    transport, _ = await loop.create_unix_connection(lambda: protocol, self.path)
                else:
                    transport, _ = await loop.create_connection(
                        lambda: protocol, self.host, self.port, ssl=self.ssl_context
                    )
                self._transport = transport
                self._protocol = protocol
                self._last_progress = time.monotonic()
                self._arm_watchdog()
                await self._handshake()
        except asyncio.CancelledError:
            self._drop(RedisConnectionError("connecting to Redis was cancelled"))
            raise
        except (OSError, TimeoutError, ResponseError, RedisConnectionError) as exc:
            error = RedisConnectionError(f"cannot connect to Redis: {exc}")
            self._drop(error)
            self._fail_outbox(error)
            return
        finally:
            self._connecting = None
        self._flush()

    async def _handshake(self) -> None:
        """AUTH and SELECT, ahead of anything queued meanwhile."""
        setup: list[Sequence[Any]] = []
        if self.password is not None:
            setup.append(("AUTH", self.username, self.password) if self.username else ("AUTH", self.password))
        if self.db:
            setup.append(("SELECT", self.db))
        if not setup:
            return
        transport = self._transport
        if transport is None:
            raise RedisConnectionError("connection lost during the handshake")
        futures = [asyncio.get_running_loop().create_future() for _ in setup]
        self._pending.extend(futures)
        transport.write(b"".join(pack_command(tuple(cmd)) for cmd in setup))
        try:
            for future in futures:
                await future
        finally:
            for future in futures:  # a failed step fails the rest: mark them seen
                if future.done() and not future.cancelled():
                    future.exception()

    # -- reading -----------------------------------------------------------------------
    def _received(self, protocol: _Protocol, data: bytes) -> None:
        if protocol is not self._protocol:
            return  # a connection already given up
        reader = protocol.reader
        reader.feed(data)
        pending = self._pending
        while True:
            try:
                reply = reader.gets()
            except hiredis.ProtocolError as exc:
                self._drop(RedisConnectionError(f"Redis protocol error: {exc}"))
                return
            if reply is _NOT_ENOUGH_DATA:
                break
            if not pending:
                self._drop(RedisConnectionError("Redis sent a reply nobody asked for"))
                return
            future = pending.popleft()
            if future.done():
                continue  # its caller was cancelled; the order is kept all the same
            if isinstance(reply, ResponseError):
                future.set_exception(reply)
            else:
                future.set_result(reply)
        self._last_progress = time.monotonic()

    def _lost(self, protocol: _Protocol, exc: Exception | None) -> None:
        if protocol is self._protocol:
            self._drop(RedisConnectionError(f"Redis connection lost: {exc or 'closed by the server'}"))

    def _drop(self, exc: Exception) -> None:
        """Give the connection up: everything written and unanswered fails with exc (as
        a ReplyLost: it may have run); what was never written, with exc itself."""
        transport = self._transport
        self._transport = None
        self._protocol = None
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        pending = self._pending
        self._pending = collections.deque()
        _fail(pending, exc if isinstance(exc, ReplyLost) else ReplyLost(*exc.args))
        if transport is not None:
            transport.abort()
        if self._outbox and not self._closed and self._connecting is None:
            # Queued, never written: nothing ran, so their callers may safely answer
            # 503 (a connect attempt in progress fails or flushes them itself).
            self._fail_outbox(exc)

    # -- liveness ----------------------------------------------------------------------
    def _arm_watchdog(self) -> None:
        loop = asyncio.get_running_loop()
        self._watchdog = loop.call_later(self.timeout_s / WATCHDOG_TICKS_PER_TIMEOUT, self._check_progress)

    def _check_progress(self) -> None:
        self._watchdog = None
        if self._transport is None:
            return
        if self._pending and time.monotonic() - self._last_progress > self.timeout_s:
            self._drop(ReplyTimeout(f"no reply from Redis for {self.timeout_s} s"))
            return
        self._arm_watchdog()
