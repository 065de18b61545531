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


def test_a_level_with_an_encoder_recipe_says_an_onnx_model_keeps_the_levels_own(encoder, tmp_path, capsys):
    src, _, tokenizer = encoder
    capsys.readouterr()
    argv = ["convert", src, str(tmp_path / "out.rbe"), "--preset", "Q4", "--tokenizer", tokenizer]
    assert main([*argv, "--calibration-windows", "1"]) == 0
    err = capsys.readouterr().err
    assert "rbe: preset q4 runs its own recipe on an ONNX model, not encoder-q4 (which runs the model in" in err
    assert main(["convert", src, str(tmp_path / "q8.rbe"), "--preset", "q8"]) == 0
    assert "its own recipe" not in capsys.readouterr().err  # q8 has no encoder recipe: nothing to say
