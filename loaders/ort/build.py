"""ONNX Runtime sessions whose weights stay compressed (``rbe_loaders.ort``'s public API).

>>> from rbe_loaders.ort import session                      # doctest: +SKIP
>>> sess, report = session("model.rbe")                     # print(report): the form of each weight
>>> sess.run(None, {"input_ids": ids, "attention_mask": mask})

An rbe file converted from an ONNX model (``rbe convert model.onnx out.rbe``)
carries the graph; ``on_the_fly_model`` rebuilds it with each weight in the
cheapest form ONNX Runtime computes on exactly, instead of the dense tensor
(``rewriters``: one module per codec, chosen by the decode formula it declares):

* ``gquant`` Linear weights (a MatMul's B stored transposed, or a ``transB=1``
  Gemm's B) become ``com.microsoft.MatMulNBits``, embedding tables read by
  ``Gather`` ``com.microsoft.GatherBlockQuantized``, a tied embedding both
  (``rewriters.gquant``).
* ``seed`` Linear weights (MatMul or transB=1 Gemm) keep their seeds and codes; standard
  operators rebuild the matrix at each run from one basis table shared per (S, C, P)
  (``rewriters.seed``).
* Anything else is decoded to a dense initializer here, at build time, and
  the report says so: other codecs, other consumers of a weight, group sizes
  without a power-of-two block of at least 16, weights that are not float32
  (a bf16 or fp16 checkpoint's, widened to the float32 graph of ``rbe convert
  --onnx``: decoded, then widened exactly).

Nothing here constant-folds back to dense: every expansion reads a graph
input (activations or indices).

``session(path)`` returns ``(onnxruntime.InferenceSession, Report)`` and
prints nothing (``quiet=False`` prints the report to stderr); ``Report``
lists, per initializer, the form used and the bytes its initializers hold.
Only containers that carry a graph are supported: one converted from an
``.onnx`` file or with ``--onnx`` (UsageError otherwise).  Rebuilding the graph
(``on_the_fly_model``, ``rbe export-onnx --on-the-fly``) needs only onnx (the
``onnx`` extra); a session needs onnxruntime too (the ``ort`` extra).
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass

from rbeformat import FormatError, Reader, UsageError
from rbeformat.embedded.onnx import carries_onnx
from rbeformat.extras import ONNX_GRAPHS, ORT_SESSIONS
from rbeformat.onnx_safety import check_model

# The core works without onnx; rebuilding a graph needs it, and only a session needs onnxruntime too.
ONNX_GRAPHS.require("rbe_loaders.ort (rebuilding the stored graph, rbe export-onnx --on-the-fly)")
import onnx  # noqa: E402
from onnx import helper  # noqa: E402

from ..report import FormReport, TensorForm  # noqa: E402
from . import guard  # noqa: E402
from .graph import Source, graph_initializers, initializer_values, stored_graph  # noqa: E402
from .rewriters import plan_rewrite  # noqa: E402
from .rewriters.base import MS_DOMAIN  # noqa: E402

PROTOBUF_LIMIT = (2 << 30) - 1  # a ModelProto of 2 GB or more cannot be serialized in one piece


def fits_one_proto(model) -> bool:
    """Whether ``model`` serializes in one piece (protobuf refuses even to count one past 2 GB)."""
    from google.protobuf.message import EncodeError

    try:
        return model.ByteSize() < PROTOBUF_LIMIT
    except EncodeError:
        return False


SHARED_FORM = "shared (read by several weights' nodes)"


# -- the report -----------------------------------------------------------------------


@dataclass
class Report(FormReport):
    """Per initializer of the rebuilt graph: its form and the bytes it keeps resident."""

    def decoded_at_build(self) -> list[str]:
        """The weights a codec stores that the session holds dense."""
        return [row.name for row in self.rows if row.form.startswith("dense")]

    def summary(self) -> list[str]:
        width = max([len(row.name) for row in self.rows] + [6])
        return [
            f"{'total'.ljust(width)}  {self.resident_bytes:>12,}  {self.dense_bytes:>12,}  "
            f"{self.ratio:.3f}x of dense; {len(self.decoded_at_build())} decoded at build"
        ]


# -- building the graph ------------------------------------------------------------------


def on_the_fly_model(path: str | os.PathLike) -> tuple[onnx.ModelProto, Report]:
    """The ONNX model an rbe file carries, its weights in compressed forms (see the module doc)."""
    with Reader(path) as r:
        if not carries_onnx(r):
            raise UsageError(
                f"{os.fspath(path)}: holds no ONNX graph: convert an .onnx file, or a Hugging Face "
                "directory with rbe convert --onnx"
            )
        model = stored_graph(r)
        wiring = graph_initializers(r)  # checked: each names a tensor of the right dtype and shape
        mapped = [t for t in model.graph.initializer if t.name in wiring]
        report = Report()
        uses = _readers_of(model.graph)
        replaced, new_inits, added = {}, [], set()
        for t in mapped:
            source = wiring[t.name]
            tensor = source.tensor
            dense_bytes = math.prod(t.dims) * (4 if source.widened else r.entry(tensor).dtype.itemsize)
            if r.stored_entry(tensor).transform is None:
                t.raw_data = _dense_bytes(r, source)
                widened = f", widened from {r.entry(tensor).dtype.name}" if source.widened else ""
                report.add(t.name, f"initializer (lossless{widened})", len(t.raw_data), dense_bytes)
                continue
            if source.widened:  # the kernels would compute in float32 what the reference rounds to bf16 or fp16
                plan = f"a {r.entry(tensor).dtype.name} weight the float32 graph reads widened"
            else:
                plan = plan_rewrite(r, tensor, uses.get(t.name, []), source.transposed, uses)
            if isinstance(plan, str):
                t.raw_data = _dense_bytes(r, source)
                report.add(t.name, f"dense (decoded at build: {plan})", len(t.raw_data), dense_bytes)
                continue
            replaced.update(plan.nodes)
            fresh = [init for init in plan.initializers if init.name not in added]  # shared ones count once
            added.update(init.name for init in fresh)
            new_inits += fresh
            report.add(t.name, plan.form, sum(len(init.raw_data) for init in fresh), dense_bytes)
            for init in plan.shared:  # a row of its own, once: the weights' rows hold their own parts
                if init.name not in added:
                    added.add(init.name)
                    new_inits.append(init)
                    report.add(init.name, SHARED_FORM, len(init.raw_data), 0)
    _apply(model, replaced, new_inits, {row.name for row in report.rows if not _kept(row)})
    # The rewrite adds only com.microsoft kernels and initializers with their data: checked again all the same.
    check_model(model, f"{os.fspath(path)}: the graph rebuilt for ONNX Runtime", error=FormatError)
    return model, report


def _dense_bytes(r: Reader, source: Source) -> bytes:
    """The initializer's raw data: the decoded tensor, transposed and widened where the graph reads it so."""
    if not (source.transposed or source.widened):
        return bytes(r.tensor_bytes(source.tensor))
    return initializer_values(r, source).tobytes()


def _kept(row: TensorForm) -> bool:
    return row.form.startswith(("dense", "initializer"))


def _readers_of(graph) -> dict[str, list[tuple[int, object, int]]]:
    """Per tensor name, the (node position, node, input index) of every node reading it."""
    out: dict[str, list] = {}
    for position, node in enumerate(graph.node):
        for index, name in enumerate(node.input):
            out.setdefault(name, []).append((position, node, index))
    return out


def _apply(model, replaced: dict[int, list], new_inits: list, dropped: set[str]) -> None:
    graph = model.graph
    nodes = []
    for position, node in enumerate(graph.node):
        nodes.extend(replaced.get(position, [node]))
    del graph.node[:]
    graph.node.extend(nodes)
    kept = [t for t in graph.initializer if t.name not in dropped]
    del graph.initializer[:]
    graph.initializer.extend(kept + new_inits)
    inputs = [value for value in graph.input if value.name not in dropped]  # IR < 4 lists initializers as inputs
    del graph.input[:]
    graph.input.extend(inputs)
    if replaced and not any(op.domain == MS_DOMAIN for op in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))


# -- sessions ----------------------------------------------------------------------------


def session(path: str | os.PathLike, *, quiet: bool = True, timeout=None, **session_kwargs):
    """``(onnxruntime.InferenceSession, Report)`` for an rbe file that carries an ONNX graph.

    ``session_kwargs`` go to ``InferenceSession`` (``sess_options``,
    ``providers``; default the CPU provider).  Nothing is printed unless
    ``quiet=False``, which prints the report (``print(report)`` gives the same
    table) to stderr; without ``sess_options`` ONNX Runtime's own log stays
    quiet too.  ``timeout``: seconds (or a ``guard.Deadline``) the build may
    take; a signal or the limit stops waiting for it (``guard.call``).
    ONNX Runtime's errors come as InputError naming the file.  The session looks
    for external data in an empty folder of its own (``guard.session_options``;
    the given ``sess_options`` keep that setting); the stored graph holds none.
    """
    _, onnxruntime = ORT_SESSIONS.require()
    deadline = guard.Deadline.of(timeout)
    model, report = on_the_fly_model(path)
    session_kwargs.setdefault("providers", ["CPUExecutionProvider"])
    if not quiet:
        print(report, file=sys.stderr)
    where = os.fspath(path)
    given = session_kwargs.pop("sess_options", None)
    # ONNX Runtime's own log lines stay off stderr unless the caller's options set a level (its errors
    # come back as exceptions either way).
    with guard.session_options(given, quiet=given is None) as options:
        if fits_one_proto(model):
            data = model.SerializeToString()
            return _build(
                lambda: onnxruntime.InferenceSession(data, options, **session_kwargs), where, deadline
            ), report
        # Past 2 GB ORT reads the weights as external data, from the one folder the guard lets it read.
        folder = options.get_session_config_entry(guard.EXTERNAL_FOLDER_KEY)
        model_path, data_path = os.path.join(folder, "model.onnx"), os.path.join(folder, "model.onnx.data")
        try:
            onnx.save_model(model, model_path, save_as_external_data=True, location="model.onnx.data")
            return _build(
                lambda: onnxruntime.InferenceSession(model_path, options, **session_kwargs), where, deadline
            ), report
        finally:
            for written in (model_path, data_path):
                if os.path.exists(written):
                    os.unlink(written)


def _build(new_session, path: str, deadline):
    return guard.call(new_session, path=path, doing="building a session on the stored graph", deadline=deadline)
