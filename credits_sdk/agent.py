"""Base classes for agents that pay for their actions with credits.

    class ContentAgent(MeteredAgent):
        async def write(self, topic: str) -> str:
            await self.consume_credits_for_action("generate_content", metadata={"topic": topic})
            return await self.llm(topic)

        @metered("llm_output_tokens", result_units=lambda draft: draft.tokens)
        async def draft(self, outline: str) -> Draft:   # charged per token, after success
            ...

    agent = ContentAgent(client, department_id=marketing, metadata={"team": "growth"})

An agent carries its own credits scope (credential, department, metadata with
``agent`` = its name): every helper runs inside it, and so does every ``@metered``
method, so whatever they charge, directly or deeper down, is attributed to the agent.
``MeteredAgent`` is for asyncio agents (``AsyncCreditsClient``), ``SyncMeteredAgent``
for blocking ones (``CreditsClient``); the methods have the same names.
"""

from __future__ import annotations

import decimal
from contextlib import AbstractContextManager

from credits_sdk import _core, models
from credits_sdk.aio import AsyncCreditsClient
from credits_sdk.context import CreditsContext, credits_context
from credits_sdk.reservation import AsyncReservationScope, ReservationScope
from credits_sdk.sync import CreditsClient


class _AgentScope:
    def __init__(
        self,
        name: str | None,
        department_id: str | None,
        metadata: models.MetadataInput | None,
        api_key: str | None,
    ) -> None:
        self.agent_name = name or type(self).__name__
        self.department_id = department_id
        self.api_key = api_key
        self.agent_metadata: models.Metadata = {"agent": self.agent_name, **(metadata or {})}

    @property
    def credits_client(self) -> AsyncCreditsClient | CreditsClient:
        raise NotImplementedError

    def credits_scope(self) -> AbstractContextManager[CreditsContext]:
        """The agent's scope: its credential, department, metadata and client."""
        return credits_context(
            api_key=self.api_key,
            department_id=self.department_id,
            metadata=self.agent_metadata,
            client=self.credits_client,
        )


class MeteredAgent(_AgentScope):
    """An asyncio agent that meters its actions through an ``AsyncCreditsClient``."""

    def __init__(
        self,
        client: AsyncCreditsClient,
        *,
        name: str | None = None,
        department_id: str | None = None,
        metadata: models.MetadataInput | None = None,
        api_key: str | None = None,
    ) -> None:
        super().__init__(name, department_id, metadata, api_key)
        self.client = client

    @property
    def credits_client(self) -> AsyncCreditsClient:
        return self.client

    async def consume_credits_for_action(
        self,
        action: str,
        units: int = 1,
        *,
        metadata: models.MetadataInput | None = None,
        idempotency_key: str | None = None,
    ) -> models.Consumption:
        """Charge one action (``units`` of it) to this agent's organization/department."""
        with self.credits_scope():
            return await self.client.consume(action, units, metadata=metadata, idempotency_key=idempotency_key)

    async def check_balance(self) -> models.Balance:
        with self.credits_scope():
            return await self.client.balance()

    async def reserve_credits(
        self,
        amount: _core.Amount,
        *,
        ttl_s: int = _core.DEFAULT_RESERVATION_TTL_S,
        action: str | None = None,
        metadata: models.MetadataInput | None = None,
        idempotency_key: str | None = None,
    ) -> models.Reservation:
        """Hold credits for a long action; pair with ``release_credits`` (or use
        ``reservation``, which cannot forget to release)."""
        with self.credits_scope():
            return await self.client.reserve(
                amount, ttl_s=ttl_s, action=action, metadata=metadata, idempotency_key=idempotency_key
            )

    async def release_credits(
        self, reservation: str | models.Reservation, used: _core.Amount = 0, *, idempotency_key: str | None = None
    ) -> models.Release:
        with self.credits_scope():
            return await self.client.release(reservation, used, idempotency_key=idempotency_key)

    def reservation(
        self,
        amount: _core.Amount,
        *,
        ttl_s: int = _core.DEFAULT_RESERVATION_TTL_S,
        action: str | None = None,
        metadata: models.MetadataInput | None = None,
    ) -> AsyncReservationScope:
        """``async with agent.reservation(50, action="analyze_data") as hold: ... hold.used = x``"""

        async def reserve() -> models.Reservation:
            return await self.reserve_credits(amount, ttl_s=ttl_s, action=action, metadata=metadata)

        async def release(reservation_id: str, used: decimal.Decimal, key: str) -> models.Release:
            return await self.release_credits(reservation_id, used, idempotency_key=key)

        return AsyncReservationScope(reserve, release)


class SyncMeteredAgent(_AgentScope):
    """A blocking agent that meters its actions through a ``CreditsClient``."""

    def __init__(
        self,
        client: CreditsClient,
        *,
        name: str | None = None,
        department_id: str | None = None,
        metadata: models.MetadataInput | None = None,
        api_key: str | None = None,
    ) -> None:
        super().__init__(name, department_id, metadata, api_key)
        self.client = client

    @property
    def credits_client(self) -> CreditsClient:
        return self.client

    def consume_credits_for_action(
        self,
        action: str,
        units: int = 1,
        *,
        metadata: models.MetadataInput | None = None,
        idempotency_key: str | None = None,
    ) -> models.Consumption:
        """Charge one action (``units`` of it) to this agent's organization/department."""
        with self.credits_scope():
            return self.client.consume(action, units, metadata=metadata, idempotency_key=idempotency_key)

    def check_balance(self) -> models.Balance:
        with self.credits_scope():
            return self.client.balance()

    def reserve_credits(
        self,
        amount: _core.Amount,
        *,
        ttl_s: int = _core.DEFAULT_RESERVATION_TTL_S,
        action: str | None = None,
        metadata: models.MetadataInput | None = None,
        idempotency_key: str | None = None,
    ) -> models.Reservation:
        with self.credits_scope():
            return self.client.reserve(
                amount, ttl_s=ttl_s, action=action, metadata=metadata, idempotency_key=idempotency_key
            )

    def release_credits(
        self, reservation: str | models.Reservation, used: _core.Amount = 0, *, idempotency_key: str | None = None
    ) -> models.Release:
        with self.credits_scope():
            return self.client.release(reservation, used, idempotency_key=idempotency_key)

    def reservation(
        self,
        amount: _core.Amount,
        *,
        ttl_s: int = _core.DEFAULT_RESERVATION_TTL_S,
        action: str | None = None,
        metadata: models.MetadataInput | None = None,
    ) -> ReservationScope:
        """``with agent.reservation(50, action="analyze_data") as hold: ... hold.used = x``"""

        def reserve() -> models.Reservation:
            return self.reserve_credits(amount, ttl_s=ttl_s, action=action, metadata=metadata)

        def release(reservation_id: str, used: decimal.Decimal, key: str) -> models.Release:
            return self.release_credits(reservation_id, used, idempotency_key=key)

        return ReservationScope(reserve, release)
