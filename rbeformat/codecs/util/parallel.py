"""Independent pieces of an encoder's work run on several threads.

numpy releases the GIL inside its array loops, so groups fitted a slice of
rows at a time on two threads use the cores one fit leaves idle (a 7 B
model's MLP weight: 9.0 s one slice of 64 MiB after another, 2.7 s in slices
of 8 MiB on two threads of two cores).  Each piece writes its own part of the
result, so the bits are the same for any number of threads.

>>> squares = [0] * 4
>>> def square(i): squares[i] = i * i
>>> run_each(square, range(4))
>>> squares
[0, 1, 4, 9]
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

Piece = TypeVar("Piece")

_chosen: list[int] = []  # the count set by ``encoder_threads``, innermost last


def default_threads() -> int:
    """One per core, at most 8: the encoders' and the writer's default."""
    return max(1, min(8, os.cpu_count() or 1))


def threads() -> int:
    """How many threads ``run_each`` uses now."""
    return _chosen[-1] if _chosen else default_threads()


@contextlib.contextmanager
def encoder_threads(count: int | None) -> Iterator[None]:
    """Within the ``with`` body encoders use ``count`` threads (None: the default)."""
    _chosen.append(max(1, count) if count else default_threads())
    try:
        yield
    finally:
        _chosen.pop()


def run_each(work: Callable[[Piece], None], pieces: Iterable[Piece]) -> None:
    """Calls ``work(piece)`` for every piece, on up to ``threads()`` threads; raises the first error."""
    pieces = list(pieces)
    count = min(threads(), len(pieces))
    if count <= 1:
        for piece in pieces:
            work(piece)
        return
    with ThreadPoolExecutor(count) as pool:
        for _ in pool.map(work, pieces):
            pass
