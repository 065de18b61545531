"""Progress on stderr: plain lines in a log, at most one every LINE_SECONDS, with an estimate."""

import os

import pytest

from rbe_converters import progress


class _Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_a_log_gets_a_line_at_most_every_ten_seconds_with_an_estimate(monkeypatch, capsys):
    clock = _Clock()
    monkeypatch.setattr(progress.time, "monotonic", clock)
    bar = progress.LineProgress(28, "encode", "blocks")
    bar.label("block 1/28: running it")
    assert capsys.readouterr().err == ""  # nothing before LINE_SECONDS
    clock.now += 12
    bar.label("block 1/28: encoding mlp.down_proj")
    assert capsys.readouterr().err == "rbe: encode: 0/28 blocks, block 1/28: encoding mlp.down_proj, 0:12 elapsed\n"
    clock.now += 48
    bar.update(1)  # 60 s a block so far: 27 blocks left, 27 minutes
    assert capsys.readouterr().err == (
        "rbe: encode: 1/28 blocks, block 1/28: encoding mlp.down_proj, 1:00 elapsed, about 27:00 left\n"
    )
    clock.now += 5
    bar.update(1)
    assert capsys.readouterr().err == ""
    clock.now += 3600
    bar.update(1)
    assert "1:01:05 elapsed" in capsys.readouterr().err


def test_a_line_is_due_a_heartbeat_early_so_that_none_comes_later_than_the_interval(monkeypatch, capsys):
    clock = _Clock()
    monkeypatch.setattr(progress.time, "monotonic", clock)
    bar = progress.LineProgress(5, "encode", "blocks")
    clock.now += progress.LINE_SECONDS - progress.HEARTBEAT_SECONDS - 0.01
    bar.tick()
    assert capsys.readouterr().err == ""
    clock.now += 0.01  # the heartbeat's next look, at most HEARTBEAT_SECONDS on, is within the interval
    bar.tick()
    assert capsys.readouterr().err.startswith("rbe: encode: 0/5 blocks, 0:10 elapsed")


def test_quiet_progress_prints_nothing(monkeypatch, capsys):
    clock = _Clock()
    monkeypatch.setattr(progress.time, "monotonic", clock)
    bar = progress.progress(10, "calibrate", "windows", quiet=True)
    clock.now += 100
    bar.update(3)
    bar.label("block 2/6: scoring mlp.up_proj")
    assert capsys.readouterr().err == ""


def test_a_bar_on_a_terminal_and_lines_in_a_log(monkeypatch):
    monkeypatch.setattr(progress.sys.stderr, "isatty", lambda: False, raising=False)
    assert progress.terminal_columns() == 0
    assert isinstance(progress.progress(5, "encode", "blocks"), progress.LineProgress)


def test_a_terminal_that_reports_no_width_gets_lines_not_an_invisible_bar(monkeypatch):
    monkeypatch.setattr(progress.sys.stderr, "isatty", lambda: True, raising=False)
    monkeypatch.setattr(progress.os, "get_terminal_size", lambda fd: os.terminal_size((0, 0)))
    assert isinstance(progress.progress(5, "encode", "blocks"), progress.LineProgress)
    monkeypatch.setattr(progress.os, "get_terminal_size", lambda fd: os.terminal_size((120, 40)))
    assert not isinstance(progress.progress(5, "encode", "blocks"), progress.LineProgress)


def test_a_calibration_stage_announces_itself_in_a_log(monkeypatch, capsys):
    monkeypatch.setattr(progress.sys.stderr, "isatty", lambda: False, raising=False)
    with progress.progress(32, "calibrate", "windows"):
        pass
    assert capsys.readouterr().err.startswith("rbe: calibrate: 0/32 windows, 0:00 elapsed")


def test_a_stage_that_showed_itself_under_way_shows_where_it_ended(monkeypatch, capsys):
    clock = _Clock()
    monkeypatch.setattr(progress.time, "monotonic", clock)
    with progress.LineProgress(32, "calibrate", "windows", announce=True) as quick:
        clock.now += 4
        quick.update(32)  # done before the line interval: no line of its own
    assert capsys.readouterr().err.splitlines() == [
        "rbe: calibrate: 0/32 windows, 0:00 elapsed",
        "rbe: calibrate: 32/32 windows, 0:04 elapsed, done",
    ]
    with progress.LineProgress(4, "calibrate", "windows", announce=True) as fractions:
        clock.now += 3
        fractions.label("after the blocks: lm_head.weight")
        fractions.update(3.9999)  # fractions of a window that add up to a little less than the whole
    assert capsys.readouterr().err.splitlines()[-1] == "rbe: calibrate: 4/4 windows, 0:03 elapsed, done"
    with progress.LineProgress(3, "encode", "blocks") as silent_so_far:
        clock.now += 5
        silent_so_far.update(3)  # never showed itself: a quick stage stays quiet
    failed = progress.LineProgress(3, "encode", "blocks", announce=True)
    with pytest.raises(KeyboardInterrupt), failed:
        failed.update(1)
        raise KeyboardInterrupt
    # a stage cut short gets no closing line: the error after it is the last word
    assert capsys.readouterr().err.splitlines() == ["rbe: encode: 0/3 blocks, 0:00 elapsed"]


def test_nothing_to_count_prints_nothing_and_a_first_sliver_gets_no_estimate(monkeypatch, capsys):
    clock = _Clock()
    monkeypatch.setattr(progress.time, "monotonic", clock)
    with progress.progress(0, "encode", "blocks") as bar:  # a conversion with no block to encode
        clock.now += 100
        bar.update(0)
    assert capsys.readouterr().err == ""
    bar = progress.LineProgress(1000, "convert", "MB")
    clock.now += 20
    bar.update(1)  # 0.1 % after 20 s: an estimate of hours would only alarm
    assert capsys.readouterr().err == "rbe: convert: 1/1000 MB, 0:20 elapsed\n"
    clock.now += 20
    bar.update(99)  # the pace since the first update: 99 MB in 20 s, 900 MB left
    assert "about 3:02 left" in capsys.readouterr().err


def test_a_stage_past_its_estimate_says_so_rather_than_dropping_it(monkeypatch, capsys):
    clock = _Clock()
    monkeypatch.setattr(progress.time, "monotonic", clock)
    bar = progress.LineProgress(6, "encode", "blocks", expected=27.0)  # predicted by the stage before
    clock.now += 12
    bar.label("block 1/6: running it")
    assert "about 0:15 left" in capsys.readouterr().err
    clock.now += 30
    bar.label("block 1/6: encoding mlp.down_proj")
    assert capsys.readouterr().err.endswith("0:42 elapsed, taking longer than estimated\n")
    clock.now += 20
    bar.update(6)
    assert "longer" not in capsys.readouterr().err  # done: nothing left to estimate


def test_the_estimate_leaves_out_the_setup_and_a_resumed_runs_earlier_blocks(monkeypatch, capsys):
    clock = _Clock()
    monkeypatch.setattr(progress.time, "monotonic", clock)
    bar = progress.LineProgress(32, "encode", "blocks")
    bar.resumed(10)  # a resumed conversion: 10 blocks done in an earlier sitting
    clock.now += 400
    bar.label("block 11/32: running it")
    assert "left" not in capsys.readouterr().err  # no block done in this sitting yet: no estimate
    clock.now += 200
    bar.update(1)  # 10 minutes a block: 21 left
    assert "about 3:30:00 left" in capsys.readouterr().err
    fresh = progress.LineProgress(32, "encode", "blocks")
    clock.now += 300  # the head and the first block: 5 minutes, then 2 minutes a block
    fresh.update(1)
    assert "about 2:35:00 left" in capsys.readouterr().err  # one unit: all we know is the elapsed time
    clock.now += 120
    fresh.update(1)
    assert "about 1:00:00 left" in capsys.readouterr().err


def test_a_terminal_bar_counts_a_resumed_runs_blocks_apart_from_its_rate(monkeypatch):
    monkeypatch.setattr(progress, "terminal_columns", lambda: 120)
    with progress.progress(32, "encode", "blocks") as bar:
        bar.resumed(10)
        assert bar.bar.n == 10 and bar.bar.initial == 10  # tqdm's rate counts from initial
        bar.update(1)
        assert bar.bar.n == 11
