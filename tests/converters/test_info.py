"""``rbe info``: rows in the same order for every file of a model, and a summary without them."""

import os

import numpy as np
from tiny_models import run

from rbeformat import Writer


def _file(path, order):
    with Writer(path) as w:
        for name in order:
            w.add_array(name, np.full((4, 8), NAMES.index(name), np.float32))  # no two alike: no aliases
    return str(path)


NAMES = ["layer.10.w", "layer.2.w", "embed.w", "layer.1.w"]


def test_rows_are_in_name_order_with_numbers_as_numbers_whatever_the_write_order(tmp_path, capsys):
    first = _file(tmp_path / "a.rbe", NAMES)
    second = _file(tmp_path / "b.rbe", list(reversed(NAMES)))
    tables = []
    for path in (first, second):
        assert run(["info", path]) == 0
        lines = capsys.readouterr().out.splitlines()
        tables.append([line.split()[0] for line in lines[2:6]])
    assert tables[0] == tables[1] == ["embed.w", "layer.1.w", "layer.2.w", "layer.10.w"]


def test_summary_prints_the_totals_and_a_row_per_codec_not_a_row_per_tensor(tmp_path, capsys):
    path = _file(tmp_path / "a.rbe", NAMES)
    assert run(["info", path, "--summary"]) == 0
    out = capsys.readouterr().out
    assert "layer.10.w" not in out
    codec_row = next(line for line in out.splitlines() if line.startswith("byteplane"))
    assert codec_row.split()[1:3] == ["4", "128"]  # 4 tensors, 128 weights
    assert "bits per weight over the whole file" in out


def test_a_long_codec_chain_is_cut_at_its_end_keeping_the_codecs_name():
    from rbe_converters.evaluate.report import codec_table

    chain = "posdct(keep=0.999, coeffs=gquant(bits=8, group=64, mode=asym, scale=f16), tail=" + "x" * 60 + ")"
    row = {"codec": chain, "internal": False, "shape": [512, 384], "stored_bytes": 1000}
    line = codec_table([row])[2]
    assert line.startswith("posdct(keep=0.999") and line.split("  ")[0].endswith("...")


def test_the_summary_says_how_its_rows_are_ordered(tmp_path, capsys):
    path = _file(tmp_path / "a.rbe", NAMES)
    assert run(["info", path, "--summary"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == "by codec chain, largest stored first:"


def test_embedded_files_are_counted_by_role_as_conversion_counts_the_directorys(model_dir, tmp_path, capsys):
    directory, _ = model_dir
    out = str(tmp_path / "m.rbe")
    assert run(["convert", directory, out]) == 0
    embedding = next(line for line in capsys.readouterr().err.splitlines() if ": embedding " in line)
    plain = int(embedding.split(": embedding ")[1].split()[0])
    assert run(["info", out]) == 0
    files_line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("files: "))
    shards = sum(name.endswith(".safetensors") for name in os.listdir(directory))
    layouts = "safetensors layout" if shards == 1 else "safetensors layouts"
    assert files_line.startswith(f"files: {plain + shards} embedded: {plain} files and {shards} {layouts} (")


def test_rows_end_without_padding(tmp_path, capsys):
    path = _file(tmp_path / "a.rbe", NAMES)
    assert run(["info", path]) == 0
    assert all(line == line.rstrip() for line in capsys.readouterr().out.splitlines())


def test_the_quality_line_names_the_tensor_with_the_worst_error(model_dir, tmp_path, capsys):
    out = str(tmp_path / "q.rbe")
    assert run(["convert", model_dir[0], out, "--codec", "gquant(bits=2, group=64)", "--quiet"]) == 0
    assert run(["info", out, "--json"]) == 0
    import json

    rows = json.loads(capsys.readouterr().out)["tensors"]
    errors = {row["name"]: row["stats"]["rel_error"] for row in rows if "rel_error" in row.get("stats", {})}
    worst = max(errors, key=errors.get)
    assert run(["info", out, "--summary"]) == 0
    assert f"worst {errors[worst]:.4f} ({worst})" in capsys.readouterr().out


def test_the_bound_on_a_re_encodings_error_holds_against_the_original():
    """rel(x2, x) <= r1 + r2 (1 + r1) for errors of any size and direction (combined_rel_error)."""
    from rbe_converters.evaluate.report import combined_rel_error

    rng = np.random.default_rng(3)
    x = rng.standard_normal(1000)
    for scale1, scale2 in [(0.01, 0.02), (0.3, 0.5), (1.0, 0.1), (0.0, 0.2)]:
        x1 = x + scale1 * rng.standard_normal(1000)
        x2 = x1 + scale2 * rng.standard_normal(1000)
        r1, r2 = (np.linalg.norm(x1 - x) / np.linalg.norm(x)), np.linalg.norm(x2 - x1) / np.linalg.norm(x1)
        bound = combined_rel_error({"rel_error": r2, "input": {"rel_error": r1}})
        assert np.linalg.norm(x2 - x) / np.linalg.norm(x) <= bound + 1e-12
    assert combined_rel_error({"rel_error": 0.1, "input": {}}) is None
