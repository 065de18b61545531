"""Output names that would mislead, and the partial files killed runs left beside an output."""

import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import write_safetensors

from rbe_converters import resume
from rbe_converters.cli import main
from rbeformat import Reader
from rbeformat.atomic import partial_pattern, stale_partials


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("rbe: error: ") and "Traceback" not in err, err
    return err


@pytest.fixture
def rbe_file(model_dir, tmp_path):
    path = str(tmp_path / "m.rbe")
    assert main(["convert", model_dir[0], path, "--quiet"]) == 0
    return path


@pytest.mark.parametrize("name, kind", [("oops.safetensors", ".safetensors file"), ("m.onnx", "ONNX model")])
def test_convert_refuses_another_file_types_name_unless_forced(model_dir, tmp_path, capsys, name, kind):
    out = tmp_path / name
    assert main(["convert", model_dir[0], str(out), "--quiet"]) == 2
    err = one_error_line(capsys)
    assert kind in err and f"{out.with_suffix('.rbe')}" in err and "--force" in err
    assert os.listdir(tmp_path) == ["model"]  # nothing written, not even a partial file
    assert main(["convert", model_dir[0], str(out), "--quiet", "--force"]) == 0
    with Reader(str(out)) as r:  # written anyway, as asked: an rbe file under that name
        assert "embed.weight" in r.keys()


@pytest.mark.parametrize("name", ["out.rbe", "model.bin", "weights.JSON"])
def test_decode_refuses_a_directory_named_like_a_file_unless_forced(rbe_file, tmp_path, capsys, name):
    out = tmp_path / name
    assert main(["decode", rbe_file, str(out), "--quiet"]) == 2
    err = one_error_line(capsys)
    assert "directory" in err and ".safetensors" in err and "--force" in err
    assert not out.exists()
    assert main(["decode", rbe_file, str(out), "--quiet", "--force"]) == 0
    assert os.path.isfile(out / "config.json")


@pytest.mark.parametrize(
    ("name", "meant"), [("out.safetensor", ".safetensors"), ("m.onx", ".onnx"), ("x.jsn", ".json")]
)
def test_a_slip_of_a_file_types_extension_is_refused_as_a_directory_name(rbe_file, tmp_path, capsys, name, meant):
    out = tmp_path / name
    assert main(["decode", rbe_file, str(out), "--quiet"]) == 2
    err = one_error_line(capsys)
    assert f"is close to {meant})" in err and "--force" in err, err
    assert not out.exists()


def test_convert_refuses_a_slip_of_another_file_types_name(model_dir, tmp_path, capsys):
    assert main(["convert", model_dir[0], str(tmp_path / "oops.safetensor"), "--quiet"]) == 2
    err = one_error_line(capsys)
    assert "is close to .safetensors)" in err and f"name it {tmp_path / 'oops'}.rbe" in err, err


@pytest.mark.parametrize("name", ["Llama-3.1-8B", "v1.5", "out", "back.d", "Qwen2.5-7B", "model.q4"])
def test_decode_takes_directory_names_without_a_file_types_extension(rbe_file, tmp_path, name):
    assert main(["decode", rbe_file, str(tmp_path / name), "--quiet"]) == 0
    assert os.path.isfile(tmp_path / name / "config.json")


# -- partial files of killed runs ---------------------------------------------------------------


def _partial(folder, output: str, token: str = "k1ll3d_0") -> str:
    """A partial file as a killed writer of ``output`` leaves it."""
    path = os.path.join(folder, f".{output}.{token}.partial")
    with open(path, "wb") as fh:
        fh.write(b"\x89RBE half of a file")
    return path


def test_the_pattern_is_the_one_writers_use(tmp_path):
    from rbeformat import Writer

    with Writer(str(tmp_path / "a.rbe")) as w:
        assert partial_pattern("a.rbe").fullmatch(w.partial_name)
        assert stale_partials(str(tmp_path / "a.rbe")) == []  # its writer holds it open
    assert not partial_pattern("a.rbe").fullmatch(".a.rbe.resume")
    assert not partial_pattern("a.rbe").fullmatch(".b.a.rbe.12345678.partial")


def test_a_convert_removes_stale_partials_of_its_output_and_names_them(model_dir, tmp_path, capsys):
    out = str(tmp_path / "m.rbe")
    stale = [_partial(tmp_path, "m.rbe"), _partial(tmp_path, "m.rbe", "3f2a9c01")]
    other = _partial(tmp_path, "other.rbe")  # another output's: not this run's business
    unlike = tmp_path / ".m.rbe.notours.partial"  # not the pattern rbe writes
    unlike.write_bytes(b"x")
    os.symlink(os.path.join(tmp_path, "model", "config.json"), tmp_path / ".m.rbe.11111111.partial")
    assert main(["convert", model_dir[0], out, "--quiet"]) == 0
    err = capsys.readouterr().err
    names = sorted(os.path.basename(p) for p in stale)
    assert err.count("\n") == 1 and f"removed 2 partial files that interrupted runs left: {', '.join(names)}" in err
    assert not any(os.path.exists(p) for p in stale)
    assert os.path.exists(other) and unlike.exists()
    assert os.path.islink(tmp_path / ".m.rbe.11111111.partial")  # a link is never followed nor removed
    assert os.path.isfile(tmp_path / "model" / "config.json")


def test_a_partial_that_a_live_process_holds_open_survives(model_dir, tmp_path, capsys):
    held = _partial(tmp_path, "m.rbe", "l1vewr1t")
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; f = open(sys.argv[1], 'ab'); print('open', flush=True); sys.stdin.read()",
            held,
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        assert holder.stdout.readline() == b"open\n"
        stale = _partial(tmp_path, "m.rbe")
        assert stale_partials(str(tmp_path / "m.rbe")) == [os.path.basename(stale)]
        assert main(["convert", model_dir[0], str(tmp_path / "m.rbe"), "--quiet"]) == 0
        assert os.path.exists(held) and not os.path.exists(stale)
        assert "removed 1 partial file" in capsys.readouterr().err
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    assert stale_partials(str(tmp_path / "m.rbe")) == [os.path.basename(held)]  # its writer is gone now


def test_partials_a_resume_state_may_go_on_from_are_left_to_it(model_dir, tmp_path, capsys):
    kept = _partial(tmp_path, "m.rbe")
    os.makedirs(resume.state_dir(str(tmp_path / "m.rbe")))
    assert main(["convert", model_dir[0], str(tmp_path / "m.rbe"), "--quiet"]) == 0
    assert os.path.exists(kept) and os.path.isdir(resume.state_dir(str(tmp_path / "m.rbe")))
    assert capsys.readouterr().err == ""


def test_a_decode_to_a_file_removes_the_stale_partials_of_that_file(rbe_file, tmp_path, capsys):
    stale = _partial(tmp_path, "one.safetensors", "ab12cd34")
    assert main(["decode", rbe_file, str(tmp_path / "one.safetensors"), "--quiet"]) == 0
    assert not os.path.exists(stale)
    assert "removed 1 partial file that interrupted runs left: .one.safetensors.ab12cd34.partial" in (
        capsys.readouterr().err
    )


def test_an_rbe_named_like_a_safetensors_file_is_read_as_rbe(model_dir, tmp_path):
    renamed = str(tmp_path / "looks.safetensors")
    write_safetensors(str(tmp_path / "plain.safetensors"), {"w": np.ones((4, 4), np.float32)})
    assert main(["convert", str(tmp_path / "plain.safetensors"), renamed, "--quiet", "--force"]) == 0
    assert main(["convert", renamed, str(tmp_path / "again.rbe"), "--quiet"]) == 0  # by its magic, not its name
    with Reader(str(tmp_path / "again.rbe")) as r:
        assert r.keys() == ["w"]


@pytest.mark.parametrize("command", [["decode"], ["export-onnx"], ["export-onnx", "--on-the-fly"]])
def test_decoding_onto_the_input_is_refused_as_such_even_with_force(rbe_file, capsys, command):
    before = open(rbe_file, "rb").read()
    assert main([command[0], rbe_file, rbe_file, *command[1:], "--force", "--quiet"]) == 2
    err = one_error_line(capsys)
    assert "is the input" in err and "choose another output" in err and "remove" not in err
    assert open(rbe_file, "rb").read() == before
