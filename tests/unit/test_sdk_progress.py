"""The built-in progress bar: drawn on terminals only, throttled, closed once."""

from __future__ import annotations

import io

from credits_sdk.progress import Progress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_bar_with_a_total() -> None:
    screen = Terminal()
    bar = Progress(200, stream=screen, label="job")
    bar.advance(100, failed=3)
    text = screen.getvalue()
    assert text.startswith("\rjob [############............] 100/200  50%") and "3 failed" in text
    bar.advance(1)  # within the redraw interval: not drawn
    assert screen.getvalue() == text
    bar.close()
    bar.close()
    assert screen.getvalue().count("\n") == 1 and "101/200" in screen.getvalue()


def test_counter_without_a_total() -> None:
    screen = Terminal()
    bar = Progress(None, stream=screen, label="job")
    bar.advance(1234)
    assert "job 1,234 items" in screen.getvalue()


def test_nothing_is_written_off_a_terminal() -> None:
    log = io.StringIO()
    bar = Progress(10, stream=log)
    bar.advance(10)
    bar.close()
    assert log.getvalue() == "" and not bar.enabled
    forced = io.StringIO()
    Progress(10, stream=forced, enabled=True).close()
    assert forced.getvalue().endswith("\n")
