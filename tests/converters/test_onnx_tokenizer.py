"""An ONNX model's tokenizer, named once at conversion (--tokenizer), travels in the container.

It is embedded as tokenizer.json; a re-encoding of the container calibrates with it (as the
.onnx with --tokenizer does), ``rbe eval`` scores with it, ``rbe run`` embeds texts with it, and a
decode to a directory writes it beside the model.  A file that is not a tokenizer.json is refused before any output exists.
"""

import json
import os

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("tokenizers")

from tiny_onnx import causal_model, encoder_model, numpy_hidden, word_tokenizer  # noqa: E402

from rbe_converters.cli import main  # noqa: E402
from rbe_converters.evaluate import quality  # noqa: E402
from rbe_loaders.ort import run as ort_run  # noqa: E402
from rbeformat import Reader, UsageError  # noqa: E402

RECIPE = '[[rule]]\nroles = ["linear"]\ncodec = "gquant(bits=3, group=16, mode=asym)"\ncalibration = "gptq"\n'


@pytest.fixture
def model(tmp_path):
    """(the .onnx file, the folder holding its tokenizer.json, options of a calibrated conversion)."""
    folder = tmp_path / "tok"
    folder.mkdir()
    _, vocab = word_tokenizer(folder / "tokenizer.json")
    src = str(tmp_path / "m.onnx")
    onnx.save(encoder_model(vocab)[0], src)
    text = tmp_path / "calibration.txt"
    text.write_text(quality.calibration_text()[:20000])
    recipe = tmp_path / "r.toml"
    recipe.write_text(RECIPE)
    calibrated = ["--recipe", str(recipe), "--calibration", str(text), "--calibration-windows", "2"]
    return src, str(folder), calibrated


def test_the_tokenizer_given_is_embedded_and_said(model, tmp_path, capsys):
    src, folder, _ = model
    out = str(tmp_path / "l.rbe")
    assert main(["convert", src, out, "--tokenizer", folder]) == 0
    assert f"embedding the tokenizer {folder} as tokenizer.json" in capsys.readouterr().err
    with Reader(out) as r:
        with open(os.path.join(folder, "tokenizer.json"), "rb") as fh:
            assert r.read_file("tokenizer.json") == fh.read()


def test_a_re_encoding_calibrates_with_the_embedded_tokenizer(model, tmp_path, capsys):
    src, folder, calibrated = model
    lossless, again, direct = (str(tmp_path / name) for name in ("l.rbe", "again.rbe", "direct.rbe"))
    assert main(["convert", src, lossless, "--tokenizer", folder, "--quiet"]) == 0
    capsys.readouterr()
    assert main(["convert", lossless, again, *calibrated]) == 0
    err = capsys.readouterr().err
    assert "warning" not in err and f"tokenized by {lossless} (its tokenizer.json)" in err
    assert main(["convert", src, direct, "--tokenizer", folder, *calibrated, "--quiet"]) == 0
    with Reader(again) as a, Reader(direct) as d:
        assert "tokenizer.json" in a.files()  # carried over
        for name in d.keys():  # the same GPTQ codes as the .onnx calibrated with --tokenizer
            np.testing.assert_array_equal(a.get_tensor(name), d.get_tensor(name))


def test_a_tokenizer_given_replaces_the_embedded_one(model, tmp_path):
    src, folder, _ = model
    first, second = str(tmp_path / "first.rbe"), str(tmp_path / "second.rbe")
    assert main(["convert", src, first, "--tokenizer", folder, "--quiet"]) == 0
    other, _ = word_tokenizer(tmp_path / "other.json", words=50)
    assert main(["convert", first, second, "--tokenizer", other, "--quiet"]) == 0
    with Reader(second) as r, open(other, "rb") as fh:
        assert r.read_file("tokenizer.json") == fh.read()
        assert sum(path == "tokenizer.json" for path in r.files()) == 1


def test_eval_and_decode_find_the_embedded_tokenizer(model, tmp_path, capsys):
    src, folder, _ = model
    lossless, lossy = str(tmp_path / "l.rbe"), str(tmp_path / "q4.rbe")
    assert main(["convert", src, lossless, "--tokenizer", folder, "--quiet"]) == 0
    assert main(["convert", lossless, lossy, "--codec", "gquant(bits=4, group=16)", "--quiet"]) == 0
    sentences = tmp_path / "sentences.txt"
    sentences.write_text("\n".join(quality.default_sentences(24)) + "\n")
    capsys.readouterr()
    assert main(["eval", src, lossy, "--sentences", str(sentences), "--json", "--quiet"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["protocol"]["tokenizer"] == f"{lossy} (its tokenizer.json)"
    assert "hidden states [batch, tokens, hidden] (the graph's output 'hidden')" in json.dumps(result)
    out = tmp_path / "decoded"
    assert main(["decode", lossless, str(out), "--quiet"]) == 0
    assert sorted(os.listdir(out)) == ["m.onnx", "tokenizer.json"]
    with open(os.path.join(folder, "tokenizer.json"), "rb") as fh:
        assert (out / "tokenizer.json").read_bytes() == fh.read()
    with open(src, "rb") as fh:
        assert (out / "m.onnx").read_bytes() == fh.read()  # lossless: the input byte for byte


@pytest.mark.parametrize(
    "content, message",
    [
        (b"not json", "not valid JSON"),
        (b'{"version": "1.0"}', 'a JSON object with a "model" member'),
        (b'{"model": 5}', "not a tokenizer.json the tokenizers library loads"),
    ],
)
def test_a_file_that_is_no_tokenizer_is_refused_before_any_output(model, tmp_path, capsys, content, message):
    src, _, _ = model
    bad = tmp_path / "bad.json"
    bad.write_bytes(content)
    out = tmp_path / "x.rbe"
    assert main(["convert", src, str(out), "--tokenizer", str(bad)]) == 3
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_a_folder_whose_tokenizer_links_outside_it_is_refused(model, tmp_path, capsys):
    src, folder, _ = model
    linked = tmp_path / "linked"
    linked.mkdir()
    os.symlink(os.path.join(folder, "tokenizer.json"), linked / "tokenizer.json")
    assert main(["convert", src, str(tmp_path / "x.rbe"), "--tokenizer", str(linked), "--quiet"]) == 3
    assert "is a symbolic link" in capsys.readouterr().err
    assert not (tmp_path / "x.rbe").exists()


# -- rbe run -------------------------------------------------------------------------------------


def test_rbe_run_embeds_with_the_embedded_tokenizer(model, tmp_path, capsys):
    """No config.json: the graph runs as an encoder, its one float output of rank 3 mean-pooled."""
    import tokenizers

    src, folder, _ = model
    converted = str(tmp_path / "l.rbe")
    assert main(["convert", src, converted, "--tokenizer", folder, "--quiet"]) == 0
    tok = tokenizers.Tokenizer.from_file(os.path.join(folder, "tokenizer.json"))
    weights = encoder_model(tok.get_vocab_size())[1]
    texts = [" ".join(quality.evaluation_text().split()[:9]), "the of"]
    expected = [numpy_hidden(weights, np.array([tok.encode(t).ids])).mean(axis=1)[0] for t in texts]
    capsys.readouterr()
    assert main(["run", converted, texts[0], "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["kind"] == "encoder" and result["dimension"] == len(expected[0])
    np.testing.assert_allclose(result["embedding"], expected[0], rtol=1e-5, atol=1e-5)
    vectors = ort_run.embed(converted, texts)  # padded to the longest: the mask leaves the padding out
    np.testing.assert_allclose(vectors, np.stack(expected), rtol=1e-5, atol=1e-5)


def test_rbe_run_without_an_embedded_tokenizer_says_to_convert_with_one(model, tmp_path, capsys):
    src, _, _ = model
    converted = str(tmp_path / "l.rbe")
    assert main(["convert", src, converted, "--quiet"]) == 0
    capsys.readouterr()
    assert main(["run", converted, "some text"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--tokenizer" in err and "rbe_loaders.ort.session(" in err


def test_a_causal_graph_without_its_config_is_refused(model, tmp_path, capsys):
    _, folder, _ = model
    import tokenizers

    vocab = tokenizers.Tokenizer.from_file(os.path.join(folder, "tokenizer.json")).get_vocab_size()
    src, converted = str(tmp_path / "c.onnx"), str(tmp_path / "c.rbe")
    onnx.save(causal_model(vocab)[0], src)
    assert main(["convert", src, converted, "--tokenizer", folder, "--quiet"]) == 0
    capsys.readouterr()
    assert main(["run", converted, "some text"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "logits" in err and "config.json" in err


class _Output:
    def __init__(self, name, type="tensor(float)", shape=("batch", "tokens", 16)):
        self.name, self.type, self.shape = name, type, list(shape)


class _Session:
    def __init__(self, *outputs):
        self.outputs = list(outputs)

    def get_outputs(self):
        return self.outputs


def test_the_hidden_states_of_a_bare_graph_are_chosen_by_name_then_by_form():
    pooled = _Output("pooled", shape=("batch", 16))
    assert ort_run.bare_encoder_output(_Session(_Output("x"), _Output("last_hidden_state")), "m.rbe") == (
        "last_hidden_state"
    )
    assert ort_run.bare_encoder_output(_Session(pooled, _Output("hidden")), "m.rbe") == "hidden"
    ids = _Output("ids", type="tensor(int64)")
    assert ort_run.bare_encoder_output(_Session(ids, _Output("hidden"), pooled), "m.rbe") == "hidden"
    with pytest.raises(UsageError, match="2 float outputs of rank 3"):
        ort_run.bare_encoder_output(_Session(_Output("a"), _Output("b")), "m.rbe")
    with pytest.raises(UsageError, match="0 float outputs of rank 3"):
        ort_run.bare_encoder_output(_Session(pooled), "m.rbe")
