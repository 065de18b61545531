"""The one family of exceptions rbe raises for bad input.

Every message says what was expected, what was found, and where, so that a user
can act on it without a traceback.
"""


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


class OutputExistsError(RbeError):
    """The output path exists and overwriting was not asked for."""


class UsageError(InputError):
    """A setting the user gave is invalid: a codec chain, a recipe, an option value.

    The command line reports it as a usage error (exit 2).
    """
