"""Outputs that appear whole or not at all, and never at the cost of a user's files.

A new file or directory is built under a temporary name beside the target,
synced, and renamed into place.  An existing directory is never replaced as a
whole: only the files being written are, each staged beside its target and
renamed over it once every file is complete, so whatever else the directory
holds stays as it was.  That also works where the directory itself cannot be
renamed (the current directory, a mount point).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from typing import Iterator

from rbeformat import OutputExistsError, RbeError, UsageError
from rbeformat.writer import default_file_mode, fsync_directory


def check_parent(path: str) -> None:
    """The directory an output goes into must exist: say so before any work."""
    parent = os.path.dirname(os.path.normpath(path)) or "."
    if not os.path.isdir(parent):
        state = "is not a directory" if os.path.lexists(parent) else "does not exist"
        raise UsageError(f"{path}: the directory {parent} {state}; create it first or choose another output")


def check_target(path: str, force: bool) -> None:
    """A file output: refuses an existing one unless forced, and never replaces a directory."""
    if os.path.isdir(path):
        raise OutputExistsError(f"{path}: is a directory; name the file to write instead")
    if os.path.lexists(path) and not force:
        raise OutputExistsError(f"{path}: exists; pass --force to overwrite it")


def check_directory_target(path: str, force: bool) -> None:
    """A directory output: a new one, or an existing directory when forced."""
    if os.path.isdir(path):
        if not force:
            raise OutputExistsError(f"{path}: exists; pass --force to replace the files the container holds "
                                    "(other files in it are kept)")
        return
    if os.path.lexists(path):
        raise OutputExistsError(f"{path}: exists and is not a directory; remove it or choose another output")
    check_parent(path)


@contextlib.contextmanager
def atomic_file(path: str, force: bool) -> Iterator:
    """Yields a binary file object; on success it replaces ``path``."""
    check_target(path, force)
    check_parent(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".partial", dir=directory)
    try:
        os.fchmod(fd, default_file_mode())  # mkstemp's 0600 would outlive the rename
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        _remove_quietly(tmp)
        raise
    fsync_directory(directory)


@contextlib.contextmanager
def atomic_directory(path: str, force: bool, files: list[str]) -> Iterator["NewDirectory | ExistingDirectory"]:
    """Yields a directory output for the relative POSIX ``files`` it will hold.

    A new directory is built under a temporary name and renamed into place; into
    an existing one (only with ``force``) each file is staged beside its target
    and all are renamed over their targets at the end.  On failure every
    temporary file is removed and the target is as it was, except that during
    the final renames some files may already be the new, complete ones.
    """
    check_directory_target(path, force)
    out = ExistingDirectory(path, files) if os.path.isdir(path) else NewDirectory(path)
    try:
        yield out
        out.commit()
    except BaseException:
        out.discard()
        raise


class NewDirectory:
    """A directory built under a temporary name beside ``path``."""

    def __init__(self, path: str):
        self.path = path
        parent = os.path.dirname(os.path.abspath(path))
        self._tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(path))}.", suffix=".partial",
                                     dir=parent)
        try:
            os.chmod(self._tmp, default_file_mode(directory=True))  # mkdtemp's 0700 would outlive the rename
        except BaseException:
            os.rmdir(self._tmp)
            raise

    @contextlib.contextmanager
    def create(self, rel: str) -> Iterator:
        target = os.path.join(self._tmp, *rel.split("/"))
        with _writing(os.path.join(self.path, *rel.split("/"))):
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with open(target, "xb") as fh:
                yield fh
                fh.flush()
                os.fsync(fh.fileno())

    def commit(self) -> None:
        os.rename(self._tmp, self.path)
        fsync_directory(os.path.dirname(os.path.abspath(self.path)))

    def discard(self) -> None:
        shutil.rmtree(self._tmp, ignore_errors=True)

    def kept(self) -> list[str]:
        return []


class ExistingDirectory:
    """Files written into a directory that exists, each staged beside its target."""

    def __init__(self, path: str, files: list[str]):
        self.path = path
        self._files = set(files)
        self._staged: list[tuple[str, str]] = []  # (temporary file, target), not yet renamed
        self._made: list[str] = []  # directories this output created, outermost first
        for rel in sorted(self._files):
            self._check_room(rel)

    def _check_room(self, rel: str) -> None:
        """Every directory on the way must be one, and the target must not be a directory."""
        parts = rel.split("/")
        for depth in range(1, len(parts) + 1):
            here = os.path.join(self.path, *parts[:depth])
            last = depth == len(parts)
            if last and os.path.isdir(here):
                raise OutputExistsError(f"{here}: is a directory where the container has a file; "
                                        "move it away first")
            if not last and os.path.lexists(here) and not os.path.isdir(here):
                raise OutputExistsError(f"{here}: is a file where the container has a directory; "
                                        "move it away first")

    def _make_parents(self, rel: str) -> str:
        directory = self.path
        for part in rel.split("/")[:-1]:
            directory = os.path.join(directory, part)
            if not os.path.isdir(directory):
                os.mkdir(directory)
                self._made.append(directory)
        return directory

    @contextlib.contextmanager
    def create(self, rel: str) -> Iterator:
        if rel not in self._files:
            raise RbeError(f"{rel}: not among the files announced for {self.path}")
        target = os.path.join(self.path, *rel.split("/"))
        with _writing(target):
            directory = self._make_parents(rel)
            fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(target)}.", suffix=".partial", dir=directory)
            self._staged.append((tmp, target))
            os.fchmod(fd, default_file_mode())
            with os.fdopen(fd, "wb") as fh:
                yield fh
                fh.flush()
                os.fsync(fh.fileno())

    def commit(self) -> None:
        while self._staged:
            tmp, target = self._staged[0]
            os.replace(tmp, target)
            self._staged.pop(0)
        for directory in {os.path.dirname(target) for target in self._targets()}:
            fsync_directory(directory)

    def discard(self) -> None:
        for tmp, _ in self._staged:
            _remove_quietly(tmp)
        self._staged.clear()
        for directory in reversed(self._made):
            with contextlib.suppress(OSError):  # not empty: it holds files already renamed into place
                os.rmdir(directory)

    def _targets(self) -> list[str]:
        return [os.path.join(self.path, *rel.split("/")) for rel in self._files]

    def kept(self) -> list[str]:
        """Files in the directory that the container does not hold: left as they were."""
        found = []
        for dirpath, dirnames, filenames in os.walk(self.path):
            dirnames.sort()
            for name in filenames:
                rel = os.path.relpath(os.path.join(dirpath, name), self.path).replace(os.sep, "/")
                if rel not in self._files:
                    found.append(rel)
        return sorted(found)


@contextlib.contextmanager
def _writing(target: str) -> Iterator[None]:
    """Names the file an operating-system error concerns (a write error has no file name)."""
    try:
        yield
    except OSError as exc:
        raise RbeError(f"{target}: cannot write it ({exc.strerror or exc})") from None


def _remove_quietly(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
