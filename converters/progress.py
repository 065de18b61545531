"""Progress on stderr: a bar on a terminal, plain lines in a log.

A conversion of hours must never look hung, and a log must not fill with a
bar's frames.  ``progress(total, desc, unit)`` gives a tqdm bar when stderr is
a terminal, otherwise ``LineProgress``: a line at most every ``LINE_SECONDS``,
when something moves on, with the count, the elapsed time and an
estimate of what is left.  Both take ``update(n)`` and ``label(text)`` (what
runs now, e.g. "block 3/28: mlp_down").
"""

from __future__ import annotations

import sys
import time

LINE_SECONDS = 10.0
ESTIMATE_FROM = 0.01  # the share done before a line estimates what is left: the first tensors say little
BAR_DELAY = 1.0  # seconds before a bar first draws: a refusal found at the start stays the one line


def progress(total: float, desc: str, unit: str, quiet: bool = False, count_format: str = "{n:.0f}/{total:.0f}"):
    """A bar (terminal) or ``LineProgress`` (log) over ``total`` ``unit``s; silent when ``quiet`` or
    when there is nothing to count (no blocks in a conversion that encodes none block by block)."""
    if quiet or not total:
        return LineProgress(total, desc, unit, silent=True)
    if sys.stderr.isatty():
        return _Bar(total, desc, unit, count_format)
    return LineProgress(total, desc, unit, count_format=count_format, announce=True)


def clock(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class LineProgress:
    """Progress as plain lines on stderr (none when ``silent``), each with an estimate from the average rate so far."""

    def __init__(
        self,
        total: float,
        desc: str,
        unit: str,
        silent: bool = False,
        count_format: str = "{n:.0f}/{total:.0f}",
        scale: float = 1.0,
        announce: bool = False,
    ):
        self.announce = announce  # a line when the stage starts, so that a log shows it began
        self.total, self.desc, self.unit, self.silent = total, desc, unit, silent
        self.count_format, self.scale = count_format, scale
        self.n = 0.0
        self.text = ""
        self.start = self.last = time.monotonic()
        self.first: tuple[float, float] | None = None  # (time, count) at the first update or ``resumed``
        self.from_resume = False

    def __enter__(self):
        if self.announce:
            self._line()
        return self

    def __exit__(self, *exc) -> None:
        pass

    def update(self, n: float = 1) -> None:
        self.n += n
        if self.first is None:
            self.first = (time.monotonic(), self.n)
        if time.monotonic() - self.last >= LINE_SECONDS:
            self._line()

    def resumed(self, n: float) -> None:
        """Counts ``n`` units done before this run (the blocks of a resumed conversion): not part of the pace."""
        self.n += n
        self.first, self.from_resume = (time.monotonic(), self.n), True

    def label(self, text: str) -> None:
        self.text = text
        if time.monotonic() - self.last >= LINE_SECONDS:
            self._line()

    def line(self) -> str:
        elapsed = time.monotonic() - self.start
        count = self.count_format.format(n=self.n / self.scale, total=self.total / self.scale)
        out = f"rbe: {self.desc}: {count} {self.unit}"
        if self.text:
            out += f", {self.text}"
        out += f", {clock(elapsed)} elapsed"
        pace = self.seconds_per_unit() if self.total * ESTIMATE_FROM <= self.n < self.total else None
        if pace is not None:
            out += f", about {clock(pace * (self.total - self.n))} left"
        return out

    def seconds_per_unit(self) -> float | None:
        """The pace since the first update once a second has come: the work before the first unit (a
        conversion's setup) and the units of a resumed run's earlier sittings are not part of it.
        None while only those are known."""
        now = time.monotonic()
        since, counted = self.first or (now, self.n)
        if self.n > counted and now > since:
            return (now - since) / (self.n - counted)
        if self.from_resume or not self.n:
            return None
        return (now - self.start) / self.n

    def _line(self) -> None:
        self.last = time.monotonic()
        if not self.silent:
            print(self.line(), file=sys.stderr, flush=True)


class _Bar:
    """tqdm's bar with ``label`` shown after the counts."""

    def __init__(self, total: float, desc: str, unit: str, count_format: str):
        from tqdm import tqdm

        self.bar = tqdm(
            total=total,
            desc=desc,
            file=sys.stderr,
            leave=False,
            delay=BAR_DELAY,
            bar_format="{desc}: {percentage:3.0f}%|{bar}| "
            + count_format
            + " "
            + unit
            + " [{elapsed}<{remaining}]{postfix}",
        )

    def __enter__(self):
        self.bar.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.bar.__exit__(*exc)

    def update(self, n: float = 1) -> None:
        self.bar.update(n)

    def resumed(self, n: float) -> None:
        self.bar.initial = self.bar.n = self.bar.n + n  # tqdm's rate counts from ``initial``
        self.bar.refresh()

    def label(self, text: str) -> None:
        self.bar.set_postfix_str(text, refresh=True)
