"""Optional packages: imported when a feature needs them, or one error naming the extra that installs them.

rbe's extras are pyproject.toml's ``[project.optional-dependencies]``.  Each
``Need`` below is what one feature imports and the one extra that brings all of
it, so that a user installs once, not once per missing package (a
``MissingExtraError``: a ``UsageError`` and an ``ImportError``, exit 2 on the
command line).  tests/rbeformat/test_extras.py checks every ``Need`` against
pyproject.toml.

>>> from rbeformat.extras import ORT_SESSIONS                 # doctest: +SKIP
>>> onnx, onnxruntime = ORT_SESSIONS.require()
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from .errors import MissingExtraError


def install_hint(extra: str) -> str:
    """The command that installs ``extra`` (quoted: ``[...]`` is a pattern to most shells)."""
    return f"pip install 'rbe[{extra}]'"


@dataclass(frozen=True)
class Need:
    """What one feature imports (``modules``) and the extra of rbe that installs all of them."""

    feature: str  # as the message names it: "rbe run", "rbe_loaders.torch"
    extra: str
    modules: tuple[str, ...]

    def require(self, feature: str | None = None) -> list:
        """The modules, imported; MissingExtraError for the first one missing (``feature``: the message's
        name for what needed them, when not this Need's)."""
        imported = []
        for module in self.modules:
            try:
                imported.append(importlib.import_module(module))
            except ImportError as exc:
                raise MissingExtraError(
                    self.message(exc.name or module, feature), name=exc.name or module, extra=self.extra
                ) from None
        return imported

    def message(self, missing: str, feature: str | None = None) -> str:
        if self.modules == (missing,):
            needs = f"needs {missing}, which is not installed"
        else:
            needs = f"needs {_listing(self.modules)}; {missing} is not installed"
        return f"{feature or self.feature} {needs}: {install_hint(self.extra)}"


def _listing(names: tuple[str, ...]) -> str:
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"


# The stored ONNX graph, rebuilt or written out (rbe export-onnx --on-the-fly, rbe_loaders.ort.graph).
ONNX_GRAPHS = Need("reading a stored ONNX graph", "onnx", ("onnx",))
# rbe_loaders.ort.session: the graph in ONNX Runtime.
ORT_SESSIONS = Need("ONNX Runtime sessions (rbe_loaders.ort.session)", "ort", ("onnx", "onnxruntime"))
# rbe run and rbe_loaders.ort.run: a session fed with the embedded tokenizer's ids.
ORT_RUN = Need("rbe run (rbe_loaders.ort.run)", "ort", ("onnx", "onnxruntime", "tokenizers"))
# rbe_loaders.tokenizer: the embedded tokenizer.json.
TOKENIZERS = Need("rbe_loaders.tokenizer", "ort", ("tokenizers",))
# safe_open(framework="pt") and rbe_loaders.torch's tensors.
TORCH_TENSORS = Need("torch tensors (rbe_loaders.torch, framework='pt')", "hf", ("torch",))
# rbe_loaders.torch.load_model: a transformers model on the container's weights.
TORCH_MODELS = Need("rbe_loaders.torch.load_model", "hf", ("torch", "transformers"))

# rbe convert with rules that calibrate (calibration = "gptq" / "wanda"): the model runs in transformers.
CALIBRATION = Need(
    'calibrated encoding (presets and recipe rules with calibration = "gptq" or "wanda")',
    "hf",
    ("torch", "transformers"),
)
# rbe convert model.onnx --tokenizer: the graph runs in ONNX Runtime on the tokenizer's ids.
ORT_CALIBRATION = Need("rbe convert --tokenizer (calibration in ONNX Runtime)", "ort", ("onnxruntime", "tokenizers"))
# rbe convert MODEL_DIR --onnx: torch's exporter writes the architecture as an ONNX graph.
ONNX_EXPORT = Need(
    "rbe convert --onnx (torch's ONNX exporter)", "hf-onnx", ("torch", "transformers", "onnx", "onnxscript")
)

# rbe convert model.onnx, rbe decode x.rbe model.onnx: the ONNX file read or written.
ONNX_FILES = Need("ONNX input and output", "onnx", ("onnx",))
# rbe eval on a transformers model directory: both models run in transformers.
TORCH_EVAL = Need("rbe eval (it runs the models in transformers)", "hf", ("torch", "transformers"))
# rbe eval on an .onnx model: both models run in ONNX Runtime on the tokenizer's ids.
ORT_EVAL = Need("rbe eval of an ONNX model (it runs in ONNX Runtime)", "ort", ("onnx", "onnxruntime", "tokenizers"))
# rbe eval --plot.
PLOTS = Need("rbe eval --plot", "plot", ("matplotlib",))

NEEDS = (
    ONNX_GRAPHS,
    ONNX_FILES,
    TORCH_EVAL,
    ORT_EVAL,
    PLOTS,
    ORT_SESSIONS,
    ORT_RUN,
    TOKENIZERS,
    TORCH_TENSORS,
    TORCH_MODELS,
    CALIBRATION,
    ORT_CALIBRATION,
    ONNX_EXPORT,
)
