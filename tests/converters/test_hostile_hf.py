"""Hostile Hugging Face content: what rbe hands transformers is data, never code (rbeformat.embedded.hf_guard).

Each case is crafted here from a small Llama or BERT built with transformers:
a config.json naming the model's own Python code (which would write a marker
file), a pickle beside safetensors shards transformers would not find by
name, sizes the tensors do not bear out, a broken tokenizer.json.  Every one
fails in one line naming the file (exit 3), or loads what the safetensors
weights hold, and no marker is ever written.
"""

from __future__ import annotations

import builtins
import json
import os
import pickle
import signal
import subprocess
import sys
import threading
import time

import pytest
from tiny_models import common_words, one_error_line, run, word_tokenizer

from rbe_converters.cli import main
from rbe_converters.safetensors_io import read_header
from rbeformat import InputError, Writer, budget

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from rbe_loaders.torch import load_model  # noqa: E402

RBE = [sys.executable, "-m", "rbe_converters.cli"]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Small Llama and BERT model directories."""
    root = tmp_path_factory.mktemp("hostile")
    tokenizer = word_tokenizer(common_words(150))
    torch.manual_seed(5)
    built = {
        "llama": transformers.LlamaForCausalLM(
            transformers.LlamaConfig(
                vocab_size=len(tokenizer),
                hidden_size=64,
                intermediate_size=128,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                max_position_embeddings=64,
                tie_word_embeddings=False,
            )
        ),
        "bert": transformers.BertModel(
            transformers.BertConfig(
                vocab_size=len(tokenizer),
                hidden_size=64,
                intermediate_size=128,
                num_hidden_layers=2,
                num_attention_heads=4,
                max_position_embeddings=64,
            )
        ),
    }
    paths = {}
    for name, model in built.items():
        paths[name] = str(root / name)
        model.save_pretrained(paths[name])
        tokenizer.save_pretrained(paths[name])
    return paths


def craft(
    path,
    model_dir: str,
    *,
    config: dict | None = None,
    files: dict[str, bytes] | None = None,
    shard: str = "model.safetensors",
) -> str:
    """A container of the directory's tensors (its safetensors file stored as ``shard``) and files, the
    config replaced by ``config`` and ``files`` added or replaced: what a hostile writer could make."""
    st = read_header(os.path.join(model_dir, "model.safetensors"))
    own = {
        n: open(os.path.join(model_dir, n), "rb").read()
        for n in sorted(os.listdir(model_dir))
        if not n.endswith(".safetensors")
    }
    if config is not None:
        own["config.json"] = json.dumps(config).encode()
    own.update(files or {})
    read_at, close = st.reader()
    with Writer(str(path), force=True, threads=1) as w:
        try:
            for t in st.tensors:
                w.add_tensor(t.name, t.dtype, t.shape, lambda o, n, b=t.begin: read_at(b + o, n))
        finally:
            close()
        w.add_safetensors_layout(shard, st.header, [t.name for t in st.tensors])
        for name, data in own.items():
            w.add_file(name, data)
    return str(path)


def config_of(model_dir: str, **changes) -> dict:
    with open(os.path.join(model_dir, "config.json")) as fh:
        return {**json.load(fh), **changes}


def marker_code(marker) -> bytes:
    return f"open({str(marker)!r}, 'w').write('ran')\n".encode()


@pytest.fixture
def answers_yes(monkeypatch):
    """Anyone asking on stdin is told "y" (as a user pressing y at transformers' prompt would); the
    questions are kept."""
    asked = []
    monkeypatch.setattr(builtins, "input", lambda prompt="": asked.append(prompt) or "y")
    return asked


# -- code: never run, never asked about ---------------------------------------------------


def _remote_code_case(case: str, model_dir: str, marker) -> dict:
    code = {"evil.py": marker_code(marker), "tokenization_evil.py": marker_code(marker)}
    if case == "unknown model_type":
        config = config_of(
            model_dir,
            model_type="evil-llama",
            architectures=["EvilForCausalLM"],
            auto_map={"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"},
        )
        return {"config": config, "files": code}
    if case == "auto_map on a built-in type":
        return {"config": config_of(model_dir, auto_map={"AutoModelForCausalLM": "evil.EvilModel"}), "files": code}
    tokenizer_config = json.loads(open(os.path.join(model_dir, "tokenizer_config.json")).read())
    tokenizer_config.update(
        tokenizer_class="EvilTokenizer", auto_map={"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}
    )
    return {"files": {**code, "tokenizer_config.json": json.dumps(tokenizer_config).encode()}}


REMOTE_CASES = ["unknown model_type", "auto_map on a built-in type", "tokenizer auto_map"]
SAYS = {
    "unknown model_type": "not built into transformers",
    "auto_map on a built-in type": "auto_map",
    "tokenizer auto_map": "tokenizer_config.json has auto_map",
}


@pytest.mark.parametrize("case", REMOTE_CASES)
def test_a_containers_code_never_runs_in_load_model(models, tmp_path, answers_yes, case):
    marker = tmp_path / "MARKER"
    path = craft(tmp_path / "evil.rbe", models["llama"], **_remote_code_case(case, models["llama"], marker))
    with pytest.raises(InputError, match=SAYS[case]) as caught:
        load_model(path, with_tokenizer=True)
    assert str(caught.value).startswith(path) and "\n" not in str(caught.value)
    assert not marker.exists() and answers_yes == []


@pytest.mark.parametrize("case", REMOTE_CASES)
def test_a_containers_code_never_runs_in_rbe_eval(models, tmp_path, capsys, answers_yes, case):
    marker = tmp_path / "MARKER"
    path = craft(tmp_path / "evil.rbe", models["llama"], **_remote_code_case(case, models["llama"], marker))
    for argv in ([path, path], [models["llama"], path]):  # as the original (its tokenizer used), as compressed
        if case == "tokenizer auto_map" and argv[0] != path:
            continue  # a compressed file's tokenizer is never loaded: eval uses the original's
        assert run(["eval", *argv, "--window", "16", "--windows", "2"]) == 3
        line = one_error_line(capsys)
        assert line.startswith(f"rbe: error: {path}: ") and SAYS[case] in line, line
    assert not marker.exists() and answers_yes == []


def test_rbe_eval_on_a_terminal_answering_y_runs_nothing(models, tmp_path):
    """The command line with stdin open and "y" waiting on it: refused in one line, no prompt, no marker."""
    marker = tmp_path / "MARKER"
    path = craft(
        tmp_path / "evil.rbe", models["llama"], **_remote_code_case("unknown model_type", models["llama"], marker)
    )
    done = subprocess.run(
        RBE + ["eval", path, path], input="y\n" * 8, capture_output=True, text=True, env=ENV, timeout=300
    )
    assert done.returncode == 3, done.stderr
    assert done.stderr.count("\n") == 1 and "not built into transformers" in done.stderr, done.stderr
    assert "[y/N]" not in done.stdout + done.stderr
    assert not marker.exists()


@pytest.mark.parametrize("key", ["attn_implementation", "_attn_implementation"])
def test_a_kernel_from_the_hub_is_refused(models, tmp_path, capsys, key):
    path = craft(
        tmp_path / "kernel.rbe",
        models["llama"],
        config=config_of(models["llama"], **{key: "kernels-community/evil-attention"}),
    )
    with pytest.raises(InputError, match="code from the Hugging Face Hub"):
        load_model(path)
    capsys.readouterr()
    assert run(["eval", path, path, "--window", "16", "--windows", "2"]) == 3
    assert f"{key} names 'kernels-community/evil-attention'" in one_error_line(capsys)


# -- pickles: never read ----------------------------------------------------------------


class _Unpickled:
    """Unpickling this runs code: it writes the marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('unpickled')",)


def test_a_pickle_beside_oddly_named_shards_is_never_read(models, tmp_path, capsys, monkeypatch):
    marker = tmp_path / "MARKER"
    bin_file = pickle.dumps({"model.embed_tokens.weight": _Unpickled(marker)})
    loads = []
    monkeypatch.setattr(torch, "load", lambda *a, **k: loads.append(a) or pytest.fail("torch.load was called"))
    # shards transformers does not find by name, and the pickle it would fall back to
    path = craft(
        tmp_path / "odd.rbe", models["llama"], shard="weights.safetensors", files={"pytorch_model.bin": bin_file}
    )
    directory = tmp_path / "odd"
    directory.mkdir()
    for name in os.listdir(models["llama"]):
        target = "weights.safetensors" if name == "model.safetensors" else name
        (directory / target).write_bytes(open(os.path.join(models["llama"], name), "rb").read())
    (directory / "pytorch_model.bin").write_bytes(bin_file)
    capsys.readouterr()
    for original in (path, str(directory), models["llama"]):
        assert main(["eval", original, path, "--window", "16", "--windows", "2", "--json"]) == 0
        rows = json.loads(capsys.readouterr().out)["rows"]
        assert rows[0]["perplexity"] == rows[1]["perplexity"]  # the safetensors weights, both times
    model = load_model(path)
    assert model.rbe_report.rows
    assert loads == [] and not marker.exists()


# -- sizes: checked against the tensors before any module is built -------------------------


def test_a_million_layers_are_refused_at_once(models, tmp_path, capsys):
    path = craft(tmp_path / "deep.rbe", models["llama"], config=config_of(models["llama"], num_hidden_layers=10**6))
    start = time.monotonic()
    with pytest.raises(InputError, match="num_hidden_layers is 1000000, but the tensors hold at most 2"):
        load_model(path)
    assert time.monotonic() - start < 2
    capsys.readouterr()
    for argv in ([path, path], [models["llama"], path]):
        start = time.monotonic()
        assert run(["eval", *argv, "--window", "16", "--windows", "2"]) == 3
        assert time.monotonic() - start < 5  # the original's tokenizer and text come first; no model loads
        assert "num_hidden_layers is 1000000" in one_error_line(capsys)


@pytest.mark.parametrize(
    "model, changes, says",
    [
        ("llama", {"hidden_size": 10**9}, "hidden_size is 1000000000, which no stored tensor has"),
        ("llama", {"intermediate_size": 10**7}, "intermediate_size is 10000000, larger than every stored"),
        ("llama", {"vocab_size": 10**6}, "vocab_size is 1000000"),
        ("llama", {"max_position_embeddings": 10**12}, "max_position_embeddings is 1000000000000, larger than any"),
        ("llama", {"max_position_embeddings": 1 << 25}, "max_position_embeddings is 33554432, more than"),
        ("llama", {"num_attention_heads": 0}, "num_attention_heads is 0; it must be at least 1"),
        ("llama", {"num_key_value_heads": -2}, "num_key_value_heads is -2"),
        ("llama", {"hidden_size": 64.5}, "hidden_size is 64.5, not a whole number"),
        ("llama", {"num_hidden_layers": "2"}, 'num_hidden_layers is "2", not a whole number'),
        ("llama", {"rope_scaling": {"factor": 1 << 40}}, "rope_scaling.factor is 1099511627776"),
        ("bert", {"max_position_embeddings": 128}, "needs [128, 64] for"),  # passes the bounds; the shapes differ
        ("bert", {"text_config": {"model_type": "bert", "hidden_size": 10**8}}, "text_config.hidden_size"),
        ("llama", {"hidden_act": "no-such-activation"}, "transformers cannot load its model"),
    ],
)
def test_sizes_the_tensors_do_not_bear_out_are_one_line_errors(models, tmp_path, capsys, model, changes, says):
    path = craft(tmp_path / "sized.rbe", models[model], config=config_of(models[model], **changes))
    with pytest.raises(InputError) as caught:
        load_model(path)
    message = str(caught.value)
    assert message.startswith(path) and "\n" not in message
    if "needs [" not in says:  # load_model names the parameter, not its module's position
        assert says in message, message
    capsys.readouterr()
    extra = ["--window", "16", "--windows", "2"] if model == "llama" else []
    assert run(["eval", path, path, *extra]) == 3
    line = one_error_line(capsys)
    assert line.startswith(f"rbe: error: {path}: ") and says in line, line


def test_the_models_memory_is_measured_before_it_is_built(models, tmp_path, capsys):
    """BERT with 2^24 positions passes the bounds (a rope model may have that many), but its position table
    and buffers would take gigabytes: measured on the meta device, refused against the limit."""
    path = craft(
        tmp_path / "wide.rbe", models["bert"], config=config_of(models["bert"], max_position_embeddings=1 << 24)
    )
    capsys.readouterr()
    assert run(["eval", path, path, "--max-memory", "512M"]) == 3
    line = one_error_line(capsys)
    assert line.startswith(f"rbe: error: {path}: the model its config.json describes: needs 4.") and "512" in line
    budget.set_limit(64 << 20)
    try:
        with pytest.raises(budget.MemoryLimitError, match="the buffers of the model"):
            load_model(path)
    finally:
        budget.set_limit(None)


# -- tokenizers ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, data",
    [
        ("tokenizer.json", b"{not json"),
        ("tokenizer.json", b'{"model": {"type": "NoSuchModel"}}'),
        ("tokenizer_config.json", b"[1, 2"),
    ],
)
def test_a_broken_tokenizer_is_a_one_line_error(models, tmp_path, capsys, name, data):
    path = craft(tmp_path / "tok.rbe", models["llama"], files={name: data})
    with pytest.raises(InputError) as caught:
        load_model(path, with_tokenizer=True)
    assert str(caught.value).startswith(path) and "\n" not in str(caught.value)
    capsys.readouterr()
    assert run(["eval", path, path, "--window", "16", "--windows", "2"]) == 3
    assert one_error_line(capsys).startswith(f"rbe: error: {path}: ")


# -- stopping a calibrating conversion ---------------------------------------------------


def _signals_as_at_a_terminal() -> None:
    for s in (signal.SIGHUP, signal.SIGINT):
        signal.signal(s, signal.SIG_DFL)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_ends_a_calibrating_convert_within_seconds(tmp_path, signum):
    directory = str(tmp_path / "llama")
    tokenizer = word_tokenizer(common_words(150))
    torch.manual_seed(6)
    transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=256,
            intermediate_size=512,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            tie_word_embeddings=False,
        )
    ).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    out = tmp_path / "out"
    out.mkdir()
    proc = subprocess.Popen(
        RBE + ["convert", directory, str(out / "q4.rbe"), "--preset", "q4"],
        env=ENV,
        stderr=subprocess.PIPE,
        preexec_fn=_signals_as_at_a_terminal,
    )
    seen = bytearray()
    started = threading.Event()

    def watch():
        while chunk := proc.stderr.read1(4096):
            seen.extend(chunk)
            if b"calibrate" in seen:
                started.set()

    reader = threading.Thread(target=watch, daemon=True)
    reader.start()
    assert started.wait(120), bytes(seen)
    time.sleep(1.0)  # well inside the calibration runs
    assert proc.poll() is None, "calibration ended before it could be stopped"
    stopped = time.monotonic()
    proc.send_signal(signum)
    proc.wait(timeout=60)
    elapsed = time.monotonic() - stopped
    reader.join(5)
    said = seen.decode(errors="replace").replace("\r", "\n")
    assert proc.returncode == 128 + signum, said
    assert elapsed < 5, (elapsed, said[-2000:])
    assert f"rbe: interrupted ({signal.Signals(signum).name})" in said
    # Nothing at the output path; what is left is the state `--resume` goes on from (a plain run clears it),
    # and only once it holds work: stopped before the survey's first block, nothing is left.
    left = sorted(p.name for p in out.iterdir())
    assert all(n == ".q4.rbe.resume" or n.endswith(".partial") for n in left), left
    if ".q4.rbe.resume" in left:
        kept = set(os.listdir(out / ".q4.rbe.resume"))
        assert kept & {"survey.json", "statistics.json", "block.json"}, kept
        assert "--resume goes on from it" in said
