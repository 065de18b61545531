"""The one family of exceptions rbe raises for bad input.

Every message says what was expected, what was found, and where, so that a user
can act on it without a traceback.

Some also derive from the built-in exception a Python user would catch for the
same mistake, so that code written for safetensors, numpy or ``open`` keeps
working: a missing file is a ``FileNotFoundError``, a missing tensor a
``KeyError``, a bad argument value a ``ValueError`` (of the wrong type, a
``TypeError``), a missing optional package an ``ImportError``.
"""

import errno
import os


class RbeError(Exception):
    """Base class of every error rbe raises on purpose."""


class FormatError(RbeError):
    """A container is malformed, truncated or hostile."""


class ChecksumError(FormatError):
    """A section's bytes do not match its recorded checksum."""


class UnsupportedError(FormatError):
    """The file needs a format version or codec this reader does not have."""


class InputError(RbeError):
    """An input to convert (a safetensors file, a model directory) is invalid."""


class FileMissingError(InputError, FileNotFoundError):
    """An input path names nothing: also a ``FileNotFoundError``, as ``open`` would raise.

    ``filename`` is the path; ``str()`` is rbe's one-line message (not OSError's
    ``[Errno 2] ...`` form).
    """

    def __init__(self, message: str, filename: str | None = None):
        super().__init__(message)
        self.errno, self.strerror, self.filename = errno.ENOENT, os.strerror(errno.ENOENT), filename

    def __str__(self) -> str:
        return self.args[0]

    def __reduce__(self):
        return type(self), (self.args[0], self.filename)


class NameNotFoundError(InputError, KeyError):
    """A container holds no tensor or embedded file of the name asked for: also a ``KeyError``.

    ``str()`` is the message as written (KeyError's own ``str()`` would quote it).
    """

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class TensorNotFoundError(NameNotFoundError):
    """``get_tensor``, ``get_slice`` or ``entry`` asked for a tensor name the container lacks."""


class EmbeddedFileNotFoundError(NameNotFoundError):
    """``read_file`` or ``iter_file`` asked for an embedded file the container lacks."""


class OutputExistsError(RbeError):
    """The output path exists and overwriting was not asked for."""


class UsageError(InputError, ValueError):
    """A setting the user gave is invalid: a codec chain, a recipe, an option value.

    Also a ``ValueError``, as Python reports a bad argument value.  The command
    line reports it as a usage error (exit 2).
    """


class UsageTypeError(UsageError, TypeError):
    """An argument of the wrong type (bytes or a list where one string goes): also a ``TypeError``."""


class MissingExtraError(UsageError, ImportError):
    """An optional package rbe needs for what was asked is not installed: also an ``ImportError``.

    The message names the one extra of rbe that installs everything needed
    (``pip install 'rbe[ort]'``); ``name`` is the missing module and
    ``extra`` the extra.  The command line reports it as a usage error (exit 2).
    """

    def __init__(self, message: str, *, name: str | None = None, extra: str | None = None):
        super().__init__(message)
        self.msg, self.name, self.extra = message, name, extra
