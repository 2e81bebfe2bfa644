"""What reconciliation counts of a held dead letter's effect on a credit line's debt."""

from __future__ import annotations

import msgspec

from ledger.store import debt_change

enc = msgspec.msgpack.encode


def test_each_event_kind_moves_the_debt_as_the_scripts_do() -> None:
    assert debt_change(enc({"t": "use", "amt": 5, "od": 3})) == 3
    assert debt_change(enc({"t": "use", "amt": 5})) == 0
    assert debt_change(enc({"t": "use_batch", "ev": [{"amt": 1, "od": 1}, {"amt": 2}, {"amt": 4, "od": 4}]})) == 5
    assert debt_change(enc({"t": "hold", "amt": 9, "od": 2})) == 2
    assert debt_change(enc({"t": "hold_closed", "used": 1, "odr": 2})) == -2
    assert debt_change(enc({"t": "grant_applied", "g": "x", "amt": 10, "rp": 7})) == -7
    assert debt_change(enc({"t": "grant_expired", "amt": 10})) == 0


def test_an_unreadable_entry_counts_nothing() -> None:
    assert debt_change(b"\xc1") == 0
    assert debt_change(enc([1, 2])) == 0
    assert debt_change(enc({"t": "use_batch", "ev": "no"})) == 0
