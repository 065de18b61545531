"""Output names that say what the output is, and what interrupted runs left beside them.

``rbe convert`` writes an rbe file: a name ending in another file type's
extension (``oops.safetensors``, ``m.onnx``) would pass it off as that kind of
file, so it is refused (exit 2) unless ``--force``.  ``rbe decode`` writes a
directory unless the name ends in ``.safetensors`` or ``.onnx``; a directory
named with a file type's extension (``out.rbe``, ``model.bin``) is nearly
always a mistyped file name, refused the same way.  Only the extensions in
``FILE_TYPES`` count, and slips of them (``out.safetensor``, ``m.onx``): model
folders named ``Llama-3.1-8B`` or ``v1.5`` are directories as ever.

An interrupted run leaves a hidden partial file beside its output
(``rbeformat.atomic.stale_partials``); the next run to the same output removes
those whose writer is gone and names them (``stale_partials_note``).
"""

from __future__ import annotations

import difflib
import os

from rbeformat import FileMissingError, UsageError

# Extensions that name a kind of file (weights, archives, data): what a directory or a non-rbe
# output must not be named with.
FILE_TYPES = {
    ".rbe": "an rbe file",
    ".safetensors": "a .safetensors file",
    ".onnx": "an ONNX model",
    ".bin": "a .bin file",
    ".pt": "a PyTorch file",
    ".pth": "a PyTorch file",
    ".ckpt": "a checkpoint file",
    ".gguf": "a GGUF file",
    ".h5": "an HDF5 file",
    ".keras": "a Keras file",
    ".msgpack": "a msgpack file",
    ".npy": "a numpy file",
    ".npz": "a numpy archive",
    ".pkl": "a pickle",
    ".pickle": "a pickle",
    ".json": "a JSON file",
    ".txt": "a text file",
    ".zip": "a zip archive",
    ".tar": "a tar archive",
    ".gz": "a gzip file",
    ".tgz": "a tar archive",
    ".xz": "an xz file",
    ".zst": "a zstd file",
}


def file_type(path: str) -> str | None:
    """The extension in ``FILE_TYPES`` that ``path``'s extension is, or is a slip of (``.safetensor``,
    ``.onx``), else None."""
    extension = os.path.splitext(os.path.basename(os.path.normpath(path)))[1].lower()
    if extension in FILE_TYPES:
        return extension
    close = difflib.get_close_matches(extension, FILE_TYPES, n=1, cutoff=0.8) if len(extension) > 3 else []
    return close[0] if close else None


def _typed(path: str, extension: str) -> str:
    """How the name shows ``extension``: as it is, or the slip and what it is close to."""
    typed = os.path.splitext(os.path.normpath(path))[1]
    return "" if typed.lower() == extension else f" (its {typed} is close to {extension})"


def check_rbe_output_name(path: str, force: bool) -> None:
    """``rbe convert``'s output: a name of another file type is refused unless ``force``."""
    extension = file_type(path)
    if force or extension in (None, ".rbe"):
        return
    stem = os.path.splitext(path)[0]
    stem = stem[: -len(".rbe")] if stem.endswith(".rbe") else stem  # out.rbe.safetensors: out.rbe, not out.rbe.rbe
    raise UsageError(
        f"{path}: rbe convert writes an rbe file, which this name would pass off as {FILE_TYPES[extension]}"
        f"{_typed(path, extension)}; "
        f"name it {stem}.rbe, or pass --force to write it under this name anyway"
    )


def check_directory_name(path: str, force: bool) -> None:
    """``rbe decode``'s directory output: a name ending in a file type's extension is refused unless ``force``."""
    extension = file_type(path)
    if force or extension is None:
        return
    raise UsageError(
        f"{path}: rbe decode writes a directory here, which this name would pass off as "
        f"{FILE_TYPES[extension]}{_typed(path, extension)}; end the name in .safetensors for one file or .onnx "
        "for an ONNX model, "
        "name the directory without a file type's extension, or pass --force to make it anyway"
    )


def check_not_input(input: str, output: str) -> None:
    """Refuses an output that is the input file itself, by any name (a link, a hard link), even with --force."""
    if not (os.path.isfile(input) and os.path.exists(output)):
        return
    if os.path.samefile(input, output):
        raise UsageError(f"{output}: is the input {input}; rbe never writes over its input: choose another output")


def check_input_exists(input: str) -> None:
    """A missing input is said before any refusal of the output, whose fix (--force) would not help."""
    if not os.path.exists(input):
        raise FileMissingError(f"{input}: no such file or directory", input)


def stale_partials_note(output: str, removed: list[str]) -> str:
    """The line that names the partial files of interrupted runs removed beside ``output``."""
    shown = ", ".join(removed[:4]) + (f" and {len(removed) - 4} more" if len(removed) > 4 else "")
    noun = "file" if len(removed) == 1 else "files"
    return f"rbe: {output}: removed {len(removed)} partial {noun} that interrupted runs left: {shown}"
