"""``rbe info``: rows in the same order for every file of a model, and a summary without them."""

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
