"""`rbe eval` and the measurement protocols of rbe_converters.evaluate.quality.

Small randomly initialised Llama and BERT models (built here with transformers,
with a word-level tokenizer) cover the table, --json, --plot and the errors
quickly; the real checkpoints check the numbers.
"""

from __future__ import annotations

import json
import math
import os
import sys

import pytest
from tiny_models import common_words, one_error_line, run, word_tokenizer  # noqa: F401  (shared with other test modules)

from rbe_converters.cli import main
from rbe_converters.evaluate import quality
from rbe_converters.evaluate.eval import Sizes, linear_weights
from rbe_converters.evaluate.plot import check_plot_target, plot_figure
from rbeformat import UsageError

# -- the texts ------------------------------------------------------------------------


def test_calibration_and_evaluation_texts_split_the_topic_text_without_overlap():
    whole, calibration, evaluation = quality.topic_text(), quality.calibration_text(), quality.evaluation_text()
    assert calibration + "\n\n" + evaluation == whole  # together: the whole text, each character once
    assert len(calibration) + 2 + len(evaluation) == len(whole)
    # The cut is the first paragraph boundary at or after the middle character.
    middle = len(whole) // 2
    assert len(calibration) >= middle and "\n\n" not in whole[middle : len(calibration) + 1]
    assert len(evaluation) > len(whole) // 3


def test_default_sentences_come_from_the_evaluation_text():
    sentences = quality.default_sentences()
    assert len(sentences) == quality.DEFAULT_SENTENCES == len(set(sentences))
    evaluation = " ".join(quality.evaluation_text().split())
    for sentence in sentences:
        assert 5 <= len(sentence.split()) <= 40 and sentence[-1] in ".!?", sentence
        assert sentence in evaluation
    # Spread over the whole part, not its first topics only.
    assert evaluation.index(sentences[-1]) > len(evaluation) * 0.8


def test_sentences_of_skips_headings_and_keeps_each_sentence_once():
    text = (
        "Numbers\n*******\n\nThere are three kinds of numbers here. Short one.\n\n"
        "There are three kinds of numbers here. Each kind has its own literal syntax in the language?"
    )
    assert quality.sentences_of(text) == [
        "There are three kinds of numbers here.",
        "Each kind has its own literal syntax in the language?",
    ]


def test_windows_are_consecutive_and_refuse_too_few_tokens():
    ids = list(range(10))
    assert quality.windows(ids, 4, 2) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    with pytest.raises(ValueError):
        quality.windows(ids, 4, 3)


def test_neighbour_agreement_and_cosine():
    torch = pytest.importorskip("torch")
    a = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    assert quality.nearest_neighbours(a) == [1, 0, 3, 2]
    swapped = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.9, 0.1], [0.1, 0.9]])  # rows 1 and 2 trade places
    assert quality.neighbour_agreement(a, swapped) == 0.0
    assert quality.neighbour_agreement(a, 3 * a) == 1.0
    assert quality.mean_cosine(a, 3 * a) == pytest.approx(1.0)
    assert quality.mean_cosine(a, swapped) < 0.9


def test_linear_weights_leave_out_embeddings_heads_norms_and_biases():
    shapes = {
        "model.layers.0.self_attn.q_proj.weight": (64, 64),
        "encoder.layer.0.attention.self.query.weight": (64, 64),
        "transformer.h.0.attn.c_attn.weight": (64, 192),
        "model.embed_tokens.weight": (100, 64),
        "lm_head.weight": (100, 64),
        "transformer.wte.weight": (100, 64),
        "embeddings.position_embeddings.weight": (32, 64),
        "model.norm.weight": (64,),
        "model.layers.0.mlp.up_proj.bias": (64,),
    }
    sizes = Sizes(file_bytes=0, tensors={name: ("F32", shape, 4 * math.prod(shape)) for name, shape in shapes.items()})
    config = {"hidden_size": 64, "vocab_size": 100, "max_position_embeddings": 32}
    assert linear_weights(sizes, config) == set(list(shapes)[:3])


def test_size_row_counts_the_stored_bytes_of_linear_weights_only():
    sizes = Sizes(file_bytes=1000, tensors={"a.weight": ("F32", (10, 10), 50), "emb.weight": ("F32", (10, 10), 400)})
    row = sizes.row(reference_bytes=4000, linear={"a.weight"})
    assert row["ratio"] == 4.0 and row["bits_per_weight"] == 8 * 1000 / 200
    assert row["linear_bits_per_weight"] == 4.0 and row["linear_weights"] == 100 and row["weights"] == 200


def test_missing_torch_is_a_usage_error_naming_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import fails as if it were not installed
    with pytest.raises(UsageError, match=r"rbe\[hf\]"):
        quality.require_torch()


def test_without_the_models_extra_or_matplotlib_the_models_extra_is_named_first(monkeypatch, tmp_path, capsys):
    import numpy as np

    from rbeformat import save_file

    compressed = str(tmp_path / "c.rbe")
    save_file({"w": np.zeros((4, 4), np.float32)}, compressed)
    for module in ("torch", "transformers", "matplotlib"):
        monkeypatch.setitem(sys.modules, module, None)  # import fails as if it were not installed
    assert main(["eval", str(tmp_path), compressed, "--plot", str(tmp_path / "q.png")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install 'rbe[hf]'" in err, err


def test_plot_without_matplotlib_names_the_plot_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(UsageError) as caught:
        check_plot_target(str(tmp_path / "q.png"), force=False)
    assert str(caught.value) == "rbe eval --plot needs matplotlib, which is not installed: pip install 'rbe[plot]'"


@pytest.mark.parametrize(
    ("name", "suggested"), [("q.txt", "q.png"), ("q.rbe", "q.png"), ("q", "q.png"), ("q.svg", "q.png")]
)
def test_a_plot_name_that_is_not_png_is_refused_with_the_png_name(tmp_path, name, suggested):
    with pytest.raises(UsageError) as caught:
        check_plot_target(str(tmp_path / name), force=False)
    assert str(caught.value).startswith("--plot writes a PNG image: name it .png")
    assert f"(e.g. {tmp_path / suggested})" in str(caught.value)
    assert not (tmp_path / name).exists()


def test_a_plot_name_in_capitals_is_a_png_name(tmp_path):
    pytest.importorskip("matplotlib", reason="--plot needs matplotlib (the plot extra)")
    check_plot_target(str(tmp_path / "Q.PNG"), force=False)  # no error


# -- small models built here --------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Small Llama and BERT directories, each with a lossless and a 4-bit .rbe file."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    root = tmp_path_factory.mktemp("tiny")
    tokenizer = word_tokenizer(common_words(200))
    vocab = len(tokenizer)
    torch.manual_seed(0)
    built = {
        "llama": transformers.LlamaForCausalLM(
            transformers.LlamaConfig(
                vocab_size=vocab,
                hidden_size=64,
                intermediate_size=128,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                max_position_embeddings=64,
                tie_word_embeddings=False,
            )
        ),
        "bert": transformers.BertModel(
            transformers.BertConfig(
                vocab_size=vocab,
                hidden_size=64,
                intermediate_size=128,
                num_hidden_layers=2,
                num_attention_heads=4,
                max_position_embeddings=64,
            )
        ),
    }
    paths = {}
    for name, model in built.items():
        directory = str(root / name)
        model.save_pretrained(directory)
        tokenizer.save_pretrained(directory)
        lossless, lossy = str(root / f"{name}-lossless.rbe"), str(root / f"{name}-q4.rbe")
        assert main(["convert", directory, lossless, "--quiet"]) == 0
        assert main(["convert", directory, lossy, "--quiet", "--codec", "gquant(bits=4, group=32)"]) == 0
        paths[name] = (directory, lossless, lossy)
    sentences = root / "sentences.txt"
    sentences.write_text("\n".join(quality.default_sentences(24)) + "\n")
    paths["sentences"] = str(sentences)
    return paths


def _eval_json(capsys, argv: list[str]) -> dict:
    capsys.readouterr()
    assert main(["eval", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_eval_causal_lm_json_reports_sizes_bits_and_perplexity(tiny, capsys):
    directory, lossless, lossy = tiny["llama"]
    result = _eval_json(capsys, [directory, lossless, lossy, "--window", "16", "--windows", "3"])
    assert result["measure"] == "perplexity"
    protocol = result["protocol"]
    assert (protocol["window"], protocol["windows"], protocol["stride"]) == (16, 3, 16)
    assert protocol["text_sha256"] == quality.fingerprint(quality.evaluation_text())
    original, same, q4 = result["rows"]
    assert [r["role"] for r in result["rows"]] == ["original", "compressed", "compressed"]
    st_bytes = os.path.getsize(os.path.join(directory, "model.safetensors"))
    assert original["file_bytes"] == st_bytes and original["ratio"] == 1.0
    assert original["linear_bits_per_weight"] == 32.0
    for row, path in ((same, lossless), (q4, lossy)):
        size = os.path.getsize(path)
        assert row["file_bytes"] == size and row["ratio"] == pytest.approx(st_bytes / size)
        assert row["bits_per_weight"] == pytest.approx(8 * size / original["weights"])
    assert same["perplexity"] == original["perplexity"] and same["perplexity_change_pct"] == 0.0
    assert q4["linear_bits_per_weight"] < 6 < 32 / 1.2 < same["linear_bits_per_weight"] * 1.3
    assert q4["perplexity_change_pct"] == pytest.approx(100 * (q4["perplexity"] / original["perplexity"] - 1))
    assert q4["perplexity"] != original["perplexity"]


def test_eval_table_prints_every_column_and_the_window_protocol(tiny, capsys):
    directory, lossless, lossy = tiny["llama"]
    capsys.readouterr()
    assert main(["eval", directory, lossy, "--window", "16", "--windows", "2"]) == 0
    out = capsys.readouterr().out
    head = out.splitlines()[0].split()
    for column in ("file", "size", "ratio", "bits/w", "Linear", "perplexity", "change"):
        assert column in head
    assert f"{directory} (original)" in out and lossy in out
    assert "2 windows of 16 tokens, stride 16" in out
    assert quality.fingerprint(quality.evaluation_text()) in out


def test_windows_default_to_as_many_as_the_text_holds(tiny, capsys, tmp_path):
    directory, lossless, _ = tiny["llama"]
    text = tmp_path / "short.txt"
    text.write_text(" ".join(common_words(50)))  # about 50 tokens: 3 windows of 16, not the default 16
    result = _eval_json(capsys, [directory, lossless, "--text", str(text), "--window", "16"])
    assert 48 <= result["protocol"]["tokens"] < 64 and result["protocol"]["windows"] == 3
    assert result["protocol"]["text"] == str(text)
    assert result["protocol"]["text_sha256"] == quality.fingerprint(text.read_text())


def test_eval_encoder_reports_cosine_and_neighbour_agreement(tiny, capsys):
    directory, lossless, lossy = tiny["bert"]
    result = _eval_json(capsys, [directory, lossless, lossy, "--sentences", tiny["sentences"]])
    assert result["measure"] == "embeddings" and result["protocol"]["count"] == 24
    original, same, q4 = result["rows"]
    for row in (original, same):
        assert row["mean_cosine"] == pytest.approx(1.0, abs=1e-6) and row["nn_agreement"] == 1.0
    assert q4["mean_cosine"] < 1 - 1e-4
    assert q4["cosine_change"] == pytest.approx(q4["mean_cosine"] - 1.0)
    assert 0 <= q4["nn_agreement"] <= 1 and "linear_bits_per_weight" in q4


def test_eval_plot_writes_a_png_with_a_panel_per_figure(tiny, capsys, tmp_path):
    pytest.importorskip("matplotlib", reason="--plot needs matplotlib (the plot extra)")
    directory, lossless, lossy = tiny["bert"]
    plot = tmp_path / "q.png"
    argv = [directory, lossless, lossy, "--sentences", tiny["sentences"]]
    assert main(["eval", *argv, "--plot", str(plot), "--quiet"]) == 0
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    captured = capsys.readouterr()
    assert captured.out.splitlines()[-1] == f"wrote {plot}"  # the table, then where the plot is
    assert "drawing" not in captured.err  # --quiet
    assert main(["eval", *argv, "--plot", str(plot), "--force"]) == 0
    assert capsys.readouterr().err.splitlines()[-1] == f"rbe: eval: drawing {plot}"  # its seconds are said
    assert run(["eval", directory, lossy, "--sentences", tiny["sentences"], "--plot", str(plot)]) == 4
    assert "--force" in one_error_line(capsys)
    result = _eval_json(capsys, argv)
    fig = plot_figure(result)
    try:
        labels = [(ax.get_ylabel(), ax.get_xlabel()) for ax in fig.axes]
        assert len(labels) == 4  # cosine and NN agreement, each against both bits per weight
        assert sum("cosine" in y for y, _ in labels) == 2 and sum("nearest-neighbour" in y for y, _ in labels) == 2
        assert sum("Linear" in x for _, x in labels) == 2
        for ax in fig.axes:
            assert len(ax.collections) == 3  # one point per file
        # one legend entry per file, with the figures the panels show: no text beside the points
        (legend,) = fig.legends
        entries = [t.get_text() for t in legend.get_texts()]
        assert len(entries) == 3 and entries[0].startswith(f"{directory} (original): cosine 1.0000, NN 1.000")
        q4 = result["rows"][2]
        assert entries[2].startswith(f"{lossy}: cosine {q4['mean_cosine']:.4f}, NN {q4['nn_agreement']:.3f}")
        assert not any(ax.texts for ax in fig.axes)
        markers = {tuple(ax.collections[k].get_facecolor()[0]) for ax in fig.axes[:1] for k in range(3)}
        assert len(markers) == 3  # told apart by colour
    finally:
        import matplotlib.pyplot as plt

        plt.close(fig)


def test_eval_plot_of_a_causal_lm_has_perplexity_panels(tiny, capsys):
    pytest.importorskip("matplotlib", reason="--plot needs matplotlib (the plot extra)")
    directory, lossless, lossy = tiny["llama"]
    fig = plot_figure(_eval_json(capsys, [directory, lossless, lossy, "--window", "16", "--windows", "2"]))
    try:
        assert [ax.get_ylabel() for ax in fig.axes] == ["perplexity (lower is better)"] * 2
    finally:
        import matplotlib.pyplot as plt

        plt.close(fig)


def test_eval_shows_progress_on_stderr_and_none_with_quiet(tiny, capsys, monkeypatch):
    from rbe_converters import progress

    monkeypatch.setattr(progress, "LINE_SECONDS", 0.0)  # a line at every step of these short runs
    directory, lossless, lossy = tiny["bert"]
    capsys.readouterr()
    assert main(["eval", directory, lossy, "--sentences", tiny["sentences"]]) == 0
    out, err = capsys.readouterr()
    assert f"rbe: eval: scoring {lossy} (file 2 of 2): " in err and "/24 sentences" in err  # a log: lines
    assert f"rbe: eval: scoring {directory} (file 1 of 2): " in err
    assert "eval: scoring" not in out and out.splitlines()[0].split()[0] == "file"  # results on stdout only
    assert main(["eval", directory, lossy, "--sentences", tiny["sentences"], "--quiet"]) == 0
    quiet_out, quiet_err = capsys.readouterr()
    assert quiet_err == "" and quiet_out.splitlines()[:4] == out.splitlines()[:4]


@pytest.mark.slow
def test_eval_accepts_a_safetensors_file_or_an_rbe_as_the_original(tiny, capsys):
    directory, lossless, lossy = tiny["llama"]
    by_dir = _eval_json(capsys, [directory, lossy, "--window", "16", "--windows", "2"])
    by_file = _eval_json(
        capsys, [os.path.join(directory, "model.safetensors"), lossy, "--window", "16", "--windows", "2"]
    )
    by_rbe = _eval_json(capsys, [lossless, lossy, "--window", "16", "--windows", "2"])
    assert by_dir["rows"][0]["perplexity"] == by_file["rows"][0]["perplexity"] == by_rbe["rows"][0]["perplexity"]
    assert by_dir["rows"][1]["perplexity"] == by_rbe["rows"][1]["perplexity"]
    assert by_rbe["rows"][0]["file_bytes"] == os.path.getsize(lossless)


def test_a_container_of_the_weights_alone_borrows_the_originals_config(tiny, capsys, tmp_path):
    directory, _, _ = tiny["llama"]
    bare = str(tmp_path / "bare.rbe")  # converted from the .safetensors file: no config, no tokenizer
    assert main(["convert", os.path.join(directory, "model.safetensors"), bare, "--quiet"]) == 0
    result = _eval_json(capsys, [directory, bare, "--window", "16", "--windows", "2"])
    assert result["rows"][1]["perplexity"] == result["rows"][0]["perplexity"]
    assert run(["eval", bare, bare]) == 3
    assert "holds no config.json" in one_error_line(capsys)


@pytest.mark.parametrize(
    "case, code, says",
    [
        ("missing original", 3, "No such file"),
        ("missing compressed", 3, "No such file"),
        ("not an rbe", 3, "not an rbe file"),
        ("another model", 3, "holds other tensors"),
        ("text too short", 3, "fewer than one window"),
        ("window of one token", 2, "--window"),
        ("sentences for a causal LM", 2, "--sentences is for encoders"),
        ("text for an encoder", 2, "--text"),
        ("tokenizer for a model directory", 2, "--tokenizer is for ONNX models"),
    ],
)
def test_eval_bad_inputs_are_one_line_errors(tiny, capsys, tmp_path, case, code, says):
    llama, llama_lossless, _ = tiny["llama"]
    bert, bert_lossless, _ = tiny["bert"]
    short = tmp_path / "short.txt"
    short.write_text("a few words only")
    argv = {
        "missing original": [str(tmp_path / "nothing"), llama_lossless],
        "missing compressed": [llama, str(tmp_path / "nothing.rbe")],
        "not an rbe": [llama, os.path.join(llama, "config.json")],
        "another model": [llama, bert_lossless],
        "text too short": [llama, llama_lossless, "--text", str(short)],
        "window of one token": [llama, llama_lossless, "--window", "1"],
        "sentences for a causal LM": [llama, llama_lossless, "--sentences", tiny["sentences"]],
        "text for an encoder": [bert, bert_lossless, "--text", str(short)],
        "tokenizer for a model directory": [bert, bert_lossless, "--tokenizer", os.path.join(bert, "tokenizer.json")],
    }[case]
    capsys.readouterr()
    assert run(["eval", *argv]) == code
    line = one_error_line(capsys)
    assert says in line, line
    if case == "another model":
        assert line.startswith(f"rbe: error: {bert_lossless}: ")  # names the file at fault
    if case == "text too short":
        assert str(short) in line


# -- real checkpoints ---------------------------------------------------------------


def _plain_perplexity(model_dir: str, tokenizer, window: int, count: int) -> float:
    """Perplexity written out with transformers alone, as a user would check rbe eval's number."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = tokenizer(quality.evaluation_text(), add_special_tokens=False, return_tensors="pt").input_ids[0]
    losses = []
    with torch.no_grad():
        for k in range(count):
            chunk = ids[k * window : (k + 1) * window].unsqueeze(0)
            logits = model(input_ids=chunk).logits[0, :-1]
            losses.append(torch.nn.functional.cross_entropy(logits, chunk[0, 1:]).item())
    return math.exp(sum(losses) / count)


SMOLLM2_LINEAR_RECIPE = """
[[rule]]
match = "model.layers.*_proj.weight"
ndim = 2
codec = "gquant(bits=4, group=64, mode=asym)"
"""


@pytest.mark.slow
def test_eval_perplexity_equals_a_plain_transformers_loop(smollm2_dir, tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    recipe, lossy, back = tmp_path / "linear.toml", str(tmp_path / "q.rbe"), str(tmp_path / "back")
    recipe.write_text(SMOLLM2_LINEAR_RECIPE)
    assert main(["convert", smollm2_dir, lossy, "--quiet", "--recipe", str(recipe)]) == 0
    result = _eval_json(capsys, [smollm2_dir, lossy, "--window", "256", "--windows", "2"])
    assert main(["decode", lossy, back, "--quiet"]) == 0
    tokenizer = transformers.AutoTokenizer.from_pretrained(smollm2_dir)
    for row, model_dir in zip(result["rows"], (smollm2_dir, back)):
        assert row["perplexity"] == pytest.approx(_plain_perplexity(model_dir, tokenizer, 256, 2), rel=1e-3)
    assert result["rows"][1]["perplexity"] > result["rows"][0]["perplexity"]


@pytest.mark.slow
def test_eval_minilm_cosine_is_one_lossless_and_below_one_at_4_bits(minilm_dir, tmp_path, capsys):
    pytest.importorskip("transformers")
    lossless, lossy = str(tmp_path / "m.rbe"), str(tmp_path / "q4.rbe")
    assert main(["convert", minilm_dir, lossless, "--quiet"]) == 0
    assert main(["convert", minilm_dir, lossy, "--quiet", "--codec", "gquant(bits=4, group=32)"]) == 0
    sentences = tmp_path / "sentences.txt"
    sentences.write_text("\n".join(quality.default_sentences(64)) + "\n")
    result = _eval_json(capsys, [minilm_dir, lossless, lossy, "--sentences", str(sentences)])
    _, same, q4 = result["rows"]
    assert same["mean_cosine"] == pytest.approx(1.0, abs=1e-6) and same["nn_agreement"] == 1.0
    assert q4["mean_cosine"] < 0.999 and q4["nn_agreement"] <= 1.0
    assert q4["bits_per_weight"] < 5 and q4["ratio"] > 6
