"""Progress on stderr: a bar on a terminal, plain lines in a log, or a callback.

A conversion of hours must never look hung, and a log must not fill with a
bar's frames.  ``progress(total, desc, unit)`` gives a tqdm bar when stderr is
a terminal, otherwise ``LineProgress``: a line when something moves on, about
every ``LINE_SECONDS`` and never more than that apart, also while nothing
moves (one long step: a large tensor's GPTQ, an export), each with the count,
the elapsed time and an estimate of what is left.  Every kind takes
``update(n)``, ``resumed(n)`` and ``label(text)`` (what runs now, e.g. "block
3/28: mlp_down").

The estimate is the average pace since the first unit, so it does not swing
with one slow or fast unit.  A stage followed by others whose cost is known
relative to it (a survey of the blocks, then their encoding) is given
``later``: seconds per unit of this stage -> seconds of the stages after it,
and its lines say what is left in all; the stage after it is given that
prediction as ``expected``, its estimate until its own first unit is done.

``CallbackProgress`` hands each update to a function as a ``ProgressReport``
instead of printing: the Python API's progress (``pipeline.CallbackReporter``).
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

LINE_SECONDS = 10.0
HEARTBEAT_SECONDS = 0.25  # how often a stage looks whether a line is due (tick): it may look this late
LONGEST_START_SECONDS = 5.0  # older: a program that called the command long after it started (or a tests run)
ESTIMATE_FROM = 0.01  # the share done before a line estimates what is left: the first tensors say little
BAR_DELAY = 1.0  # seconds before a bar first draws: a refusal found at the start stays the one line


@dataclass(frozen=True)
class ProgressReport:
    """Where a stage stands: what ``CallbackProgress`` hands to its function."""

    stage: str  # "calibrate", "score", "encode", "write", ...
    done: float  # units done, in ``unit``
    total: float
    unit: str
    label: str  # what runs now ("block 3/28: encoding mlp.down_proj"), or ""
    elapsed: float  # seconds since the stage began
    left: float | None  # estimated seconds left in this stage, None while unknown
    left_in_all: float | None  # with the stages after it, where they are known


def terminal_columns() -> int:
    """stderr's width when it is a terminal, else 0 (a pty that reports a 0 x 0 size gets no bar from
    tqdm at all: lines show there instead)."""
    if not sys.stderr.isatty():
        return 0
    try:
        return os.get_terminal_size(sys.stderr.fileno()).columns
    except (OSError, ValueError):
        return 0


def progress(
    total: float,
    desc: str,
    unit: str,
    quiet: bool = False,
    count_format: str = "{n:.0f}/{total:.0f}",
    later: Callable[[float], float] | None = None,
    scale: float = 1.0,
    announce: bool = True,
    expected: float | None = None,
    last_line: float | None = None,
):
    """A bar (terminal) or ``LineProgress`` (log) over ``total`` ``unit``s (counts shown divided by
    ``scale``); silent when ``quiet`` or when there is nothing to count (no blocks in a conversion
    that encodes none block by block).  ``announce``: a log's first line when the stage starts;
    ``last_line``: when an earlier stage printed its last line, from which the interval to this
    stage's first line runs (a log is never quiet longer between stages than within one)."""
    if quiet or not total:
        return LineProgress(total, desc, unit, silent=True)
    if terminal_columns() > 0:  # a bar; a log, or a terminal that reports no width, gets lines
        return _Bar(total, desc, unit, count_format, scale)
    return LineProgress(
        total,
        desc,
        unit,
        count_format=count_format,
        scale=scale,
        announce=announce,
        later=later,
        expected=expected,
        last_line=last_line,
    )


class NoProgress(contextlib.nullcontext):
    """A stage that shows nothing: where no one asked for progress."""

    def __enter__(self):
        return self

    def update(self, n: float = 1) -> None:
        pass

    def resumed(self, n: float) -> None:
        pass

    def label(self, text: str) -> None:
        pass


def clock(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class _Heartbeat:
    """Calls ``tick`` every ``HEARTBEAT_SECONDS`` from a daemon thread until stopped: a stage whose one
    step takes minutes still shows its clock."""

    def __init__(self, tick: Callable[[], None]):
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(tick,), daemon=True, name="rbe-progress")
        self.thread.start()

    def _run(self, tick) -> None:
        while not self.stop.wait(HEARTBEAT_SECONDS):
            tick()

    def close(self) -> None:
        self.stop.set()
        self.thread.join()


class LineProgress:
    """Progress as plain lines on stderr (none when ``silent``), each with an estimate from the average
    rate so far; also a line every ``LINE_SECONDS`` while nothing moves, once entered as a context, and
    on leaving it a last line with the final count when an earlier line showed less."""

    def __init__(
        self,
        total: float,
        desc: str,
        unit: str,
        silent: bool = False,
        count_format: str = "{n:.0f}/{total:.0f}",
        scale: float = 1.0,
        announce: bool = False,
        later: Callable[[float], float] | None = None,
        expected: float | None = None,
        last_line: float | None = None,
    ):
        self.announce = announce  # a line when the stage starts, so that a log shows it began
        self.total, self.desc, self.unit, self.silent = total, desc, unit, silent
        self.count_format, self.scale, self.later = count_format, scale, later
        self.expected = expected  # seconds the stage should take, predicted before it: until its own pace
        self.n = 0.0
        self.text = ""
        self.start = time.monotonic()
        self.last = self.start if last_line is None else last_line  # when the last line was printed
        self.shown: float | None = None  # the count the last line printed showed; None before any line
        self.ended = False  # left without an error: a last line says so, with no estimate or label
        self.first: tuple[float, float] | None = None  # (time, count) at the first update or ``resumed``
        self.updated = self.start  # when a unit was last counted
        self.from_resume = False
        self.heartbeat: _Heartbeat | None = None
        self.lock = threading.Lock()  # the heartbeat's lines and the worker's never interleave

    def __enter__(self):
        if self.announce:
            self._line()
        if not self.silent:
            self.heartbeat = _Heartbeat(self.tick)
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if self.heartbeat is not None:
            self.heartbeat.close()
            self.heartbeat = None
        if exc_type is None and self.shown is not None and self.shown != self.n:
            self.ended = True
            self._line()  # a log that showed the stage under way also shows where it ended

    def update(self, n: float = 1) -> None:
        self.n += n
        if self.first is None:
            self.first = (time.monotonic(), self.n)
        if n:
            self.updated = time.monotonic()
        self.tick()

    def resumed(self, n: float) -> None:
        """Counts ``n`` units done before this run (the blocks of a resumed conversion, the bytes an
        earlier stage wrote): not part of the pace."""
        self.n += n
        self.first, self.from_resume = (time.monotonic(), self.n), True

    def label(self, text: str) -> None:
        self.text = text
        self.tick()

    def tick(self) -> None:
        """A line when ``LINE_SECONDS`` have passed since the last, less the heartbeat's interval: the
        heartbeat may look that much late, and lines must never be more than ``LINE_SECONDS`` apart."""
        if time.monotonic() - self.last >= LINE_SECONDS - HEARTBEAT_SECONDS:
            self._line()

    def report(self) -> ProgressReport:
        elapsed = time.monotonic() - self.start
        pace = self.seconds_per_unit() if self.total * ESTIMATE_FROM <= self.n else None
        left = None
        if pace is not None:  # the units left at that pace, less the time spent on the one under way
            left = max(0.0, pace * (self.total - self.n) - (time.monotonic() - self.updated))
        if left is None and self.expected is not None:
            left = max(0.0, self.expected - elapsed)
        in_all = left + self.later(pace) if left is not None and self.later is not None else None
        n, total = self.n / self.scale, self.total / self.scale
        return ProgressReport(self.desc, n, total, self.unit, self.text, elapsed, left, in_all)

    def line(self) -> str:
        r = self.report()
        out = f"rbe: {r.stage}: {self.count_format.format(n=r.done, total=r.total)} {r.unit}"
        if self.ended:
            return f"{out}, {clock(r.elapsed)} elapsed, done"
        if r.label:
            out += f", {r.label}"
        out += f", {clock(r.elapsed)} elapsed"
        if r.left is not None and (r.left > 0 or r.left_in_all):
            if r.left_in_all is not None:  # stages after this one are known: say which figure is which
                out += f", about {clock(r.left)} left in this stage, {clock(r.left_in_all)} in all stages"
            else:
                out += f", about {clock(r.left)} left"
        elif r.left == 0 and r.done < r.total:  # the estimate ran out before the work did: say so
            out += ", taking longer than estimated"
        return out

    def seconds_per_unit(self) -> float | None:
        """The pace from the first update to the last once a second has come: the work before the
        first unit (a conversion's setup) and the units of a resumed run's earlier sittings are not
        part of it.  None while only those are known."""
        since, counted = self.first or (self.updated, self.n)
        if self.n > counted and self.updated > since:
            return (self.updated - since) / (self.n - counted)
        if self.from_resume or not self.n:
            return None
        return (self.updated - self.start) / self.n

    def _line(self) -> None:
        with self.lock:
            self.last, self.shown = time.monotonic(), self.n
            if not self.silent:
                self.emit()

    def emit(self) -> None:
        print(self.line(), file=sys.stderr, flush=True)


class CallbackProgress(LineProgress):
    """Hands a ``ProgressReport`` to ``callback`` at each update and label, and every ``LINE_SECONDS``
    while nothing moves: a program's own display or log."""

    def __init__(self, callback: Callable[[ProgressReport], None], total: float, desc: str, unit: str, **kw):
        super().__init__(total, desc, unit, announce=True, **kw)
        self.callback = callback

    def update(self, n: float = 1) -> None:
        super().update(n)
        self._line()

    def label(self, text: str) -> None:
        super().label(text)
        self._line()

    def emit(self) -> None:
        self.callback(self.report())


class _Bar:
    """tqdm's bar with ``label`` shown after the counts; its clock redrawn every second while nothing moves."""

    def __init__(self, total: float, desc: str, unit: str, count_format: str, scale: float = 1.0):
        from tqdm import tqdm

        self.scale = scale
        self.bar = tqdm(
            total=total / scale,
            desc=desc,
            file=sys.stderr,
            leave=False,
            delay=BAR_DELAY,
            smoothing=0,  # the average rate: an estimate that does not swing with each unit
            bar_format="{desc}: {percentage:3.0f}%|{bar}| "
            + count_format
            + " "
            + unit
            + " [{elapsed}<{remaining}]{postfix}",
        )
        self.heartbeat: _Heartbeat | None = None

    def __enter__(self):
        self.bar.__enter__()
        self.heartbeat = _Heartbeat(self._redraw)
        return self

    def _redraw(self) -> None:
        if self.bar.format_dict["elapsed"] >= BAR_DELAY:  # as tqdm's own first draw waits
            self.bar.refresh()

    def __exit__(self, *exc) -> None:
        if self.heartbeat is not None:
            self.heartbeat.close()
        self.bar.__exit__(*exc)

    def update(self, n: float = 1) -> None:
        self.bar.update(n / self.scale)

    def resumed(self, n: float) -> None:
        self.bar.initial = self.bar.n = self.bar.n + n / self.scale  # tqdm's rate counts from ``initial``
        self.bar.refresh()

    def label(self, text: str) -> None:
        self.bar.set_postfix_str(text, refresh=True)


def process_started() -> float:
    """``time.monotonic()``'s value when this process started (Linux: ``/proc/self/stat``), so that a
    log's first line is due from when the command was typed, the interpreter's start and the imports
    included; now elsewhere, when unreadable, or when the process is older than a command's start
    takes (``main`` called from a long-running program: its command starts now)."""
    now = time.monotonic()
    try:
        with open("/proc/self/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()  # the command name may hold spaces: cut after it
        started_ticks = int(fields[19])  # field 22, starttime, in clock ticks since boot
        age = time.clock_gettime(time.CLOCK_BOOTTIME) - started_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):
        return now
    return now - age if 0.0 <= age <= LONGEST_START_SECONDS else now
