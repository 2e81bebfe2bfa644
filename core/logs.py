"""One log format for every process: `key=value` lines for people, JSON lines for machines.

Every call site logs an event name and its fields the standard library's way,

    log.info("credits_granted", extra={"organization_id": org, "amount": 500})

and `setup()` (called once by every entry point: the `credits` command, each service,
the local Stripe stand-in) installs the one formatter that prints them all:

    2026-11-23T12:00:00.123Z INFO  billing.credits credits_granted organization_id=… amount=500 service=billing
    {"ts": "2026-11-23T12:00:00.123Z", "level": "info", "logger": "billing.credits", "event": "credits_granted", …}

(`LOG_FORMAT=text`, the default, or `LOG_FORMAT=json`). Why a formatter of our own and
not structlog: every call site, ours and the libraries', already goes through the
standard `logging` module with `extra=`, and the part missing was a formatter that
prints those fields; structlog's stdlib bridge (ProcessorFormatter + ExtraAdder) would
be the same formatter behind a dependency and a second logging API.

Our own loggers (the project's rooms) log at LOG_LEVEL; everything else — arq's cron
lines, the Stripe SDK's request lines, aiohttp's access log, asyncio — only at WARNING
and above, unless LOG_LEVEL=DEBUG, which shows everything.

Nothing secret is printed: fields whose names say secret, password, token, key,
signature or webhook URL are replaced by `[redacted]`, and in every message, field
value and traceback, credentials (`ck_…`, `sk_…`, `whsec_…`, JWTs, client secrets),
URL passwords and the path and query of http(s) URLs (where a webhook URL keeps its
token) are masked.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import re
import sys
import warnings
from collections.abc import Mapping
from typing import Any, Final, TextIO

FORMATS: Final = ("text", "json")
LEVELS: Final = ("DEBUG", "INFO", "WARNING", "ERROR")
# The project's own loggers (one per room, by module name); every other logger is a
# library's and is held at WARNING unless LOG_LEVEL=DEBUG.
OWN_LOGGERS: Final = (
    "accounts",
    "api",
    "bench",
    "billing",
    "core",
    "credits",
    "hotpath",
    "ledger",
    "lua",
    "meter",
    "ops",
    "portal",
    "settler",
    "webhooks",
)
REDACTED: Final = "[redacted]"

# LogRecord's own attributes: everything else on a record came in through `extra=`.
_RECORD_ATTRS: Final = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "taskName"}

_SECRET_FIELD = re.compile(
    r"(^|_)(secret|secrets|password|passwd|token|api_key|apikey|key_secret|authorization|cookie|signature|"
    r"webhook_url|dsn)($|_)",
    re.IGNORECASE,
)
_CREDENTIAL = re.compile(
    r"\b(ck|sk_live|sk_test|rk_live|rk_test|whsec)_[A-Za-z0-9_\-]{6,}"  # API keys, Stripe keys, signing secrets
)
_CLIENT_SECRET = re.compile(r"\b((?:pi|seti|in)_[A-Za-z0-9]+)_secret_[A-Za-z0-9]+")
_JWT = re.compile(r"\beyJ[A-Za-z0-9_\-]+\.[A-Za-z0-9_\-]+\.[A-Za-z0-9_\-]+")
_URL = re.compile(r"\b(?P<scheme>https?|rediss?|postgres(?:ql)?|unix)://(?P<rest>[^\s\"'<>]+)")


def _mask_url(match: re.Match[str]) -> str:
    scheme, rest = match.group("scheme"), match.group("rest")
    authority, sep, tail = rest.partition("/")
    if "@" in authority:  # user:password@host: keep the user, never the password
        userinfo, _, host = authority.rpartition("@")
        user = userinfo.split(":", 1)[0]
        authority = f"{user}:{REDACTED}@{host}" if ":" in userinfo else f"{user}@{host}"
    if scheme in ("http", "https") and (sep or "?" in authority):
        # A path or query may carry a token (webhook URLs do): print the origin only.
        return f"{scheme}://{authority.split('?', 1)[0]}/…"
    return f"{scheme}://{authority}{sep}{tail}"


def scrub(text: str) -> str:
    """`text` with credentials, URL passwords and http(s) paths masked."""
    if not text:
        return text
    text = _JWT.sub("[jwt]", text)
    text = _CLIENT_SECRET.sub(r"\1_secret_…", text)
    text = _CREDENTIAL.sub(lambda m: f"{m.group(1)}_…", text)
    return _URL.sub(_mask_url, text)


def _clean(name: str, value: Any) -> Any:
    if _SECRET_FIELD.search(name):
        return REDACTED
    if isinstance(value, str):
        return scrub(value)
    if isinstance(value, (bool, int, float)) or value is None:
        return value
    if isinstance(value, Mapping):
        return {str(k): _clean(str(k), v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_clean(name, v) for v in value]
    return scrub(str(value))


def fields(record: logging.LogRecord) -> dict[str, Any]:
    """The fields a call site passed with `extra=`, cleaned of secrets, in its order."""
    return {k: _clean(k, v) for k, v in record.__dict__.items() if k not in _RECORD_ATTRS and not k.startswith("_")}


def _timestamp(record: logging.LogRecord) -> str:
    moment = dt.datetime.fromtimestamp(record.created, dt.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


class _Base(logging.Formatter):
    def __init__(self, service: str | None = None) -> None:
        super().__init__()
        self.service = service

    def parts(self, record: logging.LogRecord) -> tuple[str, dict[str, Any], str | None]:
        event = scrub(record.getMessage())
        extra = fields(record)
        if self.service is not None and "service" not in extra:
            extra["service"] = self.service
        exception = None
        if record.exc_info:
            exception = scrub(self.formatException(record.exc_info))
        elif record.exc_text:
            exception = scrub(record.exc_text)
        if record.stack_info:
            exception = (exception + "\n" if exception else "") + scrub(self.formatStack(record.stack_info))
        return event, extra, exception


class JsonFormatter(_Base):
    """One JSON object per line: ts, level, logger, event, then every field."""

    def format(self, record: logging.LogRecord) -> str:
        event, extra, exception = self.parts(record)
        out: dict[str, Any] = {
            "ts": _timestamp(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": event,
        }
        for k, v in extra.items():
            out[k if k not in out else f"field_{k}"] = v
        if exception is not None:
            out["exception"] = exception
        return json.dumps(out, default=str, ensure_ascii=False)


_BARE = re.compile(r"^[^\s\"=\\]+$")


def _text_value(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (dict, list)):
        return json.dumps(value, default=str, ensure_ascii=False, separators=(",", ":"))
    text = str(value)
    return text if text and _BARE.match(text) else json.dumps(text, ensure_ascii=False)


class TextFormatter(_Base):
    """`ts LEVEL logger event key=value …`; a traceback follows on indented lines."""

    def format(self, record: logging.LogRecord) -> str:
        event, extra, exception = self.parts(record)
        line = f"{_timestamp(record)} {record.levelname:<5} {record.name} {event}"
        if extra:
            line += " " + " ".join(f"{k}={_text_value(v)}" for k, v in extra.items())
        if exception:
            line += "\n" + "\n".join("    " + row for row in exception.splitlines())
        return line


def formatter(fmt: str = "text", service: str | None = None) -> logging.Formatter:
    if fmt not in FORMATS:
        raise ValueError(f"LOG_FORMAT: expected one of {', '.join(FORMATS)}, got {fmt!r}")
    return JsonFormatter(service) if fmt == "json" else TextFormatter(service)


def setup(level: str = "INFO", fmt: str = "text", *, service: str | None = None, stream: TextIO | None = None) -> None:
    """Install the one formatter on the root logger (replacing any handler there) and
    set the levels: ours at `level`, the libraries' at WARNING unless `level` is DEBUG."""
    level = level.upper()
    if level not in LEVELS:
        raise ValueError(f"LOG_LEVEL: expected one of {', '.join(LEVELS)}, got {level!r}")
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(formatter(fmt, service))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if level == "DEBUG" else max(logging.WARNING, logging.getLevelName(level)))
    for name in OWN_LOGGERS:
        logging.getLogger(name).setLevel(level)
    logging.captureWarnings(True)
    if level != "DEBUG":
        # platformdirs (through a dependency) warns once per process on machines without a
        # login session; it says nothing about this program.
        warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
