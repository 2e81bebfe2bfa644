"""Helpers for the SDK's end-to-end tests: plain-HTTP checks of the sidecar's own view,
and a TCP proxy that loses answers. Fixtures are in conftest_sdk.py (loaded by the SDK
test modules through ``pytest_plugins``).

A test never trusts the SDK to confirm the SDK: balances are read over plain HTTP.
"""

from __future__ import annotations

import asyncio
import contextlib
import decimal
import json
from dataclasses import dataclass
from typing import Any

from aiohttp.test_utils import TestClient

from tests.conftest import Org

Client = TestClient[Any, Any]
PROXY_READ_BYTES = 65536


def meter_url_of(client: Client) -> str:
    return str(client.make_url("/")).rstrip("/")


async def raw_balance(client: Client, key: str) -> dict[str, decimal.Decimal]:
    """The balance as the sidecar reports it over plain HTTP (numbers as Decimal)."""
    r = await client.get("/api/credits/balance", headers={"Authorization": f"Bearer {key}"})
    assert r.status == 200, await r.text()
    body = json.loads(await r.text(), parse_float=decimal.Decimal, parse_int=decimal.Decimal)
    return {k: body[k] for k in ("balance", "reserved", "available")}


async def available(client: Client, key: str) -> decimal.Decimal:
    return (await raw_balance(client, key))["available"]


@dataclass(frozen=True)
class Agent:
    org: Org
    key: str  # an agent key of org, no rate limit


class DroppingProxy:
    """A TCP proxy in front of the sidecar that loses answers on purpose.

    For the first ``drops`` answers it forwards the request, waits until the sidecar has
    started answering (so the request was fully handled: charged), then aborts the
    client's connection without passing a byte of the answer on. The client sees a
    connection reset after a successful charge: the case retries must not double.
    """

    def __init__(self, upstream_host: str, upstream_port: int, drops: int) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.drops = drops
        self.dropped = 0
        self.connections = 0
        self.url = ""
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self.url

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.connections += 1
        up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        try:
            forward = asyncio.create_task(self._pump(reader, up_writer))
            backward = asyncio.create_task(self._answers(up_reader, writer))
            await asyncio.wait({forward, backward}, return_when=asyncio.FIRST_COMPLETED)
            for t in (forward, backward):
                t.cancel()
            await asyncio.gather(forward, backward, return_exceptions=True)
        finally:
            for w in (writer, up_writer):
                w.transport.abort()
            self._tasks.discard(task)

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(PROXY_READ_BYTES):
                writer.write(data)
                await writer.drain()

    async def _answers(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(PROXY_READ_BYTES):
                if self.drops > 0:
                    self.drops -= 1
                    self.dropped += 1
                    return  # the caller aborts both connections: the answer is lost
                writer.write(data)
                await writer.drain()
