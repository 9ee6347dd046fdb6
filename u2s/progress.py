"""u2s's own progress line: rows written of rows listed, by status, rows/s, ETA and busy seconds per stage.

It replaces Ray Data's per-operator progress blocks (``--verbose`` keeps those): the write tasks count each
block they write in the run's tally (:class:`u2s.error_budget.ErrorBudget`), and a driver thread reads the
tally every few seconds. On a terminal the line is redrawn in place; elsewhere (CI, `ray job logs`) a plain
line is printed every ``interval_s`` seconds and when the numbers change, so logs stay short.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TextIO

#: Seconds between lines when the output is not a terminal.
PLAIN_INTERVAL_S = 30.0
#: Seconds between redraws on a terminal.
TTY_INTERVAL_S = 1.0


@dataclass
class Progress:
    """What the tally knows: rows written by this attempt, by status, and busy seconds per stage."""

    rows: int = 0
    by_status: dict[str, int] = field(default_factory=dict)
    stage_seconds: dict[str, float] = field(default_factory=dict)


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def format_progress(progress: Progress, total: int, resumed: int, elapsed_s: float) -> str:
    """One line: ``412/1000 rows (41%) · kept 300 · edited 100 · error 12 · 3.2 rows/s · ETA 3m04s · busy
    s/row inspect 0.80 edit 2.30``. ``total``: rows listed; ``resumed``: rows an earlier attempt wrote."""
    done = resumed + progress.rows
    parts = [f"{done}/{total} rows ({100 * done // max(total, 1)}%)"]
    parts += [f"{status} {progress.by_status[status]}" for status in ("kept", "edited", "error")
              if progress.by_status.get(status)]  # fmt: skip
    rate = progress.rows / elapsed_s if elapsed_s > 0 else 0.0
    if rate > 0:
        parts.append(f"{rate:.1f} rows/s")
        parts.append(f"ETA {_duration((total - done) / rate)}")
    per_row = {stage: seconds / max(progress.rows, 1) for stage, seconds in progress.stage_seconds.items()}
    busy = [f"{stage} {seconds:.2f}" for stage, seconds in per_row.items() if seconds]
    if busy:
        parts.append("busy s/row " + " ".join(busy))
    return "u2s: " + " · ".join(parts)


class ProgressLine:
    """A driver thread that prints :func:`format_progress` of ``read()`` until :meth:`stop`."""

    def __init__(self, read: Callable[[], Progress], total: int, resumed: int = 0,
                 stream: TextIO | None = None, interval_s: float | None = None) -> None:  # fmt: skip
        self.read, self.total, self.resumed = read, total, resumed
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.interval_s = interval_s or (TTY_INTERVAL_S if self.tty else PLAIN_INTERVAL_S)
        self.start_time = time.monotonic()
        self._stop = threading.Event()
        self._last = ""
        self._thread = threading.Thread(target=self._loop, name="u2s-progress", daemon=True)

    def start(self) -> ProgressLine:
        self._thread.start()
        return self

    def _print(self, final: bool = False) -> None:
        try:
            line = format_progress(self.read(), self.total, self.resumed, time.monotonic() - self.start_time)
        except Exception:  # the tally is gone (the run is ending): nothing to show
            return
        if self.tty:
            self.stream.write("\r\033[K" + line + ("\n" if final else ""))
        elif line != self._last or final:
            self.stream.write(line + "\n")
        self.stream.flush()
        self._last = line

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._print()

    def stop(self) -> None:
        """Stop the thread and print the last line."""
        self._stop.set()
        self._thread.join(timeout=5)
        self._print(final=True)
