"""The loaders keep Python users' habits: texts are strings, nothing prints unasked, and a missing optional
package is an ImportError naming the one extra of rbe that installs what the feature needs."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys

import numpy as np
import pytest

from rbe_loaders.ort import run
from rbeformat import FileMissingError, UsageError, UsageTypeError, save_file

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture
def plain_rbe(tmp_path) -> str:
    """An rbe file without a graph: enough where the check comes before the container is read."""
    path = str(tmp_path / "plain.rbe")
    save_file({"w": np.ones((2, 2), np.float32)}, path)
    return path


@pytest.fixture
def graph_rbe(tmp_path) -> str:
    """A container converted from a one-MatMul .onnx file: it carries a graph."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    from rbe_converters.cli import main

    weight = np.random.default_rng(0).standard_normal((8, 4)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "one",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])],
        [numpy_helper.from_array(weight, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    src, out = str(tmp_path / "one.onnx"), str(tmp_path / "one.rbe")
    onnx.save_model(model, src)
    assert main(["convert", src, out, "--quiet"]) == 0
    return out


def without(modules: list[str], code: str, *args: str) -> subprocess.CompletedProcess:
    """Runs ``code`` in a fresh interpreter in which importing any of ``modules`` fails, as if not installed."""
    block = "".join(f"sys.modules[{m!r}] = None\n" for m in modules)
    return subprocess.run(
        [sys.executable, "-c", "import sys\n" + block + code, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


CLI = "from rbe_converters.cli import main\nsys.exit(main(sys.argv[1:]))\n"


# -- (a) texts are strings ----------------------------------------------------------------


@pytest.mark.parametrize(
    "texts,error,message",
    [
        (b"The cat sat on the mat.", UsageTypeError, r"not bytes \(decode it first"),
        (["one", b"two"], UsageTypeError, "text 1 of the list is bytes"),
        (["one", 2], UsageTypeError, "text 1 of the list is int"),
        ([], UsageError, "at least one text"),
        (iter(["a generator"]), UsageTypeError, "a str or a list of str"),
        (np.array(["an array"]), UsageTypeError, "not ndarray"),
    ],
)
def test_embed_refuses_anything_but_a_string_or_a_list_of_strings(tmp_path, texts, error, message):
    with pytest.raises(error, match=message):
        run.embed(str(tmp_path / "not-even-opened.rbe"), texts)  # checked before the container is read


def test_type_errors_are_type_errors_and_usage_errors():
    with pytest.raises(TypeError) as caught:
        run.text_batch(b"bytes", "embed")
    assert isinstance(caught.value, UsageError)  # exit 2 on the command line
    with pytest.raises(ValueError):
        run.text_batch([], "embed")


def test_a_string_is_one_text_and_a_tuple_a_batch():
    assert run.text_batch("The cat sat on the mat.", "embed") == ["The cat sat on the mat."]
    assert run.text_batch(("a", "b"), "embed") == ["a", "b"]


@pytest.mark.parametrize("prompt", [["one prompt", "another"], b"bytes", None])
def test_generate_takes_one_prompt_string(tmp_path, prompt):
    missing = str(tmp_path / "not-even-opened.rbe")
    with pytest.raises(UsageTypeError, match="takes one prompt, a str"):
        run.generate(missing, prompt)
    with pytest.raises(UsageTypeError, match="takes one prompt, a str"):
        run.generate_ids(missing, prompt)


@pytest.mark.parametrize(
    "ids,message",
    [
        ("The cat", r"not str \(tokenize it first"),
        ([1, "2"], "token id 1 is str"),
        ([1, True], "token id 1 is bool"),
        (np.array([[1, 2]]), "1-D integer array"),
        (np.array([1.0, 2.0]), "1-D integer array"),
    ],
)
def test_token_ids_are_ints_never_a_text(ids, message):
    with pytest.raises(UsageTypeError, match=message):
        run.token_logprobs(None, ids)  # checked before the session is touched
    with pytest.raises(UsageTypeError, match=message):
        run.greedy_ids(None, ids, 2)


def test_token_ids_accept_lists_tuples_and_integer_arrays():
    assert run.token_ids((3, np.int64(4)), "x") == [3, 4]
    assert run.token_ids(np.array([5, 6], np.int32), "x") == [5, 6]


# -- (b) a missing file is a FileNotFoundError, from every loader ----------------------------


def calling(module: str, function: str, *args):
    """A loader's function called on a path; its module imported only when the test runs."""
    return lambda path: getattr(importlib.import_module(module), function)(path, *args)


LOADERS = {
    "torch.load_file": ("torch", calling("rbe_loaders.torch", "load_file")),
    "torch.load_state_dict": ("torch", calling("rbe_loaders.torch", "load_state_dict")),
    "torch.load_model": ("transformers", calling("rbe_loaders.torch", "load_model")),
    "ort.session": ("onnxruntime", calling("rbe_loaders.ort", "session")),
    "ort.on_the_fly_model": ("onnx", calling("rbe_loaders.ort", "on_the_fly_model")),
    "ort.run.embed": ("onnxruntime", calling("rbe_loaders.ort.run", "embed", "a text")),
    "ort.run.generate": ("onnxruntime", calling("rbe_loaders.ort.run", "generate", "a prompt")),
    "tokenizer": ("tokenizers", calling("rbe_loaders", "tokenizer")),
}


@pytest.mark.parametrize("loader", LOADERS)
def test_every_loader_reports_a_missing_file_as_file_not_found(tmp_path, loader):
    needs, load = LOADERS[loader]
    pytest.importorskip(needs)
    missing = str(tmp_path / "missing.rbe")
    with pytest.raises(FileNotFoundError, match="missing.rbe: cannot open") as caught:
        load(missing)
    assert isinstance(caught.value, FileMissingError) and caught.value.filename == missing


# -- (c) nothing prints unless asked ------------------------------------------------------


def test_a_session_prints_nothing_unless_asked(graph_rbe, capfd):
    pytest.importorskip("onnxruntime")
    from rbe_loaders import ort

    sess, report = ort.session(graph_rbe)
    assert capfd.readouterr() == ("", "")
    assert sess.run(None, {"x": np.ones((2, 8), np.float32)})[0].shape == (2, 4)
    assert "w" in str(report) and str(report).startswith("tensor")
    ort.session(graph_rbe, quiet=False)
    out, err = capfd.readouterr()
    assert out == "" and err == str(report) + "\n"


def test_rbe_run_and_loaders_print_nothing_on_import(capfd):
    done = without([], "import rbe_loaders, rbe_loaders.ort, rbe_loaders.ort.run, rbe_loaders.ort.build\n")
    assert done.returncode == 0, done.stderr
    assert (done.stdout, done.stderr) == ("", "")


# -- (d) a missing optional package names the extra -------------------------------------


def test_rbe_loaders_torch_without_torch_names_the_hf_extra():
    code = (
        "try:\n"
        "    import rbe_loaders.torch\n"
        "except ImportError as exc:\n"
        "    print(type(exc).__name__, exc.name, '|', exc)\n"
    )
    done = without(["torch"], code)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("MissingExtraError torch | rbe_loaders.torch needs torch, which is not installed")
    assert done.stdout.rstrip().endswith("pip install 'rbe[hf]'")


@pytest.mark.parametrize("blocked", ["onnx", "onnxruntime", "tokenizers"])
def test_rbe_run_names_the_ort_extra_whichever_package_is_missing(plain_rbe, blocked):
    done = without([blocked], CLI, "run", plain_rbe, "some text")
    assert done.returncode == 2, done.stderr
    assert done.stdout == ""
    assert done.stderr == (
        f"rbe: error: rbe run (rbe_loaders.ort.run) needs onnx, onnxruntime and tokenizers; {blocked} "
        "is not installed: pip install 'rbe[ort]'\n"
    )


def test_rbe_run_with_nothing_of_the_extra_asks_once_for_it(plain_rbe):
    done = without(["onnx", "onnxruntime", "tokenizers"], CLI, "run", plain_rbe, "some text")
    assert done.returncode == 2 and done.stderr.count("rbe[") == 1 and "rbe[ort]" in done.stderr


def test_export_on_the_fly_needs_onnx_and_not_onnxruntime(graph_rbe, tmp_path):
    out = str(tmp_path / "fly.onnx")
    done = without(["onnxruntime"], CLI, "export-onnx", graph_rbe, out, "--on-the-fly", "--quiet")
    assert done.returncode == 0, done.stderr
    assert os.path.getsize(out) > 0
    done = without(["onnx"], CLI, "export-onnx", graph_rbe, str(tmp_path / "again.onnx"), "--on-the-fly")
    assert done.returncode == 2
    assert "pip install 'rbe[onnx]'" in done.stderr and "onnxruntime" not in done.stderr
    assert not os.path.exists(tmp_path / "again.onnx")


def test_a_session_without_onnxruntime_names_the_ort_extra(graph_rbe):
    code = (
        "from rbe_loaders import ort\n"
        "try:\n"
        "    ort.session(sys.argv[1])\n"
        "except ImportError as exc:\n"
        "    print(exc.name, '|', exc)\n"
    )
    done = without(["onnxruntime"], code, graph_rbe)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("onnxruntime | ONNX Runtime sessions") and "pip install 'rbe[ort]'" in done.stdout
    done = without(["onnx", "onnxruntime"], code, graph_rbe)  # neither: still the one extra with both
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("onnx | ONNX Runtime sessions") and "pip install 'rbe[ort]'" in done.stdout


@pytest.mark.parametrize(
    "blocked,code,extra",
    [
        ("tokenizers", "import rbe_loaders\nrbe_loaders.tokenizer(sys.argv[1])\n", "ort"),
        ("transformers", "from rbe_loaders.torch import load_model\nload_model(sys.argv[1])\n", "hf"),
        ("onnx", "import rbe_loaders.ort.graph\n", "onnx"),
    ],
)
def test_each_loader_names_its_extra(plain_rbe, blocked, code, extra):
    if blocked == "transformers":
        pytest.importorskip("torch")
    done = without([blocked], code, plain_rbe)
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("rbeformat.errors.MissingExtraError: ") and f"pip install 'rbe[{extra}]'" in last
    assert f"{blocked} is not installed" in last or f"{blocked}, which is not installed" in last


# -- the command line's exit codes stay rbe's, whatever built-in type an error also is -------


def test_exit_codes_are_rbes_for_errors_that_are_built_in_types_too(plain_rbe, tmp_path, capsys):
    from rbe_converters.cli import main

    missing = str(tmp_path / "missing.rbe")
    assert main(["info", missing]) == 3  # a FileNotFoundError too, but an invalid input first
    assert capsys.readouterr().err == f"rbe: error: {missing}: cannot open (No such file or directory)\n"
    for module in ("onnx", "onnxruntime", "tokenizers"):
        pytest.importorskip(module)
    assert main(["run", plain_rbe, "text"]) == 2  # a UsageError, also a ValueError
    assert "holds no ONNX graph" in capsys.readouterr().err
