"""Typed configuration, decoded once at start from environment variables.

A wrong value stops the process with a message naming the variable; nothing reads the
environment after start.
"""

from __future__ import annotations

import decimal
import enum
import os
import pathlib
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field, replace


class ConfigError(ValueError):
    """A variable is missing or malformed; the message names it."""


class Durability(enum.Enum):
    """What a successful consume waits for before it answers (see README)."""

    ASYNC = "async"  # the server's own appendfsync policy (everysec: up to ~1 s lost)
    LOCAL = "local"  # WAITAOF 1 0: fsynced to the local AOF before answering
    REPLICA = "replica"  # WAITAOF 1 1: also on one replica's AOF


APP_ROLE = "credits_app"
SETTLER_ROLE = "credits_settler"
CONSOLE_ROLE = "credits_console"  # the ops console's reads across organizations (read only)


@dataclass(frozen=True)
class Config:
    redis_url: str | None = None  # None: start the embedded server
    database_url: str | None = None  # owner URL (migrations); None: embedded
    app_database_url: str | None = None  # the non-owner role the services use
    app_db_password: str = "credits_app"  # noqa: S105 - dev default, set APP_DB_PASSWORD
    settler_database_url: str | None = None  # the settlement role
    settler_db_password: str = "credits_settler"  # noqa: S105 - dev default, set SETTLER_DB_PASSWORD
    console_database_url: str | None = None  # the console's read-only role
    console_db_password: str = "credits_console"  # noqa: S105 - dev default, set CONSOLE_DB_PASSWORD
    data_dir: pathlib.Path = pathlib.Path(".data")
    jwt_secret: str | None = None
    usage_partitions: int = 16
    redis_key_prefix: str = "cr"
    rate_limit_per_s: float = 1000.0
    rate_limit_burst: float = 2000.0
    idempotency_ttl_s: int = 48 * 3600
    idempotency_auto_ttl_s: int = 300  # keys assigned to requests without one (0: none assigned)
    max_body_bytes: int = 2 * 1024 * 1024
    max_batch_items: int = 5000
    durability: Durability = Durability.ASYNC
    redis_timeout_s: float = 5.0  # longest wait for a reply on the sidecar's script connection
    consume_coalesce: bool = True  # group commit of one organization's concurrent /use (hotpath/group.py)
    host: str = "127.0.0.1"
    meter_port: int = 8080
    log_level: str = "INFO"
    log_format: str = "text"  # text (key=value) | json; see core/logs.py
    meter_socket: pathlib.Path | None = None  # the sidecar also listens on this Unix socket
    cors_origins: tuple[str, ...] = ()  # browser origins allowed to call the APIs; none by default
    settler_port: int = 8082  # the settler's /metrics and ops endpoints; 0 = off
    ops_token: str | None = None  # bearer token for /api/admin/* on the settler
    ops_alert_url: str | None = None  # where the settler POSTs signed ops alerts (quarantine, lag, drift)
    ops_alert_secret: str | None = None  # their signing secret
    settle_batch_entries: int = 500
    settlement_lag_alert_s: float = 5.0
    operator_email: str | None = None  # CREDITS_OPERATOR: whom the CLI's audit rows name (else the OS user)
    # The usage audit (settler/anomalies.py): an hour's spend beyond FACTOR x the mean
    # hourly spend of the BASELINE_HOURS before it (and at least MIN_CREDITS per hour).
    anomaly_factor: float = 5.0
    anomaly_baseline_hours: int = 7 * 24
    anomaly_min_history_hours: int = 24
    anomaly_min_credits: int = 10_000  # millicredits per hour
    anomaly_interval_s: float = 300.0
    extra: Mapping[str, str] = field(default_factory=dict)

    @property
    def embedded(self) -> bool:
        return self.redis_url is None or self.database_url is None

    def with_urls(self, redis_url: str, database_url: str) -> Config:
        return replace(self, redis_url=redis_url, database_url=database_url)

    def app_dsn(self) -> str:
        """The URL the services use: the app role, never the owner."""
        if self.app_database_url:
            return self.app_database_url
        return self._role_dsn(APP_ROLE, self.app_db_password)

    def settler_dsn(self) -> str:
        """The URL the settler uses: its own role, never the owner."""
        if self.settler_database_url:
            return self.settler_database_url
        return self._role_dsn(SETTLER_ROLE, self.settler_db_password)

    def console_dsn(self) -> str:
        """The URL the ops console reads with: its own read-only role, never the owner."""
        if self.console_database_url:
            return self.console_database_url
        return self._role_dsn(CONSOLE_ROLE, self.console_db_password)

    def _role_dsn(self, role: str, password: str) -> str:
        if self.database_url is None:
            raise ConfigError("DATABASE_URL: not set and no embedded server started")
        parts = urllib.parse.urlsplit(self.database_url)
        host = parts.hostname or ""
        if ":" in host:
            host = f"[{host}]"
        port = f":{parts.port}" if parts.port else ""
        quoted = urllib.parse.quote(password, safe="")
        netloc = f"{role}:{quoted}@{host}{port}"
        return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, parts.query, ""))


def _int(env: Mapping[str, str], name: str, default: int, lo: int, hi: int) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name}: expected an integer, got {raw!r}") from None
    if not lo <= value <= hi:
        raise ConfigError(f"{name}: must be between {lo} and {hi}, got {value}")
    return value


def _float(env: Mapping[str, str], name: str, default: float, lo: float, hi: float = float("inf")) -> float:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name}: expected a number, got {raw!r}") from None
    if not lo <= value <= hi:
        bound = f"at least {lo}" if hi == float("inf") else f"between {lo} and {hi}"
        raise ConfigError(f"{name}: must be {bound}, got {raw}")
    return value


def _bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    lowered = raw.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name}: expected true or false, got {raw!r}")


# The decoders other components' configuration modules use (billing/config.py).
env_int, env_float, env_bool = _int, _float, _bool


def _url(env: Mapping[str, str], name: str, schemes: tuple[str, ...]) -> str | None:
    raw = env.get(name)
    if raw is None or raw == "":
        return None
    parts = urllib.parse.urlsplit(raw)
    if parts.scheme not in schemes or not (parts.hostname or parts.path):
        raise ConfigError(f"{name}: expected a URL starting with {' or '.join(schemes)}://")
    return raw


def _prefix(env: Mapping[str, str]) -> str:
    raw = env.get("REDIS_KEY_PREFIX", "cr")
    if not raw or not all(c.isalnum() or c in "_-" for c in raw) or len(raw) > 32:
        raise ConfigError("REDIS_KEY_PREFIX: 1 to 32 letters, digits, '_' or '-'")
    return raw


def _auto_ttl(env: Mapping[str, str]) -> int:
    value = _int(env, "IDEMPOTENCY_AUTO_TTL_S", 300, 0, 86400)
    if 0 < value < 60:
        raise ConfigError("IDEMPOTENCY_AUTO_TTL_S: 0 (assign no keys) or at least 60 seconds")
    return value


def _ops_alert_secret(env: Mapping[str, str]) -> str | None:
    url, secret = env.get("OPS_ALERT_URL") or None, env.get("OPS_ALERT_SECRET") or None
    if url is not None and (secret is None or len(secret) < 32):
        raise ConfigError("OPS_ALERT_SECRET: required with OPS_ALERT_URL, at least 32 characters (the signing key)")
    return secret


def _ops_token(env: Mapping[str, str]) -> str | None:
    raw = env.get("OPS_TOKEN") or None
    if raw is not None and len(raw) < 32:
        raise ConfigError("OPS_TOKEN: must be at least 32 characters")
    return raw


# Passwords anyone can read in this repository: for the embedded stack and a local
# Postgres only (checked in load()).
DEV_PASSWORDS = frozenset(
    {"credits_app", "credits_settler", "credits_console", "change-me-app", "change-me-settler", "change-me-console"}
)
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "::1", "localhost", ""})


def _role_password(env: Mapping[str, str], name: str, default: str, url_name: str) -> str:
    """A role's password; a well-known one only for a Postgres on this machine (or when
    the role's own URL is given): on any other host it would be the password of a
    production ledger."""
    password = env.get(name, default)
    database_url = env.get("DATABASE_URL") or ""
    if password in DEV_PASSWORDS and database_url and not env.get(url_name):
        host = urllib.parse.urlsplit(database_url).hostname or ""
        if host not in LOOPBACK_HOSTS:
            raise ConfigError(
                f"{name}: {password!r} is a development password and DATABASE_URL names {host}:"
                f" set a password of your own (or {url_name})"
            )
    return password


def _anomaly_floor(env: Mapping[str, str]) -> int:
    """ANOMALY_MIN_CREDITS: credits per hour below which no hour is a spike (exact)."""
    raw = env.get("ANOMALY_MIN_CREDITS", "") or "10"
    try:
        value = decimal.Decimal(raw)
    except decimal.InvalidOperation:
        raise ConfigError(f"ANOMALY_MIN_CREDITS: expected a number of credits, got {raw!r}") from None
    milli = value * 1000
    if milli != milli.to_integral_value() or not 0 < milli <= 10**12:
        raise ConfigError(f"ANOMALY_MIN_CREDITS: credits to 0.001, more than 0, got {raw!r}")
    return int(milli)


def _origins(env: Mapping[str, str]) -> tuple[str, ...]:
    """CORS_ORIGINS: a comma-separated list of origins (scheme://host[:port])."""
    raw = env.get("CORS_ORIGINS", "")
    origins: list[str] = []
    for item in (part.strip() for part in raw.split(",")):
        if not item:
            continue
        parts = urllib.parse.urlsplit(item)
        if item == "*" or parts.scheme not in ("http", "https") or not parts.hostname or parts.path not in ("", "/"):
            raise ConfigError(
                f"CORS_ORIGINS: expected origins like https://app.example.com, comma-separated, got {item!r}"
                " (list each origin; '*' is not accepted)"
            )
        if parts.query or parts.fragment or parts.username:
            raise ConfigError(f"CORS_ORIGINS: an origin has no path, query or credentials, got {item!r}")
        origins.append(f"{parts.scheme}://{parts.netloc.lower()}")
    return tuple(dict.fromkeys(origins))


def _socket(env: Mapping[str, str]) -> pathlib.Path | None:
    raw = env.get("METER_SOCKET", "")
    if not raw:
        return None
    path = pathlib.Path(raw.removeprefix("unix:"))
    if len(str(path).encode()) > 100:  # sockaddr_un holds 108 bytes with its terminator
        raise ConfigError(f"METER_SOCKET: a Unix socket path must be under 100 bytes, got {len(str(path))}")
    return path


def load(env: Mapping[str, str] | None = None) -> Config:
    """Decode the configuration from `env` (default: os.environ)."""
    env = os.environ if env is None else env
    durability_raw = env.get("DURABILITY", "async")
    try:
        durability = Durability(durability_raw)
    except ValueError:
        choices = ", ".join(d.value for d in Durability)
        raise ConfigError(f"DURABILITY: expected one of {choices}, got {durability_raw!r}") from None
    jwt_secret = env.get("JWT_SECRET") or None
    if jwt_secret is not None and len(jwt_secret) < 32:
        raise ConfigError("JWT_SECRET: must be at least 32 characters (HS256 key)")
    level = env.get("LOG_LEVEL", "INFO").upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ConfigError(f"LOG_LEVEL: expected DEBUG, INFO, WARNING or ERROR, got {level!r}")
    log_format = env.get("LOG_FORMAT", "text").lower() or "text"
    if log_format not in ("text", "json"):
        raise ConfigError(f"LOG_FORMAT: expected text or json, got {log_format!r}")
    return Config(
        redis_url=_url(env, "REDIS_URL", ("redis", "rediss", "unix")),
        database_url=_url(env, "DATABASE_URL", ("postgres", "postgresql")),
        app_database_url=_url(env, "APP_DATABASE_URL", ("postgres", "postgresql")),
        app_db_password=_role_password(env, "APP_DB_PASSWORD", "credits_app", "APP_DATABASE_URL"),
        settler_database_url=_url(env, "SETTLER_DATABASE_URL", ("postgres", "postgresql")),
        settler_db_password=_role_password(env, "SETTLER_DB_PASSWORD", "credits_settler", "SETTLER_DATABASE_URL"),
        console_database_url=_url(env, "CONSOLE_DATABASE_URL", ("postgres", "postgresql")),
        console_db_password=_role_password(env, "CONSOLE_DB_PASSWORD", "credits_console", "CONSOLE_DATABASE_URL"),
        data_dir=pathlib.Path(env.get("CREDITS_DATA_DIR", ".data")),
        jwt_secret=jwt_secret,
        usage_partitions=_int(env, "USAGE_PARTITIONS", 16, 1, 1024),
        redis_key_prefix=_prefix(env),
        rate_limit_per_s=_float(env, "RATE_LIMIT_PER_S", 1000.0, 0.0),
        rate_limit_burst=_float(env, "RATE_LIMIT_BURST", 2000.0, 1.0),
        idempotency_ttl_s=_int(env, "IDEMPOTENCY_TTL_S", 48 * 3600, 24 * 3600, 30 * 86400),
        idempotency_auto_ttl_s=_auto_ttl(env),
        max_body_bytes=_int(env, "MAX_BODY_BYTES", 2 * 1024 * 1024, 1024, 64 * 1024 * 1024),
        max_batch_items=_int(env, "MAX_BATCH_ITEMS", 5000, 1, 100_000),
        durability=durability,
        redis_timeout_s=_float(env, "REDIS_TIMEOUT_S", 5.0, 0.1, 120.0),
        consume_coalesce=_bool(env, "CONSUME_COALESCE", True),
        host=env.get("HOST", "127.0.0.1"),
        meter_port=_int(env, "METER_PORT", 8080, 0, 65535),
        log_level=level,
        log_format=log_format,
        meter_socket=_socket(env),
        cors_origins=_origins(env),
        settler_port=_int(env, "SETTLER_PORT", 8082, 0, 65535),
        ops_token=_ops_token(env),
        ops_alert_url=_url(env, "OPS_ALERT_URL", ("http", "https")),
        ops_alert_secret=_ops_alert_secret(env),
        settle_batch_entries=_int(env, "SETTLE_BATCH_ENTRIES", 500, 1, 10_000),
        settlement_lag_alert_s=_float(env, "SETTLEMENT_LAG_ALERT_S", 5.0, 0.1),
        operator_email=(env.get("CREDITS_OPERATOR") or "").strip().lower() or None,
        anomaly_factor=_float(env, "ANOMALY_FACTOR", 5.0, 1.5, 1000.0),
        anomaly_baseline_hours=_int(env, "ANOMALY_BASELINE_HOURS", 7 * 24, 6, 90 * 24),
        anomaly_min_history_hours=_int(env, "ANOMALY_MIN_HISTORY_HOURS", 24, 1, 90 * 24),
        anomaly_min_credits=_anomaly_floor(env),
        anomaly_interval_s=_float(env, "ANOMALY_INTERVAL_S", 300.0, 10.0, 3600.0),
    )
