"""The auto-pipelined connection (hotpath/connection.py) against a scripted fake server:
order, one write per loop turn, failures that never resend, timeouts, back-pressure."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import hiredis
import pytest

from hotpath.connection import (
    NotSent,
    PipelinedRedis,
    RedisConnectionError,
    RedisTimeoutError,
    ReplyLost,
    ReplyTimeout,
    ResponseError,
)

Behaviour = Callable[[list[bytes]], bytes | None]  # a command -> its reply bytes, or None: never answer


def ok(command: list[bytes]) -> bytes | None:
    """Answer ECHO x with x, ERR with an error, HANG never, anything else with +OK."""
    name = command[0].upper()
    if name == b"ECHO":
        return b"$%d\r\n%s\r\n" % (len(command[1]), command[1])
    if name == b"ERR":
        return b"-ERR " + command[1] + b"\r\n"
    if name == b"HANG":
        return None
    if name == b"INT":
        return b":" + command[1] + b"\r\n"
    if name == b"ARRAY":
        return b"*2\r\n:1\r\n$1\r\nx\r\n"
    return b"+OK\r\n"


class FakeRedis:
    """Speaks enough RESP: parses commands, answers by `behaviour`, records them."""

    def __init__(self, behaviour: Behaviour = ok) -> None:
        self.behaviour = behaviour
        self.commands: list[list[bytes]] = []
        self.reads = 0
        self.server: asyncio.Server | None = None
        self.writers: list[asyncio.StreamWriter] = []

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.append(writer)
        parser = hiredis.Reader()
        try:
            while data := await reader.read(65536):
                self.reads += 1
                parser.feed(data)
                out = []
                while (command := parser.gets()) is not False:
                    self.commands.append(command)
                    reply = self.behaviour(command)
                    if reply is not None:
                        out.append(reply)
                if out:
                    writer.write(b"".join(out))
                    await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    def drop_clients(self) -> None:
        for writer in self.writers:
            writer.transport.abort()
        self.writers.clear()

    async def stop(self) -> None:
        self.drop_clients()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


@contextlib.asynccontextmanager
async def serving(behaviour: Behaviour = ok, **kwargs: Any) -> AsyncIterator[tuple[FakeRedis, PipelinedRedis]]:
    fake = FakeRedis(behaviour)
    port = await fake.start()
    conn = PipelinedRedis("127.0.0.1", port, **kwargs)
    try:
        yield fake, conn
    finally:
        await conn.close()
        await fake.stop()


async def test_replies_reach_their_callers_in_order() -> None:
    async with serving() as (_, conn):
        words = [f"w{i}".encode() for i in range(500)]
        replies = await asyncio.gather(*(conn.execute("ECHO", w) for w in words))
        assert replies == words
        assert await conn.execute("INT", 42) == 42
        assert await conn.execute("ARRAY") == [1, b"x"]


async def test_commands_of_one_loop_turn_go_out_in_one_write() -> None:
    await written_in(flush_at=1000, commands=200, writes=1)


async def test_a_long_loop_turn_writes_every_flush_at_commands() -> None:
    await written_in(flush_at=8, commands=200, writes=25)
    await written_in(flush_at=8, commands=20, writes=3)  # 8, 8, and 4 at the end of the turn


async def written_in(*, flush_at: int, commands: int, writes: int) -> None:
    async with serving(flush_at=flush_at) as (_, conn):
        await conn.execute("PING")  # connected
        assert conn._transport is not None
        real = conn._transport
        written: list[bytes] = []

        class Counting:
            def write(self, data: bytes) -> None:
                written.append(data)
                real.write(data)

            def abort(self) -> None:
                real.abort()

        conn._transport = Counting()  # type: ignore[assignment]
        replies = await asyncio.gather(*(conn.execute("ECHO", str(i)) for i in range(commands)))
        assert replies == [str(i).encode() for i in range(commands)]
        assert len(written) == writes
        conn._transport = real


async def test_an_error_reply_fails_only_its_own_caller() -> None:
    async with serving() as (_, conn):
        results = await asyncio.gather(
            conn.execute("ECHO", "a"), conn.execute("ERR", "boom"), conn.execute("ECHO", "b"), return_exceptions=True
        )
        assert results[0] == b"a" and results[2] == b"b"
        assert isinstance(results[1], ResponseError) and "boom" in str(results[1])


async def test_a_dropped_connection_fails_what_is_in_flight_and_never_resends() -> None:
    async with serving() as (fake, conn):
        assert await conn.execute("ECHO", "up") == b"up"
        in_flight = conn.execute("HANG", "charge-once")
        await asyncio.sleep(0.05)  # written, not answered
        fake.drop_clients()
        with pytest.raises(ReplyLost):  # written: it may have run, and the caller is told so
            await in_flight
        # The next command opens a new connection; the lost one is not sent again.
        assert await conn.execute("ECHO", "again") == b"again"
        sent = [c for c in fake.commands if c[0] == b"HANG"]
        assert sent == [[b"HANG", b"charge-once"]]


async def test_no_reply_within_the_timeout_fails_and_reconnects() -> None:
    async with serving(timeout_s=0.2) as (fake, conn):
        with pytest.raises(RedisTimeoutError) as late:
            await conn.execute("HANG", "x")
        assert isinstance(late.value, ReplyTimeout) and isinstance(late.value, ReplyLost)
        assert not conn.connected
        assert await conn.execute("ECHO", "later") == b"later"
        assert [c for c in fake.commands if c[0] == b"HANG"] == [[b"HANG", b"x"]]


async def test_a_cancelled_caller_keeps_the_order() -> None:
    async with serving() as (_, conn):
        assert await conn.execute("ECHO", "up") == b"up"
        first = conn.execute("ECHO", "first")
        second = conn.execute("ECHO", "second")
        await asyncio.sleep(0)  # both written
        first.cancel()
        assert await second == b"second"
        assert first.cancelled()


async def test_back_pressure_past_pending_max() -> None:
    async with serving(pending_max=3) as (_, conn):
        futures = [conn.execute("ECHO", str(i)) for i in range(3)]
        with pytest.raises(NotSent, match="waiting"):
            await conn.execute("ECHO", "one too many")
        assert await asyncio.gather(*futures) == [b"0", b"1", b"2"]


async def test_unreachable_server_fails_fast() -> None:
    fake = FakeRedis()
    port = await fake.start()
    await fake.stop()  # nothing listens there any more
    conn = PipelinedRedis("127.0.0.1", port, connect_timeout_s=1)
    try:
        with pytest.raises(NotSent, match="cannot connect"):
            await conn.execute("PING")
    finally:
        await conn.close()


async def test_auth_and_select_go_first() -> None:
    async with serving(db=3, password="pw", username="me") as (fake, conn):
        assert await conn.execute("ECHO", "x") == b"x"
        assert fake.commands[:2] == [[b"AUTH", b"me", b"pw"], [b"SELECT", b"3"]]


async def test_failed_auth_fails_the_queued_commands() -> None:
    def refuse(command: list[bytes]) -> bytes | None:
        return b"-WRONGPASS invalid password\r\n" if command[0] == b"AUTH" else ok(command)

    async with serving(refuse, password="bad") as (_, conn):
        with pytest.raises(NotSent, match="WRONGPASS"):  # queued behind the handshake, never written
            await conn.execute("ECHO", "x")


async def test_close_fails_waiting_and_later_calls() -> None:
    async with serving() as (_, conn):
        waiting = conn.execute("HANG", "x")
        await asyncio.sleep(0.05)
        await conn.close()
        with pytest.raises(ReplyLost):
            await waiting
        with pytest.raises(NotSent, match="closed"):
            await conn.execute("ECHO", "x")


def test_from_url() -> None:
    conn = PipelinedRedis.from_url("redis://u:p@example.invalid:6390/4")
    assert (conn.host, conn.port, conn.db, conn.username, conn.password) == ("example.invalid", 6390, 4, "u", "p")
    unix = PipelinedRedis.from_url("unix:///tmp/redis.sock?db=2")
    assert (unix.path, unix.db) == ("/tmp/redis.sock", 2)


async def test_commands_not_yet_written_when_the_connection_drops_fail_as_not_sent() -> None:
    async with serving() as (fake, conn):
        assert await conn.execute("ECHO", "up") == b"up"
        in_flight = conn.execute("HANG", "written")
        await asyncio.sleep(0.05)
        queued = conn.execute("ECHO", "queued")  # in the outbox until the end of this turn
        fake.drop_clients()
        conn._drop(RedisConnectionError("dropped"))  # before the outbox is flushed
        with pytest.raises(ReplyLost):
            await in_flight
        with pytest.raises(NotSent):
            await queued
        assert [c for c in fake.commands if c[0] == b"ECHO" and c[1] == b"queued"] == []
