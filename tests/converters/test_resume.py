"""``rbe convert --resume``: an interrupted calibrated conversion goes on from its last finished block."""

import hashlib
import os

import pytest
from tiny_models import run, saved_llama

from rbe_converters import resume
from rbe_converters.pipeline import CallbackReporter, ConvertOptions, convert_model
from rbeformat import OutputExistsError, UsageError

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return saved_llama(tmp_path_factory.mktemp("resume"), 11, num_hidden_layers=4, tie_word_embeddings=True)


def _options(text: str, **changes) -> ConvertOptions:
    return ConvertOptions(
        **{"preset": "q4", "calibration": text, "calibration_windows": 2, "threads": 1, "force": True, **changes}
    )


def _sha(path: str) -> str:
    with open(path, "rb") as fh:
        return hashlib.sha256(fh.read()).hexdigest()


class _Stop(Exception):
    pass


def _interrupt_after(monkeypatch, block: int) -> None:
    save = resume.ResumeState.save_block

    def save_then_stop(self, index, writer_state, hidden):
        save(self, index, writer_state, hidden)
        if index == block:
            raise _Stop

    monkeypatch.setattr(resume.ResumeState, "save_block", save_then_stop)


def _interrupted(monkeypatch, directory: str, out: str, text: str, block: int) -> None:
    """A calibrated conversion stopped once block ``block``'s checkpoint is saved."""
    with monkeypatch.context() as patch:
        _interrupt_after(patch, block)
        with pytest.raises(_Stop):
            convert_model(directory, out, _options(text))


def test_a_resumed_conversion_writes_the_bytes_of_an_uninterrupted_one(model_dir, tmp_path, monkeypatch):
    directory, text = model_dir
    whole = str(tmp_path / "whole.rbe")
    convert_model(directory, whole, _options(text))
    assert not os.path.exists(resume.state_dir(whole))  # removed on success

    out = str(tmp_path / "out.rbe")
    _interrupted(monkeypatch, directory, out, text, block=1)
    assert not os.path.exists(out)  # nothing at the output path while interrupted
    partials = [n for n in os.listdir(tmp_path) if n.startswith(".out.rbe.") and n.endswith(".partial")]
    assert len(partials) == 1 and os.path.isdir(resume.state_dir(out))

    surveyed, saved = [], []
    save = resume.ResumeState.save_block
    monkeypatch.setattr("rbe_converters.pipeline._calibrations", lambda *a: surveyed.append(1))
    monkeypatch.setattr(resume.ResumeState, "save_block", lambda self, i, *a: saved.append(i) or save(self, i, *a))
    convert_model(directory, out, _options(text, resume=True))
    assert not surveyed and saved == [2, 3]  # no survey again; the blocks after the last one saved
    assert _sha(out) == _sha(whole)
    assert not os.path.exists(resume.state_dir(out))
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".partial")]


def test_a_conversion_stopped_during_the_survey_goes_on_from_its_last_surveyed_block(
    model_dir, tmp_path, monkeypatch, capsys
):
    directory, text = model_dir
    whole = str(tmp_path / "whole.rbe")
    convert_model(directory, whole, _options(text))

    out = str(tmp_path / "out.rbe")
    save = resume.ResumeState.save_survey

    def save_then_stop(self, index, stats, hidden):
        save(self, index, stats, hidden)
        if index == 1:
            raise _Stop

    with monkeypatch.context() as patch:
        patch.setattr(resume.ResumeState, "save_survey", save_then_stop)
        with pytest.raises(_Stop):
            convert_model(directory, out, _options(text))
    assert not os.path.exists(out) and os.path.isfile(os.path.join(resume.state_dir(out), "survey.json"))

    surveyed = []
    monkeypatch.setattr(resume.ResumeState, "save_survey", lambda self, i, *a: surveyed.append(i) or save(self, i, *a))
    code = run(
        [
            "convert",
            directory,
            out,
            "--preset",
            "q4",
            "--calibration",
            text,
            "--calibration-windows",
            "2",
            "--threads",
            "1",
            "--force",
            "--resume",
        ]
    )
    assert code == 0 and "resuming the interrupted survey" in capsys.readouterr().err
    assert surveyed == [2]  # the blocks after the last one surveyed (the last one is never kept)
    assert _sha(out) == _sha(whole)
    assert not os.path.exists(resume.state_dir(out))


def test_resume_refuses_other_options_and_a_plain_run_starts_again(model_dir, tmp_path, monkeypatch):
    directory, text = model_dir
    out = str(tmp_path / "out.rbe")
    _interrupted(monkeypatch, directory, out, text, block=0)
    with pytest.raises(UsageError, match="had other options"):
        convert_model(directory, out, _options(text, calibration_windows=1, resume=True))
    assert os.path.isdir(resume.state_dir(out))  # a refusal keeps the state
    weights = os.path.join(directory, "model.safetensors")
    stat = os.stat(weights)
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # the input changed since
    with pytest.raises(UsageError, match="had other input files"):
        convert_model(directory, out, _options(text, resume=True))
    convert_model(directory, out, _options(text))  # without --resume: from the start, the old state cleared
    assert os.path.exists(out) and not os.path.exists(resume.state_dir(out))
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".partial")]


def test_an_interrupted_run_names_its_state_a_plain_rerun_is_refused_and_force_starts_again(
    model_dir, tmp_path, monkeypatch
):
    directory, text = model_dir
    out = str(tmp_path / "out.rbe")
    warnings = []
    reporter = CallbackReporter(lambda report: None, on_message=warnings.append)
    save = resume.ResumeState.save_block

    def save_then_signal(self, index, *args):
        save(self, index, *args)
        raise KeyboardInterrupt  # what SIGINT or SIGTERM raises in rbe convert

    with monkeypatch.context() as patch:
        patch.setattr(resume.ResumeState, "save_block", save_then_signal)
        with pytest.raises(KeyboardInterrupt):
            convert_model(directory, out, _options(text), reporter)
    folder = os.path.basename(resume.state_dir(out))
    assert folder in warnings[-1] and "--resume goes on from it" in warnings[-1], warnings
    assert "calibration and the blocks encoded so far" in warnings[-1]
    (partial,) = [n for n in os.listdir(tmp_path) if n.endswith(".partial")]  # the blocks: named too
    assert f"{folder} and " in warnings[-1] and partial in warnings[-1], warnings
    warnings.clear()
    with pytest.raises(OutputExistsError) as refused:  # a plain rerun throws no work away unasked
        convert_model(directory, out, _options(text, force=False), reporter)
    assert folder in str(refused.value) and "pass --resume to go on from it, or --force" in str(refused.value)
    assert warnings == []  # the refusal is the run's only line
    assert os.path.exists(tmp_path / partial) and os.path.isdir(resume.state_dir(out))
    convert_model(directory, out, _options(text), reporter)  # --force: starts again
    assert any("starting again" in line and folder in line and partial in line for line in warnings), warnings
    assert not os.path.exists(tmp_path / partial)
    warnings.clear()
    convert_model(directory, str(tmp_path / "other.rbe"), _options(text), reporter)  # nothing was interrupted
    assert not any(folder in line or "starting again" in line for line in warnings), warnings


def test_a_run_that_fails_before_any_progress_leaves_no_state(model_dir, tmp_path, monkeypatch):
    directory, text = model_dir
    out = str(tmp_path / "out.rbe")

    def no_torch(*args, **kwargs):
        raise UsageError("calibrated encoding needs torch")  # as a missing extra stops it

    monkeypatch.setattr("rbe_converters.pipeline._calibrations", no_torch)
    with pytest.raises(UsageError):
        convert_model(directory, out, _options(text))
    assert not os.path.exists(resume.state_dir(out)) and os.listdir(tmp_path) == []


def test_resume_with_nothing_to_resume_converts(model_dir, tmp_path):
    directory, text = model_dir
    out = str(tmp_path / "out.rbe")
    convert_model(directory, out, _options(text, resume=True))
    assert os.path.exists(out) and not os.path.exists(resume.state_dir(out))


def test_rbe_convert_resume_refusal_is_one_line_with_exit_2(model_dir, tmp_path, monkeypatch, capsys):
    from tiny_models import one_error_line, run

    directory, text = model_dir
    out = str(tmp_path / "out.rbe")
    _interrupted(monkeypatch, directory, out, text, block=0)
    argv = ["convert", directory, out, "--preset", "q4", "--calibration", text, "--threads", "1", "--resume"]
    assert run([*argv, "--calibration-windows", "1", "--quiet"]) == 2
    line = one_error_line(capsys)
    assert "--resume: the interrupted conversion had other options (" in line and "; run without" in line
    assert "calibration_windows: 2, not 1" in line, line
    assert run([*argv, "--calibration-windows", "2", "--quiet"]) == 0  # the same options: resumed
    assert os.path.exists(out) and not os.path.exists(resume.state_dir(out))


def test_a_partial_file_killed_before_its_first_block_is_removed_by_the_next_run(model_dir, tmp_path, monkeypatch):
    from rbeformat import Writer

    directory, text = model_dir
    out = str(tmp_path / "out.rbe")
    whole = str(tmp_path / "whole.rbe")
    convert_model(directory, whole, _options(text))

    def killed(self):  # as SIGKILL leaves it: the partial file stays, nothing else happens
        self._state = "aborted"
        self._file.close()

    with monkeypatch.context() as patch:
        patch.setattr(Writer, "abort", killed)
        calls = []

        def stop_in_first_block(self, index, *args):  # before the first checkpoint is saved
            calls.append(index)
            raise _Stop

        patch.setattr(resume.ResumeState, "save_block", stop_in_first_block)
        with pytest.raises(_Stop):
            convert_model(directory, out, _options(text))
    orphans = [n for n in os.listdir(tmp_path) if n.startswith(".out.rbe.") and n.endswith(".partial")]
    assert len(orphans) == 1 and calls == [0]
    convert_model(directory, out, _options(text, resume=True))  # no block to go on from: starts the blocks again
    assert _sha(out) == _sha(whole)
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".partial")]
    assert not os.path.exists(resume.state_dir(out))


@pytest.mark.parametrize(
    "damage, message",
    [
        (
            lambda folder: _edit_json(folder, "block.json", writer={"partial": "../elsewhere.partial"}),
            "no partial file",
        ),
        (lambda folder: _edit_json(folder, "block.json", hidden=5), "damaged resume state"),
        (lambda folder: open(os.path.join(folder, "statistics.json"), "w").write("{not json"), "damaged resume state"),
        (lambda folder: open(os.path.join(folder, "hidden-0-0.npy"), "wb").write(b"\x93NUMPY junk"), "damaged"),
    ],
)
def test_a_damaged_or_planted_resume_state_is_refused_and_nothing_is_written(
    model_dir, tmp_path, monkeypatch, damage, message
):
    from rbeformat import RbeError

    directory, text = model_dir
    out = str(tmp_path / "out.rbe")
    _interrupted(monkeypatch, directory, out, text, block=0)
    damage(resume.state_dir(out))
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(RbeError, match=message):
        convert_model(directory, out, _options(text, resume=True))
    assert not os.path.exists(out) and not os.path.exists(tmp_path.parent / "elsewhere.partial")
    assert sorted(os.listdir(tmp_path)) == before  # no new partial file left behind


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda folder: open(os.path.join(folder, "survey.json"), "w").write("{not json"), "damaged resume state"),
        (lambda folder: _edit_json(folder, "survey.json", hidden=5), "damaged resume state"),
        (lambda folder: _edit_json(folder, "survey.json", candidates=[1, 2]), "survey.json is damaged"),
    ],
)
def test_a_damaged_survey_state_is_refused_and_nothing_is_written(model_dir, tmp_path, monkeypatch, damage, message):
    from rbeformat import RbeError

    directory, text = model_dir
    out = str(tmp_path / "out.rbe")
    save = resume.ResumeState.save_survey

    def save_then_stop(self, index, stats, hidden):
        save(self, index, stats, hidden)
        raise _Stop

    with monkeypatch.context() as patch:
        patch.setattr(resume.ResumeState, "save_survey", save_then_stop)
        with pytest.raises(_Stop):
            convert_model(directory, out, _options(text))
    damage(resume.state_dir(out))
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(RbeError, match=message):
        convert_model(directory, out, _options(text, resume=True))
    assert not os.path.exists(out) and sorted(os.listdir(tmp_path)) == before


def _edit_json(folder: str, name: str, **changes) -> None:
    import json

    path = os.path.join(folder, name)
    with open(path) as fh:
        data = json.load(fh)
    for key, value in changes.items():
        data[key] = {**data[key], **value} if isinstance(value, dict) else value
    with open(path, "w") as fh:
        json.dump(data, fh)


def test_a_plain_rerun_names_the_folder_a_run_killed_before_any_work_left(model_dir, tmp_path):
    directory, text = model_dir
    out = str(tmp_path / "out.rbe")
    resume.ResumeState(out, {"state": 0}).start(False)  # what a run killed by SIGKILL at once leaves
    warnings = []
    convert_model(directory, out, _options(text), CallbackReporter(lambda report: None, on_message=warnings.append))
    folder = os.path.basename(resume.state_dir(out))
    assert any(folder in line and "before it kept any work" in line for line in warnings), warnings
    assert not os.path.exists(resume.state_dir(out))
