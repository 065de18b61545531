"""rbeformat: the rbe container format (spec/rbe-v1.md) and its codecs.

The public surface follows safetensors' habits:

>>> from rbeformat import save_file, load_file, safe_open   # doctest: +SKIP
>>> save_file({"w": np.ones((2, 2), np.float32)}, "w.rbe")
>>> load_file("w.rbe")["w"].sum()
4.0
"""

from ._version import __version__
from .api import load_file, safe_open, save_file  # noqa: E402
from .budget import MemoryLimitError  # noqa: E402
from .errors import (  # noqa: E402
    ChecksumError,
    FormatError,
    InputError,
    OutputExistsError,
    RbeError,
    UnsupportedError,
    UsageError,
)
from .reader import Reader, TensorSlice  # noqa: E402
from .writer import Writer  # noqa: E402

__all__ = [
    "__version__",
    "ChecksumError",
    "FormatError",
    "InputError",
    "MemoryLimitError",
    "OutputExistsError",
    "RbeError",
    "Reader",
    "TensorSlice",
    "UnsupportedError",
    "UsageError",
    "Writer",
    "load_file",
    "safe_open",
    "save_file",
]
