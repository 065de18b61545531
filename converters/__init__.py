"""rbe_converters: Hugging Face checkpoints to rbe and back, and the ``rbe`` command.

Installed as ``rbe_converters`` (from the repository's ``converters/`` folder);
it depends on ``rbeformat`` and never the other way round.
"""
