"""Helpers the codecs share: bit packing (``bitpack``), part checks (``arrays``), the seed generator (``lfsr``)."""
