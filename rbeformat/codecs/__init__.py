"""The codecs of rbe, one module each, and what they share.

* ``base``: the contract every chunk codec follows, and its parameter checks;
* ``registry``: the permanent codec names and the classes they mean;
* blob codecs: ``raw``, ``zstd``, ``byteplane`` (lossless byte planes) with its
  plane transforms in ``planes`` (numpy reference and C fast path) and ``bitpack``;
* tensor codecs: ``gquant``, ``palette``, ``vq``, ``seed`` (with ``lfsr``),
  ``lowrank``, ``sparse`` and ``nm24``, ``normdelta``, ``posemb`` (``posdct``, ``sinusoid``);
* ``tensor``: the contract of tensor codecs (named parts, checked against ``part_specs``).

Nothing is imported here, so importing one codec loads only what it needs.
"""
