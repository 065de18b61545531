"""Hostile ONNX graphs: file references hidden anywhere a tensor can sit, operators and opsets rbe does not
run, and graphs that never end or ask for terabytes.  Every command that reads a graph refuses them in one
line (exit 3) and prints no byte of the files they name; rbe run stops on a signal or its time limit."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
tokenizers = pytest.importorskip("tokenizers")
from onnx import TensorProto, helper  # noqa: E402

from rbe_converters.cli import main  # noqa: E402
from rbe_loaders.ort import guard as ort_guard  # noqa: E402
from rbe_loaders.ort import run  # noqa: E402
from rbeformat import FormatError, InputError, Reader, Writer  # noqa: E402
from rbeformat.embedded.onnx import GRAPH_KEY, GRAPH_PATH, MAPPING_KEY  # noqa: E402
from rbeformat.onnx_safety import check_model  # noqa: E402

RBE = [sys.executable, "-m", "rbe_converters.cli"]
SECRET = b"TOPSECRET-rbe-42"  # 16 bytes: what a hostile graph would print as its embedding
SECRET_FILE = "secret.txt"
WIDTH = len(SECRET)
OPSET = 17
WORDS = ["[UNK]", "[PAD]", "hello", "world"]


# -- crafting graphs ----------------------------------------------------------------------


def external(name: str, location: str = SECRET_FILE, n: int = WIDTH, dtype=TensorProto.UINT8) -> TensorProto:
    """A tensor whose data is the first ``n`` bytes of the file at ``location``."""
    t = TensorProto(name=name, data_type=dtype, dims=[n], data_location=TensorProto.EXTERNAL)
    for key, value in (("location", location), ("offset", "0"), ("length", str(n))):
        entry = t.external_data.add()
        entry.key, entry.value = key, value
    return t


def _sparse(values: TensorProto) -> onnx.SparseTensorProto:
    indices = helper.make_tensor("indices", TensorProto.INT64, [WIDTH], list(range(WIDTH)))
    return helper.make_sparse_tensor(values, indices, [WIDTH])


def _value(name: str, elem=TensorProto.UINT8, shape=(WIDTH,)):
    return helper.make_tensor_value_info(name, elem, list(shape) if shape is not None else None)


def _payload(kind: str) -> tuple[list, dict]:
    """Nodes computing "payload" (uint8 [16]), and extras for the model (functions, opsets, sparse
    initializers, training_info), for each place a file reference can hide."""
    const = lambda t: helper.make_node("Constant", [], ["payload"], name="leak", value=t)  # noqa: E731
    if kind == "attribute t":
        return [const(external("c"))], {}
    if kind == "attribute sparse_tensor":
        return [helper.make_node("Constant", [], ["payload"], name="leak", sparse_value=_sparse(external("c")))], {}
    if kind == "attribute sparse_tensors":
        node = const(helper.make_tensor("c", TensorProto.UINT8, [WIDTH], list(range(WIDTH))))
        node.attribute.append(helper.make_attribute("extra", [_sparse(external("c"))]))
        return [node], {}
    if kind == "attribute tensors":
        node = const(helper.make_tensor("c", TensorProto.UINT8, [WIDTH], list(range(WIDTH))))
        node.attribute.append(helper.make_attribute("extra", [external("c")]))
        return [node], {}
    if kind == "function body":
        body = [helper.make_node("Constant", [], ["y"], value=external("c"))]
        f = helper.make_function("local", "Leak", [], ["y"], body, [helper.make_opsetid("", OPSET)])
        return [helper.make_node("Leak", [], ["payload"], domain="local")], {"functions": [f], "opsets": [("local", 1)]}
    if kind == "function attribute default":
        body = [helper.make_node("Identity", ["x"], ["y"])]
        default = helper.make_attribute("value", external("c"))
        f = helper.make_function(
            "local", "Same", ["x"], ["y"], body, [helper.make_opsetid("", OPSET)], attribute_protos=[default]
        )
        plain = helper.make_tensor("c", TensorProto.UINT8, [WIDTH], list(range(WIDTH)))
        return [const(plain), helper.make_node("Same", ["payload"], ["unused"], domain="local")], {
            "functions": [f],
            "opsets": [("local", 1)],
        }
    if kind in ("If branch", "Loop body"):
        inner = helper.make_graph(
            [helper.make_node("Constant", [], ["inner"], value=external("c"))], "branch", [], [_value("inner")]
        )
        yes = helper.make_node("Constant", [], ["yes"], value=helper.make_tensor("t", TensorProto.BOOL, [], [True]))
        if kind == "If branch":
            return [yes, helper.make_node("If", ["yes"], ["payload"], then_branch=inner, else_branch=inner)], {}
        body = helper.make_graph(
            [
                helper.make_node("Identity", ["cond"], ["cond_out"]),
                helper.make_node("Constant", [], ["v_out"], value=external("c")),
            ],
            "body",
            [_value("i", TensorProto.INT64, ()), _value("cond", TensorProto.BOOL, ()), _value("v")],
            [_value("cond_out", TensorProto.BOOL, ()), _value("v_out")],
        )
        one = helper.make_node("Constant", [], ["one"], value=helper.make_tensor("n", TensorProto.INT64, [], [1]))
        start = helper.make_node(
            "Constant", [], ["start"], value=helper.make_tensor("z", TensorProto.UINT8, [WIDTH], [0] * WIDTH)
        )
        return [yes, one, start, helper.make_node("Loop", ["one", "yes", "start"], ["payload"], body=body)], {}
    if kind == "sparse initializer":
        return [helper.make_node("Identity", ["table"], ["payload"])], {"sparse": [_sparse(external("table"))]}
    if kind == "initializer":
        return [helper.make_node("Identity", ["w"], ["payload"])], {"initializers": [external("w")]}
    if kind == "training graph":
        info = onnx.TrainingInfoProto()
        info.initialization.CopyFrom(helper.make_graph([], "init", [], [], [external("w")]))
        return [const(helper.make_tensor("c", TensorProto.UINT8, [WIDTH], list(range(WIDTH))))], {"training": info}
    raise AssertionError(kind)


def encoder(payload_nodes: list, extras: dict | None = None, opsets=None) -> onnx.ModelProto:
    """An encoder's interface (input_ids, attention_mask -> last_hidden_state [batch, tokens, 16]) whose
    every row is ``payload`` (uint8 [16]) as floats: the embedding rbe run prints is the payload."""
    extras = extras or {}
    nodes = payload_nodes + [
        helper.make_node("Cast", ["payload"], ["payload_f"], to=TensorProto.FLOAT),
        helper.make_node("Constant", [], ["axes"], value=helper.make_tensor("a", TensorProto.INT64, [1], [2])),
        helper.make_node("Unsqueeze", ["input_ids", "axes"], ["ids3"]),
        helper.make_node("Cast", ["ids3"], ["ids_f"], to=TensorProto.FLOAT),
        helper.make_node("Constant", [], ["zero"], value=helper.make_tensor("z0", TensorProto.FLOAT, [], [0.0])),
        helper.make_node("Mul", ["ids_f", "zero"], ["zeros"]),
        helper.make_node("Add", ["zeros", "payload_f"], ["last_hidden_state"]),
    ]
    graph = helper.make_graph(
        nodes,
        "encoder",
        [_value("input_ids", TensorProto.INT64, ("b", "s")), _value("attention_mask", TensorProto.INT64, ("b", "s"))],
        [_value("last_hidden_state", TensorProto.FLOAT, ("b", "s", WIDTH))],
        extras.get("initializers", []),
        sparse_initializer=extras.get("sparse", []),
    )
    imports = [helper.make_opsetid(d, v) for d, v in (opsets or [("", OPSET)]) + extras.get("opsets", [])]
    model = helper.make_model(graph, opset_imports=imports, functions=extras.get("functions", []))
    model.ir_version = 8  # every onnxruntime rbe accepts reads it
    if "training" in extras:
        model.training_info.append(extras["training"])
    return model


def plain_payload() -> list:
    return [
        helper.make_node(
            "Constant", [], ["payload"], value=helper.make_tensor("c", TensorProto.UINT8, [WIDTH], list(range(WIDTH)))
        )
    ]


def tokenizer_json() -> str:
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return tok.to_str()


def container(path, model: onnx.ModelProto, *, exported: bool = False) -> str:
    """An rbe file carrying ``model`` as its stored graph (written as is: no converter checks it), with the
    config and tokenizer rbe run needs; ``exported``: shaped as rbe convert --onnx writes it (a mapping)."""
    with Writer(str(path)) as w:
        w.add_array("unused", np.zeros(4, np.float32))
        w.add_file(GRAPH_PATH, model.SerializeToString())
        w.add_file("config.json", json.dumps({"architectures": ["BertModel"], "max_position_embeddings": 64}).encode())
        w.add_file("tokenizer.json", tokenizer_json().encode())
        metadata = {GRAPH_KEY: GRAPH_PATH}
        if exported:
            w.add_file("model.onnx-initializers.json", b"{}")
            metadata[MAPPING_KEY] = "model.onnx-initializers.json"
        w.set_metadata(metadata)
    return str(path)


@pytest.fixture
def secret_cwd(tmp_path, monkeypatch):
    """A working directory holding the secret, as the folder of an .onnx input and of the containers."""
    (tmp_path / SECRET_FILE).write_bytes(SECRET)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def cli(argv: list[str], capsys) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def assert_refused_in_one_line(code: int, out: str, err: str, *words: str) -> None:
    assert code == 3, (code, out, err)
    assert "Traceback" not in err and err.count("\n") == 1 and err.startswith("rbe: error: "), err
    for word in words:
        assert word in err, err
    assert_no_secret(out + err)


def assert_no_secret(text: str) -> None:
    assert SECRET.decode() not in text
    floats = [float(b) for b in SECRET]
    assert json.dumps(floats)[1:-1] not in text and " ".join(f"{v:.6f}" for v in floats[:8]) not in text


# -- file references, wherever they hide ---------------------------------------------------

KINDS = [
    "attribute t",
    "attribute tensors",
    "attribute sparse_tensor",
    "attribute sparse_tensors",
    "function body",
    "function attribute default",
    "If branch",
    "Loop body",
    "sparse initializer",
    "training graph",
]
LEAKING = ["attribute t", "function body", "If branch", "Loop body"]  # what onnxruntime reads as it is handed them


@pytest.mark.parametrize("kind", LEAKING)
def test_the_crafted_graphs_do_read_the_file_when_onnx_runtime_is_handed_them(secret_cwd, kind):
    """Without rbe's checks, a session built from the bytes reads the file in the working directory."""
    model = encoder(*_payload(kind))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    (hidden,) = session.run(
        ["last_hidden_state"], {"input_ids": np.ones((1, 2), np.int64), "attention_mask": np.ones((1, 2), np.int64)}
    )
    assert bytes(hidden[0, 0].astype(np.uint8)) == SECRET


@pytest.mark.parametrize("kind", KINDS + ["initializer"])
def test_a_stored_graph_with_a_file_reference_is_refused_by_every_command(secret_cwd, capsys, kind):
    path = container(secret_cwd / "x.rbe", encoder(*_payload(kind)))
    for argv in (
        ["decode", path, "y.onnx", "--quiet"],
        ["export-onnx", path, "y.onnx", "--quiet"],
        ["export-onnx", path, "y.onnx", "--on-the-fly"],
        ["run", path, "hello world", "--json"],
        ["run", path, "hello world"],
        ["verify", path, "--deep"],
    ):
        assert_refused_in_one_line(*cli(argv, capsys), path, "external data", "secret.txt")
        assert not os.path.exists("y.onnx")
    with pytest.raises(FormatError, match="external data"):
        run.embed(path, ["hello"])


@pytest.mark.parametrize("kind", ["function body", "attribute sparse_tensor", "If branch"])
def test_a_graph_exported_from_a_checkpoint_is_checked_as_well(secret_cwd, capsys, kind):
    path = container(secret_cwd / "x.rbe", encoder(*_payload(kind)), exported=True)
    for argv in (["decode", path, "y.onnx", "--quiet"], ["run", path, "hello", "--json"], ["verify", path, "--deep"]):
        assert_refused_in_one_line(*cli(argv, capsys), "external data")


@pytest.mark.parametrize("kind", KINDS)
def test_converting_an_onnx_file_with_a_file_reference_outside_its_initializers_is_refused(secret_cwd, capsys, kind):
    onnx.save_model(encoder(*_payload(kind)), "m.onnx")
    assert_refused_in_one_line(*cli(["convert", "m.onnx", "m.rbe", "--quiet"], capsys), "m.onnx", "external data")
    assert not os.path.exists("m.rbe")


def test_the_messages_say_where_the_tensor_sits(secret_cwd):
    with pytest.raises(
        InputError, match=r"tensor 'c' \(function local\.Leak, node 0 \(Constant\), attribute 'value'\)"
    ):
        check_model(encoder(*_payload("function body")), "m.onnx")
    with pytest.raises(InputError, match=r"node 'leak' \(Constant\), attribute 'sparse_value'"):
        check_model(encoder(*_payload("attribute sparse_tensor")), "m.onnx")
    with pytest.raises(InputError, match=r"node 1 \(If\), attribute '(then|else)_branch', node 0 \(Constant\)"):
        check_model(encoder(*_payload("If branch")), "m.onnx")


def test_an_external_location_and_any_external_data_entry_count_as_external():
    for location, entries in ((TensorProto.EXTERNAL, False), (TensorProto.DEFAULT, True)):
        t = helper.make_tensor("c", TensorProto.UINT8, [WIDTH], list(range(WIDTH)))
        t.data_location = location
        if entries:
            entry = t.external_data.add()
            entry.key, entry.value = "location", SECRET_FILE
        with pytest.raises(InputError, match="external data"):
            check_model(encoder([helper.make_node("Constant", [], ["payload"], value=t)]), "m.onnx")


def test_an_onnx_files_own_initializers_may_keep_their_data_beside_it(secret_cwd, capsys):
    """The feature stays: the main graph's initializers read by rbe itself from checked paths."""
    weights = np.arange(WIDTH, dtype=np.uint8)
    (secret_cwd / "weights.bin").write_bytes(weights.tobytes())
    model = encoder(
        [helper.make_node("Identity", ["w"], ["payload"])], {"initializers": [external("w", "weights.bin")]}
    )
    onnx.save_model(model, "m.onnx")
    assert cli(["convert", "m.onnx", "m.rbe", "--quiet"], capsys)[0] == 0
    assert (
        cli(["verify", "m.rbe", "--deep"], capsys)[1] == "m.rbe: OK (checksums and digests match; the stored ONNX "
        "graph passes rbe's checks)\n"
    )
    assert cli(["decode", "m.rbe", "back.onnx", "--quiet"], capsys)[0] == 0
    back = onnx.load_model("back.onnx")
    assert back.graph.initializer[0].raw_data == weights.tobytes() and not back.graph.initializer[0].external_data


# -- operators and opsets -----------------------------------------------------------------


def test_an_operator_of_another_domain_is_refused(secret_cwd, capsys):
    evil = [helper.make_node("Evil", [], ["payload"], name="e", domain="com.evil")]
    model = encoder(evil, opsets=[("", OPSET), ("com.evil", 1)])
    path = container(secret_cwd / "x.rbe", model)
    onnx.save_model(model, "m.onnx")
    for argv in (
        ["convert", "m.onnx", "m.rbe", "--quiet"],
        ["decode", path, "y.onnx", "--quiet"],
        ["run", path, "hello"],
        ["export-onnx", path, "y.onnx", "--on-the-fly"],
        ["verify", path, "--deep"],
    ):
        assert_refused_in_one_line(*cli(argv, capsys), "'com.evil'")
    model = encoder([helper.make_node("Evil", [], ["payload"], name="e", domain="com.evil")])  # not even imported
    with pytest.raises(InputError, match="operator 'Evil' of domain 'com.evil'"):
        check_model(model, "m.onnx")


def test_a_file_of_compiled_code_is_refused(secret_cwd):
    node = helper.make_node(
        "EPContext", [], ["payload"], domain="com.microsoft", ep_cache_context=SECRET_FILE, embed_mode=0
    )
    with pytest.raises(InputError, match="EPContext"):
        check_model(encoder([node], opsets=[("", OPSET), ("com.microsoft", 1)]), "m.onnx")


@pytest.mark.parametrize(
    "opsets, accepted",
    [
        ([("", 6)], False),
        ([("", 7)], True),
        ([("", 17)], True),
        ([("", 20)], True),
        ([("", 28)], True),
        ([("", 29)], False),
        ([("ai.onnx", 30)], False),
        ([("", 17), ("ai.onnx.ml", 5)], True),
        ([("", 17), ("ai.onnx.ml", 6)], False),
        ([("", 17), ("com.microsoft", 1)], True),
        ([("", 17), ("com.microsoft", 2)], False),
        ([("", 17), ("ai.onnx.preview.training", 1)], False),
    ],
)
def test_operator_sets_outside_the_accepted_versions_are_refused(opsets, accepted):
    model = encoder(plain_payload(), opsets=opsets)
    if accepted:
        check_model(model, "m.onnx")
    else:
        with pytest.raises(InputError, match="operator set"):
            check_model(model, "m.onnx")


def test_an_out_of_range_opset_is_refused_by_every_command(secret_cwd, capsys):
    model = encoder(plain_payload(), opsets=[("", 29)])
    path = container(secret_cwd / "x.rbe", model)
    onnx.save_model(model, "m.onnx")
    for argv in (
        ["convert", "m.onnx", "m.rbe", "--quiet"],
        ["decode", path, "y.onnx", "--quiet"],
        ["run", path, "hello"],
        ["export-onnx", path, "y.onnx", "--quiet"],
        ["verify", path, "--deep"],
    ):
        assert_refused_in_one_line(*cli(argv, capsys), "operator set 'ai.onnx' version 29", "7 to 28")


def test_a_models_own_functions_run_when_their_bodies_pass(secret_cwd, capsys):
    body = [
        helper.make_node(
            "Constant", [], ["y"], value=helper.make_tensor("c", TensorProto.UINT8, [WIDTH], list(range(WIDTH)))
        )
    ]
    f = helper.make_function("local", "Make", [], ["y"], body, [helper.make_opsetid("", OPSET)])
    model = encoder(
        [helper.make_node("Make", [], ["payload"], domain="local")], {"functions": [f], "opsets": [("local", 1)]}
    )
    path = container(secret_cwd / "x.rbe", model)
    code, out, err = cli(["run", path, "hello world", "--json"], capsys)
    assert code == 0, err
    assert json.loads(out)["embedding"] == [float(v) for v in range(WIDTH)]
    evil = helper.make_function(
        "local",
        "Make",
        [],
        ["y"],
        [helper.make_node("Evil", [], ["y"], domain="com.evil")],
        [helper.make_opsetid("", OPSET)],
    )
    model = encoder(
        [helper.make_node("Make", [], ["payload"], domain="local")], {"functions": [evil], "opsets": [("local", 1)]}
    )
    with pytest.raises(InputError, match="function local.Make"):
        check_model(model, "m.onnx")


# -- the second wall: sessions look for external data in an empty folder -----------------------


def test_sessions_look_for_external_data_in_an_empty_folder(secret_cwd):
    """Were a file reference to pass rbe's check, the session would still not find the file."""
    data = encoder(*_payload("attribute t")).SerializeToString()
    with ort_guard.session_options() as options:
        with pytest.raises(InputError, match="x.rbe: ONNX Runtime refused the stored graph"):
            ort_guard.call(
                lambda: ort.InferenceSession(data, options, providers=["CPUExecutionProvider"]),
                path="x.rbe",
                doing="building a session on the stored graph",
            )


# -- graphs that never end or ask too much ---------------------------------------------------


def endless_payload() -> list:
    """payload after a Loop with no trip count whose condition stays true: it never ends."""
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond"], ["cond_out"]), helper.make_node("Identity", ["v"], ["v_out"])],
        "body",
        [_value("i", TensorProto.INT64, ()), _value("cond", TensorProto.BOOL, ()), _value("v")],
        [_value("cond_out", TensorProto.BOOL, ()), _value("v_out")],
    )
    return [
        helper.make_node("Constant", [], ["yes"], value=helper.make_tensor("t", TensorProto.BOOL, [], [True])),
        helper.make_node(
            "Constant", [], ["start"], value=helper.make_tensor("z", TensorProto.UINT8, [WIDTH], [0] * WIDTH)
        ),
        helper.make_node("Loop", ["", "yes", "start"], ["payload"], body=body),
    ]


@pytest.fixture
def endless(tmp_path) -> str:
    return container(tmp_path / "endless.rbe", encoder(endless_payload()))


def test_the_time_limit_stops_an_endless_graph(endless, capsys):
    start = time.monotonic()
    code, out, err = cli(["run", endless, "hello", "--timeout", "1.5", "--threads", "1"], capsys)
    assert time.monotonic() - start < 10
    assert_refused_in_one_line(code, out, err, endless, "time limit of 1.5 s", "--timeout")
    with pytest.raises(InputError, match="time limit"):
        run.embed(endless, ["hello"], timeout=1)


def test_a_stop_signal_ends_an_endless_graph_in_process(endless, capsys):
    timer = threading.Timer(1.5, os.kill, (os.getpid(), signal.SIGTERM))
    timer.start()
    start = time.monotonic()
    try:
        code = main(["run", endless, "hello", "--timeout", "0", "--threads", "1"])
    finally:
        timer.cancel()
    assert code == 143 and time.monotonic() - start < 10
    assert capsys.readouterr().err == "rbe: interrupted (SIGTERM)\n"


def _terminal_signals() -> None:
    for s in (signal.SIGHUP, signal.SIGINT):  # as test_cli: a background run inherits them ignored
        signal.signal(s, signal.SIG_DFL)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_ends_rbe_run_inside_an_endless_graph(endless, signum):
    proc = subprocess.Popen(
        RBE + ["run", endless, "hello", "--timeout", "0", "--threads", "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        preexec_fn=_terminal_signals,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    time.sleep(3)  # imports, then the session's build, then the endless run
    assert proc.poll() is None, proc.communicate()
    sent = time.monotonic()
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=10)
    assert proc.returncode == 128 + signum and time.monotonic() - sent < 10
    assert out == b"" and err.decode() == f"rbe: interrupted ({signal.Signals(signum).name})\n"


def test_a_huge_allocation_fails_in_one_line(tmp_path, capsys):
    nodes = [
        helper.make_node("Constant", [], ["shape"], value=helper.make_tensor("s", TensorProto.INT64, [1], [1 << 44])),
        helper.make_node(
            "ConstantOfShape", ["shape"], ["huge"], value=helper.make_tensor("v", TensorProto.UINT8, [1], [1])
        ),
        helper.make_node("Slice", ["huge", "from", "to"], ["payload"]),
    ]
    nodes[2:2] = [
        helper.make_node("Constant", [], [name], value=helper.make_tensor(name, TensorProto.INT64, [1], [value]))
        for name, value in (("from", 0), ("to", WIDTH))
    ]
    path = container(tmp_path / "huge.rbe", encoder(nodes))
    assert_refused_in_one_line(
        *cli(["run", path, "hello", "--threads", "1"], capsys), path, "ONNX Runtime could not allocate memory"
    )


def test_the_runtimes_other_errors_are_one_line_input_errors(tmp_path, capsys):
    """A graph ONNX Runtime refuses (a type mismatch) fails as the file's fault, exit 3, not as a bug in rbe."""
    model = encoder(plain_payload())
    model.graph.node[1].attribute[0].i = TensorProto.STRING  # Cast to string, then added to floats
    path = container(tmp_path / "bad.rbe", model)
    assert_refused_in_one_line(*cli(["run", path, "hello"], capsys), path, "ONNX Runtime refused the stored graph")


def test_a_tokenizer_that_fails_is_a_one_line_input_error(tmp_path, capsys):
    path = container(tmp_path / "x.rbe", encoder(plain_payload()))
    with Writer(str(tmp_path / "pad.rbe")) as w:  # a pad id the tokenizer cannot take
        with Reader(path) as r:
            for name in r.files():
                data = r.read_file(name)
                if name == "config.json":
                    data = json.dumps({"architectures": ["BertModel"], "pad_token_id": 1 << 70}).encode()
                w.add_file(name, data)
            w.add_array("unused", np.zeros(4, np.float32))
            w.set_metadata(r.metadata())
    assert_refused_in_one_line(
        *cli(["run", str(tmp_path / "pad.rbe"), "hello"], capsys), "pad.rbe", "the embedded tokenizer failed"
    )


def test_a_well_formed_graph_runs_and_verifies(tmp_path, capsys):
    path = container(tmp_path / "x.rbe", encoder(plain_payload()))
    code, out, _ = cli(["run", path, "hello world", "--json", "--timeout", "60"], capsys)
    assert code == 0 and json.loads(out)["embedding"] == [float(v) for v in range(WIDTH)]
    assert cli(["verify", path, "--deep"], capsys)[1].endswith("the stored ONNX graph passes rbe's checks)\n")


def test_the_timeout_option_takes_seconds(tmp_path, capsys):
    for bad in ("-1", "soon", "inf", "nan"):
        with pytest.raises(SystemExit) as exc:
            main(["run", "x.rbe", "hello", "--timeout", bad])
        assert exc.value.code == 2
        assert "--timeout" in capsys.readouterr().err
