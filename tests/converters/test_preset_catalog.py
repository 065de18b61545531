"""Presets that explain themselves: levels resolved per model family, names in any case with
suggestions, `rbe presets`' table from the record of a benchmark run, and suggestions for
misspelled commands and options."""

from __future__ import annotations

import copy
import json
import os
import re

import pytest
from tiny_models import one_error_line, run

from bench.preset_record import MODELS, TABLE_PAGE, table_cells, table_environments, table_rows
from rbe_converters.cli import main
from rbe_converters.compress.catalog import (
    NOT_FOR_MODEL,
    NOT_MEASURED,
    catalog,
    catalog_table,
    load_record,
    measured_row,
)
from rbe_converters.compress.recipe import (
    SUITS,
    encoder_variant,
    policy_for_model,
    policy_from_document,
    policy_from_preset,
    preset_name,
    preset_names,
    recipe_fingerprint,
    resolve_preset,
)
from rbe_converters.compress.roles import TensorRole, model_family
from rbeformat import UsageError

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PRESETS = os.path.join(ROOT, "converters", "compress", "presets")
BERT = {"architectures": ["BertModel"], "model_type": "bert", "is_decoder": False}
LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama"}


def _preset_files() -> set[str]:
    return {f[: -len(".toml")] for f in os.listdir(PRESETS) if f.endswith(".toml")}


# -- the model's family decides the recipe of a level ------------------------------------------


@pytest.mark.parametrize(
    "config, kind",
    [
        (BERT, "encoder"),
        ({"model_type": "roberta"}, "encoder"),
        ({"architectures": ["DistilBertForMaskedLM"], "model_type": "distilbert"}, "encoder"),
        ({"architectures": ["SomethingForMaskedLM"], "model_type": "something"}, "encoder"),
        (LLAMA, "decoder"),
        ({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}, "decoder"),
        ({**BERT, "is_decoder": True}, "decoder"),  # BERT set up as a decoder
        ({"model_type": "t5", "is_encoder_decoder": True}, None),
        ({"model_type": "toy", "hidden_size": 64}, None),
        (None, None),
    ],
)
def test_model_family_from_config(config, kind):
    family = model_family(config)
    assert (family.kind if family else None) == kind


def test_levels_with_an_encoder_recipe_resolve_to_it_on_encoders_only():
    assert {n for n in preset_names() if encoder_variant(n)} == {"q4", "q3", "q2"}
    assert resolve_preset("q4", "encoder") == "encoder-q4" and resolve_preset("Q3", "encoder") == "encoder-q3"
    assert resolve_preset("q2", "encoder") == "encoder-q2"
    for level in ("q5", "q6", "q8", "q4-small", "encoder-q4"):
        assert resolve_preset(level, "encoder") == level  # no encoder recipe: the level's own
    for kind in ("decoder", None):
        assert resolve_preset("q4", kind) == "q4"


def test_policy_for_model_names_the_recipe_and_reads_config_only_for_such_levels():
    policy, line = policy_for_model(policy_from_preset("Q4"), lambda: BERT)
    assert policy.preset == "encoder-q4" and policy.budget_sensitivity == "model"
    assert line == "rbe: preset q4 -> encoder-q4 for a BertModel encoder"
    policy, line = policy_for_model(policy_from_preset("q4"), lambda: LLAMA)
    assert policy.preset == "q4" and line is None

    def no_config():
        raise AssertionError("config.json read for a preset without an encoder recipe")

    for name in ("q8", "q5", "encoder-q4"):
        policy, line = policy_for_model(policy_from_preset(name), no_config)
        assert policy.preset == name and line is None
    recipe = policy_from_document({"rule": [{"match": "*", "codec": "gquant()"}]}, "r")
    assert policy_for_model(recipe, no_config) == (recipe, None)  # a recipe file is never swapped


def test_the_q4_recipe_is_what_made_an_encoder_file_large():
    """Half of all-MiniLM-L6-v2's weights are its word embeddings: q4 gives them 6 bits, encoder-q4 3 to 6
    by the model's drift within a budget of 4.36 stored bits."""
    q4, encoder = policy_from_preset("q4"), policy_from_preset("encoder-q4")
    for policy, bits in ((q4, [6]), (encoder, [3, 3, 4, 4, 5, 6])):
        rule = policy.choose_rule(
            "embeddings.word_embeddings.weight", "F32", (30522, 384), TensorRole("token_embedding", None, True, 6)
        )
        assert [c.codec.bits for c in (rule.chain, *rule.upgrades)] == bits
    assert encoder.budget_counts == "stored" and encoder.budget_bits < 4.6


# -- names -------------------------------------------------------------------------------------


def test_preset_names_are_case_insensitive():
    assert preset_name("Q4") == "q4" and preset_name("ENCODER-Q4") == "encoder-q4"
    assert policy_from_preset("Q4-Small").preset == "q4-small"


@pytest.mark.parametrize(
    "typed, guess",
    [
        ("q44", "'q4'"),
        ("encoder_q4", "'encoder-q4'"),
        ("lossles", "'lossless'"),
        ("Q9", "'q8'?)"),
        ("q1", "'q2'?)"),
        ("q7", "'q6' or 'q8'?)"),
        ("encoder-q6", "'encoder-q4'?)"),
        ("minilm", "'minilm-layerwise'?)"),
        ("encoder", "'encoder-q2' or 'encoder-q3' or 'encoder-q4'?)"),
    ],
)
def test_an_unknown_preset_suggests_the_closest(typed, guess):
    with pytest.raises(UsageError) as exc:
        preset_name(typed)
    message = str(exc.value)
    assert f"unknown preset {typed!r} (did you mean {guess}" in message and "available: " in message
    assert "\n" not in message


# -- suggestions on the command line ---------------------------------------------------------------


@pytest.mark.parametrize(
    "argv, wanted",
    [
        (["conver", "a", "b"], "invalid choice: 'conver'; did you mean 'convert'?"),
        (["convert", "a", "b", "--presett", "q4"], "unrecognized arguments: --presett q4 (did you mean '--preset'?)"),
        (["convert", "a", "b", "--presett=q4"], "(did you mean '--preset'?)"),
        (["convert", "a", "b", "--lossless", "ra"], "invalid choice: 'ra'; did you mean 'raw'?"),
        (["presets", "--jsno"], "unrecognized arguments: --jsno (did you mean '--json'?)"),
        (["info", "f.rbe", "--jsn"], "(did you mean '--json'?)"),
        (["convert", "a", "b", "--lossles", "raw"], "(did you mean '--lossless'?)"),  # no prefix taken
        (["info", "f.rbe", "--summ"], "(did you mean '--summary'?)"),
    ],
)
def test_misspelled_commands_options_and_choices_get_a_suggestion(argv, wanted, capsys):
    assert run(argv) == 2
    line = one_error_line(capsys)
    assert wanted in line, line


def test_arguments_nothing_resembles_get_no_guess(capsys):
    assert run(["convert", "a", "b", "--zzzzzzzz"]) == 2
    line = one_error_line(capsys)
    assert "unrecognized arguments: --zzzzzzzz" in line and "did you mean" not in line
    assert run(["xyzzy"]) == 2
    assert "did you mean" not in one_error_line(capsys)


# -- rbe presets ---------------------------------------------------------------------------------


def test_every_preset_says_what_it_suits():
    for name in preset_names():
        assert policy_from_preset(name).suits in SUITS
    assert {n for n in preset_names() if policy_from_preset(n).suits == "encoders"} >= {
        "encoder-q4",
        "encoder-q3",
        "encoder-q2",
        "minilm-layerwise",
    }
    with pytest.raises(UsageError, match="'suits' must be one of"):
        policy_from_document({"suits": "llms"}, "r")


def test_rbe_presets_prints_a_row_for_every_preset_file(capsys):
    assert main(["presets"]) == 0
    lines = capsys.readouterr().out.splitlines()
    table = lines[2 : lines.index("")]
    assert [line.split()[0] for line in table] == [e.name for e in catalog()]
    assert {line.split()[0] for line in table} == _preset_files()
    assert table[:7] == [t for t in table if t.split()[0] in ("lossless", "q8", "q6", "q5", "q4", "q3", "q2")]
    q4 = next(line for line in table if line.startswith("q4 "))
    assert "(encoders: encoder-q4)" in q4 and " yes " in q4
    assert next(line for line in table if line.startswith("q8 ")).split()[2] == "no"
    assert "hf extra" in lines[1]


def test_rbe_presets_json_has_every_preset_and_its_measurements(capsys):
    assert main(["presets", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    entries = {p["name"]: p for p in doc["presets"]}
    assert set(entries) == _preset_files()
    assert entries["q4"]["needs_extra"] == "hf" and entries["q8"]["needs_extra"] is None
    assert entries["q4"]["encoder_recipe"] == "encoder-q4"
    minilm_q4 = entries["q4"]["measured"]["minilm"]
    assert minilm_q4["recipe"] == "encoder-q4" and minilm_q4["file_bpw"] <= 4.6  # the encoder recipe's row
    assert entries["q4"]["measured"]["smollm2"]["recipe"] == "q4"
    assert entries["encoder-q4"]["measured"]["smollm2"] is None  # not run on a causal LM


def test_a_recipe_changed_since_the_run_is_not_yet_measured():
    record = copy.deepcopy(load_record())
    row = next(r for r in record["rows"] if (r["model"], r["preset"]) == ("smollm2", "q6"))
    assert measured_row(record, "smollm2", "q6") is row
    row["recipe_fingerprint"] = "0" * 64  # what the run measured is not what q6 holds now
    assert measured_row(record, "smollm2", "q6") is None
    entries = catalog(record)
    line = next(x for x in catalog_table(entries, record).splitlines() if x.startswith("q6 "))
    assert NOT_MEASURED in line and f"{row['file_bpw']:.3f}" not in line.split(NOT_MEASURED)[0]


def test_an_encoder_preset_on_a_decoder_says_it_is_not_for_that_model():
    record = load_record()
    table = catalog_table(catalog(record), record).splitlines()
    line = next(x for x in table if x.startswith("encoder-q4 "))
    decoder_first = list(record["models"].values())[0]["family"] == "decoder"
    assert decoder_first and line.split("yes", 1)[1].strip().startswith(NOT_FOR_MODEL)
    assert NOT_MEASURED not in line


def test_a_measurement_counts_only_for_the_recipe_it_was_taken_on():
    record = load_record()
    for model, meta in record["models"].items():
        for name in preset_names():
            row = measured_row(record, model, name)
            if row is not None:
                recipe = resolve_preset(name, meta["family"])
                assert row["recipe"] == recipe and row["recipe_fingerprint"] == recipe_fingerprint(recipe)
    assert measured_row(record, "minilm", "q4")["recipe"] == "encoder-q4"  # what q4 runs on an encoder
    # A row of the generic q4 recipe on the encoder (an older run's) never stands for q4 there.
    generic = {**next(r for r in record["rows"] if (r["model"], r["preset"]) == ("smollm2", "q4")), "model": "minilm"}
    encoder_rows = [r for r in record["rows"] if r["model"] == "minilm" and r["recipe"] == "encoder-q4"]
    older = {**record, "rows": [r for r in record["rows"] if r not in encoder_rows] + [generic]}
    assert measured_row(older, "minilm", "q4") is None


def test_fingerprints_ignore_comments_and_descriptions_only():
    assert recipe_fingerprint("Q4") == recipe_fingerprint("q4") != recipe_fingerprint("q4-small")
    assert len({recipe_fingerprint(n) for n in preset_names()}) == len(preset_names())


# -- the record and the docs table say the same ---------------------------------------------------


def _prints_as(recorded, text: str) -> bool:
    """Whether a recorded number prints as the docs table's cell text: within half a unit of its last digit."""
    digits = len(text.split(".")[1]) if "." in text else 0
    return recorded is not None and abs(recorded - float(text)) <= 0.5 * 10**-digits + 1e-9


def _check_row(row: dict, cells: list[str]) -> None:
    _, _, linear, file_bpw, size, ratio, quality, exact, encode = cells
    assert _prints_as(row["linear_bpw"], linear) and _prints_as(row["file_bpw"], file_bpw), cells
    assert _prints_as(row["file_mb"], size.removesuffix(" MB")) and _prints_as(row["ratio"], ratio), cells
    numbers = re.findall(r"[+-]?\d+(?:\.\d+)?", quality)  # in the order the record's scores hold them
    scores = dict(row["scores"])
    if quality.endswith("(unusable)"):  # the perplexity alone: its change, in the thousands of %, says no more
        scores.pop("perplexity_change_pct", None)
    assert len(numbers) == len(scores), (cells, row["scores"])
    for value, text in zip(scores.values(), numbers):
        assert _prints_as(value, text), (cells, row["scores"])
    if exact:
        assert _prints_as(100 * row["exact_share"], exact.removesuffix("%")), cells
    amount, unit = encode.rstrip("*").split()
    assert _prints_as(row["encode_s"] / (60 if unit == "min" else 1), amount), cells
    assert bool(row["encode_note"]) == encode.endswith("*"), cells


def test_the_record_holds_the_docs_measured_presets_table():
    """The docs table (docs/measurements.md) and the record rbe presets prints cannot drift apart: the
    same rows, each number of the record printing as the table prints it, and the line above the table
    naming each model's environment as the record holds it.  Read back cell by cell, independently of
    bench.readme_tables, which writes the table."""
    with open(TABLE_PAGE, encoding="utf-8") as fh:
        text = fh.read()
    record = load_record()
    recorded = {(r["model"], r["preset"]): r for r in record["rows"]}
    printed = table_rows(text)
    assert [(r["model"], r["preset"]) for r in printed] == list(recorded)
    for row, cells in zip(printed, table_cells(text)):
        _check_row(recorded[row["model"], row["preset"]], cells)
    assert set(record["models"]) == set(MODELS)
    environments = table_environments(text)
    for key, model in record["models"].items():
        assert environments[key] == {k: model["environment"].get(k) for k in environments[key]}, key


def test_a_wheel_carries_the_record():
    import fnmatch
    import tomllib

    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as fh:
        data = tomllib.load(fh)["tool"]["setuptools"]["package-data"]["rbe_converters.compress"]
    assert any(fnmatch.fnmatch("presets/measured.json", pattern) for pattern in data)
    assert os.path.isfile(os.path.join(PRESETS, "measured.json"))
