"""The codecs of rbe: one module per tensor codec here, and what they share in sub-packages.

* tensor codecs, one plain module each: ``gquant``, ``palette``, ``vq``, ``seed``,
  ``lowrank``, ``sparse`` (``sparse`` and ``nm24``), ``normdelta``, ``posemb``
  (``posdct``, ``sinusoid``), ``slices``, ``transpose``;
* ``registry``: the permanent codec names and the classes they mean (it imports
  every plain module here, so a new tensor codec is one new file);
* ``core/``: the contracts: ``base`` (blob codecs and parameter checks), ``tensor``
  (tensor codecs: named parts checked against ``part_specs``, the declared decode
  plan), ``fields`` (declared settings);
* ``util/``: ``bitpack``, ``arrays`` (part checks), ``lfsr`` (the seed generator);
* ``encoders/``: ``gptq``, the calibrated rounding the quantizing codecs share;
* ``blob/``: blob codecs ``raw``, ``zstd``, ``byteplane`` (lossless byte planes) with
  its plane transforms in ``planes`` (numpy reference and C fast path).

Nothing is imported here, so importing one codec loads only what it needs.
"""
