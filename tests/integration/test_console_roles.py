"""The ops console's database side (issue 11, 0020_console.sql): its role reads every
organization and writes no table; the audit trail is append-only for every role;
operators' links are single use and their sessions end; the CLI's money verbs
(accounts.audited) leave an audit row naming who did it, a refusal included."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest

from accounts import admin, audited
from core.config import Config
from hotpath.client import HotPath
from ledger.operators import (
    Actor,
    AuditFilter,
    LinkRefused,
    OperatorAdmin,
    OperatorError,
    OperatorSessions,
    audit_rows,
)
from ledger.store import Ledger
from tests.conftest import Org

CREDIT = 1000
APP_ROLES = ("credits_app", "credits_settler", "credits_console")


async def connect_as(config: Config, role: str) -> asyncpg.Connection:
    dsn = {
        "credits_app": config.app_dsn(),
        "credits_settler": config.settler_dsn(),
        "credits_console": config.console_dsn(),
        "owner": config.database_url,
    }[role]
    return await asyncpg.connect(dsn)


@pytest.fixture
async def owner(migrated: Config) -> AsyncIterator[asyncpg.Connection]:
    conn = await connect_as(migrated, "owner")
    yield conn
    await conn.close()


@pytest.fixture
async def console_pool(migrated: Config) -> AsyncIterator[asyncpg.Pool]:
    pool = await asyncpg.create_pool(migrated.console_dsn(), min_size=1, max_size=2)
    assert pool is not None
    yield pool
    await pool.close()


def email() -> str:
    return f"op-{uuid.uuid4().hex[:8]}@ops.example"


async def test_the_console_role_is_no_owner_superuser_or_bypassrls(owner: asyncpg.Connection) -> None:
    row = await owner.fetchrow(
        "SELECT rolsuper, rolbypassrls, rolcreaterole, rolcreatedb FROM pg_roles WHERE rolname = 'credits_console'"
    )
    assert row is not None and not any(row.values())
    owned = await owner.fetchval(
        "SELECT count(*) FROM pg_class WHERE relowner = 'credits_console'::regrole"
        " AND relnamespace = 'public'::regnamespace"
    )
    assert owned == 0


async def test_the_console_role_cannot_write_any_table(migrated: Config, owner: asyncpg.Connection, org: Org) -> None:
    tables = [
        r["relname"]
        for r in await owner.fetch(
            "SELECT relname FROM pg_class WHERE relkind = 'r' AND relnamespace = 'public'::regnamespace ORDER BY 1"
        )
    ]
    assert "operator_audit" in tables and "organizations" in tables
    writable = await owner.fetch(
        "SELECT t AS table, p AS privilege FROM unnest($1::text[]) t,"
        " unnest(ARRAY['INSERT', 'UPDATE', 'DELETE', 'TRUNCATE', 'REFERENCES', 'TRIGGER']) p"
        " WHERE has_table_privilege('credits_console', t, p)",
        tables,
    )
    assert [dict(r) for r in writable] == []
    any_column = await owner.fetch(
        "SELECT table_name, column_name, privilege_type FROM information_schema.column_privileges"
        " WHERE grantee = 'credits_console' AND privilege_type <> 'SELECT'"
    )
    assert any_column == []
    conn = await connect_as(migrated, "credits_console")
    try:
        org_id = uuid.UUID(org.id)
        attempts = [
            ("UPDATE organizations SET balance = balance + 1000 WHERE id = $1", org_id),
            ("DELETE FROM api_keys WHERE organization_id = $1", org_id),
            (
                "INSERT INTO credit_grants (id, organization_id, source, amount, remaining, priority, reference)"
                " VALUES (gen_random_uuid(), $1, 'admin', 1, 1, 20, 'x')",
                org_id,
            ),
            ("INSERT INTO operator_audit (actor, via, action, outcome) VALUES ($1, 'cli', 'x.y', 'applied')", "me"),
            ("UPDATE operators SET disabled_at = NULL WHERE email = $1", "x"),
            ("SELECT * FROM grant_credits($1, 'admin', 1000, 20, NULL, 'console-direct', 'no')", org_id),
        ]
        for sql, arg in attempts:
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await conn.execute(sql, arg)
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.execute("TRUNCATE ledger_entries")
        with pytest.raises(asyncpg.InsufficientPrivilegeError):  # a tenant's stored answers hold secrets
            await conn.fetch("SELECT * FROM idempotency_records")
        with pytest.raises(asyncpg.InsufficientPrivilegeError):  # a key's hash is not the console's
            await conn.fetch("SELECT key_hash FROM api_keys")
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.fetch("SELECT password_hash FROM operators")
    finally:
        await conn.close()


async def test_the_console_reads_every_organization_the_app_role_none(
    migrated: Config, org: Org, other_org: Org
) -> None:
    console = await connect_as(migrated, "credits_console")
    app = await connect_as(migrated, "credits_app")
    try:
        ids = {str(r["id"]) for r in await console.fetch("SELECT id FROM organizations")}
        assert {org.id, other_org.id} <= ids
        entries = await console.fetchval(
            "SELECT count(DISTINCT organization_id) FROM ledger_entries WHERE organization_id = ANY($1::uuid[])",
            [uuid.UUID(org.id), uuid.UUID(other_org.id)],
        )
        assert entries == 2
        assert await app.fetchval("SELECT count(*) FROM organizations") == 0  # no organization context
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await app.fetch("SELECT * FROM operator_audit")
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await app.fetch("SELECT * FROM operator_sessions")
    finally:
        await console.close()
        await app.close()


@pytest.mark.parametrize("role", [*APP_ROLES, "owner"])
async def test_the_audit_trail_refuses_update_and_delete(migrated: Config, ledger: Ledger, role: str) -> None:
    row_id = await _an_audit_row(ledger)
    conn = await connect_as(migrated, role)
    try:
        for sql in (
            "UPDATE operator_audit SET reason = 'rewritten' WHERE id = $1",
            "DELETE FROM operator_audit WHERE id = $1",
        ):
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await conn.execute(sql, row_id)
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.execute("TRUNCATE operator_audit")
    finally:
        await conn.close()
    owner = await connect_as(migrated, "owner")
    try:
        assert await owner.fetchval("SELECT reason FROM operator_audit WHERE id = $1", row_id) == "kept"
    finally:
        await owner.close()


async def _an_audit_row(ledger: Ledger) -> int:
    from ledger.operators import AuditEntry, record

    entry = AuditEntry("test.row", "applied", reason="kept")
    return await record(ledger.pool, Actor("cli", None, "tester@host"), entry)


async def test_cli_money_verbs_leave_an_audit_row_each(
    ledger: Ledger, hot: HotPath, org: Org, owner: asyncpg.Connection, console_pool: asyncpg.Pool
) -> None:
    system = Actor.cli(None)
    assert system.label.startswith("system:") and "@" in system.label
    ref = f"ref-{uuid.uuid4().hex[:6]}"
    first = await audited.grant(ledger, hot, system, org.id, amount=25 * CREDIT, reason="goodwill", reference=ref)
    again = await audited.grant(ledger, hot, system, org.id, amount=25 * CREDIT, reason="goodwill", reference=ref)
    assert first.created and not again.created and first.grant_id == again.grant_id
    with pytest.raises(admin.AdminError, match="available"):
        await audited.adjust(ledger, hot, system, org.id, amount=-10_000 * CREDIT, reason="too much", reference=None)
    op = email()
    await OperatorAdmin(owner).create(op, name="Ops", created_by="test")
    named = Actor.cli(op)
    await audited.revoke_key(ledger, hot, named, org.id, org.admin_key_id, reason="leaked")
    rows = await audit_rows(console_pool, AuditFilter(organization_id=org.id), limit=10)
    assert [(r.action, r.outcome, r.actor) for r in rows] == [
        ("key.revoke", "applied", f"operator:{op}"),
        ("credits.adjust", "refused", system.label),
        ("credits.grant", "replayed", system.label),
        ("credits.grant", "applied", system.label),
    ]
    assert rows[3].amount == 25 * CREDIT and rows[3].reference == ref and rows[3].via == "cli"
    assert rows[3].target == f"grant:{first.grant_id}" and rows[3].source == system.source
    assert rows[2].amount == 0
    assert "available" in rows[1].detail["error"]


async def test_an_unknown_operator_moves_no_money(ledger: Ledger, hot: HotPath, org: Org) -> None:
    before, _ = await ledger.ledger_balance(org.id)
    with pytest.raises(OperatorError, match="not an active operator"):
        await audited.grant(
            ledger, hot, Actor.cli(email()), org.id, amount=5 * CREDIT, reason="who?", reference="unknown-op"
        )
    assert (await ledger.ledger_balance(org.id))[0] == before


async def test_links_are_single_use_and_sessions_end(
    owner: asyncpg.Connection, console_pool: asyncpg.Pool, ledger: Ledger, hot: HotPath, org: Org
) -> None:
    op = email()
    operators = OperatorAdmin(owner)
    link = await operators.create(op, name="Ada", created_by="test")
    with pytest.raises(OperatorError, match="already"):
        await operators.create(op.upper(), name="Ada", created_by="test")
    sessions = OperatorSessions(console_pool)
    started = await sessions.redeem(link.token, source="127.0.0.1", user_agent="pytest")
    with pytest.raises(LinkRefused) as refused:
        await sessions.redeem(link.token, source="127.0.0.1", user_agent="pytest")
    assert refused.value.reason == "used"
    for bad, reason in (("op1_" + "x" * 43, "unknown"), ("nope", "malformed")):
        with pytest.raises(LinkRefused) as refused:
            await sessions.redeem(bad, source="", user_agent="")
        assert refused.value.reason == reason
    session = await sessions.session(started.cookie)
    assert session is not None and session.email == op and session.method == "link" and not session.password_set

    # A password (argon2id), then signing in with it; a wrong one is refused and on record.
    with pytest.raises(OperatorError, match="characters"):
        await sessions.set_password(started.cookie, "short", source="127.0.0.1")
    assert await sessions.set_password(started.cookie, "correct horse battery", source="127.0.0.1")
    stored = await owner.fetchval("SELECT password_hash FROM operators WHERE email = $1", op)
    assert stored.startswith("$argon2id$")
    assert await sessions.sign_in(op, "wrong horse battery", source="10.0.0.9", user_agent="x") is None
    assert await sessions.sign_in("nobody@ops.example", "correct horse battery", source="", user_agent="") is None
    by_password = await sessions.sign_in(op.upper(), "correct horse battery", source="10.0.0.9", user_agent="x")
    assert by_password is not None
    assert (await sessions.session(by_password.cookie)).method == "password"  # type: ignore[union-attr]

    # Signing out ends that session; disabling the operator ends every other.
    assert await sessions.end(started.cookie, source="127.0.0.1")
    assert await sessions.session(started.cookie) is None
    assert await operators.disable(op) == 1
    assert await sessions.session(by_password.cookie) is None
    assert await sessions.sign_in(op, "correct horse battery", source="", user_agent="") is None
    with pytest.raises(OperatorError, match="disabled"):
        await operators.link(op, created_by="test")
    with pytest.raises(OperatorError, match="not an active operator"):
        await audited.grant(ledger, hot, Actor.cli(op), org.id, amount=CREDIT, reason="gone", reference=None)

    rows = await audit_rows(console_pool, AuditFilter(actor=op), limit=20)
    assert [(r.action, r.outcome) for r in reversed(rows)] == [
        ("operator.sign_in", "applied"),
        ("operator.password_set", "applied"),
        ("operator.sign_in", "refused"),
        ("operator.sign_in", "applied"),
        ("operator.sign_out", "applied"),
        ("operator.sign_in", "refused"),  # disabled
    ]
    assert rows[3].source == "10.0.0.9"


async def test_an_expired_link_is_refused(owner: asyncpg.Connection, console_pool: asyncpg.Pool) -> None:
    link = await OperatorAdmin(owner).create(email(), name="", created_by="test", link_ttl_s=60)
    await owner.execute(
        "UPDATE operator_links SET expires_at = now() - interval '1 second', created_at = now() - interval '2 minutes'"
        " WHERE operator_id = $1",
        uuid.UUID(link.operator_id),
    )
    with pytest.raises(LinkRefused) as refused:
        await OperatorSessions(console_pool).redeem(link.token, source="", user_agent="")
    assert refused.value.reason == "expired"
