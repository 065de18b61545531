"""Facts about what a container carries besides its tensors: the embedded ONNX graph (``onnx``), a Hugging
Face config.json (``config``) and the checks applied before transformers reads one (``hf_guard``).

Only the standard library and rbeformat are imported at module level; onnx, torch and transformers are
imported by the functions that need them.
"""
