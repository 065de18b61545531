"""The ONNX graph a container carries, and which rbe tensor fills each of its initializers.

Two kinds of container carry a graph (spec/rbe-v1.md, "ONNX models" and "ONNX
graphs exported from Hugging Face checkpoints"):

* one converted from an .onnx file: each initializer is the rbe tensor of the
  same name (the identity mapping);
* one converted from a Hugging Face directory with ``rbe convert --onnx``: the
  embedded JSON file named by ``MAPPING_KEY`` maps each initializer to a stored
  HF tensor, as is or transposed (a Linear weight, kept output x input by HF,
  is a MatMul's input x output B), and widened to float32 where the graph is
  float32 and the checkpoint bf16 or fp16, or to a tensor of its own under
  ``OWN_PREFIX`` (both keys in ``rbeformat.embedded.onnx``).

``graph_initializers`` checks the mapping against the graph and the tensors
before anyone reads data through it; ``stored_graph`` parses the graph, whose
initializers hold no data.  Only onnx and rbeformat are needed: no torch.

    >>> with Reader("model.rbe") as r:
    ...     model = stored_graph(r)
    ...     for init, source in graph_initializers(r).items():
    ...         values = initializer_values(r, source)
"""

from __future__ import annotations

import hashlib
import json
from typing import NamedTuple

import numpy as np

from rbeformat import ChecksumError, FormatError, Reader
from rbeformat.embedded.onnx import GRAPH_KEY, MAPPING_KEY, ONNX_DTYPES  # the format's keys and element types
from rbeformat.extras import ONNX_GRAPHS
from rbeformat.onnx_safety import parse_model
from rbeformat.values import to_float32

ONNX_GRAPHS.require()  # one error naming the extra; a loader of its own: only ONNX graphs need onnx
import onnx  # noqa: E402  (parse_model parses with it)

MAX_MAPPING_BYTES = 64 << 20  # a mapping names each initializer once; far below this for any model
WIDENS = {"BF16", "F16"}  # the dtypes a "widened" float32 initializer may read: float32 holds them exactly


class Source(NamedTuple):
    """Where an initializer's values come from: a tensor, read transposed and widened to float32 or not."""

    tensor: str
    transposed: bool = False
    widened: bool = False


def initializer_values(reader: Reader, source: Source) -> np.ndarray:
    """The initializer's values, C-contiguous: the tensor's decoded values, widened to float32 and
    transposed where ``source`` says (bf16 without widening comes as its bits, as ``raw_data`` holds it)."""
    values = reader.get_tensor(source.tensor)
    if source.widened:
        values = to_float32(values, reader.entry(source.tensor).dtype.name)
    return np.ascontiguousarray(values.T if source.transposed else values)


def stored_graph(reader: Reader) -> onnx.ModelProto:
    """The stored ModelProto, its initializers without data; FormatError when there is none or it is invalid."""
    path = reader.metadata().get(GRAPH_KEY)
    if path is None:
        raise FormatError("holds no ONNX graph (convert an .onnx file, or a Hugging Face directory with --onnx)")
    # Checked: no file reference, no operator or operator set rbe does not run (rbeformat.onnx_safety).
    return parse_model(_embedded_file(reader, path, GRAPH_KEY), f"{reader.path}: the stored ONNX graph {path!r:.80}")


def graph_initializers(reader: Reader) -> dict[str, Source]:
    """{initializer name: its Source} for every initializer of an rbe dtype, checked: each names a
    tensor of the container whose dtype is the initializer's (or, widened, a BF16 or F16 tensor for a
    float32 one) and whose shape is its ``dims`` (reversed, for a transposed 2-D tensor); no
    initializer is defined twice."""
    model = stored_graph(reader)
    initializers = _unique_initializers(model.graph)
    if MAPPING_KEY in reader.metadata():
        mapping = _read_mapping(reader)
        _check_same_names(mapping, initializers)
    else:  # converted from an .onnx file: each initializer is the tensor of its name
        mapping = {name: Source(name) for name in initializers}
    tensors = set(reader.keys())
    for name, source in mapping.items():
        _check_tensor(reader, tensors, initializers[name], source)
    return mapping


def _embedded_file(reader: Reader, path: str, key: str) -> bytes:
    entry = reader.files().get(path)
    if entry is None:
        raise FormatError(f"metadata {key!r} names {path!r:.80}, which the container does not hold")
    data = reader.read_file(path)
    if "sha256:" + hashlib.sha256(data).hexdigest() != entry.blob.digest:
        raise ChecksumError(f"file {path!r:.80}: decoded bytes do not match the recorded digest")
    return data


def _unique_initializers(graph) -> dict[str, onnx.TensorProto]:
    """The main graph's initializers of an rbe dtype by name; FormatError for a name used twice."""
    found = {}
    for t in graph.initializer:
        if t.name in found:
            raise FormatError(f"the stored ONNX graph defines initializer {t.name!r:.80} twice")
        if t.data_type in ONNX_DTYPES:
            found[t.name] = t
    return found


def _read_mapping(reader: Reader) -> dict[str, Source]:
    """The JSON mapping, parsed and checked for form: an object of {"tensor": str, "transposed": bool},
    each with "widened": true or without it."""
    path = reader.metadata()[MAPPING_KEY]
    entry = reader.files().get(path)
    if entry is not None and entry.blob.items > MAX_MAPPING_BYTES:
        raise FormatError(
            f"the initializer mapping {path!r:.80} holds {entry.blob.items} bytes, over the limit of "
            f"{MAX_MAPPING_BYTES}"
        )
    data = _embedded_file(reader, path, MAPPING_KEY)
    try:
        obj = json.loads(data, object_pairs_hook=_refuse_duplicate_keys)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise FormatError(f"the initializer mapping {path!r:.80} is not valid JSON ({str(exc)[:100]})") from None
    if not isinstance(obj, dict):
        raise FormatError(f"the initializer mapping {path!r:.80} is not a JSON object")
    return {name: _mapping_entry(name, value) for name, value in obj.items()}


def _refuse_duplicate_keys(pairs: list) -> dict:
    obj = {}
    for key, value in pairs:
        if key in obj:
            raise ValueError(f"key {key!r:.80} appears twice")
        obj[key] = value
    return obj


def _mapping_entry(name: str, value) -> Source:
    if (
        not isinstance(value, dict)
        or set(value) not in ({"tensor", "transposed"}, {"tensor", "transposed", "widened"})
        or not isinstance(value["tensor"], str)
        or not isinstance(value["transposed"], bool)
        or value.get("widened", True) is not True  # written only when true
    ):
        raise FormatError(
            f"the initializer mapping's entry for {name!r:.80} is not "
            '{"tensor": "<name>", "transposed": true|false} with "widened": true or without it'
        )
    return Source(value["tensor"], value["transposed"], "widened" in value)


def _check_same_names(mapping: dict, initializers: dict) -> None:
    unmapped = [name for name in initializers if name not in mapping]
    if unmapped:
        raise FormatError(f"the initializer mapping leaves the graph's initializer {unmapped[0]!r:.80} unmapped")
    unknown = [name for name in mapping if name not in initializers]
    if unknown:
        raise FormatError(f"the initializer mapping names {unknown[0]!r:.80}, which is no initializer of the graph")


def _check_tensor(reader: Reader, tensors: set[str], init, source: Source) -> None:
    """The tensor exists (no internal ``rbe:`` one), has the initializer's dtype (a widened one: BF16
    or F16 for an F32 initializer), and its shape after the transpose is the initializer's dims."""
    tensor, transposed = source.tensor, source.transposed
    if tensor not in tensors:
        raise FormatError(
            f"the ONNX graph's initializer {init.name!r:.80} maps to tensor {tensor!r:.80}, "
            "which the container does not hold"
        )
    entry = reader.entry(tensor)
    dims = tuple(int(d) for d in init.dims)
    shape = tuple(entry.shape)
    if transposed and len(shape) != 2:
        raise FormatError(
            f"tensor {tensor!r:.80} is {len(shape)}-D; only a matrix can be transposed for "
            f"initializer {init.name!r:.80}"
        )
    wanted = ONNX_DTYPES[init.data_type]
    fits = entry.dtype.name in WIDENS and wanted == "F32" if source.widened else entry.dtype.name == wanted
    if not fits or (shape[::-1] if transposed else shape) != dims:
        form = f"transposed {list(shape[::-1])}" if transposed else f"{list(shape)}"
        how = "widened to F32 " if source.widened else ""
        raise FormatError(
            f"tensor {tensor!r:.80} ({entry.dtype.name} {form}) {how}does not fit the ONNX graph's "
            f"initializer {init.name!r:.80} ({wanted} {list(dims)})"
        )
