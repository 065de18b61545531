"""Measuring a container: ``rbe eval`` (``eval``: size, bits per weight and quality beside the original, in
transformers; ``ort_eval``: the same for ONNX models, in ONNX Runtime; ``plot``: ``--plot``'s figure), the
quality measures and texts (``quality``: perplexity, sentence-embedding cosine) and ``rbe info``'s report
(``report``)."""
