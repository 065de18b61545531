"""The package version, in one place.

A module of its own so that any module of the package can import it without
depending on the order in which ``rbeformat/__init__.py`` runs its imports, and
so that pyproject.toml can read it statically (setuptools' ``attr:``).
"""

__version__ = "0.1.0"
