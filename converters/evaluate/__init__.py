"""Measuring a container: ``rbe eval`` (``eval``: size, bits per weight and quality beside the original),
the quality measures and texts (``quality``: perplexity, sentence-embedding cosine) and ``rbe info``'s
report (``report``)."""
