"""The API's cached catalogue readings: requests never wait for a refresh; a change made in
this process shows at once; a stale or failed background read never replaces a newer value."""

import threading
import time

from api.deps import CatalogReading


class Source:
    """A catalogue value; `hold` makes the next read take the value, then wait for `gate`."""

    def __init__(self):
        self.value, self.reads, self.started, self.fail, self.hold = 0, 0, 0, False, False
        self.gate = threading.Event()

    def read(self):
        value = self.value  # what the catalogue holds when the read starts
        self.started += 1
        if self.hold:
            self.hold = False
            self.gate.wait(5)
        self.reads += 1
        if self.fail:
            raise OSError("catalogue unavailable")
        return value


def wait_for(condition, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.005)
    return condition()


def test_a_due_refresh_happens_in_the_background():
    source = Source()
    reading = CatalogReading(source.read, refresh_s=0.05)
    assert reading.get() == 0 and source.reads == 1
    source.value, source.hold = 1, True  # the next read blocks: a request must not
    time.sleep(0.06)
    started = time.monotonic()
    assert reading.get() == 0  # the value at hand, at once
    assert time.monotonic() - started < 0.5
    assert wait_for(lambda: source.started == 2)
    source.gate.set()
    assert wait_for(lambda: reading.get() == 1)


def test_a_change_made_here_is_read_at_once_and_an_older_background_read_is_dropped():
    source = Source()
    reading = CatalogReading(source.read, refresh_s=0.05)
    assert reading.get() == 0
    source.value, source.hold = 1, True
    time.sleep(0.06)
    assert reading.get() == 0  # starts a background read of 1, held
    assert wait_for(lambda: source.started == 2)
    source.value = 2
    reading.changed()
    assert reading.get() == 2  # read now, not left to the background
    source.gate.set()
    assert wait_for(lambda: source.reads == 3 and not reading._refreshing)
    assert reading.get() == 2  # the held read of 1 came back late and was dropped


def test_a_failed_background_read_keeps_the_value_at_hand():
    source = Source()
    reading = CatalogReading(source.read, refresh_s=0.02)
    assert reading.get() == 0
    source.fail, source.value = True, 5
    time.sleep(0.03)
    assert reading.get() == 0
    assert wait_for(lambda: source.reads >= 2 and not reading._refreshing)
    assert reading.get() == 0
    source.fail = False
    assert wait_for(lambda: reading.get() == 5)
