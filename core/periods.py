"""Budget periods (UTC): day, ISO week from Monday, calendar month."""

from __future__ import annotations

import datetime as dt


def period_starts_ms(now_ms: int) -> tuple[int, int, int]:
    """Start (ms, UTC) of the current day, ISO week (Monday) and month."""
    now = dt.datetime.fromtimestamp(now_ms / 1000, tz=dt.UTC)
    day = now.replace(hour=0, minute=0, second=0, microsecond=0)
    week = day - dt.timedelta(days=day.weekday())
    month = day.replace(day=1)
    return tuple(int(x.timestamp() * 1000) for x in (day, week, month))  # type: ignore[return-value]


def period_bounds(period: str, now_ms: int) -> tuple[dt.datetime, dt.datetime]:
    """[start, end) of the current day / week / month, UTC."""
    day_ms, week_ms, month_ms = period_starts_ms(now_ms)
    start_ms = {"day": day_ms, "week": week_ms, "month": month_ms}[period]
    start = dt.datetime.fromtimestamp(start_ms / 1000, tz=dt.UTC)
    if period == "day":
        return start, start + dt.timedelta(days=1)
    if period == "week":
        return start, start + dt.timedelta(days=7)
    year, month = (start.year + 1, 1) if start.month == 12 else (start.year, start.month + 1)
    return start, start.replace(year=year, month=month)
