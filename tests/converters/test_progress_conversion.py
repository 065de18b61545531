"""A calibrated conversion's progress, stage by stage, on a fake clock: the estimates hold and nothing is silent."""

import os
import subprocess
import sys
import threading
import time

import pytest
from tiny_models import common_words, saved_llama

from rbe_converters import progress
from rbe_converters.compress import mixed
from rbe_converters.compress.calibrate import stream
from rbe_converters.pipeline import CallbackReporter, ConvertOptions, convert_model
from rbeformat import Writer

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

# What each step costs on the fake clock, in the proportions of a real q4 conversion on 2 cores:
# a survey block is a block's run and the scoring of its weights' candidates, an encoded block its
# runs (one per stage) and each weight's GPTQ.
BLOCK_RUN, SCORING, ENCODING = 4.0, 3.0, 6.0


class FakeClock:
    def __init__(self):
        self.now = 1000.0
        self.lock = threading.Lock()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        with self.lock:
            self.now += seconds


def _costing(monkeypatch, clock: FakeClock, target, name: str, seconds: float) -> None:
    real = getattr(target, name)

    def costly(*args, **kwargs):
        result = real(*args, **kwargs)
        clock.advance(seconds)
        return result

    monkeypatch.setattr(target, name, costly)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return saved_llama(tmp_path_factory.mktemp("progress"), 5, num_hidden_layers=8, tie_word_embeddings=True)


def test_every_estimate_after_the_first_fifth_is_within_a_factor_of_two(model_dir, tmp_path, monkeypatch):
    directory, text = model_dir
    clock = FakeClock()
    monkeypatch.setattr(progress.time, "monotonic", clock)
    _costing(monkeypatch, clock, stream, "run_block", BLOCK_RUN)
    _costing(monkeypatch, clock, mixed, "candidate", SCORING)
    _costing(monkeypatch, clock, Writer, "add_transformed_decoded", ENCODING)
    seen = []
    reporter = CallbackReporter(lambda report: seen.append((clock.now, report)))
    options = ConvertOptions(preset="q4", calibration=text, calibration_windows=2, threads=1)
    start = clock.now
    convert_model(directory, str(tmp_path / "q4.rbe"), options, reporter)
    end = clock.now
    stages = [report.stage for _, report in seen]
    assert stages.index("calibrate") < stages.index("encode") < stages.index("convert")
    checked = 0
    for now, report in seen:
        left = end - now
        if now - start < 0.2 * (end - start) or left < 0.05 * (end - start):
            continue  # the first fifth, and the last moments (a second more or less is a large factor)
        estimate = report.left_in_all if report.left_in_all is not None else report.left
        assert estimate is not None, report
        assert left / 2 <= estimate <= 2 * left, (report, left)
        checked += 1
    assert checked >= 10


def test_the_calibration_stage_predicts_the_encoding_after_it(model_dir, tmp_path, monkeypatch):
    directory, text = model_dir
    seen = []
    options = ConvertOptions(preset="q4", calibration=text, calibration_windows=2, threads=1)
    convert_model(directory, str(tmp_path / "q4.rbe"), options, CallbackReporter(seen.append))
    calibrating = [r for r in seen if r.stage == "calibrate" and r.left is not None]
    assert calibrating and all(r.left_in_all > r.left for r in calibrating)
    assert all(r.left_in_all is None for r in seen if r.stage != "calibrate")
    assert any(r.label.startswith("block 8/8") for r in seen if r.stage == "encode")


def test_a_stage_whose_step_lasts_prints_its_clock_every_line_interval(monkeypatch, capsys):
    monkeypatch.setattr(progress, "LINE_SECONDS", 0.2)
    with progress.LineProgress(3, "encode", "blocks", announce=True) as bar:
        bar.label("block 1/3: encoding mlp.down_proj")
        time.sleep(2.5)  # one step that lasts: the heartbeat (about every second) still prints
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) >= 3 and all("encode: 0/3 blocks" in line for line in lines)


def test_a_calibrated_preset_without_torch_says_so_in_its_only_line(model_dir, tmp_path):
    import subprocess
    import sys

    directory, _ = model_dir
    out = tmp_path / "q4.rbe"
    code = (
        "import sys; sys.modules['torch'] = None; sys.modules['transformers'] = None\n"
        "from rbe_converters.cli import main\n"
        f"sys.exit(main(['convert', {directory!r}, {str(out)!r}, '--preset', 'q4']))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.splitlines()  # the error alone: nothing of the run began
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("rbe: error: calibrated encoding") and "pip install 'rbe[hf]'" in lines[0]
    assert not out.exists()


def test_scoring_by_the_models_drift_is_a_stage_counted_in_block_runs(bert, tmp_path):
    directory, *_ = bert
    text = tmp_path / "text.txt"
    text.write_text(" ".join(common_words(120)) * 20)
    seen = []
    options = ConvertOptions(preset="encoder-q4", calibration=str(text), calibration_windows=1, threads=1)
    convert_model(directory, str(tmp_path / "e.rbe"), options, CallbackReporter(seen.append))
    scoring = [r for r in seen if r.stage == "score"]
    assert scoring and all(r.unit == "block runs" for r in scoring)
    assert scoring[-1].done == scoring[-1].total
    labels = [r.label for r in scoring if r.label]
    assert labels[0] == "running the model on the probe text"
    assert any(label.startswith("tensor 2/15: ") and "word_embeddings" in label for label in labels)
    stages = [r.stage for r in seen]
    assert stages.index("calibrate") < stages.index("score") < stages.index("encode")
    estimating = [r for r in scoring if r.left is not None]  # the blocks' encoding after it, predicted
    assert estimating and all(r.left_in_all > r.left for r in estimating)
    first_encode = next(r for r in seen if r.stage == "encode")
    assert first_encode.done == 0 and first_encode.left is not None  # that prediction, until a block is done


def test_in_a_log_the_byte_stage_keeps_the_line_interval_from_the_stage_before(monkeypatch, capsys):
    from rbe_converters import cli

    clock = FakeClock()
    monkeypatch.setattr(progress.time, "monotonic", clock)
    reporter = cli.CommandReporter(quiet=False)
    with reporter.stage(4, "score", "tensors") as stage:  # its first line as it begins
        clock.advance(3.0)
        stage.update(4)  # done within the interval: its last line says so as it ends
    clock.advance(5.0)  # work between the stages: 5 s since that line
    with reporter.bar(100e6, "convert") as bar:
        clock.advance(4.0)
        bar.update(50e6)  # 9 s since the last line: none yet
        clock.advance(1.5)
        bar.update(50e6)  # 10.5 s: its first
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(":")[1].strip() for line in lines] == ["score", "score", "convert"], lines
    assert lines[1] == "rbe: score: 4/4 tensors, 0:03 elapsed, done", lines
    assert lines[2].startswith("rbe: convert: 100.0/100.0 MB"), lines  # at 10.5 s, after its last update
    with cli.CommandReporter(quiet=False).bar(100, "convert") as alone:  # no stage before: a quick run prints none
        clock.advance(9.0)
        alone.update(100)
    assert capsys.readouterr().err == ""


def test_evals_files_scored_in_a_row_leave_a_log_quiet_no_longer_than_the_line_interval(monkeypatch, capsys):
    from rbe_converters.evaluate.eval import EvalOptions, scoring_progress

    clock = FakeClock()
    monkeypatch.setattr(progress.time, "monotonic", clock)
    options = EvalOptions()
    with scoring_progress("fp32", 4, "batches", options) as first:
        clock.advance(6.0)
        first.update(4)  # a quick file: no line of its own
    with scoring_progress("q4.rbe", 4, "batches", options, after=first) as second:
        clock.advance(3.0)
        second.update(2)  # 9 s since the run began: none yet
        clock.advance(1.5)
        second.update(1)  # 10.5 s: the first line of the run, though this file began 4.5 s ago
        clock.advance(1.0)
        second.update(1)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2 and lines[0].startswith("rbe: eval: scoring q4.rbe: 3/4 batches, 0:04 elapsed"), lines
    assert lines[1] == "rbe: eval: scoring q4.rbe: 4/4 batches, 0:06 elapsed, done"  # where it ended


def test_evals_first_line_is_due_from_the_commands_start(monkeypatch, capsys):
    from rbe_converters.evaluate.eval import EvalOptions, scoring_progress

    clock = FakeClock()
    monkeypatch.setattr(progress.time, "monotonic", clock)
    options = EvalOptions(started=clock.now)
    clock.advance(6.0)  # loading the tokenizer, checking the files
    with scoring_progress("fp32", 8, "batches", options) as first:
        clock.advance(3.0)
        first.update(4)  # 9 s since the command began: none yet
        clock.advance(1.5)
        first.update(1)  # 10.5 s: the first line, 4.5 s into the file
    lines = capsys.readouterr().err.splitlines()
    assert lines and lines[0].startswith("rbe: eval: scoring fp32: 5/8 batches, 0:04 elapsed"), lines


@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="the process's start is read from /proc")
def test_evals_lines_are_due_from_the_processs_start_not_from_after_its_imports():
    code = "import time; time.sleep(1.2); from rbe_converters.progress import process_started as p; print(time.monotonic() - p())"
    age = float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert 1.2 <= age < 5, age  # the sleep before the import is counted
    code = code.replace("1.2", "6")  # a process older than a command's start: main called from a program
    age = float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert age < 1, age  # its command starts now


def test_an_eval_of_several_files_says_which_file_of_how_many_each_line_is_about(monkeypatch, capsys):
    from rbe_converters.evaluate.eval import EvalOptions, scoring_progress

    clock = FakeClock()
    monkeypatch.setattr(progress.time, "monotonic", clock)
    options = EvalOptions(started=clock.now)
    with scoring_progress("q4.rbe", 4, "batches", options, position=(2, 3)) as scoring:
        clock.advance(10.5)
        scoring.update(1)
    with scoring_progress("alone.rbe", 4, "batches", options, after=scoring) as alone:  # one file: no place
        clock.advance(10.5)
        alone.update(1)
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith("rbe: eval: scoring q4.rbe (file 2 of 3): 1/4 batches"), lines
    assert lines[-1].startswith("rbe: eval: scoring alone.rbe: 1/4 batches"), lines


def test_the_scorings_estimate_leaves_out_the_probe_run_before_its_first_tensor(bert, tmp_path, monkeypatch):
    from rbe_converters.compress import sensitivity

    directory, *_ = bert
    text = tmp_path / "text.txt"
    text.write_text(" ".join(common_words(120)) * 20)
    clock = FakeClock()
    monkeypatch.setattr(progress.time, "monotonic", clock)
    _costing(monkeypatch, clock, sensitivity, "ModelProbe", 1000.0)  # the model's run on the probe text
    _costing(monkeypatch, clock, mixed, "candidate", SCORING)  # then each tensor's levels, scored
    seen = []
    options = ConvertOptions(preset="encoder-q4", calibration=str(text), calibration_windows=1, threads=1)
    convert_model(directory, str(tmp_path / "e.rbe"), options, CallbackReporter(seen.append))
    scoring = [r for r in seen if r.stage == "score"]
    end = scoring[-1].elapsed
    for r in scoring:
        if r.left is not None:  # within a factor of 2 of what is really left, from the first estimate on
            assert r.left <= 2 * (end - r.elapsed) + SCORING, (r.label, r.left, end - r.elapsed)
