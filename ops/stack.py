"""Where the embedded stack is: its data directory, its ports and whether it runs.

`credits dev` records its stack in two places: `<data dir>/stack.json` (ports, URLs, the
supervisor's pid) and the per-user state file `$XDG_STATE_HOME/credits/stack.json`
(default `~/.local/state/credits/stack.json`), which names the data directory of the
stack started last. Every other command finds the stack from there, whatever the
current directory:

1. REDIS_URL and DATABASE_URL set: those servers, nothing embedded.
2. CREDITS_DATA_DIR set: that data directory; otherwise the one the state file names,
   then `./.data`.
3. A stack running there: its URLs. No stack running, but a database there (made by
   `credits dev` or `credits migrate --embedded`): its embedded servers are started for
   the one command and stopped after it.
4. Nothing: a clear error, exit 1. No command but `credits dev` and
   `credits migrate --embedded` creates a database.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pathlib
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from core.config import Config

log = logging.getLogger(__name__)

STACK_FILE = "stack.json"  # in the data directory, and the per-user state file's name
PG_VERSION_FILE = pathlib.Path("postgres") / "PG_VERSION"


class NoStack(RuntimeError):
    """No running stack, no database and no URLs: the message says what to do."""


@dataclass(frozen=True)
class StackRecord:
    """One stack as `credits dev` recorded it."""

    data_dir: pathlib.Path
    pid: int | None = None  # the supervisor; None once it stopped
    ports: dict[str, int] = field(default_factory=dict)  # meter, billing, settler, redis, postgres, stripe
    urls: dict[str, str] = field(default_factory=dict)  # meter, billing, settler, redis, database, stripe
    started_at: str | None = None

    @property
    def running(self) -> bool:
        return self.pid is not None and _alive(self.pid)

    def to_json(self) -> dict[str, Any]:
        return {
            "data_dir": str(self.data_dir),
            "pid": self.pid,
            "ports": self.ports,
            "urls": self.urls,
            "started_at": self.started_at,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> StackRecord:
        pid = data.get("pid")
        return cls(
            data_dir=pathlib.Path(str(data["data_dir"])),
            pid=int(pid) if pid is not None else None,
            ports={str(k): int(v) for k, v in dict(data.get("ports") or {}).items()},
            urls={str(k): str(v) for k, v in dict(data.get("urls") or {}).items()},
            started_at=data.get("started_at"),
        )


def _alive(pid: int) -> bool:
    """The pid runs the `credits` command (a pid reused by another program is not it)."""
    import psutil

    try:
        command = " ".join(psutil.Process(pid).cmdline())
    except psutil.NoSuchProcess:
        return False
    except psutil.Error:  # someone else's process: alive, and we cannot tell what it is
        return True
    return "credits" in command or "ops.cli" in command


def state_file(env: Mapping[str, str] | None = None) -> pathlib.Path:
    """The per-user state file: $XDG_STATE_HOME/credits/stack.json."""
    env = os.environ if env is None else env
    base = env.get("XDG_STATE_HOME") or str(pathlib.Path.home() / ".local" / "state")
    return pathlib.Path(base) / "credits" / STACK_FILE


def _read(path: pathlib.Path) -> StackRecord | None:
    try:
        return StackRecord.from_json(json.loads(path.read_text()))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _write(path: pathlib.Path, record: StackRecord) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(record.to_json(), indent=2) + "\n")
    tmp.chmod(0o600)
    tmp.replace(path)


def recorded(data_dir: pathlib.Path) -> StackRecord | None:
    """The record `credits dev` left in this data directory (running or not)."""
    return _read(data_dir.expanduser().resolve() / STACK_FILE)


def record(rec: StackRecord, env: Mapping[str, str] | None = None) -> None:
    """Write the stack's record to its data directory and the per-user state file."""
    rec = replace(rec, data_dir=rec.data_dir.expanduser().resolve())
    _write(rec.data_dir / STACK_FILE, rec)
    _write(state_file(env), rec)


def remember_data_dir(data_dir: pathlib.Path, env: Mapping[str, str] | None = None) -> None:
    """Name a data directory in the state file (after `credits migrate --embedded`),
    keeping what the data directory itself recorded."""
    data_dir = data_dir.expanduser().resolve()
    rec = recorded(data_dir) or StackRecord(data_dir=data_dir)
    _write(state_file(env), rec)


def stopped(rec: StackRecord, env: Mapping[str, str] | None = None) -> None:
    """The stack stopped: keep its ports (the next start reuses them), drop the pid."""
    down = replace(rec, pid=None)
    with contextlib.suppress(OSError):
        _write(rec.data_dir / STACK_FILE, down)
    current = _read(state_file(env))
    if current is None or current.data_dir == rec.data_dir:
        with contextlib.suppress(OSError):
            _write(state_file(env), down)


def has_database(data_dir: pathlib.Path) -> bool:
    return (data_dir / PG_VERSION_FILE).exists()


def candidates(config: Config, env: Mapping[str, str] | None = None) -> list[pathlib.Path]:
    """Data directories to look in, in order (see the module docstring)."""
    env = os.environ if env is None else env
    if env.get("CREDITS_DATA_DIR"):
        return [config.data_dir.expanduser().resolve()]
    found: list[pathlib.Path] = []
    last = _read(state_file(env))
    if last is not None:
        found.append(last.data_dir)
    local = config.data_dir.expanduser().resolve()
    if local not in found:
        found.append(local)
    return found


def running(config: Config, env: Mapping[str, str] | None = None) -> StackRecord | None:
    """The running stack among the candidates, if any."""
    for data_dir in candidates(config, env):
        rec = recorded(data_dir)
        if rec is not None and rec.running and rec.urls.get("redis") and rec.urls.get("database"):
            return rec
    return None


def no_stack_message(config: Config, env: Mapping[str, str] | None = None) -> str:
    looked = ", ".join(str(p) for p in candidates(config, env))
    return (
        "no credits stack is running and there is no database to use "
        f"(looked in {looked}; state file {state_file(env)}). "
        "Start the stack with `credits dev`, or create the database with `credits migrate --embedded`, "
        "or point at your servers with REDIS_URL and DATABASE_URL."
    )


@contextlib.contextmanager
def servers(config: Config, *, create: bool = False) -> Iterator[Config]:
    """The config with both URLs set: configured, the running stack's, or the embedded
    servers of an existing data directory started for this command (and stopped after).
    `create`: make a database in config.data_dir when there is none (migrate --embedded)."""
    if not config.embedded:
        yield config
        return
    live = running(config)
    if live is not None:
        yield replace(config, data_dir=live.data_dir).with_urls(
            config.redis_url or live.urls["redis"], config.database_url or live.urls["database"]
        )
        return
    data_dir: pathlib.Path | None = None
    for candidate in candidates(config):
        if has_database(candidate):
            data_dir = candidate
            break
    if data_dir is None:
        if not create:
            raise NoStack(no_stack_message(config))
        data_dir = config.data_dir.expanduser().resolve()
    from ops.embedded import EmbeddedServers  # imported late: only the embedded mode needs it

    log.info("embedded_servers_for_command", extra={"data_dir": str(data_dir), "created": not has_database(data_dir)})
    embedded = EmbeddedServers(data_dir)
    urls = embedded.start()
    try:
        yield replace(config, data_dir=data_dir).with_urls(
            redis_url=config.redis_url or urls.redis_url, database_url=config.database_url or urls.database_url
        )
    finally:
        embedded.stop()


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
