"""The hot path's shortcuts give exactly what the plain way gives: credits written
without a Decimal, the /use response written without a Struct, period starts cached
per day, call ids."""

from __future__ import annotations

import datetime as dt
import decimal

import msgspec

from core.money import format_credits, to_credits
from core.periods import period_starts_ms
from hotpath.client import _PeriodStarts, new_id
from meter import schemas
from meter.handlers import use_response_json


def test_format_credits_is_to_credits_as_text() -> None:
    for m in (*range(-2100, 2100, 7), 10**15 - 1, -(10**15) + 1, 120_000, 1_000_000_001):
        assert format_credits(m) == str(to_credits(m))
        assert decimal.Decimal(format_credits(m)) * 1000 == m


def test_use_response_written_directly_matches_the_struct() -> None:
    encode = msgspec.json.Encoder(decimal_format="number").encode
    for event_id, action, units, charged, balance, available in [
        ("abcdef0123456789abcdef0123456789", "tool_call", 1, 100, 999_999_899_900, 999_999_899_900),
        ("x.1", "llm_output_tokens", 1234, 2468, 0, -5),
        ('q"\\', "a:b-c.d_e", 10**9, 10**15, 1, 10**15 - 1),
    ]:
        struct = schemas.UseResponse(
            id=event_id,
            action=action,
            units=units,
            credits=to_credits(charged),
            balance=to_credits(balance),
            available=to_credits(available),
        )
        assert use_response_json(event_id, action, units, charged, balance, available) == encode(struct)


def test_period_starts_cached_per_day_are_the_computed_ones() -> None:
    starts = _PeriodStarts()
    t0 = int(dt.datetime(2026, 11, 29, 0, 0, tzinfo=dt.UTC).timestamp() * 1000)  # a Sunday, month end near
    for hours in (*range(0, 24 * 5), 24 * 40):  # across days, a week and a month boundary, back and forth
        for now in (t0 + hours * 3_600_000, t0 + hours * 3_600_000 - 1, t0 - hours * 3_600_000):
            assert starts(now) == period_starts_ms(now), now


def test_call_ids_are_unique_and_uuid_shaped() -> None:
    ids = [new_id() for _ in range(10_000)]
    assert len(set(ids)) == len(ids)
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in ids)


def test_batch_results_from_the_compact_answer_and_from_an_earlier_version() -> None:
    from hotpath.client import BatchItem, batch_results
    from lua import Status
    from meter.handlers import batch_response

    items = [BatchItem(a, u, "", "", None, "") for a, u in [("t", 1), ("t", 1), ("x", 1), ("t", 3), ("w", 2)]]
    compact = {
        "b": "base",
        "c": {"t": 100, "x": False, "w": 1500},
        "f": [{"i": 2, "err": int(Status.UNKNOWN_ACTION)}],
        "r": [[4, "first-call-id", 3000]],
        "balance": 99_500,
        "available": 99_000,
    }
    expanded = [
        {"i": 0, "ok": True, "id": "base-0", "credits": 100},
        {"i": 1, "ok": True, "id": "base-1", "credits": 100},
        {"i": 2, "ok": False, "err": int(Status.UNKNOWN_ACTION)},
        {"i": 3, "ok": True, "id": "base-3", "credits": 300},
        {"i": 4, "ok": True, "id": "first-call-id", "credits": 3000, "replay": True},
    ]
    assert batch_results(compact, items) == expanded
    earlier = {"results": expanded, "balance": 99_500, "available": 99_000}  # stored by the EVALSHA-era script
    assert batch_results(earlier, items) == expanded
    encode = msgspec.json.Encoder(decimal_format="number").encode
    assert encode(batch_response(compact, items)) == encode(batch_response(earlier, items))
    response = batch_response(compact, items)
    assert [r.ok for r in response.results] == [True, True, False, True, True]
    assert response.results[2].error is not None and response.results[2].error.code == "unknown_action"
    assert [str(r.credits) for r in response.results] == ["0.1", "0.1", "None", "0.3", "3"]
    assert (str(response.balance), str(response.available)) == ("99.5", "99")


def test_consume_encoded_by_hand_is_what_the_generic_path_sends() -> None:
    from hotpath.client import N_ORG_KEYS, HotPath, pack_command
    from hotpath.connection import PipelinedRedis

    for rate, burst in ((0.0, 0.0), (1000.0, 2000.0), (2.5, 7)):
        hot = HotPath(
            None,  # type: ignore[arg-type]  # no call is made
            None,  # type: ignore[arg-type]
            partitions=16,
            default_rate_per_s=rate,
            default_burst=burst,
            idempotency_ttl_s=172_800,
            pipe=PipelinedRedis(),
        )
        for org, cred, action, units, dept, metadata, key in [
            ("0b9e4a0c-6a55-4c3b-9c47-8d8a0e6f5b11", "k", "tool_call", 1, "", "", None),
            ("o", "jwt:user-1", "llm_output_tokens", 10**9, "d", '{"é": "ü", "n": 1}', "retry-7"),
        ]:
            now = 1_764_000_123_456
            extra, idem = hot._idem(org, key, "fp" if key else "")
            args = (*hot._common(org, cred, now, "c" * 32), *idem, action, units, dept, metadata, "c" * 32)
            generic = pack_command(
                ("FCALL", hot._names["consume"], N_ORG_KEYS + len(extra), *hot.org_keys(org), *extra, *args)
            )
            assert hot._consume_command(org, extra, args) == generic
