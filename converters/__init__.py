"""rbe_converters: models to rbe and back, and the ``rbe`` command.

Installed as ``rbe_converters`` (from the repository's ``converters/`` folder);
it depends on ``rbeformat`` and never the other way round.

* ``cli``: the ``rbe`` command: parses arguments, calls one library function per command, prints;
* ``pipeline``: one conversion for every input (``convert``), and ``rbe convert`` as a library
  function (``convert_model``: codec, policy, calibration, --onnx export, the result's numbers);
* ``sources/``: what a conversion reads, one ``TensorSource`` per input format: ``safetensors``
  (a .safetensors file or a Hugging Face directory), ``onnx`` (an .onnx file's initializers and graph);
* ``compress/``: which chain each tensor gets (``plan``), recipes and presets (``recipe``),
  roles, mixed precision, head pruning, sensitivity, calibration with torch or ONNX Runtime;
* ``decode``: containers back to a Hugging Face directory, one .safetensors file or an .onnx model
  (``rbe decode``, ``rbe export-onnx``);
* ``onnx_export``: a Hugging Face model's architecture as an ONNX graph (``rbe convert --onnx``);
* ``hf_folder``: the folder transformers reads a container's model from;
* ``evaluate/``: ``rbe eval``, quality measures and ``rbe info``'s report;
* ``safetensors_io``, ``links``, ``inputs``: the safetensors format, links out of an input folder,
  opening an .rbe file with one clear error.
"""
