"""Run services as child processes, as a deployment runs them: each in its own process,
restarted when it dies, all stopped together.

`credits dev` starts `credits serve meter|settler|billing` through this. Each child runs
in a session of its own, so a terminal's Ctrl-C reaches only the supervisor, which then
stops the children in order (SIGTERM, then SIGKILL after a bound) instead of all of them
dying at once. A child also learns its supervisor's pid (CREDITS_PARENT_PID) and stops
by itself if the supervisor is killed (ops/cli.py watches for that).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final, TextIO

log = logging.getLogger(__name__)

PARENT_PID_ENV: Final = "CREDITS_PARENT_PID"
POLL_S: Final = 0.2
READY_TIMEOUT_S: Final = 180.0
READY_PROBE_TIMEOUT_S: Final = 2.0
STOP_TIMEOUT_S: Final = 20.0
RESTART_BACKOFF_S: Final = (1.0, 2.0, 4.0, 8.0, 16.0, 30.0)
HEALTHY_AFTER_S: Final = 30.0  # a child that ran this long starts its backoff afresh


class SupervisorError(RuntimeError):
    pass


@dataclass(frozen=True)
class ServiceSpec:
    name: str
    argv: Sequence[str]
    env: Mapping[str, str]
    ready_url: str | None = None  # answers 200 once the service is ready
    pass_fds: Sequence[int] = ()  # file descriptors the child inherits (a listening socket)


@dataclass
class _Child:
    spec: ServiceSpec
    proc: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    restarts: int = 0
    failures_in_a_row: int = 0
    restart_at: float | None = None


@dataclass
class Supervisor:
    specs: Sequence[ServiceSpec]
    output: TextIO = field(default_factory=lambda: sys.stderr)
    backoff_s: Sequence[float] = RESTART_BACKOFF_S
    _children: list[_Child] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def request_stop(self) -> None:
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def pids(self) -> dict[str, int | None]:
        return {c.spec.name: c.proc.pid if c.proc is not None else None for c in self._children}

    # -- start ---------------------------------------------------------------------
    def start(self, *, ready_timeout_s: float = READY_TIMEOUT_S) -> None:
        """Start every service and wait until each is ready; on failure stop them all."""
        self._children = [_Child(spec) for spec in self.specs]
        try:
            for child in self._children:
                self._spawn(child)
            deadline = time.monotonic() + ready_timeout_s
            for child in self._children:
                self._wait_ready(child, deadline)
        except BaseException:
            self.stop()
            raise

    def _spawn(self, child: _Child) -> None:
        env = {**child.spec.env, PARENT_PID_ENV: str(os.getpid())}
        child.proc = subprocess.Popen(
            list(child.spec.argv),
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self.output,  # the supervisor's stdout is for its announcement only
            stderr=self.output,
            start_new_session=True,
            pass_fds=tuple(child.spec.pass_fds),
        )
        child.started_at = time.monotonic()
        child.restart_at = None

    def _wait_ready(self, child: _Child, deadline: float) -> None:
        url = child.spec.ready_url
        while True:
            if self.stopping:
                raise SupervisorError("stopped while starting")
            assert child.proc is not None
            code = child.proc.poll()
            if code is not None:
                raise SupervisorError(f"{child.spec.name} exited with {_how(code)} while starting (its log is above)")
            if url is None or _answers(url):
                log.info("service_ready", extra={"service": child.spec.name, "pid": child.proc.pid})
                return
            if time.monotonic() > deadline:
                raise SupervisorError(f"{child.spec.name} did not become ready at {url} within {READY_TIMEOUT_S:.0f} s")
            time.sleep(POLL_S)

    # -- run -------------------------------------------------------------------------
    def run(self, on_tick: Callable[[], None] | None = None) -> None:
        """Watch the children until request_stop(): a child that dies is logged and
        started again after a backoff. Then stop them all."""
        try:
            while not self._stop.wait(POLL_S):
                for child in self._children:
                    self._check(child)
                if on_tick is not None:
                    on_tick()
        finally:
            self.stop()

    def _check(self, child: _Child) -> None:
        now = time.monotonic()
        if child.restart_at is not None:
            if now >= child.restart_at:
                self._spawn(child)
                child.restarts += 1
                assert child.proc is not None
                log.warning(
                    "service_restarted",
                    extra={"service": child.spec.name, "pid": child.proc.pid, "restarts": child.restarts},
                )
            return
        if child.proc is None:
            return
        code = child.proc.poll()
        if code is None:
            return
        uptime_s = now - child.started_at
        child.failures_in_a_row = 1 if uptime_s >= HEALTHY_AFTER_S else child.failures_in_a_row + 1
        delay_s = self.backoff_s[min(child.failures_in_a_row, len(self.backoff_s)) - 1]
        child.restart_at = now + delay_s
        log.error(
            "service_exited",
            extra={
                "service": child.spec.name,
                "pid": child.proc.pid,
                "exit": _how(code),
                "uptime_s": round(uptime_s, 1),
                "restart_in_s": delay_s,
            },
        )

    # -- stop ----------------------------------------------------------------------
    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        """SIGTERM every child (front doors first: the list in reverse), wait, SIGKILL."""
        self._stop.set()
        alive = [c for c in reversed(self._children) if c.proc is not None and c.proc.poll() is None]
        for child in alive:
            assert child.proc is not None
            with contextlib.suppress(ProcessLookupError):
                child.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for child in alive:
            assert child.proc is not None
            try:
                child.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("service_killed", extra={"service": child.spec.name, "pid": child.proc.pid})
                child.proc.kill()
                child.proc.wait(timeout=10)
        for child in self._children:
            if child.proc is not None and child.proc.returncode is None:
                child.proc.poll()


def _how(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"signal {signal.Signals(-code).name}"
        return f"signal {-code}"
    return f"status {code}"


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=READY_PROBE_TIMEOUT_S) as reply:  # noqa: S310 - our own local URL
            return bool(reply.status == 200)
    except (urllib.error.URLError, OSError, ValueError):
        return False


def exit_with_parent() -> None:
    """In a supervised child: stop (SIGTERM to ourselves) when the supervisor is gone.
    Polled once a second: no event tells a child that its parent died."""
    raw = os.environ.get(PARENT_PID_ENV)
    if not raw:
        return
    parent = int(raw)

    def watch() -> None:
        while True:
            time.sleep(1.0)
            if os.getppid() != parent:
                log.warning("supervisor_gone", extra={"parent_pid": parent})
                os.kill(os.getpid(), signal.SIGTERM)
                return

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()
