"""The codec contracts: blob codecs (``base``), tensor codecs (``tensor``) and their declared settings (``fields``)."""
