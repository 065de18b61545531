"""What an ONNX graph may hold before rbe stores, writes or runs it (spec/rbe-v1.md, section 10).

A ModelProto can name files: any tensor may keep its data "externally"
(``data_location = EXTERNAL``, or ``external_data`` entries naming a location),
and ONNX Runtime reads such files when it builds a session.  Tensors hide in
many places, all walked here: a graph's initializers and sparse initializers;
node attributes ``t``, ``tensors``, ``sparse_tensor``, ``sparse_tensors``;
subgraphs (attributes ``g`` and ``graphs``: If, Loop and Scan bodies) at any
depth; the bodies and default attributes of the model-local functions
(``model.functions``); and the graphs of ``training_info``.

``check_model`` refuses, in one line naming the file, the tensor or node and
where it sits:

* any tensor with external data (a ``data_location`` other than ``DEFAULT``, or
  any ``external_data`` entry), except the main graph's initializers of the
  element types an .onnx input may keep beside the model (``external_types``:
  ``rbe convert`` reads those itself, from checked paths, and stores their data
  in the container; a stored graph never has any);
* any operator outside the domains rbe writes or accepts (``OPSET_RANGES``:
  the standard ``ai.onnx`` operators, ``ai.onnx.ml``, and ``com.microsoft`` for
  the contrib kernels such as MatMulNBits and GatherBlockQuantized), except a
  call to one of the model's own functions, whose body passes the same check;
  ``com.microsoft.EPContext``, which names a file of compiled code, is refused;
* an operator set imported at a version outside ``OPSET_RANGES``.

Only the standard library is imported here: callers hand in a parsed
``onnx.ModelProto`` (``parse_model`` imports onnx when it is called).
"""

from __future__ import annotations

from collections import deque

from .errors import FormatError, InputError

# The operator sets a graph may import, with the versions accepted.  ai.onnx 7 is the oldest opset
# ONNX Runtime runs; 28 the newest that onnx 1.23 defines and onnxruntime 1.32 implements (1.24.3, the
# oldest release rbe accepts, implements 25 and refuses newer graphs itself, in one line).  ai.onnx.ml 5
# and com.microsoft 1 are the newest of both.
AI_ONNX = (7, 28)
OPSET_RANGES = {"": AI_ONNX, "ai.onnx": AI_ONNX, "ai.onnx.ml": (1, 5), "com.microsoft": (1, 1)}
REFUSED_OPERATORS = {("com.microsoft", "EPContext")}  # its attributes name a file of compiled code
DEFAULT_LOCATION = 0  # onnx.TensorProto.DEFAULT: the data is in the tensor (EXTERNAL is 1)


def parse_model(data: bytes, where: str, error: type = FormatError):
    """The ModelProto in ``data``, checked (``check_model``); ``error`` when it is none."""
    import onnx
    from google.protobuf.message import DecodeError

    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except (DecodeError, ValueError, RuntimeError, RecursionError):
        raise error(f"{where} is not a valid ModelProto") from None
    check_model(model, where, error=error)
    return model


def check_model(model, where: str, *, error: type = InputError, external_types=frozenset()) -> None:
    """Refuses (``error``, one line starting with ``where``) a model that names a file, runs an operator
    rbe does not, or imports an operator set outside ``OPSET_RANGES``.

    ``external_types``: element types (``TensorProto.DataType`` values) whose main-graph initializers
    may keep their data externally: an .onnx input's weights, which ``rbe convert`` reads itself.
    """
    functions = {(f.domain, f.name) for f in model.functions}
    local_domains = {domain for domain, _ in functions}
    _check_opsets(model.opset_import, local_domains, where, "the model", error)
    for f in model.functions:
        _check_opsets(f.opset_import, local_domains, where, f"function {_qualified(f.domain, f.name)}", error)
    for t, place in _tensors(model, external_types):
        _refuse_external(t, place, where, error, bool(external_types))
    for node, place in _nodes(model):
        _check_operator(node, place, functions, where, error)


def _qualified(domain: str, name: str) -> str:
    return f"{domain}.{name}" if domain else name


def _check_opsets(imports, local_domains: set[str], where: str, owner: str, error: type) -> None:
    for opset in imports:
        domain = opset.domain
        if domain in OPSET_RANGES:
            low, high = OPSET_RANGES[domain]
            if not low <= opset.version <= high:
                raise error(
                    f"{where}: {owner} imports operator set {domain or 'ai.onnx'!r} version "
                    f"{opset.version}; rbe accepts versions {low} to {high}"
                )
        elif domain not in local_domains:
            raise error(
                f"{where}: {owner} imports operator set {domain!r:.80}, which rbe does not run "
                f"(it accepts {_accepted()} and the model's own functions)"
            )


def _accepted() -> str:
    return ", ".join(repr(d) for d in OPSET_RANGES if d)


def _check_operator(node, place: str, functions: set, where: str, error: type) -> None:
    key = (node.domain, node.op_type)
    if key in REFUSED_OPERATORS:
        raise error(f"{where}: {place} is {_qualified(*key)}, which names a file of compiled code; rbe refuses it")
    if node.domain not in OPSET_RANGES and key not in functions:
        raise error(
            f"{where}: {place} runs operator {node.op_type!r:.80} of domain {node.domain!r:.80}, which "
            f"rbe does not run (it accepts {_accepted()}, the standard domain and the model's own "
            "functions)"
        )


def _refuse_external(t, place: str, where: str, error: type, input_file: bool) -> None:
    if t.data_location == DEFAULT_LOCATION and not len(t.external_data):
        return
    location = next((entry.value for entry in t.external_data if entry.key == "location"), "")
    rule = (
        "rbe reads external data only for the main graph's initializers of the types it stores"
        if input_file
        else "a graph rbe stores, writes or runs must hold no file reference"
    )
    raise error(f"{where}: tensor {t.name!r:.80} ({place}) points at external data (location {location!r:.80}); {rule}")


# -- walking every tensor and node ------------------------------------------------------


def _graphs(model):
    """(graph, where it sits) for the main graph, the training graphs and every subgraph below them,
    and (None, function) for each function body, whose nodes ``_graph_parts`` walks the same way."""
    queue = deque([(model.graph, "the main graph", True)])
    for i, info in enumerate(model.training_info):
        for field in ("initialization", "algorithm"):
            if info.HasField(field):
                queue.append((getattr(info, field), f"training_info[{i}].{field}", False))
    while queue:
        graph, place, main = queue.popleft()
        yield graph, place, main
        for node_place, attr in _node_attributes(graph.node, place):
            queue.extend((sub, f"{node_place}, attribute {attr.name!r:.40}", False) for sub in _subgraphs(attr))
    for f in model.functions:
        owner = f"function {_qualified(f.domain, f.name)}"
        yield f, owner, False
        for attr in f.attribute_proto:  # default values of the function's attributes
            for sub in _subgraphs(attr):
                yield from _graphs_below(sub, f"{owner}, default of attribute {attr.name!r:.40}")
        for node_place, attr in _node_attributes(f.node, owner):
            for sub in _subgraphs(attr):
                yield from _graphs_below(sub, f"{node_place}, attribute {attr.name!r:.40}")


def _graphs_below(graph, place: str):
    queue = deque([(graph, place)])
    while queue:
        graph, place = queue.popleft()
        yield graph, place, False
        for node_place, attr in _node_attributes(graph.node, place):
            queue.extend((sub, f"{node_place}, attribute {attr.name!r:.40}") for sub in _subgraphs(attr))


def _node_attributes(nodes, place: str):
    for index, node in enumerate(nodes):
        node_place = f"{place}, node {node.name or index!r:.80} ({node.op_type:.40})"
        for attr in node.attribute:
            yield node_place, attr


def _subgraphs(attr) -> list:
    return ([attr.g] if attr.HasField("g") else []) + list(attr.graphs)


def _attribute_tensors(attr):
    if attr.HasField("t"):
        yield attr.t
    yield from attr.tensors
    sparse = ([attr.sparse_tensor] if attr.HasField("sparse_tensor") else []) + list(attr.sparse_tensors)
    for s in sparse:
        yield s.values
        yield s.indices


def _tensors(model, external_types):
    """(tensor, where it sits) for every tensor the model holds, but the main graph's initializers whose
    data may be external (``external_types``)."""
    for graph, place, main in _graphs(model):
        if hasattr(graph, "initializer"):  # a graph; a function has only nodes and attributes
            for t in graph.initializer:
                if not (main and t.data_type in external_types):
                    yield t, f"an initializer of {place}"
            for s in graph.sparse_initializer:
                yield s.values, f"a sparse initializer of {place}"
                yield s.indices, f"a sparse initializer's indices in {place}"
        else:
            for attr in graph.attribute_proto:
                for t in _attribute_tensors(attr):
                    yield t, f"{place}, default of attribute {attr.name!r:.40}"
        for node_place, attr in _node_attributes(graph.node, place):
            for t in _attribute_tensors(attr):
                yield t, f"{node_place}, attribute {attr.name!r:.40}"


def _nodes(model):
    for graph, place, _ in _graphs(model):
        for index, node in enumerate(graph.node):
            yield node, f"{place}, node {node.name or index!r:.80} ({node.op_type:.40})"
