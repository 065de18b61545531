"""Builds the C fast path of the byteplane codec.

Everything else lives in pyproject.toml.  For users the extension is optional:
when it cannot be built (no compiler) the package still installs and works, with
the slower numpy reference implementation.  With RBE_REQUIRE_NATIVE=1 (as CI
sets it) a failed build fails the install instead; at run time the same
variable makes ``import rbeformat`` refuse to fall back (rbeformat/native.py).
"""

import os

from setuptools import Extension, setup

NATIVE_REQUIRED = os.environ.get("RBE_REQUIRE_NATIVE", "") == "1"

setup(
    ext_modules=[
        Extension(
            "rbeformat._planes",
            sources=["rbeformat/_planes.c"],
            extra_compile_args=["-O3"],
            optional=not NATIVE_REQUIRED,
        )
    ]
)
