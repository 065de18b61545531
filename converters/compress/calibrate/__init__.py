"""Calibration: the statistics of each Linear layer's inputs on calibration text, measured in torch
(``torch``: a Hugging Face model directory) or in ONNX Runtime (``ort``: an .onnx file with its tokenizer)."""
