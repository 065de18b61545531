"""`rbe eval` of ONNX models: the original (.onnx, or an .rbe converted from one) and each compressed .rbe
run in ONNX Runtime, with a tokenizer given by --tokenizer or carried by a container.

Small graphs built with onnx.helper (tests/tiny_onnx.py) check the numbers against numpy and the
errors quickly; paraphrase-MiniLM-L3-v2 (an fp32 .onnx without a tokenizer, whose vocabulary is
all-MiniLM-L6-v2's) checks a real model.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
tokenizers = pytest.importorskip("tokenizers")

from tiny_models import one_error_line, run  # noqa: E402
from tiny_onnx import HIDDEN, INNER, causal_model, encoder_model, numpy_hidden, numpy_logits, word_tokenizer  # noqa: E402

from rbe_converters.cli import main  # noqa: E402
from rbe_converters.evaluate import quality  # noqa: E402
from rbe_converters.sources.onnx import plan_conversion  # noqa: E402
from rbeformat import Reader, Writer  # noqa: E402

Q4 = "gquant(bits=4, group=16)"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """An encoder and a causal LM as .onnx files, each with a lossless and a 4-bit .rbe, their tokenizer.json
    and a file of 40 default sentences."""
    root = tmp_path_factory.mktemp("tiny-onnx")
    tokenizer, vocab = word_tokenizer(root / "tokenizer.json")
    paths = {"tokenizer": tokenizer, "vocab": vocab}
    for kind, build in (("encoder", encoder_model), ("causal", causal_model)):
        model, weights = build(vocab)
        src, lossless, lossy = (str(root / f"{kind}{suffix}") for suffix in (".onnx", ".rbe", "-q4.rbe"))
        onnx.save(model, src)
        assert main(["convert", src, lossless, "--quiet"]) == 0
        assert main(["convert", src, lossy, "--quiet", "--codec", Q4]) == 0
        paths[kind] = (src, lossless, lossy, weights)
    sentences = root / "sentences.txt"
    sentences.write_text("\n".join(quality.default_sentences(40)) + "\n")
    paths["sentences"] = str(sentences)
    return paths


def _eval_json(capsys, argv: list[str]) -> dict:
    capsys.readouterr()
    assert main(["eval", *argv, "--json", "--quiet"]) == 0
    return json.loads(capsys.readouterr().out)


def _decoded(path: str) -> dict[str, np.ndarray]:
    with Reader(path) as r:
        return {name: r.get_tensor(name) for name in r.keys()}


# -- encoders ---------------------------------------------------------------------------


def test_lossless_scores_exactly_one_and_4_bit_below(tiny, capsys):
    src, lossless, lossy, _ = tiny["encoder"]
    result = _eval_json(
        capsys, [src, lossless, lossy, "--tokenizer", tiny["tokenizer"], "--sentences", tiny["sentences"]]
    )
    assert result["measure"] == "embeddings" and result["runtime"] == "ONNX Runtime, CPU"
    assert result["protocol"]["count"] == 40 and result["protocol"]["tokenizer"] == tiny["tokenizer"]
    assert "'hidden'" in result["protocol"]["pooling"]  # the rank-3 output, not the graph's own pooled one
    original, same, q4 = result["rows"]
    assert [r["role"] for r in result["rows"]] == ["original", "compressed", "compressed"]
    for row in (original, same):
        assert row["mean_cosine"] == 1.0 and row["nn_agreement"] == 1.0  # bit-equal embeddings: exactly 1
    assert q4["mean_cosine"] < 1.0 and q4["cosine_change"] == q4["mean_cosine"] - 1.0
    # sizes: the .onnx file is what ratios divide; its Linear weights are the two MatMuls'
    size = os.path.getsize(src)
    assert original["file_bytes"] == size and original["ratio"] == 1.0
    assert same["file_bytes"] == os.path.getsize(lossless) and same["ratio"] == size / os.path.getsize(lossless)
    assert original["linear_weights"] == 2 * HIDDEN * INNER and original["linear_bits_per_weight"] == 32.0
    assert q4["linear_bits_per_weight"] < 6


def test_embedding_figures_equal_a_numpy_computation(tiny, capsys):
    src, _, lossy, weights = tiny["encoder"]
    result = _eval_json(capsys, [src, lossy, "--tokenizer", tiny["tokenizer"], "--sentences", tiny["sentences"]])
    tok = tokenizers.Tokenizer.from_file(tiny["tokenizer"])
    sentences = quality.read_sentences(tiny["sentences"])
    decoded = _decoded(lossy)

    def pooled(w):  # each token's hidden state depends on that token alone: padding changes nothing
        return np.stack([numpy_hidden(w, np.array(tok.encode(s).ids)).mean(axis=0) for s in sentences])

    reference, compressed = pooled(weights), pooled(decoded)
    q4 = result["rows"][1]
    assert q4["mean_cosine"] == pytest.approx(quality.mean_cosine(reference, compressed), rel=1e-6)
    assert abs(q4["nn_agreement"] - quality.neighbour_agreement(reference, compressed)) <= 1 / len(sentences)


def test_an_rbe_converted_from_onnx_is_an_original_too(tiny, capsys):
    src, lossless, lossy, _ = tiny["encoder"]
    common = ["--tokenizer", tiny["tokenizer"], "--sentences", tiny["sentences"]]
    by_onnx = _eval_json(capsys, [src, lossy, *common])
    by_rbe = _eval_json(capsys, [lossless, lossy, *common])
    assert by_rbe["rows"][0]["file_bytes"] == os.path.getsize(lossless)
    assert by_rbe["rows"][1]["mean_cosine"] == by_onnx["rows"][1]["mean_cosine"]  # the same embeddings
    assert by_rbe["rows"][1]["nn_agreement"] == by_onnx["rows"][1]["nn_agreement"]
    # ratios divide the dense tensors and the graph: the .onnx file but for protobuf's framing
    reference = os.path.getsize(lossy) * by_rbe["rows"][1]["ratio"]
    assert "dense" in by_rbe["ratio_divides"] and abs(reference - os.path.getsize(src)) < 64


def test_a_tokenizer_the_container_carries_is_used_without_the_option(tiny, capsys, tmp_path):
    src, _, lossy, _ = tiny["encoder"]
    carrying = str(tmp_path / "with-tokenizer.rbe")
    plan = plan_conversion(src)
    with Writer(carrying) as w:  # an .onnx conversion with a tokenizer.json beside its graph
        metadata = plan.add_entries(w, lambda init, read_at: w.add_tensor(init.name, init.dtype, init.shape, read_at))
        with open(tiny["tokenizer"], "rb") as fh:
            w.add_file("tokenizer.json", fh.read())
        w.set_metadata(metadata)
    given = _eval_json(capsys, [src, lossy, "--tokenizer", tiny["tokenizer"], "--sentences", tiny["sentences"]])
    carried = _eval_json(capsys, [carrying, lossy, "--sentences", tiny["sentences"]])
    assert carried["protocol"]["tokenizer"].startswith(carrying)
    assert carried["rows"][1]["mean_cosine"] == given["rows"][1]["mean_cosine"]


def test_progress_goes_to_stderr_results_to_stdout_and_quiet_silences_it(tiny, capsys, monkeypatch):
    from rbe_converters import progress

    monkeypatch.setattr(progress, "LINE_SECONDS", 0.0)  # a line at every step of these short runs
    src, _, lossy, _ = tiny["encoder"]
    argv = ["eval", src, lossy, "--tokenizer", tiny["tokenizer"], "--sentences", tiny["sentences"]]
    capsys.readouterr()
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert f"rbe: eval: scoring {src} (file 1 of 2): " in err and "/40 sentences" in err
    assert f"rbe: eval: scoring {lossy} (file 2 of 2): " in err
    assert out.splitlines()[0].split()[0] == "file" and "eval: scoring" not in out
    assert main([*argv, "--quiet"]) == 0
    quiet_out, quiet_err = capsys.readouterr()
    assert quiet_err == "" and quiet_out.splitlines()[:4] == out.splitlines()[:4]


def test_plot_of_an_onnx_encoder_has_both_figures(tiny, capsys, tmp_path):
    pytest.importorskip("matplotlib", reason="--plot needs matplotlib (the plot extra)")
    src, lossless, lossy, _ = tiny["encoder"]
    plot = tmp_path / "q.png"
    argv = [src, lossless, lossy, "--tokenizer", tiny["tokenizer"], "--sentences", tiny["sentences"]]
    assert main(["eval", *argv, "--plot", str(plot), "--quiet"]) == 0
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from rbe_converters.evaluate.plot import plot_figure

    fig = plot_figure(_eval_json(capsys, argv))
    try:
        ylabels = [ax.get_ylabel() for ax in fig.axes]
        assert sum("cosine" in y for y in ylabels) == 2 and sum("nearest-neighbour" in y for y in ylabels) == 2
        assert "ONNX Runtime" in fig.get_suptitle()
    finally:
        import matplotlib.pyplot as plt

        plt.close(fig)


# -- causal LMs -------------------------------------------------------------------------


def test_perplexity_equals_a_numpy_computation(tiny, capsys):
    src, lossless, lossy, weights = tiny["causal"]
    argv = [src, lossless, lossy, "--tokenizer", tiny["tokenizer"], "--window", "16", "--windows", "3"]
    result = _eval_json(capsys, argv)
    assert result["measure"] == "perplexity" and result["protocol"]["windows"] == 3
    tok = tokenizers.Tokenizer.from_file(tiny["tokenizer"])
    ids = tok.encode(quality.evaluation_text(), add_special_tokens=False).ids
    assert result["protocol"]["tokens"] == len(ids)

    def perplexity(w):
        losses = []
        for k in range(3):
            window = np.array(ids[16 * k : 16 * (k + 1)])
            shifted = numpy_logits(w, window)[:-1]
            shifted = shifted - shifted.max(axis=1, keepdims=True)
            log_softmax = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
            losses.append(-log_softmax[np.arange(15), window[1:]].mean())
        return math.exp(np.mean(losses))

    original, same, q4 = result["rows"]
    assert original["perplexity"] == pytest.approx(perplexity(weights), rel=1e-5)
    assert same["perplexity"] == original["perplexity"] and same["perplexity_change_pct"] == 0.0
    assert q4["perplexity"] == pytest.approx(perplexity(_decoded(lossy)), rel=1e-5)
    assert q4["perplexity"] != original["perplexity"]


# -- errors -----------------------------------------------------------------------------


def _graph_with(tmp_path, change) -> str:
    model, _ = encoder_model(202)
    change(model)
    path = str(tmp_path / "changed.onnx")
    onnx.save(model, path)
    return path


def _extra_input(model):
    model.graph.input.append(onnx.helper.make_tensor_value_info("pixel_values", onnx.TensorProto.FLOAT, [1, 3]))


def _no_hidden_states(model):
    del model.graph.output[0]  # only the pooled [batch, hidden] output is left


@pytest.mark.parametrize(
    "case, code, says",
    [
        ("no tokenizer", 2, "pass --tokenizer tokenizer.json (or a folder holding one)"),
        ("tokenizer missing", 3, "no such file or folder"),
        ("folder without a tokenizer", 3, "holds no tokenizer.json"),
        ("text for an encoder", 2, "--text is for causal LMs"),
        ("sentences for a causal LM", 2, "--sentences is for encoders"),
        ("no graph", 3, "holds no ONNX graph"),
        ("another model", 3, "differ from"),
        ("an input it cannot feed", 2, "'pixel_values'"),
        ("no hidden states", 2, "last_hidden_state"),
        ("too large a vocabulary", 3, "token embedding has"),
        ("missing original", 3, "no such file"),
    ],
)
def test_bad_inputs_are_one_line_errors(tiny, capsys, tmp_path, model_dir, case, code, says):
    src, lossless, lossy, _ = tiny["encoder"]
    causal, causal_lossless, _, _ = tiny["causal"]
    tok = ["--tokenizer", tiny["tokenizer"]]
    argv = {
        "no tokenizer": lambda: [src, lossy],
        "tokenizer missing": lambda: [src, lossy, "--tokenizer", str(tmp_path / "none.json")],
        "folder without a tokenizer": lambda: [src, lossy, "--tokenizer", str(tmp_path)],
        "text for an encoder": lambda: [src, lossy, *tok, "--text", tiny["sentences"]],
        "sentences for a causal LM": lambda: [causal, causal_lossless, *tok, "--sentences", tiny["sentences"]],
        "no graph": lambda: [src, _rbe_without_graph(model_dir[0], tmp_path), *tok],
        "another model": lambda: [src, causal_lossless, *tok],
        "an input it cannot feed": lambda: [_graph_with(tmp_path, _extra_input), lossy, *tok],
        "no hidden states": lambda: [_graph_with(tmp_path, _no_hidden_states), lossy, *tok],
        "too large a vocabulary": lambda: [src, lossy, "--tokenizer", word_tokenizer(tmp_path / "t.json", 400)[0]],
        "missing original": lambda: [str(tmp_path / "none.onnx"), lossy, *tok],
    }[case]()
    capsys.readouterr()
    assert run(["eval", *argv]) == code
    line = one_error_line(capsys)
    assert says in line, line


def _rbe_without_graph(directory: str, tmp_path) -> str:
    out = str(tmp_path / "plain.rbe")
    assert main(["convert", directory, out, "--quiet"]) == 0
    return out


# -- the real model -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def paraphrase(paraphrase_onnx, tmp_path_factory):
    """paraphrase-MiniLM-L3-v2's .onnx, a lossless .rbe of it and a 4-bit one (every 2-D tensor)."""
    root = tmp_path_factory.mktemp("paraphrase")
    lossless, lossy = str(root / "lossless.rbe"), str(root / "int4.rbe")
    assert main(["convert", paraphrase_onnx, lossless, "--quiet"]) == 0
    assert main(["convert", paraphrase_onnx, lossy, "--quiet", "--codec", "gquant(bits=4, group=32)"]) == 0
    return paraphrase_onnx, lossless, lossy


def test_paraphrase_onnx_against_its_lossless_and_4_bit_files(paraphrase, minilm_dir, capsys):
    # paraphrase-MiniLM-L3-v2 has no tokenizer of its own; all-MiniLM-L6-v2's (the same uncased BERT
    # vocabulary of 30522 word pieces) is the one it was trained with.
    src, lossless, lossy = paraphrase
    result = _eval_json(capsys, [src, lossless, lossy, "--tokenizer", minilm_dir])
    assert result["protocol"]["count"] == quality.DEFAULT_SENTENCES  # the HF path's default sentences
    assert result["protocol"]["sentences_sha256"] == quality.fingerprint("\n".join(quality.default_sentences()))
    original, same, q4 = result["rows"]
    assert same["mean_cosine"] == 1.0 and same["nn_agreement"] == 1.0
    assert 0.9 < q4["mean_cosine"] < 1.0 and q4["nn_agreement"] <= 1.0
    assert original["file_bytes"] == os.path.getsize(src) and q4["bits_per_weight"] < 5


def test_paraphrase_onnx_without_a_tokenizer_says_what_to_pass(paraphrase, capsys):
    src, _, lossy = paraphrase
    capsys.readouterr()
    assert run(["eval", src, lossy]) == 2
    line = one_error_line(capsys)
    assert line.startswith(f"rbe: error: {src}: an ONNX model carries no tokenizer") and "--tokenizer" in line
