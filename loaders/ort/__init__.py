"""ONNX Runtime on a container that carries an ONNX graph, its quantized weights kept compressed.

>>> from rbe_loaders.ort import session                      # doctest: +SKIP
>>> sess, report = session("model.rbe")                     # print(report): the form of each weight
>>> sess.run(None, {"input_ids": ids, "attention_mask": mask})

The public API is ``session``, ``on_the_fly_model`` and ``Report``, from
``build``, which rebuilds the stored graph with each weight in the cheapest
form ONNX Runtime computes on exactly.  The modules of the package:

* ``build``: the rebuilt graph (``on_the_fly_model``), the session on it
  (``session``) and the report of the form each initializer took;
* ``rewriters``: what replaces a compressed weight, one module per codec,
  chosen by the decode formula the codec declares (see ``rewriters``);
* ``graph``: the stored graph, and which tensor fills each of its initializers;
* ``guard``: calls into ONNX Runtime and tokenizers, stoppable and time-limited;
* ``run``: ``embed``, ``generate`` and ``token_logprobs`` on a container
  converted with ``--onnx`` (``rbe run``).

``build`` is imported when one of its names is first asked for: ``graph``,
``guard`` and ``run`` import without it (``guard`` needs only the standard
library and rbeformat; ``run`` checks a container before building a session).
"""

from __future__ import annotations

__all__ = ["Report", "on_the_fly_model", "session"]


def __getattr__(name: str):
    if name == "session":  # it needs onnxruntime too: name the extra that installs both, not build's onnx alone
        from rbeformat.extras import ORT_SESSIONS

        ORT_SESSIONS.require()
    if name in __all__:
        from . import build

        return getattr(build, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
