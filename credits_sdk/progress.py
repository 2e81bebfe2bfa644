"""A one-line progress bar on stderr, drawn only when stderr is a terminal.

Built in rather than tqdm: the SDK needs one bar with a count, a rate and an ETA, and
agents and batch jobs that install the SDK should not get a dependency (or behave
differently depending on whether one happens to be installed) for that. Redraws are
throttled to ``REDRAW_INTERVAL_S``; in a log file or a pipe nothing is written.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

REDRAW_INTERVAL_S = 0.1
BAR_WIDTH = 24


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes:02d}:{secs:02d}"


class Progress:
    def __init__(
        self,
        total: int | None,
        *,
        enabled: bool | None = None,
        stream: TextIO | None = None,
        label: str = "credits",
    ) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = _is_terminal(self.stream) if enabled is None else enabled
        self.total = total
        self.label = label
        self.done = 0
        self.failed = 0
        self._started_s = time.monotonic()
        self._drawn_s = -REDRAW_INTERVAL_S
        self._closed = False

    def advance(self, items: int, *, failed: int = 0) -> None:
        self.done += items
        self.failed += failed
        now = time.monotonic()
        if self.enabled and now - self._drawn_s >= REDRAW_INTERVAL_S:
            self._drawn_s = now
            self._draw(now)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.enabled:
            self._draw(time.monotonic())
            self.stream.write("\n")
            self.stream.flush()

    def line(self, now_s: float) -> str:
        elapsed_s = max(now_s - self._started_s, 1e-9)
        rate = self.done / elapsed_s
        failed = f" {self.failed:,} failed" if self.failed else ""
        if self.total:
            fraction = min(1.0, self.done / self.total)
            filled = int(fraction * BAR_WIDTH)
            bar = "#" * filled + "." * (BAR_WIDTH - filled)
            eta = _duration((self.total - self.done) / rate) if rate > 0 and self.done < self.total else "--:--"
            return f"{self.label} [{bar}] {self.done:,}/{self.total:,} {fraction:4.0%} {rate:,.0f}/s eta {eta}{failed}"
        return f"{self.label} {self.done:,} items {rate:,.0f}/s {_duration(elapsed_s)}{failed}"

    def _draw(self, now_s: float) -> None:
        self.stream.write("\r" + self.line(now_s) + "\x1b[K")
        self.stream.flush()


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # a closed or stand-in stream
        return False
