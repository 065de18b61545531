"""Outputs that appear whole or not at all.

Files and directories are built under a temporary name beside the target,
synced, and renamed into place; an existing target is replaced only when the
caller allows it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from typing import Iterator

from rbeformat import OutputExistsError
from rbeformat.writer import default_file_mode


def check_target(path: str, force: bool) -> None:
    if os.path.lexists(path) and not force:
        raise OutputExistsError(f"{path}: exists; pass --force to overwrite it")


@contextlib.contextmanager
def atomic_file(path: str, force: bool) -> Iterator:
    """Yields a binary file object; on success it replaces ``path``."""
    check_target(path, force)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".partial", dir=directory)
    os.fchmod(fd, default_file_mode())
    try:
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_directory(path: str, force: bool) -> Iterator[str]:
    """Yields a fresh temporary directory; on success it becomes ``path``."""
    check_target(path, force)
    parent = os.path.dirname(os.path.abspath(path))
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(path))}.", suffix=".partial", dir=parent)
    os.chmod(tmp, default_file_mode(directory=True))  # mkdtemp's 0700 would outlive the rename
    try:
        yield tmp
        old = None
        if os.path.lexists(path):
            old = tempfile.mkdtemp(prefix=".old.", dir=parent)
            os.rename(path, os.path.join(old, "x"))
        os.rename(tmp, path)
        if old:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_synced(path: str, chunks) -> None:
    """Writes byte chunks to a new file inside a directory being built."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "xb") as fh:
        for chunk in chunks:
            fh.write(chunk)
        fh.flush()
        os.fsync(fh.fileno())
