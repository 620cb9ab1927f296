"""Progress for long jobs: a bar while a person watches, nothing when switched off; one helper
for every job so that messages and bars do not tear each other."""

from __future__ import annotations

import contextlib
import sys
import time

from tqdm import tqdm


class Say:
    """`say(message)` prints one line to stderr (between progress bars) when enabled."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled

    def __call__(self, message: str) -> None:
        if self.enabled:
            tqdm.write(message, file=sys.stderr)


def progress(iterable, enabled: bool = True, **options):
    """`iterable` wrapped in a progress bar on stderr when `enabled`."""
    return tqdm(iterable, disable=not enabled, file=sys.stderr, **options)


class Timings:
    """Seconds per named step: `with timings("embed"): ...`; `seconds` is {step: s}."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = round(time.perf_counter() - started, 2)
