"""The ONNX graph a container carries: where it is stored and the element types its initializers may have.

A container converted from an .onnx file (or exported with ``--onnx``) holds
the ModelProto, its initializers' data removed, as the embedded file
``GRAPH_PATH``, named by the metadata key ``GRAPH_KEY`` (spec/rbe-v1.md, "ONNX
models").  One exported with ``--onnx`` also holds the embedded JSON file named
by ``MAPPING_KEY``, which maps each initializer to a stored tensor, or to a
tensor of the graph alone under ``OWN_PREFIX`` (read by
``rbe_loaders.ort.graph``).  onnx is imported only by ``read_graph`` (through
``rbeformat.onnx_safety.parse_model``); element types are onnx.proto's
``TensorProto.DataType`` numbers.
"""

from __future__ import annotations

import hashlib

from ..errors import ChecksumError, FormatError
from ..onnx_safety import parse_model

GRAPH_KEY = "onnx.graph"  # metadata: the path of the embedded file holding the graph
SOURCE_KEY = "onnx.source"  # metadata: the input's file name, for people reading `rbe info`
GRAPH_PATH = "model.onnx-graph"
MAPPING_KEY = "onnx.initializers"  # metadata: the embedded JSON mapping initializers to tensors
MAPPING_PATH = "model.onnx-initializers.json"  # where rbe convert --onnx stores that mapping
OWN_PREFIX = "onnx/"  # tensors of the graph alone (constants no HF tensor equals)

# onnx.proto's TensorProto.DataType numbers of the element types rbe has, with rbe's dtype names.
FLOAT, UINT8, INT8, UINT16, INT16, INT32, INT64, BOOL, FLOAT16, DOUBLE, UINT32, UINT64, BFLOAT16 = (
    1,
    2,
    3,
    4,
    5,
    6,
    7,
    9,
    10,
    11,
    12,
    13,
    16,
)
FLOAT8E4M3FN, FLOAT8E5M2 = 17, 19
ONNX_DTYPES = {
    FLOAT: "F32",
    DOUBLE: "F64",
    FLOAT16: "F16",
    BFLOAT16: "BF16",
    FLOAT8E4M3FN: "F8_E4M3",
    FLOAT8E5M2: "F8_E5M2",
    INT64: "I64",
    INT32: "I32",
    INT16: "I16",
    INT8: "I8",
    UINT64: "U64",
    UINT32: "U32",
    UINT16: "U16",
    UINT8: "U8",
    BOOL: "BOOL",
}


def carries_onnx(r) -> bool:
    return GRAPH_KEY in r.metadata()


def read_graph(r, verify: bool = True) -> onnx.ModelProto:  # noqa: F821  (onnx is imported when called)
    """The stored ModelProto (initializers without data); FormatError when the container has none."""
    path = r.metadata().get(GRAPH_KEY)
    if path is None:
        raise FormatError(
            "holds no ONNX model (it was not converted from an .onnx file); decode it to a "
            "directory or a .safetensors file instead"
        )
    entry = r.files().get(path)
    if entry is None:
        raise FormatError(f"metadata {GRAPH_KEY!r} names {path!r:.80}, which the container does not hold")
    return parse_model(_file_bytes(r, path, entry, verify), f"{r.path}: the stored ONNX graph {path!r:.80}")


def _file_bytes(r, path: str, entry, verify: bool) -> bytes:
    """An embedded file whole, in memory (``Reader.read_file``: capped and budgeted), its digest checked."""
    data = r.read_file(path)
    if verify and "sha256:" + hashlib.sha256(data).hexdigest() != entry.blob.digest:
        raise ChecksumError(f"file {path!r}: decoded bytes do not match the recorded digest")
    return data
