"""Blob codecs, which turn bytes into bytes: ``raw``, ``zstd``, ``byteplane`` (with its plane kernels in ``planes``)."""
