"""Choosing and applying the lossy codecs: recipes and presets (``recipe``, ``presets/``), tensor roles
(``roles``), mixed precision (``mixed``, ``sensitivity``), head pruning (``heads``) and calibration
(``calibrate/``: statistics of each Linear layer's inputs, measured in torch or ONNX Runtime)."""
