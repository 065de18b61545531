"""Choosing and applying the lossy codecs: each tensor's chain on any tensor source (``plan``: chain
choice, calibration methods and statistics, mixed precision's upgrades, head pruning), recipes and
presets (``recipe``, ``presets/``), tensor roles (``roles``), mixed precision (``mixed``,
``sensitivity``), head pruning (``heads``) and calibration (``calibrate/``: statistics of each Linear
layer's inputs, measured in torch or ONNX Runtime)."""
