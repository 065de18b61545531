"""Numbers that reproduce: the docs' generated tables are what their committed records give
(bench/readme_tables.py), and the record names the machine and versions it was measured with."""

from __future__ import annotations

import os
import shutil

import pytest

from bench import readme_tables
from bench.preset_record import ENVIRONMENT, environment_from_line, environment_line, run_environment

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGE = os.path.join("docs", "measurements.md")


def test_the_docs_tables_are_what_their_records_give(capsys):
    """The check CI runs: editing the docs table by hand, or the record without regenerating, fails here."""
    assert readme_tables.main(["--check"]) == 0, capsys.readouterr().out


@pytest.fixture
def copy_root(tmp_path):
    """A copy of the pages with generated tables, to edit."""
    (tmp_path / "docs").mkdir()
    shutil.copy(os.path.join(ROOT, PAGE), tmp_path / PAGE)
    return tmp_path


def test_a_number_edited_by_hand_fails_the_check_and_regenerating_restores_it(copy_root, capsys):
    page = copy_root / PAGE
    original = page.read_text(encoding="utf-8")
    row = next(line for line in original.splitlines() if line.startswith("| SmolLM2-135M | q4 |"))
    page.write_text(original.replace(row, row.replace("4.466", "4.4")), encoding="utf-8")
    assert readme_tables.main(["--check", "--root", str(copy_root)]) == 1
    out, err = capsys.readouterr()
    assert f"-{row.replace('4.466', '4.4')}" in out and f"+{row}" in out  # the diff, from the record
    assert "differ from the record" in err
    assert readme_tables.main(["--root", str(copy_root)]) == 0
    assert page.read_text(encoding="utf-8") == original


def test_regenerating_leaves_everything_outside_the_markers(copy_root):
    page = copy_root / PAGE
    text = page.read_text(encoding="utf-8")
    begin = readme_tables.begin_marker("presets")
    head, rest = text.split(begin, 1)
    block, tail = rest.split(readme_tables.END, 1)
    page.write_text(head + "Prose a person wrote.\n" + begin + "\n(stale)\n" + readme_tables.END + tail, "utf-8")
    assert readme_tables.main(["--root", str(copy_root)]) == 0
    assert (
        page.read_text(encoding="utf-8") == head + "Prose a person wrote.\n" + begin + block + readme_tables.END + tail
    )


@pytest.mark.parametrize("damage", ["no begin marker", "no end marker", "two tables"])
def test_a_page_without_its_markers_is_an_error(copy_root, damage, capsys):
    page = copy_root / PAGE
    text = page.read_text(encoding="utf-8")
    begin = readme_tables.begin_marker("presets")
    damaged = {
        "no begin marker": text.replace(begin, ""),
        "no end marker": text.replace(readme_tables.END, ""),
        "two tables": text + "\n" + begin + "\n" + readme_tables.END + "\n",
    }[damage]
    page.write_text(damaged, encoding="utf-8")
    assert readme_tables.main(["--check", "--root", str(copy_root)]) == 2
    assert readme_tables.main(["--root", str(copy_root)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("bench.readme_tables: error: docs/measurements.md: ")
    assert page.read_text(encoding="utf-8") == damaged  # nothing written


# -- how the presets table prints a record ----------------------------------------------------------

ENV = {"cpu_count": 16, "python": "3.11.9", "torch": "2.13.0", "transformers": "4.57.1", "device": "CPU",
       "dtype": "float32", "date": "2027-01-02"}  # fmt: skip


def _row(model, preset, recipe, scores, exact=None, encode_s=30.0, note=""):
    return {
        "model": model,
        "preset": preset,
        "recipe": recipe,
        "linear_bpw": 4.46649,
        "file_bpw": 4.9,
        "file_mb": 82.34,
        "ratio": 6.5,
        "scores": scores,
        "exact_share": exact,
        "encode_s": encode_s,
        "encode_note": note,
    }


def test_the_presets_table_prints_each_number_as_the_docs_do():
    record = {
        "models": {
            "smollm2": {"name": "SmolLM2-135M", "family": "decoder", "environment": ENV},
            "minilm": {"name": "all-MiniLM-L6-v2", "family": "encoder", "environment": {**ENV, "cpu_count": 2}},
        },
        "rows": [
            _row("smollm2", "q4", "q4", {"perplexity": 12.4481, "perplexity_change_pct": 1.7531}, 0.0049, 408.0),
            _row("smollm2", "q3", "q3", {"perplexity": 14.643, "perplexity_change_pct": 19.69}, 0.001, 99.4),
            _row("smollm2", "vq", "vq", {"perplexity": 20130.4}, 0.0),
            _row("minilm", "q4", "q4", {"mean_cosine": 0.99451, "nn_agreement": 0.875}),
            _row("minilm", "encoder-q4", "encoder-q4", {"mean_cosine": 0.9964, "nn_agreement": 0.914}, None, 576, "x"),
        ],
    }
    lines = readme_tables.presets_table(record).splitlines()
    assert lines[0] == environment_line(["SmolLM2-135M"], ENV)
    assert lines[1] == environment_line(["all-MiniLM-L6-v2"], {**ENV, "cpu_count": 2})
    assert (
        lines[3]
        == "| model | preset | bits/w Linear | bits/w file | size | ratio | quality (change) | exact | encode |"
    )
    assert lines[4] == "|---|---|---|---|---|---|---|---|---|"
    assert lines[5:] == [
        "| SmolLM2-135M | q4 | 4.466 | 4.900 | 82.3 MB | 6.50 | ppl 12.448 (+1.75%) | 0.5% | 6.8 min |",
        "| SmolLM2-135M | q3 | 4.466 | 4.900 | 82.3 MB | 6.50 | ppl 14.643 (+19.7%) | 0.1% | 99 s |",
        "| SmolLM2-135M | vq (uncalibrated) | 4.466 | 4.900 | 82.3 MB | 6.50 | ppl 20130 (unusable) | 0.0% | 30 s |",
        "| all-MiniLM-L6-v2 | q4 (generic) | 4.466 | 4.900 | 82.3 MB | 6.50 | cos 0.9945, NN 0.875 | | 30 s |",
        "| all-MiniLM-L6-v2 | encoder-q4 | 4.466 | 4.900 | 82.3 MB | 6.50 | cos 0.9964, NN 0.914 | | 9.6 min* |",
    ]


def test_models_measured_alike_share_one_line():
    record = {
        "models": {
            "smollm2": {"name": "SmolLM2-135M", "family": "decoder", "environment": ENV},
            "minilm": {"name": "all-MiniLM-L6-v2", "family": "encoder", "environment": dict(ENV)},
        },
        "rows": [],
    }
    first = readme_tables.presets_table(record).splitlines()[0]
    assert first.startswith("SmolLM2-135M and all-MiniLM-L6-v2: measured 2027-01-02 on 16 CPU cores, Python 3.11.9")


# -- the record's environment -----------------------------------------------------------------------


def test_a_run_environment_names_the_machine_and_versions_and_keeps_the_rest():
    measured = {"cpu_count": 16, "machine": "x86_64", "python": "3.11.9", "torch": "2.13.0",
                "transformers": "4.57.1", "numpy": "2.1.0"}  # fmt: skip
    env = run_environment(measured, "2027-01-02")
    assert list(env)[: len(ENVIRONMENT)] == list(ENVIRONMENT)
    assert env == {**measured, "device": "CPU", "dtype": "float32", "date": "2027-01-02"}
    bare = run_environment({}, None)
    assert bare == {k: None for k in ENVIRONMENT} | {"device": "CPU", "dtype": "float32"}


@pytest.mark.parametrize(
    "env",
    [
        ENV,
        {**ENV, "transformers": None, "torch": "2.13"},
        {k: None for k in ENVIRONMENT},
    ],
)
def test_the_environment_line_reads_back(env):
    line = environment_line(["SmolLM2-135M", "all-MiniLM-L6-v2"], env)
    assert environment_from_line(line) == env
    assert "\n" not in line and line.endswith(".")


def test_the_committed_record_names_its_environment():
    from bench.preset_record import read_record

    for model in read_record()["models"].values():
        env = model["environment"]
        assert set(ENVIRONMENT) <= set(env) and env["cpu_count"] and env["python"] and env["torch"]
        assert env["device"] == "CPU" and env["dtype"] == "float32" and env["date"]
