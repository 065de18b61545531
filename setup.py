"""Builds the optional C fast path of the byteplane codec.

Everything else lives in pyproject.toml.  When the extension cannot be built
the package still works, with the (slower) numpy reference implementation.
"""
from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "rbeformat._planes",
            sources=["rbeformat/_planes.c"],
            extra_compile_args=["-O3"],
            optional=True,
        )
    ]
)
