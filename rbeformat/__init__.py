"""rbeformat: the rbe container format (spec/rbe-v1.md) and its codecs.

The public surface follows safetensors' habits:

>>> from rbeformat import save_file, load_file, safe_open   # doctest: +SKIP
>>> save_file({"w": np.ones((2, 2), np.float32)}, "w.rbe")
>>> load_file("w.rbe")["w"].sum()
4.0

Errors are rbe's own types (``rbeformat.errors``) and, where Python has one
for the same mistake, the built-in type too: a missing file is a
``FileNotFoundError``, a missing tensor a ``KeyError``, a bad argument a
``ValueError`` (or ``TypeError``), a missing optional package an
``ImportError`` whose message names the extra to install.
"""

from ._version import __version__
from .api import load_file, safe_open, save_file  # noqa: E402
from .budget import MemoryLimitError  # noqa: E402
from .errors import (  # noqa: E402
    ChecksumError,
    EmbeddedFileNotFoundError,
    FileMissingError,
    FormatError,
    InputError,
    MissingExtraError,
    NameNotFoundError,
    OutputExistsError,
    RbeError,
    TensorNotFoundError,
    UnsupportedError,
    UsageError,
    UsageTypeError,
)
from .reader import Reader, TensorSlice  # noqa: E402
from .writer import Writer  # noqa: E402

__all__ = [
    "__version__",
    "ChecksumError",
    "EmbeddedFileNotFoundError",
    "FileMissingError",
    "FormatError",
    "InputError",
    "MemoryLimitError",
    "MissingExtraError",
    "NameNotFoundError",
    "OutputExistsError",
    "RbeError",
    "Reader",
    "TensorNotFoundError",
    "TensorSlice",
    "UnsupportedError",
    "UsageError",
    "UsageTypeError",
    "Writer",
    "load_file",
    "safe_open",
    "save_file",
]
