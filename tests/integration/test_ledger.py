"""The Postgres ledger: migrations, row-level security, stored procedures."""

from __future__ import annotations

import asyncio
import uuid

import asyncpg
import pytest

from core.config import Config
from ledger.migrate import migrate, migration_files
from ledger.store import Ledger
from tests.conftest import Org, Servers, _with_database

TENANT_TABLES = (
    "departments",
    "api_keys",
    "credit_grants",
    "ledger_entries",
    "grant_outbox",
    "usage_events",
    "reservations",
    "action_costs",
    "idempotency_records",
)


async def test_migrations_twice_and_concurrently(servers: Servers, config: Config) -> None:
    name = f"credits_mig_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(servers.database_url)
    await admin.execute(f'CREATE DATABASE "{name}"')
    try:
        url = _with_database(servers.database_url, name)
        results = await asyncio.gather(
            *(
                migrate(url, app_password=config.app_db_password, settler_password=config.settler_db_password)
                for _ in range(4)
            )
        )
        applied = [r for r in results if r]
        assert len(applied) == 1  # exactly one runner applied each file
        assert applied[0] == [n for n, _ in migration_files()]
        assert (
            await migrate(url, app_password=config.app_db_password, settler_password=config.settler_db_password) == []
        )
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


async def test_app_role_is_not_owner_superuser_or_bypassrls(ledger: Ledger) -> None:
    async with ledger.pool.acquire() as conn:
        row = await conn.fetchrow(
            "SELECT r.rolsuper, r.rolbypassrls, current_user AS me FROM pg_roles r WHERE r.rolname = current_user"
        )
        assert row["me"] == "credits_app"
        assert not row["rolsuper"] and not row["rolbypassrls"]
        owners = await conn.fetch(
            "SELECT tablename, tableowner FROM pg_tables WHERE schemaname = 'public' AND tablename = ANY($1)",
            list(TENANT_TABLES) + ["organizations"],
        )
        assert len(owners) == len(TENANT_TABLES) + 1
        assert all(r["tableowner"] != "credits_app" for r in owners)
        forced = await conn.fetch(
            "SELECT relname FROM pg_class WHERE relname = ANY($1) AND relrowsecurity AND relforcerowsecurity",
            list(TENANT_TABLES) + ["organizations"],
        )
        assert len(forced) == len(TENANT_TABLES) + 1


async def test_rls_hides_other_organizations_without_where(ledger: Ledger, org: Org, other_org: Org) -> None:
    await ledger.create_department(other_org.id, "secret-dept")
    async with ledger.tenant(org.id) as conn:
        for table in (*TENANT_TABLES, "organizations"):
            col = "id" if table == "organizations" else "organization_id"
            seen = {r[0] for r in await conn.fetch(f"SELECT DISTINCT {col} FROM {table}")}
            assert seen <= {uuid.UUID(org.id)}, table
        assert await conn.fetchval("SELECT count(*) FROM departments WHERE name = 'secret-dept'") == 0
        # Writing into another organization is refused too.
        with pytest.raises(asyncpg.exceptions.InsufficientPrivilegeError):
            await conn.execute(
                "INSERT INTO departments (id, organization_id, name) VALUES ($1, $2, 'x')",
                uuid.uuid4(),
                uuid.UUID(other_org.id),
            )


async def test_no_organization_context_sees_nothing(ledger: Ledger, org: Org) -> None:
    async with ledger.pool.acquire() as conn:
        assert await conn.fetchval("SELECT count(*) FROM ledger_entries") == 0
        assert await conn.fetchval("SELECT count(*) FROM organizations") == 0
        with pytest.raises(asyncpg.exceptions.InsufficientPrivilegeError):
            await conn.fetchval("SELECT count(*) FROM api_key_index")


async def test_signup_bonus_is_a_ledger_entry(ledger: Ledger, org: Org) -> None:
    async with ledger.tenant(org.id) as conn:
        rows = await conn.fetch("SELECT type, amount, balance_after, reference FROM ledger_entries")
    assert [tuple(r) for r in rows] == [("grant", 100_000, 100_000, "signup_bonus:signup")]


async def test_concurrent_grants_with_one_reference_grant_once(ledger: Ledger, org: Org) -> None:
    results = await asyncio.gather(
        *(ledger.grant(org.id, amount=7_000, source="purchase", reference="pi_123", reason="pack") for _ in range(20))
    )
    assert sum(r.created for r in results) == 1
    assert len({r.grant_id for r in results}) == 1
    balance, entries = await ledger.ledger_balance(org.id)
    assert balance == entries == 107_000


async def test_grant_rejects_bad_amounts_with_no_effect(ledger: Ledger, org: Org) -> None:
    for amount in (0, -5):
        with pytest.raises(asyncpg.exceptions.InvalidParameterValueError):
            await ledger.grant(org.id, amount=amount, source="admin", reference=f"bad{amount}", reason="x")
    assert await ledger.ledger_balance(org.id) == (100_000, 100_000)


async def test_api_keys_are_hashed_at_rest(ledger: Ledger, org: Org) -> None:
    async with ledger.tenant(org.id) as conn:
        rows = await conn.fetch("SELECT key_hash, prefix FROM api_keys")
    assert len(rows) == 1
    assert bytes(rows[0]["key_hash"]) != org.admin_key.encode()
    assert org.admin_key.encode() not in bytes(rows[0]["key_hash"])
    cred = await ledger.authenticate(org.admin_key)
    assert cred is not None and cred.organization_id == org.id and cred.role == "admin"
    assert await ledger.authenticate(org.admin_key + "x") is None
