"""What `rbe convert model.onnx` says when a recipe asks for calibration it cannot run: one plain line
naming what is missing (a tokenizer), what rbe does instead (rounds to nearest, which costs quality)
and the option to pass."""

from __future__ import annotations

import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("tokenizers")

from tiny_onnx import encoder_model, word_tokenizer  # noqa: E402

from rbe_converters.cli import main  # noqa: E402
from rbe_converters.compress.recipe import policy_from_document  # noqa: E402
from rbe_converters.sources import onnx as onnx_source  # noqa: E402

GPTQ_RECIPE = '[[rule]]\nroles = ["linear"]\ncodec = "gquant(bits=4, group=16)"\ncalibration = "gptq"\n'


@pytest.fixture
def encoder(tmp_path):
    tokenizer, vocab = word_tokenizer(tmp_path / "tokenizer.json")
    model, _ = encoder_model(vocab)
    src = str(tmp_path / "encoder.onnx")
    onnx.save(model, src)
    recipe = tmp_path / "gptq.toml"
    recipe.write_text(GPTQ_RECIPE)
    return src, str(recipe), tokenizer


def test_calibration_without_a_tokenizer_says_it_rounds_and_what_to_pass(encoder, tmp_path, capsys):
    src, recipe, _ = encoder
    capsys.readouterr()
    assert main(["convert", src, str(tmp_path / "out.rbe"), "--recipe", recipe, "--quiet"]) == 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err  # one line, even with --quiet
    assert err.startswith("rbe: warning: encoder.onnx: calibration = 'gptq' needs a tokenizer")
    assert "round to nearest instead, which costs quality" in err
    assert err.rstrip().endswith("pass --tokenizer tokenizer.json (or a folder holding one)")
    assert "Hugging Face" not in err


def test_a_program_without_a_message_callback_still_gets_the_warning(encoder, tmp_path, capsys):
    from rbe_converters.pipeline import CallbackReporter, ConvertOptions, convert_model

    src, recipe, _ = encoder
    seen = []
    for reporter in (None, CallbackReporter(seen.append)):
        out = str(tmp_path / f"{len(seen)}-{reporter is None}.rbe")
        result = convert_model(src, out, ConvertOptions(recipe=recipe), reporter)
        assert len(result.warnings) == 1 and "round to nearest instead" in result.warnings[0]
        assert not result.warnings[0].startswith("rbe:"), result.warnings  # the command line's prefix is not kept
    assert capsys.readouterr().err == ""  # printed by nobody: the program asked for no messages


def test_calibration_with_a_tokenizer_says_nothing(encoder, tmp_path, capsys):
    src, recipe, tokenizer = encoder
    capsys.readouterr()
    argv = ["convert", src, str(tmp_path / "out.rbe"), "--recipe", recipe, "--tokenizer", tokenizer, "--quiet"]
    argv += ["--calibration-windows", "1"]
    assert main(argv) == 0
    assert "warning" not in capsys.readouterr().err


def test_model_sensitivity_says_layers_are_scored_instead(encoder):
    src, _, _ = encoder
    doc = {
        "budget_bits": 5.0,
        "budget_sensitivity": "model",
        "rule": [{"roles": ["linear"], "codec": "gquant(bits=4, group=16)", "upgrade": "gquant(bits=8, group=16)"}],
    }
    policy, note = onnx_source.check_policy(onnx_source.plan_conversion(src), policy_from_document(doc, "r"), True)
    assert policy.budget_sensitivity == "layer"
    assert note == (
        "encoder.onnx: budget_sensitivity = 'model' measures the whole model's drift, which needs a Hugging Face "
        "model: mixed precision scores each layer's own error instead"
    )


def test_a_level_with_an_encoder_recipe_runs_it_on_an_onnx_encoder(encoder, tmp_path, capsys):
    from rbeformat import safe_open

    src, _, tokenizer = encoder
    capsys.readouterr()
    outputs = {}
    for preset in ("Q4", "encoder-q4"):
        outputs[preset] = str(tmp_path / f"{preset}.rbe")
        argv = ["convert", src, outputs[preset], "--preset", preset, "--tokenizer", tokenizer]
        assert main([*argv, "--calibration-windows", "1"]) == 0
        err = capsys.readouterr().err
        if preset == "Q4":
            assert "rbe: preset q4 -> encoder-q4 for an ONNX encoder (its graph gives no logits)" in err, err
            assert "budget_sensitivity" not in err  # said in the line above, not as a warning
    with safe_open(outputs["Q4"]) as level, safe_open(outputs["encoder-q4"]) as named:
        assert level.keys() == named.keys()
        for name in level.keys():  # the same recipe, the same values
            assert (level.get_tensor(name) == named.get_tensor(name)).all(), name
    assert main(["convert", src, str(tmp_path / "q8.rbe"), "--preset", "q8"]) == 0
    assert "->" not in capsys.readouterr().err  # q8 has no encoder recipe: nothing to say


def test_a_causal_lms_graph_keeps_the_level(tmp_path, capsys):
    from tiny_onnx import causal_model

    model, _ = causal_model(200)
    src = str(tmp_path / "causal.onnx")
    onnx.save(model, src)
    assert main(["convert", src, str(tmp_path / "q4.rbe"), "--preset", "q4"]) == 0
    err = capsys.readouterr().err
    assert "->" not in err and "round to nearest" in err, err  # q4's own recipe, uncalibrated without a tokenizer


def test_a_graph_gives_logits_when_an_output_is_named_logits(encoder):
    from tiny_onnx import causal_model

    assert onnx_source.gives_logits(causal_model(200)[0].SerializeToString())
    assert not onnx_source.gives_logits(onnx.load(encoder[0]).SerializeToString())
