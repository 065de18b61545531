"""Damaged and hostile files: detected, and refused only with RbeError.

Two promises are checked here:

* damage is detected: every single-byte change of a file, anywhere (header,
  sections, padding, manifest, footer), makes opening fail or verify() report it;
* hostile input is harmless: whatever the bytes or the manifest say, opening,
  get_tensor, read_file and verify(deep=True) either work or raise an RbeError
  subclass.  Any other exception, a hang, or an allocation beyond a small
  budget is a reader bug.

Hostile manifests are re-serialised with fresh manifest and footer checksums,
so that the reader parses them instead of stopping at a checksum.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import signal
import struct

import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rbe_craft import (
    RawJson,
    append_section,
    assemble,
    file_entry,
    replace_payload,
    split_file,
    tensor,
    write_sample,
    zstd_frame,
)

from rbe_converters.cli import main as cli_main
from rbeformat import RbeError, Reader
from rbeformat.codecs.blob.byteplane import METHODS
from rbeformat.layout import crc32
from rbeformat.spec import DTYPES, FOOTER_SIZE, HEADER_SIZE

SECONDS_PER_CASE = 20
MEMORY_HEADROOM = 1 << 30  # more than any sound decode of these small files needs

# RBE_FUZZ_SCALE=20 runs twenty times as many examples, for a deeper search than CI's.
SCALE = float(os.environ.get("RBE_FUZZ_SCALE", "1"))


def examples(n: int) -> int:
    return max(1, round(n * SCALE))


FUZZ = settings(deadline=None, max_examples=examples(150), suppress_health_check=[HealthCheck.too_slow])


# -- harness ---------------------------------------------------------------------------


def _address_space_in_use() -> int | None:
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):  # not Linux
        return None


@pytest.fixture(scope="module", autouse=True)
def memory_budget():
    """Caps the address space so that an absurd allocation fails fast as MemoryError.

    Yields whether the cap is in force (Linux only).  The reader reports a failed
    allocation as an RbeError naming it; check_error() refuses those.
    """
    try:
        import resource
    except ImportError:
        resource = None
    in_use = _address_space_in_use()
    if resource is None or in_use is None:
        yield False
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = min(x for x in (in_use + MEMORY_HEADROOM, soft, hard) if x != resource.RLIM_INFINITY)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    try:
        yield True
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


class Hang(Exception):
    """A case ran past SECONDS_PER_CASE (not an RbeError, so it fails the test)."""


@contextlib.contextmanager
def time_limit(seconds: float):
    if not hasattr(signal, "setitimer"):  # Windows: no timer signal
        yield
        return

    def expire(signum, frame):
        raise Hang(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def check_error(exc: RbeError) -> None:
    """An RbeError is fine unless it hides an allocation beyond the budget."""
    message = str(exc)
    assert "MemoryError" not in message and "not enough memory" not in message, (
        f"the reader tried an absurd allocation: {message}"
    )


def attempt(fn, *args):
    try:
        return fn(*args)
    except RbeError as exc:
        check_error(exc)
        return None


def read_everything(reader: Reader) -> None:
    for name in reader.keys():
        array = attempt(reader.get_tensor, name)
        if array is not None:
            assert array.shape == reader.entry(name).shape
    for path in reader.files():
        data = attempt(reader.read_file, path)
        if data is not None:
            assert len(data) == reader.files()[path].blob.items
    attempt(lambda: list(reader.verify(deep=True)))


def exercise(path) -> None:
    """Opens and reads ``path`` every way; anything but an RbeError propagates."""
    with time_limit(SECONDS_PER_CASE):
        for verify_checksums in (True, False):
            reader = attempt(lambda checks=verify_checksums: Reader(path, verify_checksums=checks, threads=2))
            if reader is not None:
                with reader:
                    read_everything(reader)


def detected(path) -> bool:
    """Whether opening fails or verify() reports a problem."""
    try:
        with Reader(path) as r:
            return bool(list(r.verify()))
    except RbeError:
        return True


def _chunks(manifest: dict) -> list[dict]:
    """Every chunk record of a (sound) manifest."""
    return [c for t in manifest["tensors"] for c in t.get("chunks", [])] + [
        c for f in manifest["files"] for c in f["chunks"]
    ]


class SampleBytes(bytes):
    """The sample file's bytes, with a short repr for hypothesis' failure reports."""

    def __repr__(self) -> str:
        return f"<sample rbe file of {len(self)} bytes>"


@pytest.fixture(scope="module")
def sample(tmp_path_factory) -> bytes:
    path = tmp_path_factory.mktemp("sample") / "sample.rbe"
    write_sample(path)
    return SampleBytes(path.read_bytes())


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    """One file that each example overwrites (hypothesis forbids per-example fixtures)."""
    path = tmp_path_factory.mktemp("scratch") / "case.rbe"

    def write(data: bytes):
        path.write_bytes(data)
        return path

    return write


# -- the sample and the harness work ---------------------------------------------------


def padding(r: Reader) -> list[tuple[int, int]]:
    """The [start, end) ranges of a file that no header, section, manifest or footer covers."""
    spans = sorted((c.offset, c.offset + c.length) for _, c in r.manifest.chunks())
    manifest = (r.footer.manifest_offset, r.footer.manifest_offset + r.footer.manifest_length)
    covered = [(0, HEADER_SIZE), *spans, manifest, (r.size - FOOTER_SIZE, r.size)]
    return [(end, start) for (_, end), (start, _) in zip(covered, covered[1:]) if start > end]


def test_sample_is_sound_and_covers_every_region(sample, scratch):
    with Reader(scratch(sample)) as r:
        assert list(r.verify(deep=True)) == []
        assert r.entry("b.alias").alias_of == "a.f32"
        assert r.entry("e.raw").blob.codec_record["name"] == "raw"
        assert "split" in {m for c in r.entry("c.grid").blob.chunks for m, _ in c.params["planes"]}
        assert "fields" in {m for c in r.entry("g.rotated").blob.chunks for m, _ in c.params["planes"]}
        assert padding(r) and len(sample) < 16 * 1024


def test_reassembled_manifest_is_read(sample, scratch):
    """The rebuild helpers make files the reader accepts, so hostile cases reach the parser."""
    area, manifest = split_file(sample)
    manifest["metadata"] = {"changed": "yes"}
    with Reader(scratch(assemble(area, manifest))) as r:
        assert r.metadata() == {"changed": "yes"}
        assert list(r.verify(deep=True)) == []


def test_harness_fails_on_foreign_exceptions(sample, scratch, monkeypatch):
    """exercise() must not swallow what it is there to catch."""
    monkeypatch.setattr(Reader, "get_tensor", lambda self, name: {}[name])
    with pytest.raises(KeyError):
        exercise(scratch(sample))


def test_allocation_failure_is_an_rbe_error(sample, scratch, memory_budget):
    """A sound file whose tensor exceeds the memory budget: refused, not a MemoryError."""
    if not memory_budget:
        pytest.skip("needs the address-space cap, or it would really allocate 2.5 GiB")
    area, manifest = split_file(sample)
    frame = zstandard.ZstdCompressor(level=1).compress(bytes(1 << 26))  # 64 MiB of zeros in ~2 KiB
    chunks = []
    for _ in range(40):  # 2.5 GiB in all, beyond the headroom
        area, offset = append_section(area, frame)
        chunks.append({"offset": offset, "length": len(frame), "crc32": crc32(frame), "items": 1 << 26, "params": {}})
    manifest["tensors"].append(
        {
            "name": "zeros",
            "dtype": "U8",
            "shape": [40 << 26],
            "digest": None,
            "codec": {"name": "zstd", "must_understand": True, "config": {"chunk_items": 1 << 26}},
            "chunks": chunks,
        }
    )
    # A limit past the address-space cap: the allocation itself fails (the budget refuses it sooner otherwise).
    with Reader(scratch(assemble(area, manifest)), max_memory=1 << 40) as r:
        with pytest.raises(RbeError, match="not enough memory"):
            r.get_tensor("zeros")


# -- damage is detected ----------------------------------------------------------------


@pytest.mark.slow
def test_every_single_byte_flip_is_detected(sample, tmp_path):
    path = tmp_path / "flip.rbe"
    path.write_bytes(sample)
    missed = []
    fd = os.open(path, os.O_RDWR)
    try:
        for i, byte in enumerate(sample):
            os.pwrite(fd, bytes([byte ^ 0xFF]), i)
            if not detected(path):
                missed.append(i)
            os.pwrite(fd, bytes([byte]), i)
    finally:
        os.close(fd)
    assert missed == []
    assert not detected(path)  # the loop restored every byte


@pytest.mark.parametrize(
    "where, offset_of, code, named",
    [
        ("tensor chunk", lambda r: r.entry("a.f32").blob.chunks[1].offset + 7, 1, "tensor 'a.f32' chunk 1"),
        ("embedded file", lambda r: r.files()["config.json"].blob.chunks[0].offset, 1, "file 'config.json' chunk 0"),
        ("padding", lambda r: padding(r)[0][0], 1, "padding"),
        ("manifest", lambda r: r.footer.manifest_offset + 5, 3, "manifest: checksum mismatch"),
        ("header", lambda r: 3, 3, "header"),
        ("footer", lambda r: r.size - 20, 3, "footer"),
    ],
)
def test_cli_verify_names_the_damage(sample, tmp_path, capsys, where, offset_of, code, named):
    path = tmp_path / "damaged.rbe"
    path.write_bytes(sample)
    with Reader(path) as r:
        offset = offset_of(r)
    damaged = bytearray(sample)
    damaged[offset] ^= 0x41
    path.write_bytes(damaged)
    assert cli_main(["verify", str(path)]) == code
    assert named in capsys.readouterr().err


@FUZZ
@given(st.data())
def test_truncation_is_detected(sample, scratch, data):
    size = data.draw(st.integers(0, len(sample) - 1), label="size")
    zero_filled = data.draw(st.booleans(), label="zero_filled")  # as a crash can leave a file
    damaged = sample[:size] + (bytes(len(sample) - size) if zero_filled else b"")
    path = scratch(damaged)
    assert detected(path)
    exercise(path)


@FUZZ
@given(st.data())
def test_multi_byte_flips_are_detected_and_harmless(sample, scratch, data):
    flips = data.draw(st.dictionaries(st.integers(0, len(sample) - 1), st.integers(1, 255), min_size=1, max_size=8))
    damaged = bytearray(sample)
    for at, mask in flips.items():
        damaged[at] ^= mask
    path = scratch(bytes(damaged))
    assert detected(path)
    exercise(path)  # verify_checksums=False hands the damaged bytes to the decoders


@FUZZ
@given(st.binary(max_size=4096))
def test_random_bytes_are_refused(scratch, blob):
    path = scratch(blob)
    assert detected(path)
    exercise(path)


@FUZZ
@given(st.data())
def test_damaged_payloads_with_valid_checksums_are_harmless(sample, scratch, data):
    """Chunk bytes changed and their CRC updated: the decoders themselves meet the damage."""
    area, manifest = split_file(sample)
    chunk = data.draw(st.sampled_from(_chunks(manifest)), label="chunk")
    payload = bytearray(area[chunk["offset"] : chunk["offset"] + chunk["length"]])
    flips = data.draw(st.dictionaries(st.integers(0, len(payload) - 1), st.integers(1, 255), min_size=1, max_size=6))
    for at, mask in flips.items():
        payload[at] ^= mask
    area = replace_payload(area, chunk, bytes(payload))
    exercise(scratch(assemble(area, manifest)))


# -- hostile manifests -----------------------------------------------------------------

SPECIAL_VALUES = [
    -1,
    0,
    1,
    63,
    64,
    65,
    4095,
    4096,
    2**31,
    2**32 - 1,
    2**32,
    2**40,
    2**40 + 1,
    2**62,
    2**63 - 1,
    2**63,
    2**64,
    -(2**63),
    10**30,
    True,
    False,
    None,
    0.5,
    1.0,
    -0.0,
    1e308,
    math.inf,
    -math.inf,
    math.nan,
    "",
    ".",
    "..",
    "../x",
    "a/../b",
    "/abs",
    "a\\b",
    "C:x",
    "a//b",
    "x" * 5000,
    "\x00",
    "\ud800",
    "é",
    "F32",
    "BF16",
    "Q4_K",
    "split",
    "raw",
    "zstd",
    "byteplane",
    "rotl1",
    "file",
    "safetensors-header",
    "sha256:" + "0" * 64,
    [],
    {},
    [1, 2],
    [[]],
    [-1],
    [2**63],
    {"name": "x"},
    ["raw", 1],
    ["split", 2**40],
]


def nested(depth: int, kind: str) -> RawJson:
    if kind == "list":
        return RawJson("[" * depth + "]" * depth)
    return RawJson('{"a":' * depth + "1" + "}" * depth)


# Depths around the interpreter's recursion limit, where json parses but repr() may not.
NESTING = st.builds(
    nested,
    st.one_of(st.integers(1, 3000), st.sampled_from([900, 980, 995, 1000, 10**5])),
    st.sampled_from(["list", "dict"]),
)

HOSTILE = st.one_of(
    st.sampled_from(SPECIAL_VALUES).map(copy.deepcopy),  # edits must not change the shared originals
    st.integers(),
    st.floats(),
    st.text(max_size=40),
    st.lists(st.one_of(st.integers(-2, 2**64), st.sampled_from(SPECIAL_VALUES[:30])), max_size=9),
    NESTING,
)


def locations(node, prefix=()):
    """The key path of every value in a JSON tree."""
    yield prefix
    if isinstance(node, dict):
        for key, value in node.items():
            yield from locations(value, prefix + (key,))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from locations(value, prefix + (i,))


def lookup(node, path):
    for key in path:
        node = node[key]
    return node


def mutate(manifest: dict, data) -> None:
    """One random edit somewhere in the manifest."""
    paths = list(locations(manifest))[1:]
    path = data.draw(st.sampled_from(paths), label="path")
    parent, key = lookup(manifest, path[:-1]), path[-1]
    op = data.draw(st.sampled_from(["replace", "nudge", "delete", "add_key", "duplicate", "swap"]), label="op")
    value = parent[key]
    if op == "nudge" and type(value) is int:
        parent[key] = value + data.draw(st.sampled_from([-65, -64, -2, -1, 1, 2, 63, 64, 4096, 2**32, 2**62]))
    elif op == "delete" and isinstance(parent, dict):
        del parent[key]
    elif op == "add_key" and isinstance(value, dict):
        value[data.draw(st.sampled_from(["extra", "alias_of", "stats", "tensors", "must_understand"]))] = data.draw(
            HOSTILE
        )
    elif op == "duplicate" and isinstance(value, list) and value:
        value.append(copy.deepcopy(data.draw(st.sampled_from(value))))
    elif op == "swap":
        other = data.draw(st.sampled_from(paths), label="other")
        if other[: len(path)] != path and path[: len(other)] != other:  # neither contains the other
            other_parent = lookup(manifest, other[:-1])
            parent[key], other_parent[other[-1]] = copy.deepcopy(other_parent[other[-1]]), copy.deepcopy(value)
    else:
        parent[key] = data.draw(HOSTILE, label="value")


@pytest.mark.slow
@settings(FUZZ, max_examples=examples(400))
@given(st.data())
def test_randomly_mutated_manifests_are_harmless(sample, scratch, data):
    area, manifest = split_file(sample)
    for _ in range(data.draw(st.integers(1, 3), label="edits")):
        mutate(manifest, data)
    exercise(scratch(assemble(area, manifest)))


# Targeted edits: each aims at one check of the reader, with drawn parameters.

SIZES = st.one_of(
    st.sampled_from([-1, 0, 1, 2**31, 2**32, 2**40, 2**40 + 1, 2**62, 2**63, 2**64, 10**20]),
    st.integers(-(2**65), 2**65),
    st.booleans(),
    st.floats(),
)


def t_shape(area, manifest, data):
    t = data.draw(st.sampled_from(manifest["tensors"]))
    t["shape"] = data.draw(st.lists(st.one_of(SIZES, st.integers(0, 70)), max_size=10))
    return area


def t_chunk_field(area, manifest, data):
    chunk = data.draw(st.sampled_from(_chunks(manifest)))
    chunk[data.draw(st.sampled_from(["offset", "length", "items", "crc32"]))] = data.draw(SIZES)
    return area


def t_chunk_geometry(area, manifest, data):
    """Offsets and lengths that overlap, misalign, or run past the data area."""
    chunks = _chunks(manifest)
    chunk, other = data.draw(st.sampled_from(chunks)), data.draw(st.sampled_from(chunks))
    end = len(area)
    chunk["offset"] = data.draw(
        st.sampled_from(
            [other["offset"], other["offset"] + 64, other["offset"] + 1, end, end - 64, end + 64, 0, 64, 2**62]
        )
    )
    chunk["length"] = data.draw(st.sampled_from([chunk["length"], 0, other["length"], end, end + 1]))
    return area


def t_file_size(area, manifest, data):
    f = data.draw(st.sampled_from(manifest["files"]))
    f["size"] = data.draw(SIZES)
    f["chunks"][0]["items"] = data.draw(st.sampled_from([f["chunks"][0]["items"], f["size"]]))
    return area


def t_dtype(area, manifest, data):
    t = data.draw(st.sampled_from(manifest["tensors"]))
    t["dtype"] = data.draw(st.one_of(st.sampled_from(sorted(DTYPES)), HOSTILE))
    return area


def t_codec(area, manifest, data):
    holder = data.draw(st.sampled_from([t for t in manifest["tensors"] if "codec" in t] + manifest["files"]))
    holder["codec"] = {
        "name": data.draw(st.sampled_from(["byteplane", "raw", "zstd", "future-codec", "", 7])),
        "must_understand": data.draw(st.sampled_from([True, False, 0, 1, None, "false"])),
        "config": data.draw(
            st.one_of(
                st.just({}),
                st.fixed_dictionaries(
                    {"transform": st.sampled_from(["none", "rotl1", "rotl3", 1]), "chunk_items": SIZES}
                ),
                HOSTILE,
            )
        ),
    }
    return area


def t_planes(area, manifest, data):
    """Byteplane parameters with wrong plane counts, lengths and methods."""
    chunk = data.draw(st.sampled_from([c for c in _chunks(manifest) if "planes" in c["params"]]))
    method = st.one_of(st.sampled_from(METHODS), HOSTILE)
    length = st.one_of(st.integers(0, chunk["length"] + 2), SIZES)
    chunk["params"]["planes"] = data.draw(
        st.lists(
            st.one_of(st.lists(st.one_of(method, length), max_size=3), st.tuples(method, length).map(list)), max_size=9
        )
    )
    return area


def t_split_table(area, manifest, data):
    """A split plane whose run-length table does not add up (CRC kept valid)."""
    chunk = tensor(manifest, "c.grid")["chunks"][0]
    payload = bytearray(area[chunk["offset"] : chunk["offset"] + chunk["length"]])
    entries = data.draw(st.integers(1, 64))
    table = data.draw(
        st.lists(st.one_of(st.integers(0, 300), st.integers(0, 2**32 - 1)), min_size=entries, max_size=entries)
    )
    payload[: 4 * entries] = struct.pack(f"<{entries}I", *table)
    return replace_payload(area, chunk, bytes(payload))


def t_zstd_frame(area, manifest, data):
    """An embedded file whose frame declares a content size other than the manifest's (a bomb)."""
    f = file_entry(manifest, "config.json")
    declared = data.draw(
        st.one_of(st.sampled_from([f["size"], f["size"] + 1, 2**26 + 1, 2**40, 2**64 - 1]), st.integers(0, 2**64 - 1))
    )
    body = data.draw(st.binary(max_size=200))
    frame = zstd_frame(declared, body, data.draw(st.booleans()), data.draw(st.integers(0, 255)))
    area, offset = append_section(area, frame)
    f["chunks"] = [{"offset": offset, "length": len(frame), "crc32": crc32(frame), "items": f["size"], "params": {}}]
    return area


def t_alias(area, manifest, data):
    names = [t["name"] for t in manifest["tensors"]] + ["missing", ""]
    for t in manifest["tensors"]:
        if data.draw(st.booleans()):
            for key in ("digest", "codec", "chunks"):
                t.pop(key, None)
            t["alias_of"] = data.draw(st.sampled_from(names))
    return area


def t_paths(area, manifest, data):
    f = data.draw(st.sampled_from(manifest["files"]))
    f["path"] = data.draw(
        st.one_of(
            st.sampled_from(
                [
                    "../evil",
                    "/etc/passwd",
                    "a\\b",
                    "C:/x",
                    "a/./b",
                    "a//b",
                    "a/",
                    ".",
                    "config.json",
                    "x" * 2000,
                    "sub/notes.txt",
                    "ok/../../x",
                ]
            ),
            st.text(max_size=30),
        )
    )
    f["role"] = data.draw(st.sampled_from(["file", "file", "safetensors-header", "other", 3]))
    if f["role"] == "safetensors-header":
        f["tensors"] = data.draw(
            st.lists(st.sampled_from([t["name"] for t in manifest["tensors"]] + ["nope"]), max_size=4)
        )
    return area


def t_names(area, manifest, data):
    t = data.draw(st.sampled_from(manifest["tensors"]))
    t["name"] = data.draw(
        st.one_of(st.sampled_from(["a.f32", "", "x" * 1025, "\x00", "\ud800", "é" * 600]), st.text(max_size=20))
    )
    return area


TARGETED = [
    t_shape,
    t_chunk_field,
    t_chunk_geometry,
    t_file_size,
    t_dtype,
    t_codec,
    t_planes,
    t_split_table,
    t_zstd_frame,
    t_alias,
    t_paths,
    t_names,
]


@pytest.mark.parametrize("edit", TARGETED, ids=[f.__name__[2:] for f in TARGETED])
@settings(FUZZ, max_examples=examples(40))
@given(data=st.data())
def test_targeted_hostile_manifests_are_harmless(sample, scratch, edit, data):
    area, manifest = split_file(sample)
    area = edit(area, manifest, data)
    if data.draw(st.booleans(), label="also a random edit"):
        mutate(manifest, data)
    exercise(scratch(assemble(area, manifest)))


@settings(FUZZ, max_examples=examples(60))
@given(st.binary(max_size=2048))
def test_random_manifest_bytes_are_harmless(sample, scratch, body):
    area, _ = split_file(sample)
    exercise(scratch(assemble(area, body)))
