"""A TCP proxy in front of a real server, for tests that need a backing service to
stall or vanish without touching the server itself (it is shared): `pause()` holds
every byte clients send (as a paused Redis leaves them in its socket buffer) and
`resume()` delivers them, also for clients that gave up meanwhile (Redis executes what
it has read even after the client left); `refuse()` drops every connection and stops
listening until `restore()`, so new connections are refused by the kernel (a client
then knows that nothing it meant to send was delivered)."""

from __future__ import annotations

import asyncio
import contextlib
import socket

CHUNK = 65536


class Proxy:
    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = 0
        self._server: asyncio.Server | None = None
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._refusing = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._serve, sock=self._listen(0))
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self.port

    @staticmethod
    def _listen(port: int) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))
        sock.listen(128)
        sock.setblocking(False)
        return sock

    def url(self, scheme: str = "redis", path: str = "/0") -> str:
        return f"{scheme}://127.0.0.1:{self.port}{path}"

    def pause(self) -> None:
        self._flowing.clear()

    def resume(self) -> None:
        self._flowing.set()

    def refuse(self) -> None:
        self._refusing = True
        if self._server is not None:
            self._server.close()  # nothing listens: a connect is refused, not accepted and reset
        for writer in list(self._writers):
            writer.transport.abort()

    def restore(self) -> None:
        self._refusing = False
        if self._server is not None and not self._server.is_serving():
            # Bound and listening at once (connections wait in the backlog); the server
            # that accepts them starts on the next turn of the loop.
            sock = self._listen(self.port)
            task = asyncio.get_running_loop().create_task(self._serve_on(sock))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _serve_on(self, sock: socket.socket) -> None:
        self._server = await asyncio.start_server(self._serve, sock=sock)

    async def stop(self) -> None:
        self.resume()
        self.refuse()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(BaseException):
                await task

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._refusing:
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self._writers.update((writer, up_writer))
        upstream = asyncio.create_task(self._pump(reader, up_writer, held=True))
        downstream = asyncio.create_task(self._pump(up_reader, writer, held=False))
        self._tasks.update((upstream, downstream))
        try:
            await upstream  # the client is done (or gone); what it sent has been delivered
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(downstream), timeout=10.0)  # the server's answers
        finally:
            for task in (upstream, downstream):
                task.cancel()
                self._tasks.discard(task)
            self._writers.discard(writer)
            self._writers.discard(up_writer)
            writer.transport.abort()
            # A FIN, not a reset: the server reads (and runs) what it was sent before it
            # sees the end, as it does when a client that gave up closes its socket.
            up_writer.close()

    async def _pump(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter, *, held: bool) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while True:
                data = await source.read(CHUNK)
                if held:
                    await self._flowing.wait()  # a paused server: the bytes wait, unread
                if not data:
                    return
                if self._refusing:
                    return
                sink.write(data)
                await sink.drain()
