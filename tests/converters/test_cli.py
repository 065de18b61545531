"""The rbe command: round trips, exit codes, one-line errors, no data loss."""

import hashlib
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import tree_digest, write_safetensors

from rbe_converters.cli import main

RBE = [sys.executable, "-m", "rbe_converters.cli"]


def test_directory_roundtrip_is_byte_identical(model_dir, tmp_path, capsys):
    src, tensors = model_dir
    before = tree_digest(src)
    out = str(tmp_path / "m.rbe")
    assert main(["convert", src, out, "--quiet"]) == 0
    assert main(["decode", out, str(tmp_path / "back"), "--quiet"]) == 0
    assert tree_digest(str(tmp_path / "back")) == before
    assert tree_digest(src) == before  # the input is never touched
    assert main(["verify", out]) == 0
    assert "OK" in capsys.readouterr().out


def test_decoding_a_lossy_file_says_its_values_approximate_the_originals(model_dir, tmp_path, capsys):
    src, _ = model_dir
    lossless, lossy = str(tmp_path / "exact.rbe"), str(tmp_path / "q8.rbe")
    assert main(["convert", src, lossless, "--quiet"]) == 0
    assert main(["convert", src, lossy, "--quiet", "--codec", "gquant(bits=8, group=16)"]) == 0
    capsys.readouterr()
    assert main(["decode", lossless, str(tmp_path / "exact")]) == 0
    assert "lossily" not in capsys.readouterr().out
    assert main(["decode", lossy, str(tmp_path / "q8")]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"{tmp_path / 'q8'}: decoded from {lossy} (") and "stored lossily: their decoded " in line
    assert line.endswith("values approximate the original's (rbe info shows each one's error)"), line


def test_single_file_roundtrip_and_merge(model_dir, tmp_path):
    src, tensors = model_dir
    shard = os.path.join(src, "model-00001-of-00002.safetensors")
    out = str(tmp_path / "s.rbe")
    assert main(["convert", shard, out, "--quiet"]) == 0
    assert main(["decode", out, str(tmp_path / "s.safetensors"), "--quiet"]) == 0
    assert (tmp_path / "s.safetensors").read_bytes() == open(shard, "rb").read()
    # A sharded model decoded to one file holds every tensor.
    assert main(["convert", src, str(tmp_path / "m.rbe"), "--quiet"]) == 0
    assert main(["decode", str(tmp_path / "m.rbe"), str(tmp_path / "all.safetensors"), "--quiet"]) == 0
    from safetensors.numpy import load_file

    merged = load_file(str(tmp_path / "all.safetensors"))
    assert sorted(merged) == sorted(tensors)
    for name, array in tensors.items():
        assert merged[name].tobytes() == array.tobytes()


def test_info_shows_table_and_json(model_dir, tmp_path, capsys):
    src, _ = model_dir
    out = str(tmp_path / "m.rbe")
    main(["convert", src, out, "--quiet"])
    capsys.readouterr()
    assert main(["info", out]) == 0
    text = capsys.readouterr().out
    assert "alias of embed.weight" in text and "bits per weight" in text and "lossless" in text
    assert main(["info", out, "--json"]) == 0
    import json

    info = json.loads(capsys.readouterr().out)
    names = {row["name"]: row for row in info["tensors"]}
    assert names["lm_head.weight"]["stored_bytes"] == 0
    assert info["totals"]["file_bytes"] == os.path.getsize(out)
    stored = info["totals"]["tensor_stored_bytes"] + sum(f["stored_bytes"] for f in info["files"])
    assert stored + info["totals"]["overhead_bytes"] == os.path.getsize(out)


@pytest.mark.parametrize(
    "argv",
    [
        ["convert", "{missing}", "{out}.rbe"],
        ["convert", "{missing}", "{out}.rbe", "--preset", "q8"],
        ["decode", "{missing}", "{out}.rbe"],
        ["decode", "{missing}", "{out}.safetensors"],
        ["export-onnx", "{missing}", "{out}.onnx"],
        ["export-onnx", "{missing}", "{out}.onnx", "--on-the-fly"],
    ],
)
def test_a_missing_input_is_said_before_the_outputs_refusals(tmp_path, capsys, argv):
    """An output that exists (or a directory named like a file) would ask for --force, which cannot help."""
    missing, out = str(tmp_path / "nope.rbe"), str(tmp_path / "out")
    argv = [arg.format(missing=missing, out=out) for arg in argv]
    open(argv[2], "wb").close()
    assert main(argv) == 3
    assert capsys.readouterr().err == f"rbe: error: {missing}: no such file or directory\n"
    assert os.path.getsize(argv[2]) == 0


def test_exit_codes_and_one_line_errors(model_dir, tmp_path, capsys):
    src, _ = model_dir
    out = tmp_path / "m.rbe"
    assert main(["convert", src, str(out), "--quiet"]) == 0
    before = out.read_bytes()
    assert main(["convert", src, str(out), "--quiet"]) == 4  # exists, no --force
    assert out.read_bytes() == before
    assert main(["convert", src, str(out), "--quiet", "--force"]) == 0
    assert out.read_bytes() == before  # deterministic
    capsys.readouterr()
    assert main(["convert", str(tmp_path / "nope"), str(tmp_path / "x.rbe")]) == 3
    err = capsys.readouterr().err
    assert err.startswith("rbe: error:") and err.count("\n") == 1 and "Traceback" not in err
    (tmp_path / "junk.rbe").write_bytes(b"not an rbe file at all" * 10)
    assert main(["info", str(tmp_path / "junk.rbe")]) == 3
    damaged = bytearray(before)
    damaged[200] ^= 1
    (tmp_path / "bad.rbe").write_bytes(bytes(damaged))
    capsys.readouterr()
    assert main(["verify", str(tmp_path / "bad.rbe")]) == 1
    err = capsys.readouterr().err
    assert "checksum mismatch" in err and err.startswith(f"rbe: {tmp_path / 'bad.rbe'}: damaged: ")
    with pytest.raises(SystemExit) as exc:
        main(["convert"])
    assert exc.value.code == 2


def test_bad_safetensors_input_is_refused_cleanly(tmp_path, capsys):
    path = tmp_path / "bad.safetensors"
    path.write_bytes((10**9).to_bytes(8, "little") + b"{}")
    assert main(["convert", str(path), str(tmp_path / "o.rbe"), "--quiet"]) == 3
    assert "header length" in capsys.readouterr().err
    assert not (tmp_path / "o.rbe").exists()


# -- decoding into a directory that exists --------------------------------------------


@pytest.fixture
def converted(model_dir, tmp_path):
    src, _ = model_dir
    out = str(tmp_path / "m.rbe")
    assert main(["convert", src, out, "--quiet"]) == 0
    return src, out


def partials(root) -> list[str]:
    return [os.path.join(d, f) for d, _, files in os.walk(root) for f in files if f.endswith(".partial")]


def test_decode_into_an_existing_directory_needs_force(converted, tmp_path, capsys):
    _, rbe = converted
    (tmp_path / "empty").mkdir()
    capsys.readouterr()
    assert main(["decode", rbe, str(tmp_path / "empty"), "--quiet"]) == 4
    assert "--force" in capsys.readouterr().err
    assert os.listdir(tmp_path / "empty") == []


def test_decode_force_replaces_only_the_containers_files(converted, tmp_path, capsys):
    src, rbe = converted
    back = tmp_path / "back"
    assert main(["decode", rbe, str(back), "--quiet"]) == 0
    (back / "notes.txt").write_text("my own notes")
    (back / "config.json").write_text("stale")  # a file the container holds: replaced
    capsys.readouterr()
    assert main(["decode", rbe, str(back), "--force", "--quiet"]) == 0
    err = capsys.readouterr().err
    assert err == f"rbe: {back}: kept 1 file not in the container: notes.txt\n"
    assert (back / "notes.txt").read_text() == "my own notes"
    digest = tree_digest(str(back))
    del digest["notes.txt"]
    assert digest == tree_digest(src)
    assert partials(back) == []


@pytest.mark.parametrize("prepared", [False, True])
def test_decode_force_into_the_current_directory(converted, tmp_path, monkeypatch, prepared):
    src, rbe = converted
    here = tmp_path / "here"
    here.mkdir()
    if prepared:
        assert main(["decode", rbe, str(here), "--quiet", "--force"]) == 0
    monkeypatch.chdir(here)
    assert main(["decode", rbe, ".", "--force", "--quiet"]) == 0
    assert tree_digest(".") == tree_digest(src)
    assert [p for p in os.listdir(tmp_path) if p.startswith(".")] == []  # no .old.* or temp left beside


def test_decode_from_inside_the_directory_keeps_the_rbe_file(converted, tmp_path, monkeypatch, capsys):
    src, rbe = converted
    here = tmp_path / "here"
    here.mkdir()
    os.replace(rbe, here / "m.rbe")
    monkeypatch.chdir(here)
    capsys.readouterr()
    assert main(["decode", "m.rbe", ".", "--force", "--quiet"]) == 0
    assert "kept 1 file not in the container: m.rbe" in capsys.readouterr().err
    assert main(["verify", "m.rbe", "--quiet"]) == 0


def test_a_failed_decode_leaves_the_directory_as_it_was(converted, tmp_path, monkeypatch, capsys):
    from rbeformat import ChecksumError, Reader

    _, rbe = converted
    back = tmp_path / "back"
    back.mkdir()
    (back / "notes.txt").write_text("my own notes")
    (back / "config.json").write_text("stale")
    before = tree_digest(str(back))
    real, calls = Reader.iter_tensor_bytes, []

    def failing(r, name, verify=False):
        calls.append(name)
        if len(calls) == 4:
            raise ChecksumError(f"tensor {name!r}: decoded bytes do not match the recorded digest")
        return real(r, name, verify=verify)

    monkeypatch.setattr(Reader, "iter_tensor_bytes", failing)
    capsys.readouterr()
    assert main(["decode", rbe, str(back), "--force", "--quiet"]) == 3
    assert "do not match" in capsys.readouterr().err
    assert tree_digest(str(back)) == before
    assert sorted(os.listdir(back)) == ["config.json", "notes.txt"]  # no 1_Pooling/, no temp files


def test_a_directory_in_the_way_is_refused_before_writing(converted, tmp_path, capsys):
    _, rbe = converted
    back = tmp_path / "back"
    (back / "config.json").mkdir(parents=True)
    capsys.readouterr()
    assert main(["decode", rbe, str(back), "--force", "--quiet"]) == 4
    assert "config.json: is a directory" in capsys.readouterr().err
    assert os.listdir(back) == ["config.json"] and os.listdir(back / "config.json") == []


def test_single_file_decode_over_a_file_and_onto_a_directory(converted, tmp_path, capsys):
    _, rbe = converted
    one = tmp_path / "one.safetensors"
    one.write_bytes(b"old")
    assert main(["decode", rbe, str(one), "--quiet"]) == 4
    assert main(["decode", rbe, str(one), "--quiet", "--force"]) == 0
    assert one.read_bytes() != b"old"
    (tmp_path / "dir.safetensors").mkdir()
    capsys.readouterr()
    assert main(["decode", rbe, str(tmp_path / "dir.safetensors"), "--quiet", "--force"]) == 4
    assert "is a directory" in capsys.readouterr().err


# -- what convert and decode print ----------------------------------------------------


class RecordingBar:
    def __init__(self, total):
        self.total, self.done = total, 0

    def update(self, n):
        self.done += n

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        bars.append(self)


bars: list[RecordingBar] = []


@pytest.mark.parametrize(
    "options",
    [
        [],
        ["--codec", "gquant(bits=4, group=32)"],  # transformed tensors, and a transformed alias (lm_head)
        ["--recipe", "normdelta"],  # an internal base tensor that is not the model's
    ],
)
def test_progress_ends_at_its_total(model_dir, tmp_path, monkeypatch, options):
    import math

    from rbe_converters import cli

    src, tensors = model_dir
    if options == ["--recipe", "normdelta"]:
        recipe = tmp_path / "r.toml"
        recipe.write_text('[[rule]]\nmatch = "norm.weight"\ncodec = "normdelta(mode=bits)"\n')
        options = ["--recipe", str(recipe)]
    monkeypatch.setattr(cli, "progress_bar", lambda total, quiet, desc, last_line=None: RecordingBar(total))
    bars.clear()
    out = str(tmp_path / "m.rbe")
    assert main(["convert", src, out, "--quiet", *options]) == 0
    assert main(["decode", out, str(tmp_path / "back"), "--quiet"]) == 0
    assert main(["decode", out, str(tmp_path / "one.safetensors"), "--quiet"]) == 0
    dense = sum(math.prod(a.shape) * a.itemsize for a in tensors.values())
    assert [(b.total, b.done) for b in bars] == [(dense, dense)] * 3


def test_quiet_hides_the_result_line_and_sizes_are_decimal(model_dir, tmp_path, capsys):
    src, _ = model_dir
    assert main(["convert", src, str(tmp_path / "q.rbe"), "--quiet"]) == 0
    assert capsys.readouterr() == ("", "")
    assert main(["convert", src, str(tmp_path / "m.rbe")]) == 0
    out = capsys.readouterr().out  # the result on stdout; progress and warnings on stderr
    assert f"{tmp_path / 'm.rbe'}: 178.8 kB of tensors -> " in out and "iB" not in out
    assert main(["info", str(tmp_path / "m.rbe")]) == 0
    out = capsys.readouterr().out
    assert " kB" in out and "iB" not in out


def test_a_chain_larger_than_dense_warns_and_is_marked(model_dir, tmp_path, capsys):
    src, _ = model_dir
    out = str(tmp_path / "lr.rbe")
    capsys.readouterr()
    assert main(["convert", src, out, "--quiet", "--codec", "lowrank(rank=64)"]) == 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("rbe: warning: ")
    import json

    assert main(["info", out, "--json"]) == 0
    rows = {row["name"]: row for row in json.loads(capsys.readouterr().out)["tensors"]}
    larger = sorted(name for name, row in rows.items() if row["larger_than_dense"])
    assert "layer.0.weight" in larger and "layer.0.bias" not in larger
    assert all(rows[name]["stored_bytes"] > rows[name]["raw_bytes"] for name in larger)
    assert f"{len(larger)} tensors are larger under their codec chain than dense" in err
    assert larger[0] in err
    assert main(["info", out]) == 0
    assert "LARGER THAN DENSE" in capsys.readouterr().out
    assert main(["convert", src, str(tmp_path / "q.rbe"), "--quiet", "--codec", "gquant(bits=4, group=32)"]) == 0
    assert capsys.readouterr().err == ""


# -- signals ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def big_checkpoint(tmp_path_factory) -> tuple[str, str]:
    """150 MiB of random float32, so that a conversion runs long enough to be stopped midway."""
    path = str(tmp_path_factory.mktemp("big") / "big.safetensors")
    rng = np.random.default_rng(0)
    write_safetensors(path, {f"t{i}": (rng.standard_normal(4 << 20) * 0.02).astype(np.float32) for i in range(10)})
    return path, hashlib.sha256(open(path, "rb").read()).hexdigest()


def _signals_as_at_a_terminal() -> None:
    """A run started under nohup or in the background inherits SIGHUP / SIGINT ignored, and rbe keeps
    them ignored on purpose; the child gets the dispositions of a terminal session instead."""
    for s in (signal.SIGHUP, signal.SIGINT):
        signal.signal(s, signal.SIG_DFL)


def start_and_wait_for_partial(src: str, dst, *options) -> subprocess.Popen:
    """Starts a conversion and returns once its .partial file holds data and grows."""
    proc = subprocess.Popen(
        RBE + ["convert", src, str(dst), "--quiet", *options],
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
        preexec_fn=_signals_as_at_a_terminal,
    )
    deadline, seen = time.time() + 60, 0
    while time.time() < deadline and proc.poll() is None:
        found = [p for p in dst.parent.iterdir() if p.name.endswith(".partial")]
        size = found[0].stat().st_size if found else 0
        if seen > 4 << 20 and size > seen:
            break
        seen = max(seen, size)
        time.sleep(0.02)
    assert proc.poll() is None, "conversion finished before it could be stopped"
    return proc


@pytest.mark.slow
def test_sigkill_midway_leaves_no_output_and_input_intact(big_checkpoint, tmp_path):
    src, digest = big_checkpoint
    dst = tmp_path / "out" / "big.rbe"
    dst.parent.mkdir()
    proc = start_and_wait_for_partial(src, dst, "--threads", "1")
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert not dst.exists()
    assert hashlib.sha256(open(src, "rb").read()).hexdigest() == digest


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_stop_signal_midway_cleans_up_and_exits_128_plus_signal(big_checkpoint, tmp_path, signum):
    src, digest = big_checkpoint
    dst = tmp_path / "out" / "big.rbe"
    dst.parent.mkdir()
    proc = start_and_wait_for_partial(src, dst)  # default threads: the writer's pool is busy
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=60)  # a pool thread keeping the process alive would time out
    assert proc.returncode == 128 + signum
    assert err.decode() == f"rbe: interrupted ({signal.Signals(signum).name})\n"
    assert list(dst.parent.iterdir()) == []  # neither the output nor its .partial
    assert hashlib.sha256(open(src, "rb").read()).hexdigest() == digest


@pytest.mark.slow
def test_sigterm_during_decode_into_an_existing_directory_changes_nothing(big_checkpoint, tmp_path):
    src, _ = big_checkpoint
    rbe = str(tmp_path / "big.rbe")
    assert main(["convert", src, rbe, "--quiet"]) == 0
    back = tmp_path / "back"
    back.mkdir()
    (back / "notes.txt").write_text("my own notes")
    (back / "big.safetensors").write_bytes(b"an old copy")
    before = tree_digest(str(back))
    proc = subprocess.Popen(
        RBE + ["decode", rbe, str(back), "--force", "--quiet"],
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    deadline = time.time() + 60
    while time.time() < deadline and proc.poll() is None:
        if any(os.path.getsize(p) > 8 << 20 for p in partials(back)):
            break
        time.sleep(0.01)
    assert proc.poll() is None, "decode finished before it could be stopped"
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=60)
    assert proc.returncode == 143
    assert tree_digest(str(back)) == before and partials(back) == []
