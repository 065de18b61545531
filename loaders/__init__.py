"""rbe_loaders: load rbe containers into frameworks.

Installed as ``rbe_loaders`` (from the repository's ``loaders/`` folder).
``rbe_loaders.torch`` saves torch tensors (``save_file``) and loads them back
(``load_file``, ``load_state_dict``), as ``safetensors.torch`` does.
``rbe_loaders.ort`` opens a container converted from ONNX as an ONNX Runtime
session whose quantized weights stay compressed (``session``, ``on_the_fly_model``).
"""
