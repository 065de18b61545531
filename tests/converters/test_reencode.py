"""An .rbe file as the input of rbe convert: encoded anew, its files carried over, the input untouched."""

import hashlib
import os

import numpy as np
import pytest
from conftest import tree_digest

from rbe_converters.cli import main
from rbeformat import Reader

G4 = "gquant(bits=4, group=64)"


def convert(*args: str) -> None:
    assert main(["convert", *args, "--quiet"]) == 0


def values(path: str) -> dict[str, np.ndarray]:
    with Reader(path) as r:
        return {name: r.get_tensor(name) for name in r.keys()}


def assert_same_values(a: str, b: str) -> None:
    left, right = values(a), values(b)
    assert list(left) == list(right)
    for name in left:
        assert left[name].dtype == right[name].dtype and np.array_equal(left[name], right[name]), name


def files(path: str) -> dict[str, str]:
    """{path: sha256 of the bytes} of every file a container embeds."""
    with Reader(path) as r:
        return {p: hashlib.sha256(r.read_file(p)).hexdigest() for p in r.files()}


def sha(path: str) -> str:
    with open(path, "rb") as fh:
        return hashlib.sha256(fh.read()).hexdigest()


@pytest.fixture(scope="module")
def minilm_files(minilm_dir, tmp_path_factory):
    """all-MiniLM-L6-v2 stored losslessly and at 4 bits, each converted from the directory."""
    folder = tmp_path_factory.mktemp("reencode")
    lossless, g4 = str(folder / "lossless.rbe"), str(folder / "g4.rbe")
    convert(minilm_dir, lossless)
    convert(minilm_dir, g4, "--codec", G4)
    return lossless, g4


def test_lossless_rbe_to_4_bits_equals_the_directory_converted_so(minilm_dir, minilm_files, tmp_path):
    lossless, g4 = minilm_files
    before = sha(lossless)
    again = str(tmp_path / "again.rbe")
    convert(lossless, again, "--codec", G4)
    assert sha(lossless) == before  # the input is only read
    assert_same_values(again, g4)
    with Reader(again) as r, Reader(g4) as direct:
        quantized = [n for n in r.keys() if r.entry(n).transform is not None]
        assert quantized and quantized == [n for n in direct.keys() if direct.entry(n).transform is not None]
        assert r.metadata() == direct.metadata()
    assert files(again) == files(lossless)  # config, tokenizer, safetensors header: all carried over
    back = tmp_path / "back"
    assert main(["decode", again, str(back), "--quiet"]) == 0
    decoded, original = tree_digest(str(back)), tree_digest(minilm_dir)
    assert sorted(decoded) == sorted(original)  # the whole directory comes back
    assert {k: v for k, v in decoded.items() if not k.endswith(".safetensors")} == {
        k: v for k, v in original.items() if not k.endswith(".safetensors")
    }


def test_a_4_bit_rbe_to_lossless_keeps_its_decoded_values_exactly(minilm_files, tmp_path, capsys):
    _, g4 = minilm_files
    dense = str(tmp_path / "dense.rbe")
    assert main(["convert", g4, dense, "--lossless", "byteplane"]) == 0
    captured = capsys.readouterr()
    assert "embedding" in captured.err  # the files it carries over are named
    note = captured.err.splitlines()[-1]  # lossless to the input's values, not the original's: on stderr
    assert note.startswith(f"rbe: {dense}: {g4} holds ") and f"not the model {g4} was made from" in note
    # exact to the q4 values, which the file says: a 4-bit file is never passed off as the model
    result = captured.out.splitlines()[-1]
    assert "were lossy in the input this file was encoded from" in result and "stored exactly here" in result
    assert "quality: lossless" not in result
    assert main(["convert", dense, str(tmp_path / "again.rbe")]) == 0
    again = capsys.readouterr()
    assert f"{dense} holds " in again.err  # the copy's values are still the 4-bit ones, and say so
    assert "stored exactly here" in again.out
    with Reader(str(tmp_path / "again.rbe")) as r, Reader(g4) as q4:
        name = "encoder.layer.0.attention.self.query.weight"
        assert r.entry(name).extra["stats"]["input"] == q4.entry(name).extra["stats"]  # q4's own figures
    with Reader(dense) as r:
        assert all(r.entry(n).transform is None for n in r.keys())  # every tensor stored as it decodes
    assert_same_values(dense, g4)
    # the same directory decodes from both, byte for byte
    for path, folder in ((g4, "from-g4"), (dense, "from-dense")):
        assert main(["decode", path, str(tmp_path / folder), "--quiet"]) == 0
    assert tree_digest(str(tmp_path / "from-g4")) == tree_digest(str(tmp_path / "from-dense"))


def test_a_calibrated_preset_reads_the_model_from_the_rbe(tmp_path):
    pytest.importorskip("transformers")
    from tiny_models import saved_llama

    directory, text = saved_llama(tmp_path, 5, num_hidden_layers=2)
    lossless, direct, again = (str(tmp_path / f"{n}.rbe") for n in ("lossless", "direct", "again"))
    options = ["--preset", "q4", "--calibration", text, "--calibration-windows", "2", "--threads", "1"]
    convert(directory, lossless)
    convert(directory, direct, *options)
    convert(lossless, again, *options)
    with Reader(again) as r:
        assert any(r.entry(n).transform is not None for n in r.keys())
    assert_same_values(again, direct)  # the same statistics: the lossless tensors are the directory's
    assert files(again) == files(lossless)
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]  # no state or partial file left


def test_a_graph_exported_with_onnx_is_carried_and_runs_on_the_new_weights(bert, tmp_path):
    pytest.importorskip("onnxruntime")
    from rbe_loaders.ort.run import embed

    directory, _, _, exported = bert  # converted with --onnx, losslessly
    direct, again = str(tmp_path / "direct.rbe"), str(tmp_path / "again.rbe")
    assert main(["convert", directory, direct, "--onnx", "--codec", G4, "--quiet", "--threads", "1"]) == 0
    convert(exported, again, "--codec", G4)
    assert_same_values(again, direct)  # the graph's own constants included, stored losslessly
    assert files(again) == files(exported)
    texts = ["the first of the", "and to be"]
    np.testing.assert_array_equal(embed(again, texts), embed(direct, texts))


def test_an_onnx_container_is_encoded_by_its_graphs_roles_and_decodes_to_a_directory(paraphrase_onnx, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    lossless, direct, again = (str(tmp_path / f"{n}.rbe") for n in ("p", "direct", "again"))
    convert(paraphrase_onnx, lossless)
    convert(paraphrase_onnx, direct, "--codec", G4)
    convert(lossless, again, "--codec", G4)
    assert_same_values(again, direct)
    with Reader(again) as r:
        matmuls = [n for n in r.keys() if n.startswith("onnx::MatMul")]  # weights the graph's MatMuls read
        assert matmuls and all(r.entry(n).transform.codec.name == "transpose" for n in matmuls)
    assert files(again) == files(lossless)  # the graph goes over as stored

    out = tmp_path / "decoded"
    assert main(["decode", again, str(out), "--quiet"]) == 0
    name = os.path.basename(paraphrase_onnx)
    assert os.listdir(out) == [name]  # the model it came from, not its graph as a file of its own
    assert main(["decode", lossless, str(tmp_path / "exact"), "--quiet"]) == 0
    assert sha(str(tmp_path / "exact" / name)) == sha(paraphrase_onnx)  # lossless: the input byte for byte
    original = first_output(ort, paraphrase_onnx)
    np.testing.assert_array_equal(first_output(ort, str(tmp_path / "exact" / name)), original)
    quantized = first_output(ort, str(out / name)).mean(axis=1)[0]
    reference = original.mean(axis=1)[0]
    assert np.dot(quantized, reference) / (np.linalg.norm(quantized) * np.linalg.norm(reference)) > 0.9


def first_output(ort, path: str) -> np.ndarray:
    """The model's first output (its hidden states) on one short sentence's tokens."""
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    ids = np.array([[101, 7592, 2088, 2003, 1037, 3231, 102]], np.int64)
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    return session.run(None, {i.name: feeds[i.name] for i in session.get_inputs()})[0]


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("rbe: error: ") and "Traceback" not in err, err
    return err


def test_the_input_is_never_the_output(model_dir, tmp_path, capsys):
    src = str(tmp_path / "m.rbe")
    convert(model_dir[0], src)
    before = sha(src)
    link = tmp_path / "link.rbe"
    os.link(src, link)
    for output, extra in ((src, []), (src, ["--force"]), (str(link), ["--force"])):
        assert main(["convert", src, output, "--quiet", "--codec", G4, *extra]) == 2
        assert "is the input" in one_error_line(capsys)
    assert sha(src) == before
    assert sorted(os.listdir(tmp_path)) == ["link.rbe", "m.rbe", "model"]  # no partial file left either


def test_onnx_export_of_an_rbe_input_is_refused_with_the_way(model_dir, tmp_path, capsys):
    src = str(tmp_path / "m.rbe")
    convert(model_dir[0], src)
    assert main(["convert", src, str(tmp_path / "o.rbe"), "--onnx"]) == 2  # not quiet: still the one line
    err = one_error_line(capsys)
    assert "decode" in err and "--onnx" in err
    assert not (tmp_path / "o.rbe").exists()


def test_a_container_reencoded_keeps_every_file_and_tensor(model_dir, tmp_path):
    src, tensors = model_dir
    first, second = str(tmp_path / "a.rbe"), str(tmp_path / "b.rbe")
    convert(src, first)
    convert(first, second, "--lossless", "raw")
    with Reader(second) as r:
        assert all(r.entry(n).transform is None for n in r.keys())
        assert r.entry("lm_head.weight").alias_of == "embed.weight"  # tied tensors stay stored once
    assert main(["decode", second, str(tmp_path / "back"), "--quiet"]) == 0
    assert tree_digest(str(tmp_path / "back")) == tree_digest(src)


def test_an_embedded_file_is_read_in_order_and_to_its_end():
    from rbe_converters.sources.rbe import SequentialRead

    starts, ended = [], []

    def pieces():
        starts.append(1)
        yield from (b"abc", b"defg", b"h")
        ended.append(1)  # where Reader.iter_file checks the digest

    read = SequentialRead(pieces, 8)
    assert read(0, 2) == b"ab" and read(2, 3) == b"cde" and not ended
    assert read(1, 2) == b"bc" and len(starts) == 2  # from further back: read again from the start
    assert read(3, 5) == b"defgh" and ended == [1]
