"""Hostile files that would make rbe allocate far more than they hold, and the memory limit that stops them.

Each test crafts its file here (tests/rbe_craft.py takes files apart and puts
them back together).  A refused file fails with one line and exit 3, before
anything large is allocated; a file within the limits decodes with memory
bounded by what it legitimately needs.  Peak memory is measured in a child
process (ru_maxrss), so that the numbers are the command's own.
"""

from __future__ import annotations

import glob
import json
import math
import os
import struct
import subprocess
import sys
import time
import tracemalloc

import numpy as np
import pytest
import zstandard
from rbe_craft import RawJson, append_section, assemble, serialise, split_file

from rbe_converters.cli import build_parser, main
from rbeformat import FormatError, InputError, MemoryLimitError, Reader, Writer, budget
from rbeformat.chain import parse_chain
from rbeformat.codecs.core.tensor import REGISTERED
from rbeformat.codecs.posemb import MAX_TABLE_ELEMENTS, Sinusoidal
from rbeformat.layout import MANIFEST_ZSTD, crc32, pack_footer
from rbeformat.manifest import check_name, parse_manifest
from rbeformat.spec import align_up

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FIXTURES = os.path.join(ROOT, "fixtures")
MiB = 1 << 20
CHUNK = 64 * MiB
SINUSOID = {"name": "sinusoid", "must_understand": True, "config": {"base": 10000.0, "tolerance": 1e-6}}
LOWRANK = {"name": "lowrank", "must_understand": True, "config": {"rank": 1, "residual": False}}


# -- crafting ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> bytes:
    """A small sound file: one 8 x 6 sinusoid table."""
    path = tmp_path_factory.mktemp("base") / "base.rbe"
    with Writer(path, force=True, threads=1) as w:
        w.add_transformed(
            "pos", "F32", Sinusoidal.table(8, 6, 10000.0, "interleaved"), parse_chain("sinusoid", REGISTERED)
        )
    return path.read_bytes()


_frames: dict[int, bytes] = {}


def zero_blob(area: bytes, nbytes: int, itemsize: int = 1) -> tuple[bytes, dict]:
    """The area with zstd chunks of ``nbytes`` zero bytes appended (about 2 KiB per 64 MiB), and their blob."""
    chunks, left = [], nbytes
    while left > 0:
        n = min(CHUNK, left)
        if n not in _frames:
            _frames[n] = zstandard.ZstdCompressor(level=19).compress(bytes(n))
        area, offset = append_section(area, _frames[n])
        chunks.append(
            {
                "offset": offset,
                "length": len(_frames[n]),
                "crc32": crc32(_frames[n]),
                "items": n // itemsize,
                "params": {},
            }
        )
        left -= n
    return area, {
        "codec": {"name": "zstd", "must_understand": True, "config": {"chunk_items": CHUNK // itemsize}},
        "digest": None,
        "chunks": chunks,
    }


def zeros_digest(nbytes: int) -> str:
    import hashlib

    h, block = hashlib.sha256(), bytes(MiB)
    for _ in range(nbytes // MiB):
        h.update(block)
    return "sha256:" + h.hexdigest()


def transformed(base: bytes, shape, codec: dict, params: dict, parts: dict, dtype: str = "F32") -> bytes:
    """A file whose one tensor is ``codec`` of ``shape``, each part zeros stored as zstd."""
    area, manifest = split_file(base)
    stored = {}
    for name, (pdtype, pshape, itemsize) in parts.items():
        area, blob = zero_blob(area, math.prod(pshape) * itemsize, itemsize)
        stored[name] = {"dtype": pdtype, "shape": list(pshape), **blob}
    manifest["tensors"] = [
        {"name": "w", "dtype": dtype, "shape": list(shape), "codec": codec, "params": params, "parts": stored}
    ]
    return assemble(area, manifest)


def zstd_manifest(base: bytes, manifest) -> bytes:
    """A file with ``manifest`` stored as one zstd frame (footer encoding 1)."""
    area, _ = split_file(base)
    body = serialise(manifest)
    frame = zstandard.ZstdCompressor(level=19).compress(body)
    offset = align_up(len(area))
    out = bytearray(area) + bytes(offset - len(area)) + frame
    out += bytes(align_up(len(out)) - len(out))
    return bytes(out + pack_footer(offset, len(frame), crc32(frame), MANIFEST_ZSTD))


def write(tmp_path, name: str, data: bytes) -> str:
    path = tmp_path / name
    path.write_bytes(data)
    return str(path)


def one_line_error(capsys, argv: list[str], code: int = 3) -> str:
    capsys.readouterr()
    try:
        assert main(argv) == code
    except SystemExit as exc:  # argparse refusing an option value
        assert exc.code == code
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rbe: error: "), captured.err
    assert "Traceback" not in captured.err
    return lines[0]


def child_peak(tmp_path, code: str) -> tuple[int, str]:
    """Runs ``code`` in a fresh interpreter; returns its peak resident memory in bytes and its stdout.

    The peak is the child's own VmHWM: ru_maxrss also counts the memory of the process it was forked
    from (Linux records the forked copy's high-water mark at exec), here the whole test session."""
    script = (
        f"import resource, sys\n{code}\n"
        "hwm = [line.split()[1] for line in open('/proc/self/status') if line.startswith('VmHWM:')]\n"
        "print('PEAK', int(hwm[0]) * 1024 if hwm else "
        "resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr
    peak = int(proc.stdout.rsplit("PEAK", 1)[1])
    return peak, proc.stdout


# -- the budget module -------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, value",
    [
        ("4096", 4096),
        ("2G", 2 << 30),
        ("500M", 500 << 20),
        ("1.5g", 3 << 29),
        ("64KiB", 64 << 10),
        ("1T", 1 << 40),
        (" 3 GB", 3 << 30),
    ],
)
def test_sizes_parse(text, value):
    assert budget.parse_size(text) == value


@pytest.mark.parametrize("text", ["", "x", "0", "-1", "2Q", "G", "1e9"])
def test_bad_sizes_are_usage_errors(text, capsys):
    with pytest.raises(InputError):
        budget.parse_size(text)
    line = one_line_error(capsys, ["info", "x.rbe", "--max-memory", text], code=2)
    assert "--max-memory" in line


def test_the_default_is_a_share_of_the_available_memory_tied_to_small_files(monkeypatch):
    available = budget.available_memory()
    assert available is None or budget.default_limit() <= max(budget.MIN_DEFAULT, available)
    monkeypatch.setattr(budget, "default_limit", lambda: 8 << 30)
    assert budget.container_limit(512) == budget.FILE_FLOOR
    assert budget.container_limit(16 << 20) == 4 << 30  # 256 times the file
    assert budget.container_limit(1 << 30) == 8 << 30  # never past the share of available memory
    assert budget.manifest_limit(512) == budget.MANIFEST_FLOOR
    assert budget.container_limit(512, 5 << 30) == 5 << 30  # an explicit limit is taken as given
    with pytest.raises(MemoryLimitError, match=r"tensor 'w': needs 2\.00 GiB .*--max-memory to change"):
        budget.check(2 << 30, "tensor 'w'", 1 << 30)


@pytest.mark.parametrize(
    "command",
    [
        ["convert", "a", "b.rbe"],
        ["decode", "a.rbe", "b"],
        ["export-onnx", "a", "b"],
        ["info", "a"],
        ["verify", "a"],
        ["eval", "a", "b.rbe"],
        ["run", "a", "t"],
    ],
)
def test_every_command_that_reads_files_takes_max_memory(command):
    assert build_parser().parse_args(command + ["--max-memory", "2G"]).max_memory == 2 << 30


def test_max_memory_lasts_for_its_command_only(tmp_path, base, capsys):
    path = write(tmp_path, "ok.rbe", base)
    assert main(["info", path, "--max-memory", "100M"]) == 0
    assert budget.configured_limit() is None


# -- transformed tensors -------------------------------------------------------------------


def test_a_sinusoid_table_past_any_real_one_is_refused_when_opened(tmp_path, base, capsys):
    # 512 bytes of file for 1 GiB of float32 (it took 4.1 GB of memory to decode)
    path = write(
        tmp_path,
        "sin.rbe",
        transformed(base, (1 << 15, 1 << 13), SINUSOID, {"base": 10000.0, "layout": "interleaved"}, {}),
    )
    assert os.path.getsize(path) <= 512
    line = one_line_error(capsys, ["decode", path, str(tmp_path / "out.safetensors"), "--quiet"])
    assert f"more than the {MAX_TABLE_ELEMENTS} a position table may hold" in line
    assert "tensors[0]: a sinusoid position table of shape [32768, 8192]" in line


def test_a_sinusoid_table_over_the_limit_is_refused_and_decodes_with_enough(tmp_path, base, capsys):
    shape = (4096, 1024)  # 16 MiB of float32
    path = write(tmp_path, "sin.rbe", transformed(base, shape, SINUSOID, {"base": 10000.0, "layout": "halves"}, {}))
    out = str(tmp_path / "out.safetensors")
    line = one_line_error(capsys, ["decode", path, out, "--max-memory", "8M", "--quiet"])
    assert "tensor 'w'" in line and "over the memory limit of 8.00 MiB" in line and "--max-memory to change" in line
    assert not os.path.exists(out)
    with Reader(path, max_memory=8 * MiB) as r, pytest.raises(MemoryLimitError):
        r.get_tensor("w")
    assert main(["decode", path, out, "--max-memory", "64M", "--quiet"]) == 0
    with open(out, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        fh.seek(8 + n)
        decoded = np.frombuffer(fh.read(), np.float32).reshape(shape)
    assert decoded.tobytes() == Sinusoidal.table(*shape, 10000.0, "halves").tobytes()


def test_a_sinusoid_decodes_in_about_its_own_size(tmp_path, base):
    shape = (8192, 4096)  # 128 MiB of float32: the whole-table decode held 4 times that
    path = write(
        tmp_path, "sin.rbe", transformed(base, shape, SINUSOID, {"base": 10000.0, "layout": "interleaved"}, {})
    )
    opened, _ = child_peak(tmp_path, f"from rbeformat import Reader\nr = Reader({path!r})")
    decoded, out = child_peak(
        tmp_path,
        f"from rbeformat import Reader\nr = Reader({path!r})\nprint('SUM', float(r.get_tensor('w')[::97, ::89].sum()))",
    )
    assert decoded - opened < 1.5 * 4 * math.prod(shape), (opened, decoded)


def test_a_low_rank_bomb_is_refused_under_the_default_limit(tmp_path, base, capsys):
    # two zero factors of 16384 values, zstd-compressed: under 1 KB of file for 1 GiB of float32
    shape = (16384, 16384)
    data = transformed(base, shape, LOWRANK, {"rank": 1}, {"A": ("F32", (16384, 1), 4), "B": ("F32", (1, 16384), 4)})
    path = write(tmp_path, "lowrank.rbe", data)
    assert os.path.getsize(path) < 1024
    start = time.monotonic()
    line = one_line_error(capsys, ["decode", path, str(tmp_path / "out.safetensors"), "--quiet"])
    assert time.monotonic() - start < 5
    assert "over the memory limit" in line and f"the default for a {os.path.getsize(path)}-byte file" in line


def test_a_small_low_rank_tensor_decodes_with_enough_memory(tmp_path, base):
    shape = (2048, 2048)
    data = transformed(base, shape, LOWRANK, {"rank": 1}, {"A": ("F32", (2048, 1), 4), "B": ("F32", (1, 2048), 4)})
    path = write(tmp_path, "lowrank.rbe", data)
    with Reader(path, max_memory=16 * MiB) as r, pytest.raises(MemoryLimitError, match="--max-memory"):
        r.get_tensor("w")
    with Reader(path) as r:  # 16 MiB of float32 from 2 KB: within the 1 GiB a small file gets
        assert not r.get_tensor("w").any()


def _decode_peak(r: Reader, name: str) -> int:
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        r.get_tensor(name)
        return tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()


def _transformed_tensors(paths):
    for path in paths:
        with Reader(path) as r:
            for name in r.keys():
                if r.stored_entry(name).transform is not None:
                    yield path, name


LOSSY_FIXTURES = sorted(
    glob.glob(os.path.join(FIXTURES, "v1.1", "*.rbe")) + glob.glob(os.path.join(FIXTURES, "v1.2", "*.rbe"))
)


@pytest.mark.parametrize(
    "path, name",
    list(_transformed_tensors(LOSSY_FIXTURES)),
    ids=lambda v: os.path.basename(v) if str(v).endswith(".rbe") else str(v),
)
def test_the_estimate_covers_what_decoding_a_fixture_allocates(path, name):
    from rbeformat.reader import DECODE_SLACK

    with Reader(path) as r:
        entry = r.stored_entry(name)
        estimate = r.transform_memory(entry.transform, entry.dtype, entry.shape) + DECODE_SLACK
        assert _decode_peak(r, name) <= estimate


CHAINS = [
    "gquant(bits=4, group=32)",
    "gquant(bits=3, group=64, mode=asym)",
    "gquant(bits=8, group=0)",
    "lowrank(rank=8)",
    "palette(bits=3)",
    "vq(dim=4, bits=6)",
    "sparse(density=0.25)",
    "sparse(density=0.02)",
    "nm24",
    "slices(axis=1)",
    "transpose",
    "posdct(keep=16)",
    "gquant(bits=4, group=32, scales=gquant(bits=8, group=0))",
]


@pytest.mark.parametrize("dtype", ["F32", "BF16"])
@pytest.mark.parametrize("chain", CHAINS)
def test_the_estimate_covers_what_decoding_allocates(tmp_path, chain, dtype):
    """Large enough (2^20 values) that the codecs' blocks and tiles matter; the reader's check is never under."""
    from rbeformat.reader import DECODE_SLACK

    x = np.random.default_rng(0).standard_normal((1024, 1024)).astype(np.float32)
    path = tmp_path / "m.rbe"
    with Writer(path, force=True, threads=1) as w:
        array = x if dtype == "F32" else (x.view(np.uint32) >> 16).astype(np.uint16)
        w.add_transformed("w", dtype, array, parse_chain(chain, REGISTERED))
    with Reader(path, threads=1) as r:
        entry = r.stored_entry("w")
        estimate = r.transform_memory(entry.transform, entry.dtype, entry.shape) + DECODE_SLACK
        peak = _decode_peak(r, "w")
    assert peak <= estimate, (
        f"{chain}: decoding held {peak / x.size:.2f} bytes per value, estimated {estimate / x.size:.2f}"
    )


# -- manifests -------------------------------------------------------------------------


def test_a_zstd_manifest_bomb_is_refused_at_once(tmp_path, base, capsys):
    _, manifest = split_file(base)
    manifest["tensors"][0]["stats"] = RawJson("[" + "{}," * (20 << 20) + "{}]")  # 60 MiB of JSON in a few KB
    data = zstd_manifest(base, manifest)
    path = write(tmp_path, "bomb.rbe", data)
    assert len(data) < 16 << 10
    start = time.monotonic()
    line = one_line_error(capsys, ["info", path])
    assert time.monotonic() - start < 5
    assert "more than a manifest expands" in line


def test_a_manifest_too_costly_to_parse_is_refused_before_parsing(tmp_path, base, capsys):
    _, manifest = split_file(base)
    manifest["tensors"][0]["stats"] = RawJson("[" + "{}," * (2 << 20) + "{}]")  # 6 MiB: 4 M values
    manifest["metadata"] = {"pad": os.urandom(8 << 10).hex()}  # keeps the frame within 1024-fold
    path = write(tmp_path, "costly.rbe", zstd_manifest(base, manifest))
    line = one_line_error(capsys, ["info", path])
    assert "manifest: parsing" in line and "the default for the manifest of a" in line
    assert main(["info", path, "--max-memory", "2G"]) == 0  # an explicit limit lifts the file-size default


def test_more_entries_than_a_file_can_hold_are_refused_before_validation(tmp_path, base, capsys):
    _, manifest = split_file(base)
    manifest["tensors"] += [
        {"name": f"a{i}", "dtype": "F32", "shape": [8, 6], "alias_of": "pos"} for i in range(70_000)
    ]
    path = write(tmp_path, "aliases.rbe", zstd_manifest(base, manifest))
    start = time.monotonic()
    line = one_line_error(capsys, ["info", path])
    assert time.monotonic() - start < 5
    assert "70001 tensors, files and chunks in a" in line


def test_a_manifest_with_a_duplicate_key_is_refused(tmp_path, base, capsys):
    area, manifest = split_file(base)
    text = serialise(manifest).replace(b'"format":"rbe"', b'"format":"rbe","format":"rbe"')
    path = write(tmp_path, "dup.rbe", assemble(area, text))
    line = one_line_error(capsys, ["info", path])
    assert "manifest: an object holds the key 'format' twice" in line
    with pytest.raises(FormatError, match="key 'name' twice"):
        parse_manifest(serialise(manifest).replace(b'"name":"pos"', b'"name":"pos","name":"other"'))


@pytest.mark.parametrize("where", ["tensor name", "metadata key", "metadata value", "file path"])
def test_a_lone_surrogate_anywhere_in_the_manifest_is_refused(tmp_path, base, capsys, where):
    area, manifest = split_file(base)
    text = serialise(manifest)
    escape = b"\\udc80"
    if where == "tensor name":
        text = text.replace(b'"name":"pos"', b'"name":"pos' + escape + b'"')
    elif where == "metadata key":
        text = text.replace(b'"metadata":{}', b'"metadata":{"k' + escape + b'":"v"}')
    elif where == "metadata value":
        text = text.replace(b'"metadata":{}', b'"metadata":{"k":"' + escape + b'"}')
    else:
        area, blob = zero_blob(area, 16)
        manifest["files"] = [{"path": "PLACEHOLDER", "role": "file", "size": 16, **blob}]
        text = serialise(manifest).replace(b"PLACEHOLDER", b"a" + escape)
    path = write(tmp_path, "surrogate.rbe", assemble(area, text))
    line = one_line_error(capsys, ["info", path])
    assert "lone surrogate" in line


def test_names_must_be_valid_utf8():
    with pytest.raises(FormatError, match="not valid UTF-8"):
        check_name("bad\udc80name", "tensors[0].name")
    assert check_name("emoji \U0001f600", "tensors[0].name")  # a surrogate pair in JSON is one character


def test_a_surrogate_pair_escape_is_accepted(tmp_path, base):
    area, manifest = split_file(base)
    text = serialise(manifest).replace(b'"name":"pos"', b'"name":"pos\\ud83d\\ude00"')
    with Reader(write(tmp_path, "pair.rbe", assemble(area, text))) as r:
        assert r.keys() == ["pos\U0001f600"]


# -- embedded files and stored tensors -----------------------------------------------------


def _big_file_container(base: bytes, nbytes: int, *, as_tensor: bool = False) -> bytes:
    area, manifest = split_file(base)
    area, blob = zero_blob(area, nbytes)
    blob["digest"] = zeros_digest(nbytes)
    if as_tensor:
        manifest["tensors"].append({"name": "zeros", "dtype": "U8", "shape": [nbytes], **blob})
    else:
        manifest["files"] = [{"path": "big.bin", "role": "file", "size": nbytes, **blob}]
    return assemble(area, manifest)


@pytest.mark.parametrize("as_tensor", [False, True], ids=["embedded file", "stored tensor"])
def test_a_large_embedded_file_or_tensor_streams_to_disk(tmp_path, base, as_tensor):
    nbytes = 512 * MiB  # 20 KB of file; decoding held it twice (1.1 GB) before it streamed
    path = write(tmp_path, "big.rbe", _big_file_container(base, nbytes, as_tensor=as_tensor))
    assert os.path.getsize(path) < 32 << 10
    out = str(tmp_path / ("out.safetensors" if as_tensor else "out"))
    peak, _ = child_peak(
        tmp_path, f"from rbe_converters.cli import main\nassert main(['decode', {path!r}, {out!r}, '--quiet']) == 0"
    )
    written = os.path.getsize(out if as_tensor else os.path.join(out, "big.bin"))
    assert written >= nbytes
    assert peak < 400 * MiB, f"decode peaked at {peak / MiB:.0f} MiB"
    peak, _ = child_peak(
        tmp_path, f"from rbe_converters.cli import main\nassert main(['verify', '--deep', {path!r}, '--quiet']) == 0"
    )
    assert peak < 400 * MiB, f"verify --deep peaked at {peak / MiB:.0f} MiB"


def test_streaming_checks_the_digest(tmp_path, base):
    data = _big_file_container(base, 4 * MiB)
    area, manifest = split_file(data)
    manifest["files"][0]["digest"] = "sha256:" + "0" * 64
    with Reader(write(tmp_path, "bad.rbe", assemble(area, manifest))) as r:
        with pytest.raises(FormatError, match="do not match the recorded sha256 digest"):
            for _ in r.iter_file("big.bin"):
                pass
        assert sum(len(piece) for piece in r.iter_file("big.bin", verify=False)) == 4 * MiB


def test_reading_a_large_embedded_file_into_memory_is_refused(tmp_path, base):
    with Reader(write(tmp_path, "big.rbe", _big_file_container(base, 512 * MiB))) as r:
        with pytest.raises(MemoryLimitError, match="file 'big.bin': reading it into memory"):
            r.read_file("big.bin")  # twice its size, over the 1 GiB a 20 KB file gets
    with Reader(write(tmp_path, "huge.rbe", _big_file_container(base, 2 << 30)), max_memory=1 << 40) as r:
        with pytest.raises(MemoryLimitError, match="stream it with iter_file"):
            r.read_file("big.bin")  # past READ_FILE_CAP whatever the limit


# -- safetensors headers ---------------------------------------------------------------------


def _safetensors(path, header: bytes, data: bytes) -> str:
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(header)) + header + data)
    return str(path)


def test_a_safetensors_header_with_a_duplicate_key_is_refused(tmp_path, capsys):
    entry = '{"dtype":"F32","shape":[2],"data_offsets":[0,8]}'
    header = ('{"w":' + entry + ',"w":' + entry + "}").encode()
    path = _safetensors(tmp_path / "dup.safetensors", header + b" " * (-len(header) % 8), bytes(8))
    line = one_line_error(capsys, ["convert", path, str(tmp_path / "out.rbe"), "--quiet"])
    assert "header holds the key 'w' twice" in line and "dup.safetensors" in line


def test_a_safetensors_header_with_a_lone_surrogate_is_refused(tmp_path, capsys):
    header = b'{"w\\ud800":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}'
    path = _safetensors(tmp_path / "bad.safetensors", header + b" " * (-len(header) % 8), bytes(8))
    line = one_line_error(capsys, ["convert", path, str(tmp_path / "out.rbe"), "--quiet"])
    assert "lone surrogate" in line


def test_a_stored_safetensors_header_with_a_duplicate_key_is_refused(tmp_path, capsys):
    from conftest import write_safetensors

    src = tmp_path / "m.safetensors"
    write_safetensors(str(src), {"a": np.ones(4, np.float32), "b": np.zeros(2, np.float32)})
    rbe = str(tmp_path / "m.rbe")
    assert main(["convert", str(src), rbe, "--quiet"]) == 0
    area, manifest = split_file(open(rbe, "rb").read())
    header_entry = manifest["files"][0]
    with Reader(rbe) as r:
        header = r.read_file(header_entry["path"])
    obj = json.loads(header)
    doubled = header.replace(b'"a":', b'"a":' + json.dumps(obj["a"]).encode() + b',"a":', 1)
    doubled += b" " * (-len(doubled) % 8)
    area, offset = append_section(area, doubled)  # the stored header, as one raw chunk
    header_entry.update(
        size=len(doubled),
        digest=None,
        codec={"name": "raw", "must_understand": True, "config": {}},
        chunks=[
            {"offset": offset, "length": len(doubled), "crc32": crc32(doubled), "items": len(doubled), "params": {}}
        ],
    )
    bad = write(tmp_path, "bad.rbe", assemble(area, manifest))
    line = one_line_error(capsys, ["decode", bad, str(tmp_path / "out.safetensors"), "--quiet"])
    assert "the key 'a' appears twice" in line
