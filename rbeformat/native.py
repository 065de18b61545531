"""The one place that loads the C extension ``rbeformat._planes``.

The extension is optional for users (a build without a compiler still works, on
the slower numpy reference path), so a failed import is recorded here rather
than raised.  Two environment variables, read once at import, change that:

* ``RBE_REQUIRE_NATIVE=1``: a missing extension makes ``import rbeformat`` fail
  with an ImportError naming the variable and the original error.  CI sets it so
  that a broken C build cannot pass while the slow path ships.
* ``RBE_DISABLE_NATIVE=1``: the extension is not loaded even when it exists, so
  the numpy path can be exercised on a machine that built it.  It takes
  precedence over ``RBE_REQUIRE_NATIVE``: disabling on purpose is not missing.

Everything else asks this module: ``extension`` is the loaded module or None,
``missing_reason`` says why it is None.
"""

from __future__ import annotations

import os
from types import ModuleType

REQUIRE_VARIABLE = "RBE_REQUIRE_NATIVE"
DISABLE_VARIABLE = "RBE_DISABLE_NATIVE"


def _flag(variable: str) -> bool:
    return os.environ.get(variable, "") == "1"


def _load() -> tuple[ModuleType | None, str | None]:
    """(the extension, None) or (None, why it is not loaded)."""
    if _flag(DISABLE_VARIABLE):
        return None, f"disabled by {DISABLE_VARIABLE}=1"
    try:
        from . import _planes
    except ImportError as exc:
        return None, f"{type(exc).__name__}: {exc}"
    return _planes, None


extension, missing_reason = _load()

if extension is None and _flag(REQUIRE_VARIABLE) and not _flag(DISABLE_VARIABLE):
    raise ImportError(
        f"{REQUIRE_VARIABLE}=1 but the C extension rbeformat._planes could not be imported "
        f"({missing_reason}); rebuild it (pip install -e .) or unset {REQUIRE_VARIABLE}"
    )


def available() -> bool:
    """Whether the C fast path is in use."""
    return extension is not None


def required() -> bool:
    """Whether this process was asked to insist on the C extension."""
    return _flag(REQUIRE_VARIABLE) and not _flag(DISABLE_VARIABLE)
