"""The rbe command's one error path: one stderr line, the documented exit code, no traceback."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import zstandard

from rbe_converters import cli
from rbe_converters.cli import main
from rbeformat import UsageError, __version__
from rbeformat.spec import FORMAT_MAJOR, FORMAT_MINOR

RBE = [sys.executable, "-m", "rbe_converters.cli"]


def run(argv: list[str]) -> int:
    """main()'s exit code, whether it returns it or argparse exits with it."""
    try:
        return main(argv)
    except SystemExit as exc:
        return exc.code


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.count("\n") == 1, err
    assert err.startswith("rbe: error: "), err
    return err


@pytest.fixture
def rbe_file(model_dir, tmp_path, capsys):
    out = str(tmp_path / "m.rbe")
    assert main(["convert", model_dir[0], out, "--quiet"]) == 0
    capsys.readouterr()
    return out


def test_version(capsys):
    assert run(["--version"]) == 0
    assert capsys.readouterr().out == f"rbe {__version__} (format {FORMAT_MAJOR}.{FORMAT_MINOR})\n"


@pytest.mark.parametrize(
    "extra, named",
    [
        (["--level", "99"], "--level"),
        (["--level", "-1"], "--level"),
        (["--level", "four"], "--level"),
        (["--threads", "0"], "--threads"),
        (["--threads", "-3"], "--threads"),
        (["--lossless", "gzip"], "--lossless"),
    ],
)
def test_bad_option_values_are_usage_errors(model_dir, tmp_path, capsys, extra, named):
    out = tmp_path / "m.rbe"
    assert run(["convert", model_dir[0], str(out), *extra]) == 2
    assert named in one_error_line(capsys)
    assert not out.exists()


def test_decode_threads_must_be_positive(rbe_file, tmp_path, capsys):
    assert run(["decode", rbe_file, str(tmp_path / "back"), "--threads", "-3"]) == 2
    assert "--threads" in one_error_line(capsys)


def test_usage_error_from_a_command_exits_2(monkeypatch, rbe_file, capsys):
    def bad_setting(args):
        raise UsageError("codec chain 'gquant(bits=9)': bits must be 2-8")

    monkeypatch.setitem(cli.COMMANDS, "info", bad_setting)
    assert main(["info", rbe_file]) == 2
    assert "bits must be 2-8" in one_error_line(capsys)


def test_missing_output_directory_is_named_before_any_work(model_dir, tmp_path, capsys, monkeypatch):
    import rbe_converters.sources.safetensors as source

    monkeypatch.setattr(source, "plan_conversion", lambda src: pytest.fail("work started"))
    target = os.path.join(str(tmp_path), "missing_dir", "a.rbe")
    assert main(["convert", model_dir[0], target, "--quiet"]) == 2
    err = one_error_line(capsys)
    assert "missing_dir does not exist" in err and ".partial" not in err
    assert os.listdir(tmp_path) == ["model"]


def test_missing_decode_parent_is_named(rbe_file, tmp_path, capsys):
    for target in ("nowhere/back", "nowhere/one.safetensors"):
        assert main(["decode", rbe_file, str(tmp_path / target), "--quiet"]) == 2
        assert "nowhere does not exist" in one_error_line(capsys)


def test_convert_to_an_existing_directory_is_refused(model_dir, tmp_path, capsys):
    (tmp_path / "somedir").mkdir()
    assert main(["convert", model_dir[0], str(tmp_path / "somedir"), "--quiet", "--force"]) == 4
    assert "is a directory" in one_error_line(capsys)
    assert os.listdir(tmp_path / "somedir") == []


def test_a_safetensors_file_is_named_with_the_fix(model_dir, capsys):
    shard = os.path.join(model_dir[0], "model-00001-of-00002.safetensors")
    for command in (["info", shard], ["verify", shard], ["decode", shard, shard + ".d"]):
        assert main(command) == 3
        err = one_error_line(capsys)
        assert f"{shard}: not an rbe file (it looks like a safetensors file)" in err
        assert f"rbe convert {shard} out.rbe" in err


@pytest.mark.parametrize(
    "content, says",
    [
        (b"", "it is empty"),
        (b"GGUF\x03\x00\x00\x00" + bytes(200), "GGUF"),
        (b"PK\x03\x04" + bytes(200), "zip archive"),
        (b"\x80\x02}q\x00" + bytes(200), "pickle"),
        (b"hello world, certainly not weights" * 10, "it starts with b'hello wo'"),
    ],
)
def test_other_files_say_what_they_look_like(tmp_path, capsys, content, says):
    path = tmp_path / "weights.bin"
    path.write_bytes(content)
    assert main(["info", str(path)]) == 3
    err = one_error_line(capsys)
    assert f"{path}: not an rbe file" in err and says in err


def test_a_directory_and_a_missing_file(model_dir, tmp_path, capsys):
    assert main(["info", model_dir[0]]) == 3
    assert f"rbe convert {model_dir[0]} out.rbe" in one_error_line(capsys)
    missing = str(tmp_path / "nope.rbe")
    assert main(["info", missing]) == 3
    assert missing in one_error_line(capsys)


def test_damaged_rbe_header_keeps_the_readers_diagnosis(rbe_file, capsys):
    data = bytearray(open(rbe_file, "rb").read())
    data[3] ^= 0x41
    open(rbe_file, "wb").write(bytes(data))
    assert main(["info", rbe_file]) == 3
    err = one_error_line(capsys)
    assert "header" in err and rbe_file in err


def _raise_codec_value_error(args):
    from rbeformat.codecs.gquant import GroupQuant

    GroupQuant(bits=99)


@pytest.mark.parametrize(
    "raiser, code, says",
    [
        (_raise_codec_value_error, 3, "gquant.bits (code bits per value): expected an integer in [2, 8]"),
        (lambda args: (_ for _ in ()).throw(MemoryError()), 3, "out of memory"),
        (lambda args: (_ for _ in ()).throw(zstandard.ZstdError("frame is corrupt")), 3, "zstd: frame is corrupt"),
        (
            lambda args: (_ for _ in ()).throw(PermissionError(13, "Permission denied", "/x/y")),
            3,
            "/x/y: Permission denied",
        ),
        (
            lambda args: (_ for _ in ()).throw(RuntimeError("boom\nsecond line")),
            70,
            "bug in rbe: RuntimeError: boom second line",
        ),
        (lambda args: int("not a number"), 70, "bug in rbe: ValueError"),  # not from a codec: a bug
    ],
)
def test_every_exception_is_one_line(monkeypatch, rbe_file, capsys, raiser, code, says):
    monkeypatch.setitem(cli.COMMANDS, "info", raiser)
    assert main(["info", rbe_file]) == code
    err = one_error_line(capsys)
    assert says in err
    if code == 70:
        assert "report" in err
    else:
        assert rbe_file in err or "/x/y" in err


def test_unexpected_exception_in_a_subprocess_has_no_traceback(tmp_path):
    # A real process: nothing reaches Python's default excepthook.
    script = (
        "import sys\nfrom rbe_converters import cli\n"
        "cli.COMMANDS['info'] = lambda args: 1 / 0\n"
        "sys.exit(cli.main(sys.argv[1:]))\n"
    )
    proc = subprocess.run([sys.executable, "-c", script, "info", "x.rbe"], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 70
    assert proc.stderr.count("\n") == 1 and "ZeroDivisionError" in proc.stderr and "Traceback" not in proc.stderr


@pytest.fixture(scope="module")
def many_tensors_rbe(tmp_path_factory) -> str:
    """An rbe file whose `info --json` (about 500 kB) is far larger than a pipe's buffer."""
    from rbeformat import save_file

    out = str(tmp_path_factory.mktemp("many") / "many.rbe")
    save_file({f"block.{i}.weight": np.full(4, i, np.float32) for i in range(1500)}, out)
    return out


def test_closed_stdout_ends_quietly(many_tensors_rbe):
    big = many_tensors_rbe
    # The reader is gone before rbe writes a byte: every write meets a broken pipe.
    proc = subprocess.Popen(RBE + ["info", "--json", big], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()
    assert proc.wait(timeout=60) == 141
    assert proc.stderr.read() == b""
    proc.stderr.close()


def test_pipe_into_head_prints_no_error(many_tensors_rbe, tmp_path):
    big = many_tensors_rbe
    command = " ".join(RBE) + f" info --json {big} | head -c 10; echo; echo rc=${{PIPESTATUS[0]}}"
    proc = subprocess.run(["bash", "-c", command], capture_output=True, text=True, cwd=tmp_path)
    assert proc.stderr == ""
    # 141 when the pipe broke under rbe; 0 where the kernel let the one large write finish.
    assert proc.stdout.startswith("{") and proc.stdout.rsplit("rc=", 1)[1] in ("141\n", "0\n")


def test_info_json_without_a_pipe_is_complete(many_tensors_rbe, capsys):
    assert main(["info", "--json", many_tensors_rbe]) == 0
    assert len(json.loads(capsys.readouterr().out)["tensors"]) == 1500


@pytest.mark.parametrize(
    "chain, says",
    [
        ("gquant(bits=4, grop=64)", "gquant has no setting 'grop'; valid: bits (code bits per value)"),
        ("gquant(bits=4, bits=8)", "'bits' is given twice"),
        ("", "empty"),
        ("vq(bits=2)", "vq.bits (codebook size in bits"),
        ("lowrank(rank=4, A=normdelta())", "shares state across tensors"),
    ],
)
def test_bad_codec_chains_exit_2_with_one_line_naming_the_fix(model_dir, tmp_path, capsys, chain, says):
    out = tmp_path / "o.rbe"
    assert main(["convert", model_dir[0], str(out), "--codec", chain]) == 2
    assert says in one_error_line(capsys)
    assert not out.exists()


def test_a_codec_that_changes_no_tensor_is_a_usage_error(tmp_path, capsys):
    from conftest import write_safetensors

    src = tmp_path / "bias.safetensors"
    write_safetensors(str(src), {"bias": np.zeros(8, np.float32)})
    assert main(["convert", str(src), str(tmp_path / "o.rbe"), "--codec", "gquant(bits=4, group=32)"]) == 2
    assert "applies to no tensor" in one_error_line(capsys)
    assert sorted(os.listdir(tmp_path)) == ["bias.safetensors"]
