"""rbe_loaders: load rbe containers into frameworks.

Installed as ``rbe_loaders`` (from the repository's ``loaders/`` folder).
``rbe_loaders.torch`` turns a container into a torch state dict.
"""
