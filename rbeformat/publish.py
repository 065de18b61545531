"""Renaming a finished output into place without replacing what is already there.

An output is written under a temporary name beside its target and renamed
into place when complete.  Without ``--force`` that last rename must not
replace a file or directory that appeared after rbe checked that the target
was free (a second ``rbe convert`` to the same output, say): checking first
and then renaming leaves a gap in which the other output would be silently
replaced.  ``rename_noreplace`` closes the gap:

- on Linux, ``renameat2(..., RENAME_NOREPLACE)`` (glibc 2.28 and later, called
  through ctypes) renames in one step and fails if the target exists;
- where that call or the file system lacks it, a file is hard-linked to its
  target (``link`` fails if the target exists) and its temporary name then
  removed; on a file system without hard links the target is first created
  exclusively (empty) and the file renamed over it;
- a directory's target is first created exclusively (empty) and the temporary
  directory renamed over it, which replaces an empty directory only.

Either way a target that exists raises ``FileExistsError``; nothing is replaced.
"""

from __future__ import annotations

import ctypes
import errno
import os
import sys

AT_FDCWD = -100  # Linux's "relative to the current directory"
RENAME_NOREPLACE = 1
_UNSUPPORTED = {errno.EINVAL, errno.ENOSYS, errno.EPERM, errno.EOPNOTSUPP, getattr(errno, "ENOTSUP", errno.EOPNOTSUPP)}
_NO_HARD_LINKS = {
    errno.EPERM,
    errno.EOPNOTSUPP,
    getattr(errno, "ENOTSUP", errno.EOPNOTSUPP),
    errno.EMLINK,
    errno.ENOSYS,
}


def _load_renameat2():
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # not glibc, or a glibc older than 2.28
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


RENAMEAT2 = _load_renameat2()


def rename_noreplace(
    src: str, dst: str, *, src_dir_fd: int | None = None, dst_dir_fd: int | None = None, directory: bool = False
) -> None:
    """Renames ``src`` to ``dst`` unless ``dst`` exists (``FileExistsError`` then; ``src`` is left).

    ``src_dir_fd`` and ``dst_dir_fd`` are directory descriptors the names are
    relative to, as for ``os.replace``; ``directory`` says that ``src`` is a
    directory (it picks the fallback where renameat2 is missing).
    """
    if RENAMEAT2 is not None:
        old = AT_FDCWD if src_dir_fd is None else src_dir_fd
        new = AT_FDCWD if dst_dir_fd is None else dst_dir_fd
        if RENAMEAT2(old, os.fsencode(src), new, os.fsencode(dst), RENAME_NOREPLACE) == 0:
            return
        code = ctypes.get_errno()
        if code == errno.EEXIST:
            raise FileExistsError(code, os.strerror(code), dst)
        if code not in _UNSUPPORTED:
            raise OSError(code, os.strerror(code), src, None, dst)
    if directory:
        _directory_by_placeholder(src, dst, src_dir_fd, dst_dir_fd)
    else:
        _file_by_link(src, dst, src_dir_fd, dst_dir_fd)


def _file_by_link(src: str, dst: str, src_dir_fd: int | None, dst_dir_fd: int | None) -> None:
    try:
        os.link(src, dst, src_dir_fd=src_dir_fd, dst_dir_fd=dst_dir_fd, follow_symlinks=False)
    except FileExistsError:
        raise
    except OSError as exc:
        if exc.errno not in _NO_HARD_LINKS:
            raise
        fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600, dir_fd=dst_dir_fd)
        os.close(fd)
        os.replace(src, dst, src_dir_fd=src_dir_fd, dst_dir_fd=dst_dir_fd)  # over the placeholder made above
        return
    os.unlink(src, dir_fd=src_dir_fd)


def _directory_by_placeholder(src: str, dst: str, src_dir_fd: int | None, dst_dir_fd: int | None) -> None:
    os.mkdir(dst, 0o700, dir_fd=dst_dir_fd)  # FileExistsError if anything is there
    try:
        os.rename(src, dst, src_dir_fd=src_dir_fd, dst_dir_fd=dst_dir_fd)  # replaces only an empty directory
    except OSError as exc:
        try:
            os.rmdir(dst, dir_fd=dst_dir_fd)
        except OSError:
            pass  # no longer empty: another program wrote into it; leave it to that program
        if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
            raise FileExistsError(exc.errno, os.strerror(exc.errno), dst) from None
        raise
