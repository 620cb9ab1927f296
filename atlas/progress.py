"""Progress for long jobs, decided in one place: a tqdm bar while a person watches a terminal,
a few plain lines when stderr is a log (cron, CI, `docker logs`), nothing when switched off.

A bar redraws itself with carriage returns; in a log every redraw becomes a line, thousands
per build. So when stderr is not a terminal a loop prints one line when it starts, a line at
most every LOG_EVERY_FRACTION of the loop *and* LOG_EVERY_S seconds (whichever is rarer:
a short loop prints none), and a last line; each says elapsed time, rate and what remains.
A transient bar (tqdm's `leave=False`: per-batch bars inside an epoch that already reports
itself) leaves nothing on a terminal, so it prints nothing in a log either.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TextIO

from tqdm import tqdm

LOG_EVERY_FRACTION = 0.1  # of a loop's total
LOG_EVERY_S = 30.0


def on_terminal() -> bool:
    """Whether stderr (where progress goes) is a terminal a person watches."""
    isatty = getattr(sys.stderr, "isatty", None)
    return bool(isatty and isatty())


def shows_bars(enabled: bool = True) -> bool:
    """Whether progress bars (ours or a library's) should be drawn: enabled and on a terminal."""
    return enabled and on_terminal()


class Say:
    """`say(message)` prints one line to stderr (between progress bars) when enabled."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled

    def __call__(self, message: str) -> None:
        if not self.enabled:
            return
        if on_terminal():
            tqdm.write(message, file=sys.stderr)
        else:
            print(message, file=sys.stderr, flush=True)


def progress(iterable: Iterable, enabled: bool = True, **options):
    """`iterable`, reporting its progress on stderr when `enabled`: a tqdm bar on a terminal,
    a `LogProgress` otherwise. `options` are tqdm's (`desc`, `total`, `unit`, `leave`...);
    the result supports `set_postfix` either way."""
    if shows_bars(enabled):
        return tqdm(iterable, file=sys.stderr, **options)
    if not enabled or options.get("leave", True) is False:
        return tqdm(iterable, disable=True, **options)  # iterates at full speed, prints nothing
    return LogProgress(iterable, desc=options.get("desc"), total=options.get("total"),
                       unit=options.get("unit", "it"))


class LogProgress:
    """A loop's progress as a few whole lines (no carriage returns) for a log file:

        embed: started, 480 chunk
        embed: 96/480 chunk (20%) after 31s, 3.1 chunk/s, about 2m04s left
        embed: done, 480 chunk in 2m35s (3.1 chunk/s)

    `stream` defaults to stderr at print time and `clock` to `time.monotonic` (tests pass
    their own)."""

    def __init__(self, iterable: Iterable, desc: str | None = None, total: int | None = None,
                 unit: str = "it", stream: TextIO | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.iterable = iterable
        self.desc = desc or "progress"
        self.total = total if total is not None else _length(iterable)
        self.unit = unit
        self.stream = stream
        self.clock = clock
        self.n = 0
        self.postfix = ""

    def __len__(self) -> int:
        if self.total is None:
            raise TypeError("this loop's length is unknown")
        return self.total

    def set_postfix(self, **values) -> None:
        """Values shown at the end of the next line (as tqdm's `set_postfix`)."""
        self.postfix = ", ".join(f"{key}={value}" for key, value in values.items())

    def __iter__(self) -> Iterator:
        started = last_time = self.clock()
        last_n = 0
        self._write(f"started, {self.total} {self.unit}" if self.total is not None else "started")
        try:
            for item in self.iterable:
                yield item
                self.n += 1
                now = self.clock()
                if self._due(self.n - last_n, now - last_time):
                    self._write(self._status(now - started))
                    last_n, last_time = self.n, now
        finally:
            elapsed = self.clock() - started
            if self.total is None or self.n >= self.total:
                self._write(f"done, {self.n} {self.unit} in {_duration(elapsed)} "
                            f"({self._rate(elapsed)})")
            else:
                self._write(f"stopped at {self.n}/{self.total} {self.unit} after "
                            f"{_duration(elapsed)}")

    def _due(self, steps: int, seconds: float) -> bool:
        if seconds < LOG_EVERY_S:
            return False
        if self.total is None:
            return True
        return steps >= math.ceil(LOG_EVERY_FRACTION * self.total) and self.n < self.total

    def _status(self, elapsed: float) -> str:
        if self.total is None:
            return f"{self.n} {self.unit} after {_duration(elapsed)}, {self._rate(elapsed)}"
        left = (self.total - self.n) * elapsed / self.n
        return (f"{self.n}/{self.total} {self.unit} ({self.n / self.total:.0%}) after "
                f"{_duration(elapsed)}, {self._rate(elapsed)}, about {_duration(left)} left")

    def _rate(self, elapsed: float) -> str:
        if self.n == 0 or elapsed <= 0:
            return f"- {self.unit}/s"
        per_second = self.n / elapsed
        if per_second >= 1:
            return f"{per_second:.1f} {self.unit}/s"
        return f"{1 / per_second:.1f} s/{self.unit}"

    def _write(self, text: str) -> None:
        line = f"{self.desc}: {text}" + (f" [{self.postfix}]" if self.postfix else "")
        print(line, file=self.stream or sys.stderr, flush=True)


class Timings:
    """Seconds per named step: `with timings("embed"): ...`; `seconds` is {step: s}. Given a
    `say`, each step announces itself when it starts (one line per step in a log)."""

    def __init__(self, say: Say | None = None):
        self.seconds: dict[str, float] = {}
        self.say = say

    @contextlib.contextmanager
    def __call__(self, name: str):
        if self.say is not None:
            self.say(f"{name} ...")
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = round(time.perf_counter() - started, 2)


def _length(iterable: Iterable) -> int | None:
    try:
        return len(iterable)  # type: ignore[arg-type]
    except TypeError:
        return None


def _duration(seconds: float) -> str:
    """42s, 3m05s, 1h02m."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
