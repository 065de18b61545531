"""The demo of the README's first command: it keeps its file, checks the round trip and ends with
commands a user can paste as they are."""

import os
import sys

from bench import demo


def test_the_demo_keeps_its_file_and_names_the_commands_of_this_environment(minilm_dir, tmp_path, capsys):
    assert demo.run(str(tmp_path)) == 0
    out = capsys.readouterr().out
    kept = tmp_path / "all-MiniLM-L6-v2.rbe"
    assert kept.is_file() and (tmp_path / "decoded" / "model.safetensors").is_file()
    assert "byte-identical to the original" in out
    steps = out[out.index("next:") :].splitlines()[1:]
    rbe = os.path.join(os.path.dirname(sys.executable), "rbe")
    commands = [line.split()[0] for line in steps]
    assert all(os.path.abspath(c) == rbe for c in commands if c.endswith("rbe")), steps
    assert any(f"info {kept}" in line for line in steps)
    assert any("--preset q4" in line for line in steps)


def test_next_steps_name_the_hf_extra_only_where_it_is_missing(monkeypatch):
    from rbeformat import MissingExtraError, extras

    installed = demo.next_steps("model", "m.rbe")
    assert not any("install" in line for line in installed)  # the test extras include hf

    def missing(*_):
        raise MissingExtraError("no torch", name="torch", extra="hf")

    monkeypatch.setattr(extras.Need, "require", missing)
    lines = demo.next_steps("model", "m.rbe")
    install = [line for line in lines if "install" in line]
    assert len(install) == 1 and "'.[hf]'" in install[0]
    assert lines.index(install[0]) < next(i for i, line in enumerate(lines) if "--preset q4" in line)
