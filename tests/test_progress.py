"""Progress as logs read it: a few whole lines per loop when stderr is not a terminal (no
carriage returns), tqdm bars on a terminal, nothing when switched off; and a real build's log."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import pytest
from tqdm import tqdm

from atlas import progress as progress_module
from atlas.progress import LogProgress, Say, Timings, progress

ROOT = Path(__file__).resolve().parents[1]


class Clock:
    """A clock that moves `step` seconds each time it is read after an item."""

    def __init__(self, step: float):
        self.now, self.step = 0.0, step

    def __call__(self) -> float:
        return self.now

    def run(self, loop: LogProgress) -> list:
        items = []
        for item in loop:
            items.append(item)
            self.now += self.step
        return items


def log_lines(n: int, seconds_per_item: float, **options) -> list[str]:
    stream, clock = io.StringIO(), Clock(seconds_per_item)
    loop = LogProgress(range(n), stream=stream, clock=clock, **options)
    assert clock.run(loop) == list(range(n))
    text = stream.getvalue()
    assert "\r" not in text
    return text.splitlines()


def test_a_long_loop_prints_a_start_a_line_per_tenth_and_a_last_line():
    lines = log_lines(1000, 1.0, desc="embed", unit="img")
    assert lines[0] == "embed: started, 1000 img"
    assert lines[1] == "embed: 100/1000 img (10%) after 1m40s, 1.0 img/s, about 15m00s left"
    assert len(lines) == 11 and all("/1000 img (" in line for line in lines[1:-1])
    assert lines[-1] == "embed: done, 1000 img in 16m40s (1.0 img/s)"


def test_a_fast_loop_reports_at_most_every_30_seconds():
    lines = log_lines(100_000, 1 / 1024, desc="segment", unit="img")  # 98 s in all
    assert len(lines) == 2 + 3
    assert lines[1] == "segment: 30720/100000 img (31%) after 30s, 1024.0 img/s, about 1m08s left"


def test_a_short_loop_prints_only_its_start_and_end():
    assert log_lines(50, 0.2, desc="VAE", unit="epoch") == [
        "VAE: started, 50 epoch", "VAE: done, 50 epoch in 10s (5.0 epoch/s)"]


def test_a_loop_of_unknown_length_reports_every_30_seconds_without_a_remaining_time():
    stream, clock = io.StringIO(), Clock(10.0)
    clock.run(LogProgress((i for i in range(10)), desc="read", stream=stream, clock=clock))
    lines = stream.getvalue().splitlines()
    assert lines[0] == "read: started" and lines[-1] == "read: done, 10 it in 1m40s (10.0 s/it)"
    assert lines[1:-1] == ["read: 3 it after 30s, 10.0 s/it", "read: 6 it after 1m00s, 10.0 s/it",
                           "read: 9 it after 1m30s, 10.0 s/it"]


def test_a_loop_left_early_says_where_it_stopped_and_postfix_values_are_shown():
    stream, clock = io.StringIO(), Clock(1.0)
    loop = LogProgress(range(10), desc="train", stream=stream, clock=clock)
    for item in loop:
        loop.set_postfix(loss="0.512")
        clock.now += 1.0
        if item == 2:
            break  # as with tqdm, an item counts once the loop asks for the next one
    assert stream.getvalue().splitlines()[-1] == "train: stopped at 2/10 it after 3s [loss=0.512]"


def test_progress_in_a_log_prints_lines_and_nothing_when_disabled_or_transient(capsys):
    assert not progress_module.on_terminal()  # pytest captures stderr
    assert list(progress(range(3), True, desc="embed", unit="chunk")) == [0, 1, 2]
    err = capsys.readouterr().err
    assert err.startswith("embed: started, 3 chunk\nembed: done, 3 chunk in ") and "\r" not in err
    assert list(progress(range(3), False, desc="embed")) == [0, 1, 2]
    inner = progress(range(3), True, desc="batches", leave=False)
    for _ in inner:
        inner.set_postfix(loss="1.0")
    assert capsys.readouterr().err == ""


def test_progress_on_a_terminal_is_a_tqdm_bar(monkeypatch):
    monkeypatch.setattr(progress_module, "on_terminal", lambda: True)
    bar = progress(range(3), True, desc="embed")
    assert isinstance(bar, tqdm) and not bar.disable
    bar.close()
    assert progress_module.shows_bars(True) and not progress_module.shows_bars(False)


def test_say_and_step_timings_print_whole_lines_only_when_enabled(capsys):
    say = Say(True)
    timings = Timings(say)
    with timings("som"):
        say("a message")
    with Timings(Say(False))("umap"):
        pass
    assert capsys.readouterr().err == "som ...\na message\n"
    assert set(timings.seconds) == {"som"}


def test_cli_build_logs_a_bounded_number_of_lines_without_carriage_returns(synthetic_images,
                                                                           tmp_path):
    home = tmp_path / "home"
    command = [sys.executable, "-m", "indexer.cli", "build", "--images", str(synthetic_images),
               "--home", str(home), "--preset", "tiny", "--epochs", "1", "--som-epochs", "2",
               "--threads", "1"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "\r" not in done.stderr + done.stdout
    lines = done.stderr.splitlines()
    assert 20 <= len(lines) <= 60, done.stderr
    for step in ("ingest_segment_describe ...", "segment: started, 48 img", "train_vae ...",
                 "Atlas version 000001 published"):
        assert step in lines or any(line.startswith(step) for line in lines), step
    assert any(line.startswith("segment: done, 48 img in ") for line in lines)

    quiet = subprocess.run([sys.executable, "-m", "indexer.cli", "rebuild", "--home", str(home),
                            "--threads", "1", "--quiet"], cwd=ROOT, capture_output=True, text=True,
                           timeout=600)
    assert quiet.returncode == 0, quiet.stderr
    assert quiet.stdout == "000002\n" and quiet.stderr == ""


@pytest.mark.parametrize("seconds, text", [(0.4, "0s"), (42, "42s"), (185, "3m05s"),
                                           (3720, "1h02m")])
def test_durations_read_as_a_person_writes_them(seconds, text):
    assert progress_module._duration(seconds) == text
