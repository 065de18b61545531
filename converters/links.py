"""Which symbolic links inside an input folder rbe follows when it reads the folder.

``rbe convert DIR`` embeds every file of DIR in the container.  A link whose
target lies outside DIR (``README.md -> ~/.ssh/id_rsa``) would carry that file
into a container the user may share, so such links are refused, naming the
link and its target.  Links that stay inside DIR are followed.

One layout is allowed outside DIR: a Hugging Face cache snapshot.  There a
model's files are links from ``.../models--ORG--NAME/snapshots/REV/`` into the
same model's ``.../models--ORG--NAME/blobs/``; a folder at or below a snapshot
may follow links into its model's ``blobs`` folder, and nowhere else.
"""

from __future__ import annotations

import os

from rbeformat import InputError


def allowed_roots(folder: str) -> list[str]:
    """The real paths that links in ``folder`` may point into: the folder, and a HF cache model's blobs."""
    top = os.path.realpath(folder)
    blobs = hf_cache_blobs(top)
    return [top] if blobs is None else [top, blobs]


def hf_cache_blobs(real_folder: str) -> str | None:
    """``.../models--ORG--NAME/blobs`` when ``real_folder`` is at or below ``.../models--ORG--NAME/snapshots/REV``."""
    parts = real_folder.split(os.sep)
    for i in range(len(parts) - 2, 0, -1):
        if parts[i] == "snapshots" and parts[i - 1].startswith("models--") and parts[i + 1]:
            return os.sep.join(parts[:i] + ["blobs"])
    return None


def inside(real: str, roots: list[str]) -> bool:
    return any(os.path.commonpath([real, root]) == root for root in roots)


def check_link(path: str, folder: str, roots: list[str] | None = None) -> None:
    """Refuses ``path`` (in ``folder``) when it is a symbolic link whose target lies outside the allowed roots.

    A link whose target does not exist carries nothing and is left to the caller (rbe skips it).
    """
    if not os.path.islink(path) or not os.path.exists(path):
        return
    real = os.path.realpath(path)
    if inside(real, roots if roots is not None else allowed_roots(folder)):
        return
    try:
        target = os.readlink(path)
    except OSError:
        target = real
    shown = target if target == real else f"{target}, that is {real}"
    raise InputError(
        f"{path}: is a symbolic link to {shown}, outside {folder}; rbe embeds only what the folder "
        "holds: copy the file in, or remove the link"
    )
