"""One log format (core/logs.py): every field printed, secrets never, libraries quiet."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from typing import Any, cast

import pytest
from aiohttp.test_utils import make_mocked_request

from api.errors import shape_error
from core import logs
from core.errors import Unavailable
from webhooks.store import EventStore
from webhooks.worker import EventWorker


@pytest.fixture
def captured() -> Iterator[io.StringIO]:
    """The root logger writing JSON lines into a buffer, as LOG_FORMAT=json sets it up."""
    root = logging.getLogger()
    before = (list(root.handlers), root.level)
    stream = io.StringIO()
    logs.setup("INFO", "json", service="test", stream=stream)
    yield stream
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in before[0]:
        root.addHandler(handler)
    root.setLevel(before[1])


def lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines() if line.strip()]


def test_dependency_unavailable_names_what_and_where(captured: io.StringIO) -> None:
    request = make_mocked_request("POST", "/api/credits/use")
    response = shape_error(request, Unavailable("redis: connection refused"))
    assert response.status == 503
    [event] = lines(captured)
    assert event["event"] == "dependency_unavailable"
    assert event["level"] == "warning" and event["logger"] == "api.errors" and event["service"] == "test"
    assert event["path"] == "/api/credits/use" and event["error"] == "redis: connection refused"


class _Events:
    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    async def retry(self, org: str, event_id: str, *, error: str, delay_s: float, give_up: bool) -> None:
        self.calls.append({"org": org, "event": event_id, "give_up": give_up})


async def test_event_gave_up_says_which_event_of_whom_and_why(captured: io.StringIO) -> None:
    events = _Events()
    worker = EventWorker(cast(EventStore, events), cast(Any, None), workers=1, sweep_interval_s=1.0, attempts_max=3)
    org = "7d6f4c1e-0000-4000-8000-000000000001"
    await worker._retry(org, "evt_1", "invoice.paid", 2, "StripeUnavailable: timeout", 4.0)
    await worker._retry(org, "evt_1", "invoice.paid", 3, "StripeUnavailable: timeout", 8.0)
    retry, gave_up = lines(captured)
    assert retry["event"] == "event_retry" and retry["retry_in_s"] == 4.0 and retry["attempts"] == 2
    assert gave_up["event"] == "event_gave_up" and gave_up["level"] == "error"
    assert {k: gave_up[k] for k in ("stripe_event", "type", "organization_id", "attempts", "error")} == {
        "stripe_event": "evt_1",
        "type": "invoice.paid",
        "organization_id": org,
        "attempts": 3,
        "error": "StripeUnavailable: timeout",
    }
    assert events.calls[-1]["give_up"] is True


def test_text_lines_are_key_value(captured: io.StringIO) -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logs.formatter("text", service="meter"))
    logger = logging.getLogger("billing.credits.text")
    logger.addHandler(handler)
    try:
        logger.info("credits_granted", extra={"organization_id": "o-1", "credits": "500", "note": "two words"})
    finally:
        logger.removeHandler(handler)
    line = stream.getvalue().strip()
    assert line.endswith('credits_granted organization_id=o-1 credits=500 note="two words" service=meter')
    assert " INFO  billing.credits.text " in line


def test_old_style_messages_and_tracebacks_print(captured: io.StringIO) -> None:
    log = logging.getLogger("settler.service")
    log.warning("grant_push_failed grant=%s error=%s", "g-1", "boom")
    try:
        raise ValueError("broken")
    except ValueError:
        log.exception("partition_failed partition=%d", 3)
    first, second = lines(captured)
    assert first["event"] == "grant_push_failed grant=g-1 error=boom"
    assert second["event"] == "partition_failed partition=3"
    assert "ValueError: broken" in second["exception"]


def test_secrets_and_webhook_urls_are_never_printed(captured: io.StringIO) -> None:
    log = logging.getLogger("settler.alerts")
    jwt = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJlLXBhcnQ"
    log.warning(
        "webhook_delivery_failed id=%s url=%s error=%s",
        "d-1",
        "https://hooks.example.com/services/T00/B00/XXXXSECRET?token=abc",
        "timeout",
    )
    log.info(
        "credential_seen",
        extra={
            "api_key": "ck_abcdefghijklmnop",
            "webhook_url": "https://hooks.example.com/T/B/secret",
            "secret": "whsec_abcdefghijkl",
            "detail": f"Bearer {jwt} for sk_test_abcdefgh123 and whsec_zzzzzzzzzz",
            "database": "postgresql://credits:hunter2@db:5432/credits",
            "client": "pi_123ABC_secret_456DEF",
            "nested": {"password": "p", "ok": "fine"},
        },
    )
    text = captured.getvalue()
    for secret in ("XXXXSECRET", "token=abc", "abcdefghijklmnop", "/T/B/secret", "whsec_abcdefghijkl", "hunter2"):
        assert secret not in text
    for secret in (jwt, "sk_test_abcdefgh123", "whsec_zzzzzzzzzz", "456DEF"):
        assert secret not in text
    first, second = lines(captured)
    assert "https://hooks.example.com/…" in first["event"]
    assert second["api_key"] == second["webhook_url"] == second["secret"] == logs.REDACTED
    assert second["database"] == "postgresql://credits:[redacted]@db:5432/credits"
    assert second["client"] == "pi_123ABC_secret_…"
    assert second["nested"] == {"password": logs.REDACTED, "ok": "fine"}
    assert "[jwt]" in second["detail"] and "sk_test_…" in second["detail"]


def test_libraries_are_held_at_warning_unless_debug(captured: io.StringIO) -> None:
    assert logging.getLogger("meter.app").isEnabledFor(logging.INFO)
    assert logging.getLogger("credits").isEnabledFor(logging.INFO)
    for library in ("arq.worker", "stripe", "aiohttp.access", "asyncio"):
        assert not logging.getLogger(library).isEnabledFor(logging.INFO), library
        assert logging.getLogger(library).isEnabledFor(logging.WARNING), library
    logs.setup("DEBUG", "json", stream=io.StringIO())
    assert logging.getLogger("arq.worker").isEnabledFor(logging.DEBUG)


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="LOG_FORMAT"):
        logs.formatter("yaml")
    with pytest.raises(ValueError, match="LOG_LEVEL"):
        logs.setup("LOUD", "text", stream=io.StringIO())
