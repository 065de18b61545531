"""The specification document and the code must state the same numbers.

spec/rbe-v1.md marks its machine-checked tables and examples with HTML comments
(``<!-- constants:begin -->`` ... ``<!-- constants:end -->``).  These tests parse
them and compare them with rbeformat, in both directions where that makes sense,
so that neither can change without the other.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

import rbeformat.spec as spec
from rbeformat import Reader
from rbeformat.codecs import planes
from rbeformat.codecs.byteplane import Byteplane
from rbeformat.codecs.registry import CODECS, RESERVED_NAMES, codec_from_record
from rbeformat.layout import pack_header

SPEC = Path(__file__).resolve().parent.parent / "spec" / "rbe-v1.md"


def _block(marker: str) -> str:
    text = SPEC.read_text(encoding="utf-8")
    found = re.findall(rf"<!-- {marker}:begin -->(.*?)<!-- {marker}:end -->", text, re.S)
    assert len(found) == 1, f"spec/rbe-v1.md must contain exactly one '{marker}' block"
    return found[0]


def _table(marker: str) -> list[dict[str, str]]:
    """The rows of the Markdown table in a marked block, as {column: cell}."""
    rows = []
    for line in _block(marker).splitlines():
        line = line.strip()
        if not line.startswith("|"):
            continue
        cells = [c.strip().strip("`").strip() for c in line.strip("|").split("|")]
        if all(set(c) <= set("-: ") for c in cells):
            continue  # the separator row
        rows.append(cells)
    header, body = rows[0], rows[1:]
    assert body, f"the '{marker}' table is empty"
    assert all(len(r) == len(header) for r in body), f"the '{marker}' table has ragged rows"
    return [dict(zip(header, r)) for r in body]


def _hex(text: str) -> bytes:
    return bytes.fromhex(text.replace("|", " "))


def _hexdump(marker: str) -> bytes:
    """The bytes of an ``OFFSET  HEX HEX ...`` dump, checking that offsets are consecutive."""
    data = bytearray()
    for line in _block(marker).splitlines():
        if not re.match(r"^[0-9a-f]{4,8}\s", line):
            continue
        offset, rest = line.split(None, 1)
        assert int(offset, 16) == len(data), f"{marker}: offset {offset} out of sequence"
        data += _hex(rest)
    return bytes(data)


def _public_constants() -> dict[str, int | bytes]:
    return {
        name: value
        for name, value in vars(spec).items()
        if re.fullmatch(r"[A-Z][A-Z0-9_]*", name)
        and isinstance(value, (int, bytes))
        and not isinstance(value, bool)
    }


# -- constants ---------------------------------------------------------------------------

CONSTANT_ROWS = _table("constants")


@pytest.mark.parametrize("row", CONSTANT_ROWS, ids=[r["Name"] for r in CONSTANT_ROWS])
def test_constant_row_matches_code(row):
    name = row["Name"]
    assert hasattr(spec, name), f"the spec documents {name}, which rbeformat.spec does not define"
    actual = getattr(spec, name)
    if row["Type"] == "bytes":
        assert isinstance(actual, bytes), f"{name} is documented as bytes"
        assert _hex(row["Value"]) == actual, f"{name}: spec says {row['Value']}, code has {actual.hex(' ')}"
    elif row["Type"] == "int":
        assert re.fullmatch(r"[0-9]+", row["Value"]), f"{name}: write the exact integer, not {row['Value']!r}"
        assert type(actual) is int, f"{name} is documented as int"
        assert int(row["Value"]) == actual, f"{name}: spec says {row['Value']}, code has {actual}"
    else:
        pytest.fail(f"{name}: unknown type {row['Type']!r} (use int or bytes)")


def test_every_constant_is_documented():
    documented = [r["Name"] for r in _table("constants")]
    assert len(documented) == len(set(documented)), "a constant is listed twice"
    missing = sorted(set(_public_constants()) - set(documented))
    assert not missing, f"constants of rbeformat.spec missing from the spec's table: {missing}"


# -- dtypes and codecs -------------------------------------------------------------------


def test_dtype_table_matches_code():
    rows = _table("dtypes")
    assert [r["Name"] for r in rows] == list(spec.DTYPES), "dtype names or order differ"
    for r in rows:
        d = spec.DTYPES[r["Name"]]
        assert int(r["Item size"]) == d.itemsize, r["Name"]
        assert r["Float"] == ("yes" if d.is_float else "no"), r["Name"]
        assert r["byteplane transform"] == Byteplane().for_dtype(d).transform, r["Name"]


def test_codec_registry_matches_code():
    rows = _table("codecs")
    active = {r["Name"] for r in rows if r["Status"] == "active"}
    reserved = {r["Name"] for r in rows if r["Status"] == "reserved"}
    assert len(active) + len(reserved) == len(rows), "a codec row has an unknown status"
    assert active == set(CODECS)
    assert reserved == set(RESERVED_NAMES)
    for r in rows:
        if r["Name"] in CODECS:
            assert r["Lossless"] == ("yes" if CODECS[r["Name"]].lossless else "no"), r["Name"]


# -- examples ----------------------------------------------------------------------------


def test_header_example_is_the_header():
    assert _hexdump("example-header") == pack_header()


@pytest.mark.parametrize("implementation", ["numpy reference", "default"])
def test_byteplane_example_decodes(implementation, monkeypatch):
    if implementation == "numpy reference":
        monkeypatch.setattr(planes, "_native", None)
    fields = dict(
        (k.strip(), v.strip())
        for k, v in (line.split(":", 1) for line in _block("example-byteplane").splitlines() if ":" in line)
    )
    dtype = spec.DTYPES[fields["dtype"]]
    expected = _hex(fields["decoded"])
    values = np.array([float(v) for v in fields["values"].split()], dtype=dtype.numpy_storage)
    assert values.tobytes() == expected
    codec = codec_from_record(
        {"name": "byteplane", "must_understand": True,
         "config": {"transform": "rotl1", "chunk_items": len(values)}}, "example")
    out = bytearray(len(expected))
    codec.decode_chunk(memoryview(_hex(fields["section"])), json.loads(fields["params"]), dtype,
                       memoryview(out), "example")
    assert bytes(out) == expected


def test_example_file_is_valid(tmp_path):
    path = tmp_path / "example.rbe"
    path.write_bytes(_hexdump("example-file"))
    with Reader(path) as r:
        assert list(r.verify(deep=True)) == []
        assert r.keys() == ["w"]
        np.testing.assert_array_equal(r.get_tensor("w"), np.array([1.0, -2.0, 0.5, 3.0], np.float32))
