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
    assert "checksum mismatch" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["convert"])
    assert exc.value.code == 2


def test_bad_safetensors_input_is_refused_cleanly(tmp_path, capsys):
    path = tmp_path / "bad.safetensors"
    path.write_bytes((10**9).to_bytes(8, "little") + b"{}")
    assert main(["convert", str(path), str(tmp_path / "o.rbe"), "--quiet"]) == 3
    assert "header length" in capsys.readouterr().err
    assert not (tmp_path / "o.rbe").exists()


def _big_checkpoint(path: str, mib: int) -> None:
    rng = np.random.default_rng(0)
    tensors = {f"t{i}": (rng.standard_normal(4 << 20) * 0.02).astype(np.float32) for i in range(mib // 16)}
    write_safetensors(path, tensors)


@pytest.mark.slow
def test_sigkill_midway_leaves_no_output_and_input_intact(tmp_path):
    src = str(tmp_path / "big.safetensors")
    _big_checkpoint(src, 160)
    digest = hashlib.sha256(open(src, "rb").read()).hexdigest()
    dst = tmp_path / "out" / "big.rbe"
    dst.parent.mkdir()
    proc = subprocess.Popen(RBE + ["convert", src, str(dst), "--quiet", "--threads", "1"],
                            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    deadline = time.time() + 60
    # Wait until the partial file has real content, then kill without warning.
    while time.time() < deadline:
        partial = [p for p in dst.parent.iterdir() if p.name.endswith(".partial")]
        if partial and partial[0].stat().st_size > 4 << 20:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "conversion finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not dst.exists()
    assert hashlib.sha256(open(src, "rb").read()).hexdigest() == digest
