"""``rbe convert --ray``: tensors encoded as Ray tasks, one writer placing them in order: the same bytes
as one process, on a local Ray of two workers and on two Ray nodes started on this machine."""

import hashlib
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest
from tiny_models import run, saved_llama

from rbe_converters import pipeline, ray_encode
from rbe_converters.pipeline import ConvertOptions, convert_model

ray = pytest.importorskip("ray")
torch = pytest.importorskip("torch")
pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return saved_llama(tmp_path_factory.mktemp("ray"), 5, num_hidden_layers=2, tie_word_embeddings=False)


def _sha(path) -> str:
    with open(path, "rb") as fh:
        return hashlib.sha256(fh.read()).hexdigest()


def _options(text: str, preset: str | None, **changes) -> ConvertOptions:
    calibrated = {"calibration": text, "calibration_windows": 2} if preset == "q4" else {}
    return ConvertOptions(preset=preset, threads=1, force=True, **calibrated, **changes)


@pytest.mark.slow
@pytest.mark.parametrize("preset", [None, "q8", "q4"])
def test_two_local_workers_write_the_bytes_of_one_process(model_dir, tmp_path, monkeypatch, preset):
    directory, text = model_dir
    one, spread = tmp_path / "one.rbe", tmp_path / "ray.rbe"
    convert_model(directory, str(one), _options(text, preset))
    handed = {"transformed": 0, "candidate": 0}
    for kind in handed:
        method = getattr(ray_encode.RayEncoders, kind)

        def counted(self, *args, _method=method, _kind=kind, **kwargs):
            handed[_kind] += 1
            return _method(self, *args, **kwargs)

        monkeypatch.setattr(ray_encode.RayEncoders, kind, counted)
    convert_model(directory, str(spread), _options(text, preset, ray="local", ray_workers=2))
    assert _sha(one) == _sha(spread)
    if preset == "q4":  # the stages of each block, and mixed precision's scores, went to Ray
        assert handed["transformed"] >= 14 and handed["candidate"] >= 14, handed


@pytest.mark.slow
def test_workers_that_do_not_see_the_input_get_its_bytes_through_the_object_store(model_dir, tmp_path, monkeypatch):
    directory, text = model_dir
    one, spread = tmp_path / "one.rbe", tmp_path / "ray.rbe"
    convert_model(directory, str(one), _options(text, "q8"))
    # The driver's view of each shard differs from what the workers find: every task answers
    # that it cannot read the input, and the driver hands the tensor over instead.
    monkeypatch.setattr(ray_encode, "file_identity", lambda path: (0, 0))
    handed = []
    stored_bytes = ray_encode.RayEncoders._stored_bytes
    monkeypatch.setattr(
        ray_encode.RayEncoders,
        "_stored_bytes",
        lambda self, source, name: handed.append(name) or stored_bytes(self, source, name),
    )
    convert_model(directory, str(spread), _options(text, "q8", ray="local", ray_workers=2))
    assert _sha(one) == _sha(spread)
    assert len(handed) >= len(pipeline.open_source(directory).tensors)


@pytest.mark.slow
def test_an_error_in_a_task_is_rbes_own_one_line(tmp_path, capsys):
    from safetensors.numpy import save_file

    weight = np.ones((64, 64), np.float32)
    weight[3, 5] = np.nan  # no codec encodes it: the worker's InputError reaches the user as one line
    save_file({"w": weight}, str(tmp_path / "in.safetensors"))
    out = tmp_path / "out.rbe"
    chain = "gquant(bits=4, group=32)"
    code = run(["convert", str(tmp_path / "in.safetensors"), str(out), "--codec", chain, "--ray", "--ray-workers", "2"])
    err = capsys.readouterr().err
    assert code == 3 and "Traceback" not in err and err.count("\n") == 1, err
    assert err.startswith("rbe: error: ") and "NaN" in err
    assert not out.exists() and os.listdir(tmp_path) == ["in.safetensors"]


def test_ray_workers_need_a_local_ray(model_dir, tmp_path, capsys):
    directory, _ = model_dir
    assert run(["convert", directory, str(tmp_path / "out.rbe"), "--ray-workers", "2"]) == 2
    assert "--ray-workers" in capsys.readouterr().err


def test_an_address_where_nothing_answers_is_refused_at_once(model_dir, tmp_path, capsys):
    directory, _ = model_dir
    address = f"127.0.0.1:{_free_port()}"
    assert run(["convert", directory, str(tmp_path / "out.rbe"), "--quiet", "--ray", address]) == 2
    err = capsys.readouterr().err
    assert err.startswith("rbe: error: ") and err.count("\n") == 1 and f"nothing answers at {address}" in err, err
    assert os.listdir(tmp_path) == []


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_ray_nodes_on_this_machine_write_the_bytes_of_one_process(model_dir, tmp_path, monkeypatch):
    directory, text = model_dir
    ray_cli = shutil.which("ray", path=os.path.dirname(sys.executable))
    if ray_cli is None:
        pytest.skip("no ray command beside this Python")
    monkeypatch.setenv("RAY_AUTH_MODE", "token")  # the head's token, in ~/.ray, admits the second node
    port = _free_port()
    common = ["--num-cpus=1", "--disable-usage-stats"]
    try:
        subprocess.run(
            [ray_cli, "start", "--head", f"--port={port}", "--include-dashboard=false", *common],
            check=True,
            capture_output=True,
            timeout=180,
        )
        subprocess.run(
            [ray_cli, "start", f"--address=127.0.0.1:{port}", *common], check=True, capture_output=True, timeout=180
        )
        for preset in (None, "q4"):
            one, spread = tmp_path / f"one-{preset}.rbe", tmp_path / f"cluster-{preset}.rbe"
            convert_model(directory, str(one), _options(text, preset))
            convert_model(directory, str(spread), _options(text, preset, ray=f"127.0.0.1:{port}"))
            assert _sha(one) == _sha(spread), preset
    finally:
        subprocess.run([ray_cli, "stop", "--force"], capture_output=True, timeout=120)
