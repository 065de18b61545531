"""Opening an .rbe file given on the command line, with one error that says what the file is when it is not one."""

from __future__ import annotations

import os
import struct

from rbeformat import FormatError, InputError, Reader
from rbeformat.spec import FOOTER_MAGIC, FOOTER_SIZE, MAGIC


def open_rbe(path: str, **kwargs) -> Reader:
    """A Reader, or one error that says what the file is when it is not an rbe file."""
    if os.path.isdir(path):
        raise InputError(f"{path}: is a directory, not an rbe file; to make one: rbe convert {path} out.rbe")
    try:
        return Reader(path, **kwargs)
    except FormatError:
        if _looks_like_rbe(path):
            raise
        raise InputError(_not_rbe(path)) from None


def _looks_like_rbe(path: str) -> bool:
    """An rbe header or footer magic: a damaged rbe file, whose own error says more."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(len(MAGIC))
            size = os.fstat(fh.fileno()).st_size
            fh.seek(max(0, size - FOOTER_SIZE))
            tail = fh.read(len(FOOTER_MAGIC))
    except OSError:
        return True
    return head == MAGIC or tail == FOOTER_MAGIC


def _not_rbe(path: str) -> str:
    with open(path, "rb") as fh:
        head = fh.read(16)
        size = os.fstat(fh.fileno()).st_size
    if not head:
        return f"{path}: not an rbe file (it is empty)"
    kind = _file_kind(head, size)
    if kind == "a safetensors file":
        return f"{path}: not an rbe file (it looks like {kind}); to make one: rbe convert {path} out.rbe"
    if kind:
        return (
            f"{path}: not an rbe file (it looks like {kind}); rbe converts .safetensors files and "
            "Hugging Face model directories"
        )
    return f"{path}: not an rbe file (it starts with {head[:8]!r}; an rbe file starts with {MAGIC!r})"


def _file_kind(head: bytes, size: int) -> str | None:
    if len(head) >= 9 and head[8:9] == b"{" and 2 <= struct.unpack("<Q", head[:8])[0] <= size - 8:
        return "a safetensors file"
    kinds = {
        b"GGUF": "a GGUF file",
        b"PK\x03\x04": "a zip archive (a PyTorch checkpoint?)",
        b"\x93NUMPY": "a numpy .npy file",
        b"\x89HDF\r\n\x1a\n": "an HDF5 file (a Keras checkpoint?)",
    }
    for magic, kind in kinds.items():
        if head.startswith(magic):
            return kind
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "a Python pickle (a PyTorch checkpoint?)"
    return None
