"""An .onnx file, as a tensor source.

An ONNX file is a protobuf ``ModelProto``: the graph (nodes, inputs, outputs,
value_info, opsets, metadata) and the weights as the graph's initializers, held
inline (``raw_data`` or a typed field such as ``float_data``) or in external
files beside the model.  The container keeps them apart:

* every initializer of the main graph whose element type rbe has (``ONNX_DTYPES``)
  becomes an rbe tensor of the same name, encoded by the same pipeline as a
  Hugging Face checkpoint (``converters/pipeline.py``), with roles read from the
  graph (``graph_roles``); a MatMul's weight is stored input x output, so a chain
  that groups along the last axis is stored as ``transpose(values=CHAIN)``, its
  groups along the input axis (``compress.plan.input_axis_grouped``);
* the ModelProto with those initializers' data removed (name, dims and type kept)
  becomes the embedded file ``GRAPH_PATH``, named by the metadata key
  ``GRAPH_KEY`` (spec/rbe-v1.md, "ONNX models");
* the model's tokenizer, when the user names one (``--tokenizer``), becomes the
  embedded file ``tokenizer.json`` (``read_tokenizer_file``), so that ``rbe eval``,
  a re-encoding and a loader find it without being told again.

Decoding back to an .onnx file is ``converters/decode.py``'s.  External data is
read here, never by onnx, and only from paths checked to stay inside the model's
folder.

Calibration-aware rules (``calibration = "gptq"``) run the model with
transformers, which an ONNX file is not: their chains are encoded without
calibration unless a tokenizer lets ONNX Runtime run it
(``converters/compress/calibrate/ort.py``), and the converter says so
(``check_policy``); head pruning is refused (``UsageError``) before anything is written.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np

from rbeformat import InputError, UsageError, Writer, extras
from rbeformat.embedded.onnx import GRAPH_KEY, GRAPH_PATH, ONNX_DTYPES, SOURCE_KEY
from rbeformat.manifest import INTERNAL_PREFIX
from rbeformat.onnx_safety import check_model
from rbeformat.spec import DTYPES, MAX_NDIM, MAX_TENSOR_ELEMENTS

from ..compress.recipe import Policy
from ..compress.roles import LINEAR_ROLES, TensorRole, classify, layer_index
from ..links import allowed_roots, inside
from . import AddTensor, load

extras.ONNX_FILES.require()  # the core works without onnx; only this path needs it
import onnx  # noqa: E402
from google.protobuf.message import DecodeError  # noqa: E402
from onnx import TensorProto  # noqa: E402

# Where each type keeps its values when raw_data is not used (onnx.proto's TensorProto);
# 16- and 8-bit floats keep their bit patterns in int32_data.
_TYPED_FIELDS = {
    TensorProto.FLOAT: "float_data",
    TensorProto.DOUBLE: "double_data",
    TensorProto.INT64: "int64_data",
    TensorProto.UINT64: "uint64_data",
    TensorProto.UINT32: "uint64_data",
}
_BIT_PATTERNS = {TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.FLOAT8E4M3FN, TensorProto.FLOAT8E5M2}
DATA_FIELDS = (
    "raw_data",
    "float_data",
    "int32_data",
    "int64_data",
    "double_data",
    "uint64_data",
    "string_data",
    "external_data",
)


# -- reading an ONNX file ---------------------------------------------------------------


@dataclass
class Initializer:
    """One initializer: its name, dtype and shape, and where its little-endian bytes are."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    inline: bytes | None = None  # the little-endian bytes, when the model holds them
    external: tuple[str, int] | None = None  # (checked real path, offset), when a file beside it does

    @property
    def size(self) -> int:
        return math.prod(self.shape) * DTYPES[self.dtype].itemsize

    def reader(self):
        """(``read_at(offset, size)`` over the initializer's bytes, close)."""
        if self.inline is not None:
            view = memoryview(self.inline)
            return (lambda o, n: view[o : o + n]), (lambda: None)
        path, start = self.external
        fd = os.open(path, os.O_RDONLY)

        def read_at(offset: int, size: int) -> bytes:
            data = os.pread(fd, size, start + offset)
            if len(data) != size:
                raise InputError(
                    f"{path}: expected {size} bytes at {start + offset}, got {len(data)} "
                    f"(tensor {self.name!r}; did the file change?)"
                )
            return data

        return read_at, lambda: os.close(fd)


@dataclass
class OnnxSource:
    """What converting an ONNX file reads: its stripped graph and its initializers, validated."""

    root: str  # the model's folder: external data must stay inside it
    source: str
    graph: bytes  # the ModelProto without the initializers' data
    initializers: list[Initializer]
    roles: dict[str, TensorRole]
    external_files: set[str] = field(default_factory=set)
    path: str = ""  # the input as given
    added_files: dict[str, bytes] = field(default_factory=dict)  # --tokenizer's tokenizer.json
    transformers_model = False
    roles_from_graph = True
    _by_name: dict = field(default_factory=dict, repr=False)

    @property
    def label(self) -> str:
        return self.path or self.source

    @property
    def tensors(self) -> list[Initializer]:
        return self.initializers

    @property
    def tensor_bytes(self) -> int:
        return sum(init.size for init in self.initializers)

    def tensor(self, name: str) -> Initializer:
        if not self._by_name:
            self._by_name.update((init.name, init) for init in self.initializers)
        return self._by_name[name]

    def read(self, name: str) -> np.ndarray:
        init = self.tensor(name)
        read_at, close = init.reader()
        try:
            return load(read_at, init)
        finally:
            close()

    def locate(self, name: str) -> None:
        return None  # inline in the graph or in external data: handed over whole

    def config(self) -> dict | None:
        return None

    def embedded_files(self) -> list[str]:
        return list(self.added_files)  # the graph is the model itself, and not listed

    def check_output(self, destination: str) -> None:
        target = os.path.realpath(destination)
        if any(os.path.realpath(p) == target for p in [os.path.abspath(self.path), *self.external_files]):
            raise UsageError(f"{destination}: is the input (or its external data); choose another output")

    def check_policy(self, policy: Policy, calibrating: bool = False) -> tuple[Policy, str | None]:
        return check_policy(self, policy, calibrating)

    def add_entries(self, w: Writer, add_tensor: AddTensor) -> dict[str, str]:
        """Every initializer, then the stripped graph and any added file; the metadata that names the graph."""
        for init in self.initializers:
            read_at, close = init.reader()
            try:
                add_tensor(init, read_at)
            finally:
                close()
        w.add_file(GRAPH_PATH, self.graph)
        for path, data in self.added_files.items():
            w.add_file(path, data)
        return {GRAPH_KEY: GRAPH_PATH, SOURCE_KEY: self.source}


def plan_conversion(src: str) -> OnnxSource:
    """Parses and checks ``src`` and its external data, before any output exists."""
    model = load_model(src)
    root = os.path.dirname(os.path.abspath(src))
    check_model(model, src, external_types=frozenset(ONNX_DTYPES))  # no other file, operator or opset
    initializers = [read_initializer(t, root, src) for t in model.graph.initializer if t.data_type in ONNX_DTYPES]
    _check_names(initializers, src)
    roles = graph_roles(model.graph, {init.name: init for init in initializers})
    for t in model.graph.initializer:
        if t.data_type in ONNX_DTYPES:
            for name in DATA_FIELDS:
                t.ClearField(name)
            t.ClearField("data_location")
    external = {init.external[0] for init in initializers if init.external}
    return OnnxSource(root, os.path.basename(src), model.SerializeToString(), initializers, roles, external, src)


def load_model(path: str) -> onnx.ModelProto:
    """The ModelProto of an .onnx file, external data untouched; InputError when it is none."""
    if not os.path.isfile(path):
        raise InputError(f"{path}: no such file" if not os.path.exists(path) else f"{path}: not a file")
    if os.path.getsize(path) == 0:
        raise InputError(f"{path}: not an ONNX model (the file is empty)")
    try:
        model = onnx.load_model(path, load_external_data=False)
    except (DecodeError, ValueError, RuntimeError, RecursionError) as exc:
        raise InputError(
            f"{path}: not a valid ONNX model (protobuf: {str(exc)[:100] or type(exc).__name__}; "
            "truncated or another kind of file?)"
        ) from None
    if not model.HasField("graph") or model.ir_version <= 0:
        raise InputError(f"{path}: not an ONNX model (no graph or no IR version)")
    return model


def _check_names(initializers: list[Initializer], src: str) -> None:
    seen = set()
    for init in initializers:
        if not init.name:
            raise InputError(f"{src}: an initializer has no name")
        if init.name.startswith(INTERNAL_PREFIX):
            raise InputError(
                f"{src}: initializer {init.name!r} uses the prefix {INTERNAL_PREFIX!r}, which rbe reserves"
            )
        if init.name in seen:
            raise InputError(f"{src}: two initializers are named {init.name!r}")
        seen.add(init.name)


def read_initializer(t, root: str, src: str) -> Initializer:
    dtype = ONNX_DTYPES[t.data_type]
    shape = _shape(t, src)
    size = math.prod(shape) * DTYPES[dtype].itemsize
    where = f"{src}: initializer {t.name!r}"
    if t.data_location == TensorProto.EXTERNAL:
        return Initializer(t.name, dtype, shape, external=_external(t, root, size, where))
    if t.HasField("raw_data"):
        data = t.raw_data
    else:
        data = _typed_values(t, dtype, math.prod(shape), where)
    if len(data) != size:
        raise InputError(f"{where}: shape {list(shape)} needs {size} bytes of {dtype}, the model holds {len(data)}")
    return Initializer(t.name, dtype, shape, inline=data)


def _shape(t, src: str) -> tuple[int, ...]:
    dims = tuple(int(d) for d in t.dims)
    where = f"{src}: initializer {t.name!r}"
    if len(dims) > MAX_NDIM or any(d < 0 for d in dims):
        raise InputError(f"{where}: invalid shape {list(dims)} (at most {MAX_NDIM} non-negative dimensions)")
    if math.prod(dims) > MAX_TENSOR_ELEMENTS:
        raise InputError(
            f"{where}: shape {list(dims)} has {math.prod(dims)} elements, over the limit of {MAX_TENSOR_ELEMENTS}"
        )
    return dims


def _typed_values(t, dtype: str, count: int, where: str) -> bytes:
    """The little-endian bytes of values kept in a typed field (float_data, int32_data, ...)."""
    values = getattr(t, _TYPED_FIELDS.get(t.data_type, "int32_data"))
    if len(values) != count:
        raise InputError(f"{where}: shape needs {count} values, the model holds {len(values)}")
    storage = np.dtype(DTYPES[dtype].numpy_storage)
    if t.data_type in _BIT_PATTERNS:  # int32_data holds the bits, not the values
        return np.asarray(values, np.int64).astype(f"<u{storage.itemsize}").tobytes()
    wide = np.asarray(values, dtype=storage if storage.kind == "f" else np.int64)
    return wide.astype(storage).tobytes()


def _external(t, root: str, size: int, where: str) -> tuple[str, int]:
    """(real path, offset) of an initializer's external data, after every check."""
    info = {entry.key: entry.value for entry in t.external_data}
    path = _external_path(info.get("location", ""), root, where)
    offset = _non_negative(info.get("offset", "0"), "offset", where)
    available = os.path.getsize(path) - offset
    length = _non_negative(info["length"], "length", where) if "length" in info else available
    if offset + length > os.path.getsize(path):
        raise InputError(
            f"{where}: external data at offset {offset}, length {length} runs past the end of "
            f"{info['location']} ({os.path.getsize(path)} bytes)"
        )
    if length != size:
        raise InputError(f"{where}: shape {list(t.dims)} needs {size} bytes, the external data holds {length}")
    return path, offset


def _external_path(location: str, root: str, where: str) -> str:
    if not location:
        raise InputError(f"{where}: external data without a location")
    if location.startswith(("/", "\\")) or os.path.isabs(location) or re.match(r"^[A-Za-z]:", location):
        raise InputError(
            f"{where}: external data location {location!r:.80} is absolute; it must be relative to the model's folder"
        )
    if ".." in re.split(r"[\\/]", location) or "\x00" in location:
        raise InputError(f"{where}: external data location {location!r:.80} contains '..'")
    real = os.path.realpath(os.path.join(root, location))
    if not inside(real, allowed_roots(root)):  # a HF cache snapshot's links into its blobs are allowed
        raise InputError(
            f"{where}: external data location {location!r:.80} resolves outside the model's folder (to {real:.200})"
        )
    if not os.path.isfile(real):
        raise InputError(f"{where}: external data file {location!r:.80} does not exist or is not a file")
    return real


def _non_negative(text: str, key: str, where: str) -> int:
    if not re.fullmatch(r"[0-9]{1,19}", text.strip()):
        raise InputError(f"{where}: external data {key} {text!r:.40} is not a non-negative whole number")
    return int(text)


# -- roles from the graph ---------------------------------------------------------------


def gives_logits(graph: bytes) -> bool:
    """Whether the (stripped) graph has an output named ``logits``: a causal LM's, as rbe eval tells
    one; any other graph is an encoder's."""
    return any(output.name == "logits" for output in onnx.ModelProto.FromString(graph).graph.output)


_NORMS = {"LayerNormalization", "SimplifiedLayerNormalization", "RMSNormalization"}


def graph_roles(graph, initializers: dict[str, Initializer]) -> dict[str, TensorRole]:
    """Each initializer's role, from the nodes that consume it (names only refine them).

    A MatMul's B input is a Linear weight stored input x output (``input_last``
    False); Gemm's B follows ``transB``.  A 1-D initializer added to a MatMul's
    or Gemm's output is its bias, and the bias's name (``...attention.self.query.bias``)
    names the layer for ``roles.classify`` (attn_q, mlp_up, ...).  Gather's table
    is an embedding: the kind ``classify`` names, else a position table when its
    name says "pos", else a token embedding when a model input indexes it (a
    token-type table when that input's name says "type"), else a position table
    (under 64 rows: a token-type table).
    LayerNormalization's scale and bias are norm weights and biases.  Other
    tensors take their role by name, never a Linear one: no MatMul reads them.
    """
    consumers = defaultdict(list)
    for node in graph.node:
        for index, name in enumerate(node.input):
            consumers[name].append((node, index))
    named = classify({n: (i.dtype, i.shape) for n, i in initializers.items()}, None)
    found: dict[str, tuple[str, bool | None, str]] = {}  # name -> (role, input_last, module name)
    tables = []
    for node in graph.node:
        inputs = list(node.input)
        if node.op_type in ("MatMul", "Gemm") and len(inputs) > 1 and _is_2d(initializers.get(inputs[1])):
            _linear(node, inputs, initializers, consumers, found)
        elif node.op_type == "Gather" and len(inputs) > 1 and _is_2d(initializers.get(inputs[0])):
            tables.append((inputs[0], inputs[1]))
        elif node.op_type in _NORMS:
            for index, role in ((1, "norm_weight"), (2, "norm_bias")):
                if len(inputs) > index and inputs[index] in initializers:
                    found.setdefault(inputs[index], (role, None, inputs[index]))
    graph_inputs = {value.name for value in graph.input} - set(initializers)
    found.update(_embeddings(tables, graph_inputs, initializers, named))
    return _with_layers(initializers, named, found)


def _is_2d(init: Initializer | None) -> bool:
    return init is not None and len(init.shape) == 2


def _linear(node, inputs: list[str], initializers: dict, consumers: dict, found: dict) -> None:
    weight = inputs[1]
    input_last = node.op_type == "Gemm" and any(a.name == "transB" and a.i == 1 for a in node.attribute)
    bias = inputs[2] if node.op_type == "Gemm" and len(inputs) > 2 else _added_bias(node, initializers, consumers)
    if bias in initializers and len(initializers[bias].shape) == 1:
        found[bias] = ("linear_bias", None, bias)
    module = bias[: -len(".bias")] if bias and bias.endswith(".bias") else weight.rsplit(".", 1)[0]
    found.setdefault(weight, ("linear", input_last, module))


def _added_bias(node, initializers: dict, consumers: dict) -> str | None:
    """The 1-D initializer an Add applies to this node's output, if one does."""
    for user, index in consumers.get(node.output[0] if node.output else "", []):
        if user.op_type == "Add" and len(user.input) == 2:
            other = user.input[1 - index]
            if other in initializers and len(initializers[other].shape) == 1:
                return other
    return None


def _embeddings(tables: list[tuple[str, str]], graph_inputs: set[str], initializers: dict, named: dict) -> dict:
    """Roles of Gather tables, given as (table, indices): by name first, then by what indexes them."""
    found = {}
    for name, indices in tables:
        role = named[name].role
        if role not in ("position_embedding", "token_type_embedding", "token_embedding"):
            role = _embedding_by_use(name, indices, graph_inputs, initializers[name].shape[0])
        found.setdefault(name, (role, None, name))
    return found


def _embedding_by_use(name: str, indices: str, graph_inputs: set[str], rows: int) -> str:
    """A table indexed by a model input holds tokens (or token types, when the input says so);
    one indexed by computed positions is a position table, or a token-type table when tiny."""
    if "pos" in name.lower():
        return "position_embedding"
    if indices in graph_inputs:
        return "token_type_embedding" if "type" in indices.lower() else "token_embedding"
    return "position_embedding" if rows >= 64 else "token_type_embedding"


def _with_layers(initializers: dict, named: dict, found: dict) -> dict[str, TensorRole]:
    layers = {}
    for name in initializers:
        module = found[name][2] if name in found else name
        layers[name] = layer_index(module) if layer_index(module) is not None else layer_index(name)
    indices = [i for i in layers.values() if i is not None]
    num_layers = max(indices) + 1 if indices else None
    roles = {}
    for name, init in initializers.items():
        if name in found:
            role, input_last, module = found[name]
            if role == "linear":
                role = _linear_role_by_name(module, init, input_last)
        else:
            role, input_last = named[name].role, None
            if role in LINEAR_ROLES:  # a 2-D tensor no MatMul or Gemm reads is no Linear weight
                role = "other"
        layer = layers[name]
        roles[name] = TensorRole(role, layer, input_last, num_layers if layer is not None else None)
    return roles


def _linear_role_by_name(module: str, init: Initializer, input_last: bool) -> str:
    """attn_q, mlp_down, ... when the module's name is one ``roles.classify`` knows; else linear."""
    out_in = init.shape if input_last else init.shape[::-1]
    role = classify({f"{module}.weight": (init.dtype, tuple(out_in))}, None)[f"{module}.weight"].role
    return role if role in LINEAR_ROLES else "linear"


# -- what the conversion may do ---------------------------------------------------------


TOKENIZER_OPTION = "--tokenizer tokenizer.json (or a folder holding one)"
TOKENIZER_FILE = "tokenizer.json"  # the name a tokenizer is embedded under, as in a Hugging Face directory
MAX_TOKENIZER_BYTES = 1 << 28  # the largest tokenizer.json known is a few tens of MB


def read_tokenizer_file(path: str) -> bytes:
    """The bytes of ``--tokenizer`` (a tokenizer.json, or a folder holding one) to embed: a JSON object
    of at most ``MAX_TOKENIZER_BYTES``; InputError naming the path otherwise.

    The path is the user's; a folder's tokenizer.json may not be a link out of the folder
    (``links.check_link``), as a model directory's files may not.
    """
    import json

    from ..links import check_link

    if not os.path.exists(path):
        raise InputError(
            f"{path}: no such file or folder (--tokenizer takes a tokenizer.json, or a folder holding one)"
        )
    file = os.path.join(path, TOKENIZER_FILE) if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise InputError(
            f"{path}: holds no tokenizer.json (--tokenizer takes a tokenizer.json, or a folder holding one)"
        )
    if file != path:
        check_link(file, path)
    size = os.path.getsize(file)
    if size > MAX_TOKENIZER_BYTES:
        raise InputError(f"{file}: {size} bytes, more than a tokenizer.json holds ({MAX_TOKENIZER_BYTES} at most)")
    try:
        with open(file, "rb") as fh:
            data = fh.read(MAX_TOKENIZER_BYTES + 1)
    except OSError as exc:
        raise InputError(f"{file}: cannot read ({exc.strerror})") from None
    try:
        parsed = json.loads(data)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise InputError(f"{file}: not a tokenizer.json (not valid JSON: {str(exc)[:100]})") from None
    if not isinstance(parsed, dict) or "model" not in parsed:
        raise InputError(f'{file}: not a tokenizer.json (a JSON object with a "model" member)')
    _check_tokenizer_loads(data, file)
    return data


def _check_tokenizer_loads(data: bytes, file: str) -> None:
    """Where the tokenizers library is installed, a tokenizer it cannot load is refused before it is
    embedded: eval and the loaders would only fail on it later."""
    try:
        import tokenizers
    except ImportError:
        return
    try:
        tokenizers.Tokenizer.from_str(data.decode("utf-8"))
    except Exception as exc:  # tokenizers raises its own Exception types for a malformed file
        raise InputError(f"{file}: not a tokenizer.json the tokenizers library loads ({str(exc)[:100]})") from None


def check_policy(plan: OnnxSource, policy: Policy, calibrating: bool = False) -> tuple[Policy, str | None]:
    """The policy an ONNX file is encoded with, and a note for the user.

    With ``calibrating`` (a tokenizer was given: ``converters/compress/calibrate/ort.py``)
    calibrated rules keep their method.  Without, nothing turns the calibration
    text into token ids: rules that ask for it encode without it (round to
    nearest) and the note names the option that calibrates, and
    mixed precision scores its upgrades by the weight error, as it does
    without statistics.  Either way mixed precision measures layers, not the
    model's drift (that runs transformers), and head pruning is refused.
    """
    if policy.prune_heads:
        raise UsageError(
            f"{plan.source}: prune_heads needs calibration, which runs a Hugging Face model; "
            "ONNX input takes recipes without it"
        )
    calibrated = sorted({rule.calibration for rule in policy.rules if rule.calibration})
    rounds = bool(calibrated) and not calibrating
    by_model = policy.budget_sensitivity == "model"
    if not rounds and not by_model:
        return policy, None
    rules = [dataclasses.replace(rule, calibration=None) for rule in policy.rules] if rounds else policy.rules
    plain = dataclasses.replace(policy, rules=rules, budget_sensitivity="layer")
    notes = []
    if rounds:
        methods = " and ".join(repr(c) for c in calibrated)
        notes.append(
            f"calibration = {methods} needs a tokenizer to run the model on text, and none was given or "
            "embedded: those rules round to nearest instead, which costs quality"
            + ("; mixed precision picks its upgrades by weight error alone" if policy.budget_bits else "")
            + f"; to calibrate in ONNX Runtime, pass {TOKENIZER_OPTION}"
        )
    if by_model:
        notes.append(
            "budget_sensitivity = 'model' measures the whole model's drift, which needs a Hugging Face model: "
            "mixed precision scores each layer's own error instead"
        )
    return plain, f"{plan.source}: {'; '.join(notes)}"


def filled_model(plan: OnnxSource) -> onnx.ModelProto:
    """The model with every initializer's data in place (read from the checked plan): what ONNX
    Runtime runs for calibration.  It holds all the weights in memory at once."""
    model = onnx.ModelProto.FromString(plan.graph)
    by_name = {init.name: init for init in plan.initializers}
    for t in model.graph.initializer:
        if t.name in by_name:
            t.raw_data = np.ascontiguousarray(plan.read(t.name)).tobytes()
    return model
