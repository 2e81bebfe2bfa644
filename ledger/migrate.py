"""SQL migrations: apply ledger/migrations/*.sql in order, once each.

Safe to run twice and from several processes at once: a session-level advisory lock
serializes runners, each file runs in its own transaction together with its row in
schema_migrations, and a file whose checksum changed after it was applied is refused.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import importlib.resources
import logging

import asyncpg
import scramp

from core.config import APP_ROLE, CONSOLE_ROLE, SETTLER_ROLE

log = logging.getLogger(__name__)

# Arbitrary constant: the advisory lock id of the migration runner.
MIGRATION_LOCK_ID = 0x6372656469747301


class MigrationError(RuntimeError):
    pass


SCRAM_ITERATIONS = 4096  # PostgreSQL's own default (scram_iterations)


def scram_verifier(password: str) -> str:
    """The SCRAM-SHA-256 verifier PostgreSQL stores for `password`, made here (with
    scramp, which applies SASLprep as the server and asyncpg do), so that ALTER ROLE
    carries the verifier and the password never leaves this process."""
    salt, stored_key, server_key, iterations = scramp.ScramMechanism("SCRAM-SHA-256").make_auth_info(
        password, iteration_count=SCRAM_ITERATIONS
    )
    b64 = base64.b64encode
    return f"SCRAM-SHA-256${iterations}:{b64(salt).decode()}${b64(stored_key).decode()}:{b64(server_key).decode()}"


def verifier_matches(verifier: str, password: str) -> bool:
    """Whether a stored SCRAM-SHA-256 verifier is the one of `password` (made again
    with its own salt and iteration count)."""
    try:
        head, keys = verifier.split("$", 1)[1].split("$")
        iterations, salt = head.split(":")
        salt_bytes = base64.b64decode(salt)
        _, stored_key, server_key, _ = scramp.ScramMechanism("SCRAM-SHA-256").make_auth_info(
            password, iteration_count=int(iterations), salt=salt_bytes
        )
    except (ValueError, IndexError):  # not a SCRAM verifier (md5, none)
        return False
    b64 = base64.b64encode
    return keys == f"{b64(stored_key).decode()}:{b64(server_key).decode()}"


async def _set_password(conn: asyncpg.Connection, role: str, password: str) -> None:
    """Give the role its configured password (and LOGIN), unless it has it already.
    Roles are shared by every database of the server, and the migration lock is per
    database: migrations of two databases at once (test sessions side by side) would
    otherwise update the same role row, and one fails with `tuple concurrently
    updated`; that one tries again."""
    with contextlib.suppress(asyncpg.InsufficientPrivilegeError):  # pg_authid: superusers only
        row = await conn.fetchrow("SELECT rolcanlogin, rolpassword FROM pg_authid WHERE rolname = $1", role)
        if row is not None and row["rolcanlogin"] and verifier_matches(row["rolpassword"] or "", password):
            return
    quoted = await conn.fetchval("SELECT quote_literal($1)", scram_verifier(password))
    for attempt in range(5):
        try:
            await conn.execute(f"ALTER ROLE {role} LOGIN PASSWORD {quoted}")
            return
        except asyncpg.InternalServerError as exc:
            if "tuple concurrently updated" not in str(exc) or attempt == 4:
                raise
            await asyncio.sleep(0.05 * (attempt + 1))


def migration_files() -> list[tuple[str, str]]:
    root = importlib.resources.files(__package__).joinpath("migrations")
    files = sorted((p.name, p.read_text(encoding="utf-8")) for p in root.iterdir() if p.name.endswith(".sql"))
    return files


async def migrate(
    dsn: str,
    *,
    app_password: str,
    settler_password: str,
    console_password: str = "credits_console",  # noqa: S107 - the dev default
) -> list[str]:
    """Apply pending migrations; return the names applied by this call. The console
    role's password defaults to the development one (Config.console_db_password): the
    services and `credits migrate` pass the configured one."""
    conn = await asyncpg.connect(dsn)
    applied: list[str] = []
    try:
        await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK_ID)
        try:
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                " name text PRIMARY KEY, checksum text NOT NULL,"
                " applied_at timestamptz NOT NULL DEFAULT now())"
            )
            done = {r["name"]: r["checksum"] for r in await conn.fetch("SELECT name, checksum FROM schema_migrations")}
            for name, sql in migration_files():
                checksum = hashlib.sha256(sql.encode()).hexdigest()
                if name in done:
                    if done[name] != checksum:
                        raise MigrationError(f"{name} changed after it was applied; add a new migration instead")
                    continue
                async with conn.transaction():
                    await conn.execute(sql)
                    await conn.execute("INSERT INTO schema_migrations (name, checksum) VALUES ($1, $2)", name, checksum)
                log.info("migration_applied", extra={"migration": name})
                applied.append(name)
            # The roles are cluster-wide and their passwords come from configuration.
            # Only a SCRAM verifier reaches the server, never the password: a statement
            # log (log_statement = ddl) would keep a plaintext one.
            roles = ((APP_ROLE, app_password), (SETTLER_ROLE, settler_password), (CONSOLE_ROLE, console_password))
            for role, password in roles:
                await _set_password(conn, role, password)
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK_ID)
    finally:
        await conn.close()
    return applied
