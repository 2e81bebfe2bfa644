"""Holds that are released exactly once, whichever way their block ends.

    async with client.reservation(50, ttl_s=600, action="generate_content") as hold:
        result = await long_task()
        hold.used = 12            # charged at exit; the other 38 go back to available

On exit the hold is released with ``hold.used`` (0 unless set): after success, after an
exception (the exception still propagates; set ``used`` before raising if work was
done), and after cancellation (the release runs shielded, so cancelling the task does
not cancel the release). The release uses one idempotency key per hold, so its own
network retries replay rather than fail as "already released". A release that fails
after an exception is logged, not raised, so it never hides the original error; after
success it raises (``ReservationClosed`` when the hold had already expired: then nothing
was charged and ``hold.release_error`` says so).
"""

from __future__ import annotations

import asyncio
import decimal
import logging
from collections.abc import Awaitable, Callable
from types import TracebackType

from credits_sdk import _core, errors, models

log = logging.getLogger("credits_sdk")


def release_key(reservation_id: str) -> str:
    """One key per hold: every attempt to release it is the same request."""
    return f"release:{reservation_id}"


class Hold:
    """An open reservation. Set ``used`` to what the work cost (0 <= used <= amount)."""

    def __init__(self, reservation: models.Reservation) -> None:
        self.reservation = reservation
        self._used = decimal.Decimal(0)
        self.closing = False  # set once, before the release is sent: never released twice
        self.released: models.Release | None = None
        self.release_error: errors.CreditsError | None = None

    @property
    def id(self) -> str:
        return self.reservation.id

    @property
    def amount(self) -> decimal.Decimal:
        return self.reservation.amount

    @property
    def used(self) -> decimal.Decimal:
        return self._used

    @used.setter
    def used(self, value: _core.Amount) -> None:
        amount = _core.check_exact(_core.to_decimal(value, "used"), "used")
        if amount < 0:
            raise ValueError(f"used must not be negative: {amount}")
        if amount > self.amount:
            raise ValueError(f"used ({amount}) is more than the hold ({self.amount})")
        if self.closing:
            raise RuntimeError(f"reservation {self.id} is already released")
        self._used = amount

    def __repr__(self) -> str:
        return f"Hold(id={self.id!r}, amount={self.amount}, used={self.used}, released={self.released is not None})"


def _failed_while_raising(hold: Hold, failure: errors.CreditsError, exc: BaseException) -> None:
    # The block's own exception is what the caller needs to see; the hold will expire by
    # its TTL if this release never landed, and nothing beyond `used` is ever charged.
    log.warning(
        "credits_sdk: releasing reservation %s failed (%s) while %s propagated; it expires at %s",
        hold.id,
        failure,
        type(exc).__name__,
        hold.reservation.expires_at.isoformat(),
    )


class AsyncReservationScope:
    """``async with client.reservation(...) as hold``: reserve at entry, release at exit."""

    def __init__(
        self,
        reserve: Callable[[], Awaitable[models.Reservation]],
        release: Callable[[str, decimal.Decimal, str], Awaitable[models.Release]],
    ) -> None:
        self._reserve = reserve
        self._release = release
        self.hold: Hold | None = None

    async def __aenter__(self) -> Hold:
        if self.hold is not None:
            raise RuntimeError("a reservation scope can be entered once")
        self.hold = Hold(await self._reserve())
        return self.hold

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        hold = self.hold
        if hold is None or hold.closing:
            return
        hold.closing = True
        release = asyncio.ensure_future(self._release(hold.id, hold.used, release_key(hold.id)))
        release.add_done_callback(_retrieve)
        try:
            hold.released = await asyncio.shield(release)
        except errors.CreditsError as failure:
            hold.release_error = failure
            if exc is None:
                raise
            _failed_while_raising(hold, failure, exc)


def _retrieve(task: asyncio.Future[models.Release]) -> None:
    """If the awaiting task was cancelled, nobody awaits the shielded release: read its
    outcome here so asyncio does not warn, and say if it failed."""
    if task.cancelled():
        return
    failure = task.exception()
    if failure is not None:
        log.debug("credits_sdk: background release ended with %r", failure)


class ReservationScope:
    """``with client.reservation(...) as hold``: reserve at entry, release at exit."""

    def __init__(
        self,
        reserve: Callable[[], models.Reservation],
        release: Callable[[str, decimal.Decimal, str], models.Release],
    ) -> None:
        self._reserve = reserve
        self._release = release
        self.hold: Hold | None = None

    def __enter__(self) -> Hold:
        if self.hold is not None:
            raise RuntimeError("a reservation scope can be entered once")
        self.hold = Hold(self._reserve())
        return self.hold

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        hold = self.hold
        if hold is None or hold.closing:
            return
        hold.closing = True
        try:
            hold.released = self._release(hold.id, hold.used, release_key(hold.id))
        except errors.CreditsError as failure:
            hold.release_error = failure
            if exc is None:
                raise
            _failed_while_raising(hold, failure, exc)
