"""GPTQ for ONNX models: layer input moments from ONNX Runtime runs over tokenized sentences."""

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
tokenizers = pytest.importorskip("tokenizers")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from rbe_converters import pipeline  # noqa: E402
from rbe_converters.compress.calibrate import ort as onnx_calibrate  # noqa: E402
from rbe_converters.compress.calibrate.torch import CalibrationText  # noqa: E402
from rbe_converters.compress.plan import calibration_methods  # noqa: E402
from rbe_converters.compress.recipe import policy_from_document  # noqa: E402
from rbe_converters.evaluate import quality  # noqa: E402
from rbe_converters.sources import onnx as onnx_source  # noqa: E402
from rbeformat import Reader, UsageError  # noqa: E402

HIDDEN, INNER = 16, 32


def word_tokenizer(path):
    """A word-level tokenizer over the evaluation text's commonest words, saved as tokenizer.json."""
    from collections import Counter

    words = [w for w, _ in Counter(quality.evaluation_text().split()).most_common(200)]
    tok = tokenizers.Tokenizer(
        tokenizers.models.WordLevel({w: i for i, w in enumerate(["[UNK]", *words])}, unk_token="[UNK]")
    )
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.save(str(path))
    return str(path), len(words) + 1


def mlp_model(vocab: int, rng) -> tuple[onnx.ModelProto, dict]:
    """input_ids (batch x length, both dynamic) -> table -> MatMul -> Relu -> MatMul."""
    weights = {
        "table": rng.standard_normal((vocab, HIDDEN)).astype(np.float32),
        "w_up": (rng.standard_normal((HIDDEN, INNER)) * 0.3).astype(np.float32),
        "w_down": (rng.standard_normal((INNER, HIDDEN)) * 0.3).astype(np.float32),
    }
    nodes = [
        helper.make_node("Gather", ["table", "input_ids"], ["h"]),
        helper.make_node("MatMul", ["h", "w_up"], ["up"]),
        helper.make_node("Relu", ["up"], ["act"]),
        helper.make_node("MatMul", ["act", "w_down"], ["out"]),
    ]
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["b", "n"])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["b", "n", HIDDEN])],
        [numpy_helper.from_array(v, k) for k, v in weights.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), weights


def test_moments_are_those_of_each_layers_input(tmp_path):
    path, vocab = word_tokenizer(tmp_path / "tokenizer.json")
    model, w = mlp_model(vocab, np.random.default_rng(0))
    text = CalibrationText(quality.evaluation_text()[:8000], "test", window=32, windows=2)
    tok = onnx_calibrate.load_tokenizer(str(tmp_path))  # a folder holding tokenizer.json works too
    stats = onnx_calibrate.collect(model, {"w_up": "gptq", "w_down": "gptq"}, text, tok)
    ids = np.concatenate([np.array(s) for s in onnx_calibrate.sentence_ids(tok, text)])
    h = w["table"][ids].astype(np.float64)
    act = np.maximum(h @ w["w_up"], 0)
    np.testing.assert_allclose(stats["w_up"].hessian, h.T @ h / len(ids), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats["w_down"].hessian, act.T @ act / len(ids), rtol=1e-4, atol=1e-5)
    assert stats["w_up"].method == "gptq"


def test_graphs_wanting_more_than_a_sentence_are_refused(tmp_path):
    path, vocab = word_tokenizer(tmp_path / "tokenizer.json")
    model, _ = mlp_model(vocab, np.random.default_rng(0))
    model.graph.input.append(helper.make_tensor_value_info("past", TensorProto.FLOAT, [1, 2]))
    text = CalibrationText(quality.evaluation_text()[:4000], "test", window=32, windows=1)
    with pytest.raises(UsageError, match="'past'"):
        onnx_calibrate.collect(model, {"w_up": "gptq"}, text, onnx_calibrate.load_tokenizer(path))
    with pytest.raises(UsageError, match="MatMul and Gemm"):
        onnx_calibrate.collect(model, {"table": "gptq"}, text, onnx_calibrate.load_tokenizer(path))


def test_gptq_on_onnx_lowers_the_output_error_of_rounding(tmp_path):
    path, vocab = word_tokenizer(tmp_path / "tokenizer.json")
    model, w = mlp_model(vocab, np.random.default_rng(1))
    src = tmp_path / "m.onnx"
    onnx.save(model, str(src))
    doc = {
        "rule": [
            {
                "roles": ["linear", "mlp_up", "mlp_down"],
                "codec": "gquant(bits=3, group=16, mode=asym)",
                "calibration": "gptq",
            }
        ]
    }
    policy = policy_from_document(doc, "r")
    plan = onnx_source.plan_conversion(str(src))
    text = CalibrationText(quality.calibration_text()[:20000], "test", window=32, windows=4)
    stats = onnx_calibrate.collect(
        onnx_source.filled_model(plan), calibration_methods(plan, policy), text, onnx_calibrate.load_tokenizer(path)
    )
    errors = {}
    for label, calibrations in (("gptq", stats), ("rounded", None)):
        out = str(tmp_path / f"{label}.rbe")
        notes = pipeline.convert(str(src), out, policy=policy, calibrations=calibrations)
        assert bool(notes) == (calibrations is None)  # rounding says it dropped the calibration
        with Reader(out) as r:
            errors[label] = sum(
                np.trace((r.get_tensor(n) - w[n]).T @ stats[n].hessian @ (r.get_tensor(n) - w[n]))
                for n in ("w_up", "w_down")
            )
    assert errors["gptq"] < 0.8 * errors["rounded"]  # 0.46 against 0.71 when written


def test_rbe_convert_calibrates_an_onnx_model_given_a_tokenizer(tmp_path, capsys):
    from rbe_converters.cli import main

    path, vocab = word_tokenizer(tmp_path / "tokenizer.json")
    model, w = mlp_model(vocab, np.random.default_rng(2))
    src = str(tmp_path / "m.onnx")
    onnx.save(model, src)
    text = tmp_path / "calibration.txt"
    text.write_text(quality.calibration_text()[:20000])
    recipe = tmp_path / "r.toml"
    recipe.write_text(
        '[[rule]]\nroles = ["linear"]\ncodec = "gquant(bits=3, group=16, mode=asym)"\ncalibration = "gptq"\n'
    )
    common = ["--recipe", str(recipe), "--calibration", str(text), "--calibration-windows", "2", "--quiet"]
    assert main(["convert", src, str(tmp_path / "c.rbe"), "--tokenizer", path, *common]) == 0
    assert "warning" not in capsys.readouterr().err  # calibrated: nothing dropped
    assert main(["convert", src, str(tmp_path / "r.rbe"), *common]) == 0
    assert "round to nearest" in capsys.readouterr().err
    with Reader(str(tmp_path / "c.rbe")) as c, Reader(str(tmp_path / "r.rbe")) as r:
        assert not np.array_equal(c.get_tensor("w_up"), r.get_tensor("w_up"))  # GPTQ chose other codes
    assert main(["convert", src, str(tmp_path / "x.rbe"), "--tokenizer", str(tmp_path / "none.json"), *common]) == 3
    assert not (tmp_path / "x.rbe").exists()


def test_a_tokenizer_is_refused_for_a_model_directory(model_dir, tmp_path, capsys):
    from rbe_converters.cli import main

    assert main(["convert", model_dir[0], str(tmp_path / "m.rbe"), "--tokenizer", "t.json", "--quiet"]) == 2
    assert "--tokenizer is for .onnx input" in capsys.readouterr().err
