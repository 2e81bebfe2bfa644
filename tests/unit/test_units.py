"""Fast tests with no servers: money, configuration, validation errors, periods,
the scripts' status codes and the OpenAPI document."""

from __future__ import annotations

import datetime as dt
import decimal
import json
import re

import msgspec
import pytest

import lua
from api.errors import from_validation
from core.config import ConfigError, Durability, load
from core.money import PrecisionError, to_credits, to_milli
from hotpath.client import fingerprint, period_bounds, period_starts_ms
from meter import schemas


@pytest.mark.parametrize(
    ("text", "milli"),
    [
        ("0", 0),
        ("1", 1000),
        ("0.001", 1),
        ("0.125", 125),
        ("-2.5", -2500),
        ("1E+2", 100_000),
        ("999999999999.999", 999999999999999),
    ],
)
def test_credits_to_milli_exact(text: str, milli: int) -> None:
    assert to_milli(decimal.Decimal(text)) == milli
    assert to_milli(to_credits(milli)) == milli


@pytest.mark.parametrize("text", ["0.0001", "1.0005", "NaN", "Infinity", "1e13", "-1e13"])
def test_credits_refuse_more_precision_or_range(text: str) -> None:
    with pytest.raises(PrecisionError):
        to_milli(decimal.Decimal(text))


def test_credits_render_without_exponent_or_trailing_zeros() -> None:
    assert [str(to_credits(m)) for m in (100_000, 1500, 1, -3, 0)] == ["100", "1.5", "0.001", "-0.003", "0"]


def test_config_defaults_and_errors_name_the_variable() -> None:
    c = load({})
    assert c.embedded and c.redis_url is None and c.durability is Durability.ASYNC
    c = load(
        {
            "REDIS_URL": "redis://h:1/0",
            "DATABASE_URL": "postgresql://u:p@h:5/db",
            "DURABILITY": "local",
            "APP_DB_PASSWORD": "app pass/@",
            "SETTLER_DB_PASSWORD": "settler-pass",
            "CONSOLE_DB_PASSWORD": "console-pass",
        }
    )
    assert not c.embedded and c.durability is Durability.LOCAL
    assert c.app_dsn() == "postgresql://credits_app:app%20pass%2F%40@h:5/db"
    assert c.console_dsn() == "postgresql://credits_console:console-pass@h:5/db"
    for env, name in [
        ({"REDIS_URL": "http://x"}, "REDIS_URL"),
        ({"DATABASE_URL": "mysql://x"}, "DATABASE_URL"),
        ({"USAGE_PARTITIONS": "zero"}, "USAGE_PARTITIONS"),
        ({"USAGE_PARTITIONS": "0"}, "USAGE_PARTITIONS"),
        ({"RATE_LIMIT_PER_S": "-1"}, "RATE_LIMIT_PER_S"),
        ({"IDEMPOTENCY_TTL_S": "60"}, "IDEMPOTENCY_TTL_S"),
        ({"DURABILITY": "sometimes"}, "DURABILITY"),
        ({"JWT_SECRET": "short"}, "JWT_SECRET"),
        ({"LOG_LEVEL": "chatty"}, "LOG_LEVEL"),
        ({"METER_PORT": "70000"}, "METER_PORT"),
    ]:
        with pytest.raises(ConfigError, match=name):
            load(env)


def test_validation_errors_carry_the_json_path() -> None:
    dec = msgspec.json.Decoder(schemas.BatchRequest)
    with pytest.raises(msgspec.ValidationError) as exc:
        dec.decode(b'{"items": [{"action": "a"}, {"action": "a", "units": 0}]}')
    err = from_validation(exc.value)
    assert (err.status, err.code, err.param) == (400, "invalid_request", "$.items[1].units")
    with pytest.raises(msgspec.ValidationError) as exc:
        dec.decode(b'{"items": [{"action": "a", "colour": 1}]}')
    assert from_validation(exc.value).param == "$.items[0].colour"
    with pytest.raises(msgspec.DecodeError) as dexc:
        dec.decode(b"{")
    assert from_validation(dexc.value).message.startswith("malformed JSON")


def test_period_starts_and_bounds() -> None:
    t = int(dt.datetime(2026, 12, 31, 15, 0, tzinfo=dt.UTC).timestamp() * 1000)  # a Thursday
    day, week, month = period_starts_ms(t)
    assert dt.datetime.fromtimestamp(day / 1000, dt.UTC) == dt.datetime(2026, 12, 31, tzinfo=dt.UTC)
    assert dt.datetime.fromtimestamp(week / 1000, dt.UTC) == dt.datetime(2026, 12, 28, tzinfo=dt.UTC)
    assert dt.datetime.fromtimestamp(month / 1000, dt.UTC) == dt.datetime(2026, 12, 1, tzinfo=dt.UTC)
    start, end = period_bounds("month", t)
    assert (start.month, end.year, end.month) == (12, 2027, 1)


def test_fingerprint_is_stable_and_sensitive() -> None:
    assert fingerprint("use", "a", 1, "", None) == fingerprint("use", "a", 1, "", None)
    assert fingerprint("use", "a", 1, "", None) != fingerprint("use", "a", 2, "", None)
    assert fingerprint("use", "a", 1, "", {"x": 1}) != fingerprint("use", "a", 1, "", {"x": 2})


# The upper-case names lib.lua declares itself (`local A, B = ...`): constants, not statuses.
LIB_CONSTANTS = {
    name.strip()
    for declared in re.findall(r"^local ([A-Z][A-Z0-9_, ]*?) *(?:=|$)", lua._read("lib.lua"), flags=re.M)
    for name in declared.split(",")
}


def test_every_status_a_script_names_is_in_the_enum() -> None:
    names = {s.name for s in lua.Status}
    for script in lua.SCRIPTS:
        body = lua.source(script).split("\n", len(lua.Status))[-1]
        body = re.sub(r"--\[\[.*?\]\]|--[^\n]*|'[^'\n]*'", "", body, flags=re.S)  # comments, strings
        used = set(re.findall(r"\b([A-Z][A-Z_]{2,})\b", body)) - LIB_CONSTANTS - {"KEYS", "ARGV", "LOG_WARNING"}
        used = {u for u in used if not u.startswith("K_")}
        assert used <= names, (script, used - names)


def test_every_script_has_a_header() -> None:
    for script in lua.SCRIPTS:
        text = (lua.source(script)).split(lua._read("lib.lua"))[1]
        assert "KEYS" in text and "ARGV" in text and "Returns" in text, script


def test_openapi_document_covers_the_contract() -> None:
    from meter import openapi

    doc = json.loads(openapi.document())
    assert doc["openapi"].startswith("3.")
    use = doc["paths"]["/api/credits/use"]["post"]
    assert use["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("/UseRequest")
    assert set(use["responses"]) >= {"200", "400", "401", "402", "409", "413", "429", "503"}
    props = doc["components"]["schemas"]["UseResponse"]["properties"]
    assert set(props) == {"id", "action", "units", "credits", "balance", "available"}
    assert props["credits"]["type"] == "number"


def test_well_known_role_passwords_only_for_a_local_postgres() -> None:
    remote = {"DATABASE_URL": "postgresql://owner:pw@db.example.com:5432/credits"}
    with pytest.raises(ConfigError, match="APP_DB_PASSWORD"):
        load(remote)
    with pytest.raises(ConfigError, match="SETTLER_DB_PASSWORD"):
        load({**remote, "APP_DB_PASSWORD": "s3cret-of-our-own"})
    with pytest.raises(ConfigError, match="development password"):
        load({**remote, "APP_DB_PASSWORD": "change-me-app", "SETTLER_DB_PASSWORD": "x" * 20})
    with pytest.raises(ConfigError, match="CONSOLE_DB_PASSWORD"):
        load({**remote, "APP_DB_PASSWORD": "a" * 20, "SETTLER_DB_PASSWORD": "b" * 20})
    ok = load({**remote, "APP_DB_PASSWORD": "a" * 20, "SETTLER_DB_PASSWORD": "b" * 20, "CONSOLE_DB_PASSWORD": "c" * 20})
    assert ok.app_db_password == "a" * 20 and ok.console_db_password == "c" * 20
    # The role's own URL carries its password: nothing to check here.
    load(
        {
            **remote,
            "APP_DATABASE_URL": "postgresql://credits_app:x@db/credits",
            "SETTLER_DB_PASSWORD": "b" * 20,
            "CONSOLE_DATABASE_URL": "postgresql://credits_console:y@db/credits",
        }
    )
    load({"DATABASE_URL": "postgresql://postgres@127.0.0.1:5432/test"})  # a Postgres on this machine
    load({})  # the embedded stack


def test_role_passwords_reach_postgres_as_scram_verifiers_only() -> None:
    import base64
    import hashlib
    import hmac

    from ledger.migrate import scram_verifier

    verifier = scram_verifier("pässwörd")
    assert "pässwörd" not in verifier
    method, rest = verifier.split("$", 1)
    head, keys = rest.split("$")
    iterations, salt = head.split(":")
    stored_key, server_key = (base64.b64decode(k) for k in keys.split(":"))
    assert method == "SCRAM-SHA-256" and int(iterations) == 4096
    # RFC 5802, as the server checks a client's proof: the stored key is H(HMAC(Hi(p, s, i), "Client Key")).
    salted = hashlib.pbkdf2_hmac("sha256", "pässwörd".encode(), base64.b64decode(salt), int(iterations))
    client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
    assert hashlib.sha256(client_key).digest() == stored_key
    assert hmac.new(salted, b"Server Key", hashlib.sha256).digest() == server_key


def test_a_stored_verifier_is_recognised_for_its_password_only() -> None:
    """migrate leaves a role alone when it has its password already (roles are shared by
    the server's databases: two migrations at once would update the same row)."""
    from ledger.migrate import scram_verifier, verifier_matches

    verifier = scram_verifier("pässwörd")
    assert verifier_matches(verifier, "pässwörd")
    assert not verifier_matches(verifier, "password")
    assert not verifier_matches("md5" + "0" * 32, "pässwörd")
    assert not verifier_matches("", "pässwörd")


def test_the_usage_audit_is_configured_exactly() -> None:
    c = load({"ANOMALY_FACTOR": "3", "ANOMALY_MIN_CREDITS": "2.5", "ANOMALY_BASELINE_HOURS": "48"})
    assert (c.anomaly_factor, c.anomaly_min_credits, c.anomaly_baseline_hours) == (3.0, 2500, 48)
    for env, name in [
        ({"ANOMALY_FACTOR": "1"}, "ANOMALY_FACTOR"),
        ({"ANOMALY_MIN_CREDITS": "0.0001"}, "ANOMALY_MIN_CREDITS"),
        ({"ANOMALY_MIN_CREDITS": "lots"}, "ANOMALY_MIN_CREDITS"),
        ({"ANOMALY_BASELINE_HOURS": "2"}, "ANOMALY_BASELINE_HOURS"),
    ]:
        with pytest.raises(ConfigError, match=name):
            load(env)


def test_the_anomaly_method_judges_one_hour() -> None:
    import datetime as dt

    from settler.anomalies import Method, judge

    hour = dt.datetime(2026, 6, 1, 12, tzinfo=dt.UTC)
    method = Method(factor=5.0, baseline_hours=168, min_history_hours=24, min_credits=10_000)

    def row(spend: int, before: int, hours_ago: int, credential: str | None = None) -> dict:  # type: ignore[type-arg]
        return {
            "organization_id": "o",
            "credential_id": credential,
            "spend": spend,
            "before": before,
            "first_hour": hour - dt.timedelta(hours=hours_ago),
        }

    found = judge(method, row(200_001, 168 * 40_000, 500), hour)  # 40/h baseline, 5x is 200
    assert found is not None and found.baseline == 40_000 and found.baseline_hours == 168
    assert judge(method, row(200_000, 168 * 40_000, 500), hour) is None  # not beyond the factor
    assert judge(method, row(49_000, 0, 500), hour) is None  # under 5 x the 10-credit floor
    assert judge(method, row(10**9, 1000, 23, "key"), hour) is None  # under a day of history
    short = judge(method, row(500_000, 48 * 10_000, 48, "key"), hour)  # two days: the mean over those
    assert short is not None and short.scope == "api_key" and short.baseline == 10_000 and short.baseline_hours == 48
