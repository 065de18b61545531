"""Outputs that appear whole or not at all, and never at the cost of a user's files.

A new file or directory is built under a temporary name beside the target,
synced, and renamed into place.  An existing directory is never replaced as a
whole: only the files being written are, each staged beside its target and
renamed over it once every file is complete, so whatever else the directory
holds stays as it was.  That also works where the directory itself cannot be
renamed (the current directory, a mount point).

Without ``force`` nothing is ever replaced: the final rename fails, and the
output is discarded with ``OutputExistsError``, if the target appeared after it
was checked (``rbeformat.publish.rename_noreplace``).

A run that is killed leaves its partial file (``.NAME.XXXXXXXX.partial``, the
writer's or ``atomic_file``'s) beside the target: ``remove_stale_partials``,
called by the next run to the same target, removes those whose writer is gone
(no process holds them open).

Nothing is written through a symbolic link that rbe did not create.  The path
the user named (and the directories above it) is taken as typed, but inside an
output directory every step is taken from an open directory descriptor with
``O_NOFOLLOW``, and a link found there (``sub`` pointing elsewhere, or a link
where the container has a file) is refused, never followed or replaced; so is
a link named as a file output.  Listing the files an existing directory keeps
does not follow links either.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import shutil
import stat
from collections.abc import Iterator

from .errors import OutputExistsError, RbeError, UsageError
from .publish import rename_noreplace

_DIRECTORY = os.O_RDONLY | os.O_DIRECTORY | getattr(os, "O_CLOEXEC", 0)
_NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)


def check_parent(path: str) -> None:
    """The directory an output goes into must exist: say so before any work."""
    parent = os.path.dirname(os.path.normpath(path)) or "."
    if not os.path.isdir(parent):
        state = "is not a directory" if os.path.lexists(parent) else "does not exist"
        raise UsageError(f"{path}: the directory {parent} {state}; create it first or choose another output")


def check_target(path: str, force: bool) -> None:
    """A file output: refuses an existing one unless forced, and never replaces a directory or a link."""
    if os.path.islink(path):
        raise OutputExistsError(
            _link_refused(path, "replaces no link and writes through none: remove it, or name the file it points to")
        )
    if os.path.isdir(path):
        raise OutputExistsError(f"{path}: is a directory; name the file to write instead")
    if os.path.lexists(path) and not force:
        raise OutputExistsError(f"{path}: exists; pass --force (force=True from Python) to overwrite it")


def check_directory_target(path: str, force: bool) -> None:
    """A directory output: a new one, or an existing directory when forced."""
    if os.path.isdir(path):
        if not force:
            raise OutputExistsError(
                f"{path}: exists; pass --force to replace the files the container holds (other files in it are kept)"
            )
        return
    if os.path.lexists(path):
        raise OutputExistsError(f"{path}: exists and is not a directory; remove it or choose another output")
    check_parent(path)


@contextlib.contextmanager
def atomic_file(path: str, force: bool) -> Iterator:
    """Yields a binary file object; on success it becomes ``path`` (replacing a file there only with ``force``)."""
    check_target(path, force)
    check_parent(path)
    parent, name = os.path.split(os.path.abspath(path))
    with _writing(path):
        dir_fd = os.open(parent, _DIRECTORY)
    try:
        with _writing(path):
            tmp, fd = _new_temporary(dir_fd, name)
        try:
            with os.fdopen(fd, "wb") as fh:
                yield fh
                fh.flush()
                os.fsync(fh.fileno())
            _publish_file(dir_fd, tmp, name, path, force)
        except BaseException:
            _unlink_quietly(tmp, dir_fd)
            raise
        _fsync(dir_fd)
    finally:
        os.close(dir_fd)


@contextlib.contextmanager
def atomic_directory(path: str, force: bool, files: list[str]) -> Iterator[NewDirectory | ExistingDirectory]:
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
    finally:
        out.close()


class _Tree:
    """Directory descriptors below a root descriptor, opened without following links."""

    def __init__(self, path: str, root_fd: int):
        self.path = path
        self._fds: dict[str, int] = {"": root_fd}  # relative directory -> descriptor
        self._made: list[tuple[int, str]] = []  # (parent descriptor, name) of directories made here, outermost first

    def shown(self, rel: str) -> str:
        return os.path.join(self.path, *rel.split("/")) if rel else self.path

    def directory(self, rel: str, create: bool) -> int:
        """The descriptor of directory ``rel`` (``a/b``), each component opened with O_NOFOLLOW.

        With ``create``, missing components are made (and remembered, to remove on failure).
        """
        if rel in self._fds:
            return self._fds[rel]
        head, _, name = rel.rpartition("/")
        parent = self.directory(head, create)
        if create:
            try:
                os.mkdir(name, 0o777, dir_fd=parent)
                self._made.append((parent, name))
            except FileExistsError:
                pass  # there already: opened below, and refused if it is not a directory
        try:
            fd = os.open(name, _DIRECTORY | os.O_NOFOLLOW, dir_fd=parent)
        except OSError as exc:
            raise _not_a_directory(self.shown(rel), name, parent, exc) from None
        self._fds[rel] = fd
        return fd

    def remove_made(self) -> None:
        for parent, name in reversed(self._made):
            with contextlib.suppress(OSError):  # not empty: it holds files already renamed into place
                os.rmdir(name, dir_fd=parent)
        self._made.clear()

    def fsync_all(self) -> None:
        for fd in self._fds.values():
            _fsync(fd)

    def close(self) -> None:
        for fd in self._fds.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds.clear()


class NewDirectory:
    """A directory built under a temporary name beside ``path``, renamed into place by ``commit``."""

    def __init__(self, path: str):
        self.path = path
        parent, self._name = os.path.split(os.path.abspath(path))
        with _writing(path):
            self._parent = os.open(parent, _DIRECTORY)
        try:
            with _writing(path):
                self._tmp = _new_temporary_directory(self._parent, self._name)
                root = os.open(self._tmp, _DIRECTORY | os.O_NOFOLLOW, dir_fd=self._parent)
        except BaseException:
            if getattr(self, "_tmp", None) is not None:
                with contextlib.suppress(OSError):
                    os.rmdir(self._tmp, dir_fd=self._parent)
            os.close(self._parent)
            raise
        self._tree = _Tree(path, root)

    @contextlib.contextmanager
    def create(self, rel: str) -> Iterator:
        head, _, name = rel.rpartition("/")
        with _writing(os.path.join(self.path, *rel.split("/"))):
            fd = os.open(name, _NEW_FILE, 0o666, dir_fd=self._tree.directory(head, create=True))
            with os.fdopen(fd, "wb") as fh:
                yield fh
                fh.flush()
                os.fsync(fh.fileno())

    def commit(self) -> None:
        self._tree.fsync_all()
        try:
            rename_noreplace(self._tmp, self._name, src_dir_fd=self._parent, dst_dir_fd=self._parent, directory=True)
        except FileExistsError:
            raise OutputExistsError(
                f"{self.path}: appeared while this output was being written (another program "
                "made it) and was left as it is; nothing was written"
            ) from None
        except OSError as exc:
            raise RbeError(
                f"{self.path}: cannot rename the finished output into place ({exc.strerror or exc})"
            ) from None
        self._tmp = None
        _fsync(self._parent)

    def discard(self) -> None:
        if self._tmp is not None:
            self._tree.close()
            shutil.rmtree(self._tmp, ignore_errors=True, dir_fd=self._parent)
            self._tmp = None

    def close(self) -> None:
        self._tree.close()
        if self._parent is not None:
            os.close(self._parent)
            self._parent = None

    def kept(self) -> list[str]:
        return []


class ExistingDirectory:
    """Files written into a directory that exists, each staged beside its target."""

    def __init__(self, path: str, files: list[str]):
        self.path = path
        self._files = set(files)
        self._staged: list[tuple[int, str, str, str]] = []  # (directory fd, temporary name, name, shown path)
        self._kept: list[str] = []
        with _writing(path):
            root = os.open(path, _DIRECTORY)  # the directory the user named, as they typed it
        self._tree = _Tree(path, root)
        try:
            for rel in sorted(self._files):
                self._check_room(rel)
        except BaseException:
            self._tree.close()
            raise

    def _check_room(self, rel: str) -> None:
        """Every directory on the way must be one (not a link to one), and the target neither a directory nor a link."""
        parts = rel.split("/")
        for depth in range(1, len(parts) + 1):
            here_rel = "/".join(parts[:depth])
            here = self._tree.shown(here_rel)
            parent = self._tree.directory("/".join(parts[: depth - 1]), create=False)
            try:
                mode = os.stat(parts[depth - 1], dir_fd=parent, follow_symlinks=False).st_mode
            except FileNotFoundError:
                return  # made when the file is written
            except OSError as exc:
                raise RbeError(f"{here}: cannot inspect it ({exc.strerror or exc})") from None
            if stat.S_ISLNK(mode):
                raise OutputExistsError(
                    _link_refused(
                        here, "never writes through a link it did not create: remove the link or choose another output"
                    )
                )
            last = depth == len(parts)
            if last and stat.S_ISDIR(mode):
                raise OutputExistsError(f"{here}: is a directory where the container has a file; move it away first")
            if not last and not stat.S_ISDIR(mode):
                raise OutputExistsError(f"{here}: is a file where the container has a directory; move it away first")

    @contextlib.contextmanager
    def create(self, rel: str) -> Iterator:
        if rel not in self._files:
            raise RbeError(f"{rel}: not among the files announced for {self.path}")
        head, _, name = rel.rpartition("/")
        target = self._tree.shown(rel)
        with _writing(target):
            directory = self._tree.directory(head, create=True)
            tmp, fd = _new_temporary(directory, name)
            self._staged.append((directory, tmp, name, target))
            with os.fdopen(fd, "wb") as fh:
                yield fh
                fh.flush()
                os.fsync(fh.fileno())

    def commit(self) -> None:
        while self._staged:
            directory, tmp, name, target = self._staged[0]
            with _writing(target):
                if stat.S_ISLNK(_lstat_mode(name, directory)):  # a link put there since the check
                    raise OutputExistsError(
                        _link_refused(
                            target, "never replaces a link it did not create: remove the link or choose another output"
                        )
                    )
                os.replace(tmp, name, src_dir_fd=directory, dst_dir_fd=directory)
            self._staged.pop(0)
        self._tree.fsync_all()
        self._kept = self._list_kept()

    def discard(self) -> None:
        for directory, tmp, _, _ in self._staged:
            _unlink_quietly(tmp, directory)
        self._staged.clear()
        self._tree.remove_made()

    def close(self) -> None:
        self._tree.close()

    def kept(self) -> list[str]:
        """Files in the directory that the container does not hold: left as they were (links listed, not followed)."""
        return list(self._kept)

    def _list_kept(self) -> list[str]:
        found = []
        root = self._tree.directory("", create=False)
        for dirpath, dirnames, filenames, dir_fd in os.fwalk(".", dir_fd=root, follow_symlinks=False):
            links = [name for name in dirnames if stat.S_ISLNK(_lstat_mode(name, dir_fd))]  # to a directory
            dirnames[:] = sorted(set(dirnames) - set(links))
            for name in filenames + links:
                rel = os.path.normpath(os.path.join(dirpath, name)).replace(os.sep, "/")
                if rel not in self._files:
                    found.append(rel)
        return sorted(found)


# -- what interrupted runs left ------------------------------------------------------


def partial_pattern(name: str) -> re.Pattern:
    """The names of partial files of an output named ``name``: hidden, eight random characters (hex here,
    ``tempfile``'s alphabet in ``Writer``) and ``.partial``."""
    return re.compile(rf"\.{re.escape(name)}\.[a-z0-9_]{{8}}\.partial")


def stale_partials(path: str) -> list[str]:
    """The partial files that earlier runs writing ``path`` left beside it, whose writers are gone.

    Only names of ``partial_pattern``, plain files (never a link or a directory)
    owned by this user, that no process holds open: a live writer holds its
    partial file open until it renames or removes it, and a killed one's is
    closed by the system.  Which files processes hold open is read from /proc
    (processes of other users, whose descriptors cannot be read, cannot write
    this user's files); without /proc nothing is found stale.
    """
    return sorted(_stale(path))


def remove_stale_partials(path: str) -> list[str]:
    """Removes ``stale_partials(path)``; returns the names removed.  Each is looked at again, without
    following links, just before it is unlinked: still the same plain file."""
    stale = _stale(path)
    if not stale:
        return []
    removed = []
    with _writing(path):
        dir_fd = os.open(os.path.dirname(os.path.abspath(path)), _DIRECTORY)
    try:
        for name, key in sorted(stale.items()):
            info = _lstat(name, dir_fd)
            if info is None or not stat.S_ISREG(info.st_mode) or (info.st_dev, info.st_ino) != key:
                continue
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name, dir_fd=dir_fd)
                removed.append(name)
    finally:
        os.close(dir_fd)
    return removed


def _stale(path: str) -> dict[str, tuple[int, int]]:
    """{name: (device, inode)} of ``stale_partials(path)``."""
    parent, name = os.path.split(os.path.abspath(path))
    pattern = partial_pattern(name)
    try:
        names = [n for n in os.listdir(parent) if pattern.fullmatch(n)]
    except OSError:
        return {}
    candidates = {}
    for found in names:
        info = _lstat(os.path.join(parent, found))
        if info is not None and stat.S_ISREG(info.st_mode) and info.st_uid == os.geteuid():
            candidates[found] = (info.st_dev, info.st_ino)
    if not candidates:
        return {}
    held = _held_open(set(candidates.values()))
    if held is None:
        return {}
    return {found: key for found, key in candidates.items() if key not in held}


def _lstat(path: str, dir_fd: int | None = None) -> os.stat_result | None:
    try:
        return os.stat(path, dir_fd=dir_fd, follow_symlinks=False)
    except OSError:
        return None


def _held_open(files: set[tuple[int, int]]) -> set[tuple[int, int]] | None:
    """Those of ``files`` ((device, inode) pairs) that a process holds open, as far as /proc shows; None
    where there is no /proc to tell."""
    if not os.path.isdir("/proc/self/fd"):
        return None
    held = set()
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        descriptors = f"/proc/{pid}/fd"
        try:
            fds = os.listdir(descriptors)
        except OSError:  # gone, or another user's
            continue
        for fd in fds:
            try:
                info = os.stat(f"{descriptors}/{fd}")  # what the descriptor is open on
            except OSError:
                continue
            if (info.st_dev, info.st_ino) in files:
                held.add((info.st_dev, info.st_ino))
    return held


def _new_temporary(dir_fd: int, name: str) -> tuple[str, int]:
    """A new file ``.NAME.XXXX.partial`` in the directory, created exclusively, never through a link."""
    for _ in range(100):
        tmp = f".{name}.{secrets.token_hex(4)}.partial"
        try:
            return tmp, os.open(tmp, _NEW_FILE, 0o666, dir_fd=dir_fd)  # the umask applies, as for open()
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no free temporary name", name)


def _new_temporary_directory(dir_fd: int, name: str) -> str:
    for _ in range(100):
        tmp = f".{name}.{secrets.token_hex(4)}.partial"
        try:
            os.mkdir(tmp, 0o777, dir_fd=dir_fd)  # the umask applies, as for mkdir
            return tmp
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no free temporary name", name)


def _publish_file(dir_fd: int, tmp: str, name: str, path: str, force: bool) -> None:
    with _writing(path):
        if force:
            if stat.S_ISLNK(_lstat_mode(name, dir_fd)):  # a link put there since the check
                raise OutputExistsError(
                    _link_refused(path, "replaces no link: remove it, or name the file it points to")
                )
            os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
            return
        try:
            rename_noreplace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        except FileExistsError:
            raise OutputExistsError(
                f"{path}: appeared while this output was being written (another program "
                "made it) and was left as it is; pass --force to overwrite it"
            ) from None


def _lstat_mode(name: str, dir_fd: int) -> int:
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode
    except FileNotFoundError:
        return 0


def _link_refused(path: str, what: str) -> str:
    try:
        target = f" (to {os.readlink(path)})"
    except OSError:
        target = ""
    return f"{path}: is a symbolic link{target}; rbe {what}"


def _not_a_directory(shown: str, name: str, parent: int, exc: OSError) -> RbeError:
    """Why a component could not be opened as a directory without following links."""
    mode = _lstat_mode(name, parent)
    if stat.S_ISLNK(mode):
        return OutputExistsError(
            _link_refused(
                shown, "never writes through a link it did not create: remove the link or choose another output"
            )
        )
    if mode and not stat.S_ISDIR(mode):
        return OutputExistsError(f"{shown}: is a file where the container has a directory; move it away first")
    return RbeError(f"{shown}: cannot open the directory ({exc.strerror or exc})")


def _fsync(fd: int) -> None:
    """Makes renames durable; some file systems cannot sync a directory, which is harmless."""
    with contextlib.suppress(OSError):
        os.fsync(fd)


@contextlib.contextmanager
def _writing(target: str) -> Iterator[None]:
    """Names the file an operating-system error concerns (a write error has no file name)."""
    try:
        yield
    except OSError as exc:
        raise RbeError(f"{target}: cannot write it ({exc.strerror or exc})") from None


def _unlink_quietly(name: str, dir_fd: int) -> None:
    with contextlib.suppress(OSError):
        os.unlink(name, dir_fd=dir_fd)
