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

import rbeformat.manifest as manifest
import rbeformat.spec as spec
from rbeformat import Reader, Writer
from rbeformat.chain import Chain, parse_chain
from rbeformat.codecs.blob import planes
from rbeformat.codecs.blob.byteplane import Byteplane
from rbeformat.codecs.normdelta import NormDelta
from rbeformat.codecs.registry import CODECS, RESERVED_NAMES, TENSOR_CODECS, codec_from_record
from rbeformat.codecs.util import bitpack
from rbeformat.layout import pack_header
from rbeformat.values import from_float32

SPEC = Path(__file__).resolve().parents[2] / "spec" / "rbe-v1.md"


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
        if re.fullmatch(r"[A-Z][A-Z0-9_]*", name) and isinstance(value, (int, bytes)) and not isinstance(value, bool)
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


# The manifest's own constants (those rbeformat.manifest defines rather than imports).
MANIFEST_ROWS = _table("manifest-constants")


def _manifest_constants() -> dict[str, object]:
    return {
        name: value
        for name, value in vars(manifest).items()
        if re.fullmatch(r"[A-Z][A-Z0-9_]*", name)
        and not hasattr(spec, name)
        and isinstance(value, (int, str, tuple, dict))
        and not isinstance(value, bool)
    }


def _cell_names(cell: str) -> list[str]:
    """The comma-separated items of a table cell, without backticks; "none" is the empty list."""
    text = cell.replace("`", "").strip()
    return [] if text == "none" else [item.strip() for item in text.split(",")]


@pytest.mark.parametrize("row", MANIFEST_ROWS, ids=[r["Name"] for r in MANIFEST_ROWS])
def test_manifest_constant_row_matches_code(row):
    name = row["Name"]
    assert name in _manifest_constants(), f"the spec documents {name}, which rbeformat.manifest does not define"
    actual = getattr(manifest, name)
    kind, value = row["Type"], row["Value"]
    if kind == "int":
        assert re.fullmatch(r"[0-9]+", value), f"{name}: write the exact integer, not {value!r}"
        assert type(actual) is int and int(value) == actual, f"{name}: spec says {value}, code has {actual}"
    elif kind == "str":
        assert isinstance(actual, str) and value == actual, f"{name}: spec says {value!r}, code has {actual!r}"
    elif kind == "names":
        assert isinstance(actual, tuple) and _cell_names(value) == list(actual), f"{name}: code has {actual}"
    elif kind == "map":
        pairs = dict((k.strip(), int(v)) for k, v in (item.split(":") for item in _cell_names(value)))
        assert isinstance(actual, dict) and pairs == actual, f"{name}: spec says {pairs}, code has {actual}"
    else:
        pytest.fail(f"{name}: unknown type {kind!r} (use int, str, names or map)")


def test_every_manifest_constant_is_documented():
    documented = [r["Name"] for r in MANIFEST_ROWS]
    assert len(documented) == len(set(documented)), "a manifest constant is listed twice"
    missing = sorted(set(_manifest_constants()) - set(documented))
    assert not missing, f"constants of rbeformat.manifest missing from the spec's table: {missing}"


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


TENSOR_CODEC_ROWS = _table("tensor-codecs")


def test_tensor_codec_registry_lists_every_codec():
    names = [r["Name"] for r in TENSOR_CODEC_ROWS]
    assert len(names) == len(set(names)), "a tensor codec is listed twice"
    assert set(names) == set(TENSOR_CODECS), (
        f"spec lists {sorted(names)}, rbeformat.codecs.registry.TENSOR_CODECS has {sorted(TENSOR_CODECS)}"
    )
    assert not set(names) & set(CODECS), "a name is used by both a blob codec and a tensor codec"


@pytest.mark.parametrize("row", TENSOR_CODEC_ROWS, ids=[r["Name"] for r in TENSOR_CODEC_ROWS])
def test_tensor_codec_row_matches_code(row):
    cls = TENSOR_CODECS.get(row["Name"])
    assert cls is not None, f"{row['Name']} is not in TENSOR_CODECS"
    assert row["Module"] == cls.__module__.replace(".", "/") + ".py", f"{row['Name']} is defined in {cls.__module__}"
    assert _cell_names(row["Chainable parts"]) == list(cls.chainable_parts), (
        f"{row['Name']}: spec says {row['Chainable parts']!r}, code has {cls.chainable_parts}"
    )
    if row["Lossless"] in ("yes", "no"):
        assert cls.lossless == (row["Lossless"] == "yes"), row["Name"]
    else:  # lossless only in some configuration: the class as such is not
        assert not cls.lossless, row["Name"]
    link = re.fullmatch(r"\[([^\]]+)\]\(([^)]+)\)", row["Specification"])
    assert link and link.group(1) == link.group(2), f"{row['Name']}: expected a link [path](path)"
    assert (SPEC.parent / link.group(2)).is_file(), f"{row['Name']}: spec/{link.group(2)} does not exist"


def test_bitpack_examples():
    for row in _table("example-bitpack"):
        bits = int(row["Bits"])
        values = [int(v) for v in row["Values"].split()]
        packed = _hex(row["Packed bytes"])
        assert len(packed) == bitpack.packed_size(len(values), bits)
        assert bitpack.pack(np.array(values), bits).tobytes() == packed, row
        assert bitpack.unpack(np.frombuffer(packed, np.uint8), bits, len(values)).tolist() == values, row


@pytest.mark.parametrize("row", _table("example-from-float32"), ids=lambda r: f"{r['float32']}-{r['Dtype']}")
def test_float_conversion_examples(row):
    x = np.array([int(row["float32"], 16)], np.uint32).view(np.float32)
    with np.errstate(over="ignore"):
        result = from_float32(x, row["Dtype"])
    assert f"{int(result.view(np.uint16)[0]):04x}" == row["Result"]


# -- examples ----------------------------------------------------------------------------


def test_header_example_is_the_header():
    assert _hexdump("example-header") == pack_header()


@pytest.mark.parametrize("block", ["example-byteplane", "example-byteplane-rotl"])
@pytest.mark.parametrize("implementation", ["numpy reference", "default"])
def test_byteplane_example_decodes(implementation, block, monkeypatch):
    if implementation == "numpy reference":
        monkeypatch.setattr(planes, "kernels", None)
    fields = dict(
        (k.strip(), v.strip()) for k, v in (line.split(":", 1) for line in _block(block).splitlines() if ":" in line)
    )
    dtype = spec.DTYPES[fields["dtype"]]
    expected = _hex(fields["decoded"])
    values = np.array([float(v) for v in fields["values"].split()], np.float32)
    if dtype.name == "BF16":  # the example's values are exact in bfloat16: the top half of each float32
        values = (values.view(np.uint32) >> 16).astype("<u2")
    else:
        values = values.astype(dtype.numpy_storage)
    assert values.tobytes() == expected
    codec = codec_from_record(
        {
            "name": "byteplane",
            "must_understand": True,
            "config": {"transform": fields["transform"], "chunk_items": len(values)},
        },
        "example",
    )
    out = bytearray(len(expected))
    codec.decode_chunk(
        memoryview(_hex(fields["section"])), json.loads(fields["params"]), dtype, memoryview(out), "example"
    )
    assert bytes(out) == expected


def test_example_file_is_valid(tmp_path):
    path = tmp_path / "example.rbe"
    path.write_bytes(_hexdump("example-file"))
    with Reader(path) as r:
        assert list(r.verify(deep=True)) == []
        assert r.keys() == ["w"]
        np.testing.assert_array_equal(r.get_tensor("w"), np.array([1.0, -2.0, 0.5, 3.0], np.float32))


def _example_manifest() -> dict:
    text = _block("example-transformed")
    return json.loads(text[text.index("{") : text.rindex("}") + 1])


def test_transformed_example_is_a_valid_manifest():
    parsed = manifest.parse_manifest(json.dumps(_example_manifest()).encode())
    entry = parsed.tensors["ln.weight"]
    assert entry.transform is not None and entry.transform.codec.references() == ["rbe:base/F32/4"]
    assert parsed.tensors["rbe:base/F32/4"].internal
    assert entry.transform.parts["delta"].transform.codec.name == "gquant"


def test_transformed_example_is_what_the_writer_writes(tmp_path):
    base = np.array([1.0, 0.5, -2.0, 0.25], np.float32)
    x = np.array([1.0625, 0.5, -2.125, 0.25], np.float32)
    chain = Chain(
        NormDelta("rbe:base/F32/4", "float"), {"delta": parse_chain("gquant(bits=4, group=0)", TENSOR_CODECS)}
    )
    path = tmp_path / "transformed.rbe"
    with Writer(path, threads=1) as w:
        w.add_array("rbe:base/F32/4", base, dedup=False, internal=True)
        w.add_transformed("ln.weight", "F32", x, chain, refs={"rbe:base/F32/4": base})
    with Reader(path) as r:
        assert r.keys() == ["ln.weight"]
        np.testing.assert_array_equal(r.get_tensor("ln.weight"), x)
        assert list(r.verify(deep=True)) == []
        o, n = r.footer.manifest_offset, r.footer.manifest_length
    written = json.loads(path.read_bytes()[o : o + n])
    assert written == _example_manifest()
