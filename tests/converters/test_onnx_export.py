"""rbe convert --onnx: a Hugging Face model's graph exported with torch, wired to the stored weights, run in ONNX Runtime."""

from __future__ import annotations

import copy
import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402
from tiny_models import (  # noqa: E402
    common_words,
    convert,
    encoder_inputs,
    hf_greedy,
    ort_greedy,
    torch_hidden,
    word_tokenizer,
)

import rbe_loaders  # noqa: E402
from rbe_converters import decode, onnx_export  # noqa: E402
from rbe_converters.cli import main  # noqa: E402
from rbe_loaders.ort import session as ort_session  # noqa: E402
from rbe_loaders.ort.graph import graph_initializers, initializer_values, stored_graph  # noqa: E402
from rbeformat import FormatError, Reader, UsageError, Writer  # noqa: E402
from rbeformat.embedded.onnx import MAPPING_KEY, OWN_PREFIX  # noqa: E402

torch.set_num_threads(1)
TOLERANCE = 1e-4


def dense_session(path: str) -> ort.InferenceSession:
    """An ONNX Runtime session on the stored graph, each initializer filled from the tensor the
    container maps it to (transposed where flagged)."""
    with Reader(path) as r:
        model = stored_graph(r)
        wiring = graph_initializers(r)
        for t in model.graph.initializer:
            if t.name in wiring:
                t.CopyFrom(numpy_helper.from_array(initializer_values(r, wiring[t.name]), t.name))
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


# -- encoders ---------------------------------------------------------------------------


def test_every_encoder_weight_is_wired_and_linear_weights_are_transposed(bert):
    directory, model, _, path = bert
    with Reader(path) as r:
        wiring = graph_initializers(r)
        names = set(r.keys())
    hf_tensors = {name for name in names if not name.startswith(OWN_PREFIX)}
    wired = {source.tensor for source in wiring.values()}
    # The pooler is left out of the graph (its output is not one); every other weight is in it.
    assert wired & hf_tensors == {n for n in hf_tensors if not n.startswith("pooler.")}
    linear = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "pooler" not in n}
    assert {source.tensor for source in wiring.values() if source.transposed} == linear
    own = [s.tensor for s in wiring.values() if s.tensor.startswith(OWN_PREFIX)]
    assert own and all(tensor in names for tensor in own)


def test_the_encoder_graph_runs_in_onnx_runtime_as_transformers(bert):
    _, model, tokenizer, path = bert
    session = dense_session(path)
    assert [i.name for i in session.get_inputs()] == ["input_ids", "attention_mask", "token_type_ids"]
    feed = encoder_inputs(len(tokenizer))
    (hidden,) = session.run(["last_hidden_state"], feed)
    diff = np.abs(hidden - torch_hidden(model, feed)).max()
    print(f"encoder: max abs diff ORT vs transformers {diff:.2e}")
    assert diff < TOLERANCE


def test_decoding_gives_back_the_directory_without_the_graph(bert, tmp_path):
    directory, _, _, path = bert
    out = str(tmp_path / "decoded")
    assert main(["decode", path, out, "--quiet"]) == 0
    assert sorted(os.listdir(out)) == sorted(os.listdir(directory))
    for name in os.listdir(directory):
        with open(os.path.join(directory, name), "rb") as a, open(os.path.join(out, name), "rb") as b:
            assert a.read() == b.read(), name


def test_decoding_to_onnx_writes_the_dense_wired_model(bert, tmp_path):
    _, model, tokenizer, path = bert
    out = str(tmp_path / "bert.onnx")
    assert main(["decode", path, out, "--quiet"]) == 0
    onnx.checker.check_model(out)
    feed = encoder_inputs(len(tokenizer))
    (hidden,) = ort.InferenceSession(out, providers=["CPUExecutionProvider"]).run(["last_hidden_state"], feed)
    assert np.abs(hidden - torch_hidden(model, feed)).max() < TOLERANCE


def test_a_lossy_preset_wires_the_compressed_weights(bert, tmp_path):
    directory, _, tokenizer, _ = bert
    path = convert(directory, str(tmp_path / "q8.rbe"), "--preset", "q8")
    decoded = str(tmp_path / "decoded")
    assert main(["decode", path, decoded, "--quiet"]) == 0
    lossy = transformers.BertModel.from_pretrained(decoded).eval()
    feed = encoder_inputs(len(tokenizer))
    (hidden,) = dense_session(path).run(["last_hidden_state"], feed)
    assert np.abs(hidden - torch_hidden(lossy, feed)).max() < TOLERANCE  # the graph runs the decoded weights
    with Reader(path) as r:
        assert any(r.entry(tensor).transform is not None for tensor, _, _ in graph_initializers(r).values())


def test_the_export_is_a_stage_of_its_own(bert, tmp_path):
    from rbe_converters.pipeline import CallbackReporter, ConvertOptions, convert_model

    seen = []
    options = ConvertOptions(onnx=True, threads=1)
    convert_model(bert[0], str(tmp_path / "e.rbe"), options, CallbackReporter(seen.append))
    export = [r for r in seen if r.stage == "export"]
    assert export and any(r.label == "torch.onnx.export" for r in export) and export[-1].done == export[-1].total == 1
    assert [r.stage for r in seen].index("export") < [r.stage for r in seen].index("convert")


def test_the_export_prints_only_rbe_lines(bert, tmp_path, capsys):
    transformers.utils.logging.enable_progress_bar()  # as in a fresh process
    assert main(["convert", bert[0], str(tmp_path / "e.rbe"), "--onnx", "--threads", "1"]) == 0
    captured = capsys.readouterr()
    assert captured.err and all(line.startswith("rbe: ") for line in captured.err.splitlines()), captured.err
    assert f"{tmp_path / 'e.rbe'}: " in captured.out  # the result line, on stdout


def test_without_onnxscript_the_error_names_the_hf_onnx_extra(bert, tmp_path, capsys, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "onnxscript", None)  # import now raises ModuleNotFoundError
    assert main(["convert", bert[0], str(tmp_path / "e.rbe"), "--onnx"]) == 2  # not quiet: still one line
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "rbe convert --onnx" in err[0] and "pip install 'rbe[hf-onnx]'" in err[0], err


def test_the_tokenizer_comes_from_the_container(bert, tmp_path):
    directory, _, tokenizer, path = bert
    text = " ".join(common_words(30)[::3]) + " unheardofword"
    assert rbe_loaders.tokenizer(path).encode(text).ids == tokenizer(text)["input_ids"]
    bare = str(tmp_path / "bare.rbe")
    assert main(["convert", os.path.join(directory, "model.safetensors"), bare, "--quiet"]) == 0
    with pytest.raises(UsageError, match="tokenizer.json"):
        rbe_loaders.tokenizer(bare)


def test_onnx_is_refused_for_inputs_without_an_architecture(bert, tmp_path, capsys):
    directory = bert[0]
    single = os.path.join(directory, "model.safetensors")
    assert main(["convert", single, str(tmp_path / "a.rbe"), "--onnx", "--quiet"]) == 2
    assert "config.json" in capsys.readouterr().err
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    model_path = str(tmp_path / "m.onnx")
    onnx.save(helper.make_model(graph), model_path)
    assert main(["convert", model_path, str(tmp_path / "b.rbe"), "--onnx", "--quiet"]) == 2
    assert not os.path.exists(tmp_path / "a.rbe") and not os.path.exists(tmp_path / "b.rbe")


# -- hostile mappings -------------------------------------------------------------------


def _container(tmp_path, mapping_text: str, initializers=(("init", [3, 2]),)) -> str:
    """A container with tensor "w" [2, 3], a graph whose initializers hold no data, and the mapping given."""
    inits = [TensorProto(name=name, data_type=TensorProto.FLOAT, dims=dims) for name, dims in initializers]
    graph = helper.make_graph([], "g", [], [], initializer=inits)
    path = str(tmp_path / "hostile.rbe")
    with Writer(path, force=True) as w:
        w.add_array("w", np.arange(6, dtype=np.float32).reshape(2, 3))
        w.add_file("model.onnx-graph", helper.make_model(graph).SerializeToString())
        w.add_file("map.json", mapping_text.encode())
        w.set_metadata({"onnx.graph": "model.onnx-graph", MAPPING_KEY: "map.json"})
    return path


def test_a_sound_mapping_is_read(tmp_path):
    path = _container(tmp_path, json.dumps({"init": {"tensor": "w", "transposed": True}}))
    with Reader(path) as r:
        assert graph_initializers(r) == {"init": ("w", True, False)}


def test_a_widened_mapping_reads_bf16_values_as_float32(tmp_path):
    path = str(tmp_path / "widened.rbe")
    values = np.array([[1.5, -2.0, 3.25], [0.0, 7.0, -0.125]], np.float32)
    graph = helper.make_graph(
        [], "g", [], [], initializer=[TensorProto(name="init", data_type=TensorProto.FLOAT, dims=[3, 2])]
    )
    with Writer(path, force=True) as w:
        w.add_array("h", (values.view(np.uint32) >> 16).astype(np.uint16), dtype="BF16")  # exact in bf16
        w.add_file("model.onnx-graph", helper.make_model(graph).SerializeToString())
        w.add_file("map.json", json.dumps({"init": {"tensor": "h", "transposed": True, "widened": True}}).encode())
        w.set_metadata({"onnx.graph": "model.onnx-graph", MAPPING_KEY: "map.json"})
    with Reader(path) as r:
        source = graph_initializers(r)["init"]
        assert source == ("h", True, True)
        np.testing.assert_array_equal(initializer_values(r, source), values.T)


@pytest.mark.parametrize(
    "mapping, message",
    [
        ('{"init": {"tensor": "missing", "transposed": true}}', "does not hold"),
        ('{"init": {"tensor": "w", "transposed": false}}', "does not fit"),
        ('{"init": {"tensor": "w", "transposed": true}, "init": {"tensor": "w", "transposed": true}}', "twice"),
        ('{"init": {"tensor": "w", "transposed": "yes"}}', "is not"),
        ('{"init": {"tensor": "w"}}', "is not"),
        ('{"init": {"tensor": "w", "transposed": true, "widened": false}}', "is not"),
        ('{"init": {"tensor": "w", "transposed": true, "widened": true}}', "widened to F32 does not fit"),
        ("{}", "unmapped"),
        (
            '{"init": {"tensor": "w", "transposed": true}, "other": {"tensor": "w", "transposed": true}}',
            "no initializer",
        ),
        ('["init"]', "not a JSON object"),
        ('{"init": ', "not valid JSON"),
    ],
)
def test_a_hostile_mapping_is_refused(tmp_path, mapping, message):
    path = _container(tmp_path, mapping)
    with Reader(path) as r, pytest.raises(FormatError, match=message):
        graph_initializers(r)


def test_an_initializer_defined_twice_is_refused(tmp_path):
    path = _container(
        tmp_path,
        json.dumps({"init": {"tensor": "w", "transposed": True}}),
        initializers=(("init", [3, 2]), ("init", [3, 2])),
    )
    with Reader(path) as r, pytest.raises(FormatError, match="twice"):
        graph_initializers(r)


def test_decode_leaves_out_only_the_graphs_parts(bert):
    path = bert[3]
    with Reader(path) as r:
        files, tensors = decode.exported_graph_parts(r)
        assert files == {r.metadata()["onnx.graph"], r.metadata()[MAPPING_KEY]}
        assert tensors == {s.tensor for s in graph_initializers(r).values() if s.tensor.startswith(OWN_PREFIX)}


# -- causal LMs -------------------------------------------------------------------------


def test_every_causal_lm_weight_is_wired_the_tied_head_once(llama):
    _, model, path = llama
    with Reader(path) as r:
        wiring = graph_initializers(r)
        hf_tensors = {name for name in r.keys() if not name.startswith(OWN_PREFIX)}
    assert "lm_head.weight" not in hf_tensors  # tied: stored once, as the embedding
    assert {source.tensor for source in wiring.values()} & hf_tensors == hf_tensors
    linear = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"}
    assert {source.tensor for source in wiring.values() if source.transposed} - {"model.embed_tokens.weight"} == linear


def test_the_causal_lm_graph_takes_a_batch_with_a_past_as_transformers(llama):
    _, model, path = llama
    session = dense_session(path)
    layers, kv_heads, head_dim = onnx_export.cache_geometry(model.config)
    rng = np.random.default_rng(7)
    batch, past_len, seq = 3, 4, 6
    ids = rng.integers(0, model.config.vocab_size, (batch, seq), dtype=np.int64)
    mask = np.ones((batch, past_len + seq), np.int64)
    positions = np.broadcast_to(np.arange(past_len, past_len + seq, dtype=np.int64), (batch, seq)).copy()
    past = [rng.standard_normal((batch, kv_heads, past_len, head_dim)).astype(np.float32) for _ in range(2 * layers)]
    names = onnx_export.cache_names(layers)
    logits, *present = session.run(
        None, {"input_ids": ids, "attention_mask": mask, "position_ids": positions, **dict(zip(names, past))}
    )
    cache = transformers.DynamicCache(
        [(torch.from_numpy(past[2 * i]), torch.from_numpy(past[2 * i + 1])) for i in range(layers)], config=model.config
    )
    with torch.no_grad():
        expected = model(
            input_ids=torch.from_numpy(ids),
            attention_mask=torch.from_numpy(mask),
            position_ids=torch.from_numpy(positions),
            past_key_values=cache,
            use_cache=True,
        )
    diff = np.abs(logits - expected.logits.numpy()).max()
    print(f"causal LM: max abs diff of logits ORT vs transformers {diff:.2e}")
    assert diff < TOLERANCE
    assert present[0].shape == (batch, kv_heads, past_len + seq, head_dim)
    assert np.abs(present[-1] - cache.layers[-1].values.numpy()).max() < TOLERANCE


def test_greedy_decoding_with_the_kv_cache_in_onnx_runtime_is_transformers(llama):
    _, model, path = llama
    prompt = [5, 17, 42, 8, 99, 3]
    tokens = ort_greedy(dense_session(path), prompt, 5, model.config)
    assert tokens == hf_greedy(model, prompt, 5)


def test_a_calibrated_preset_converts_with_onnx(llama, tmp_path):
    directory, model, _ = llama
    text = tmp_path / "calibration.txt"
    text.write_text(" ".join(common_words(150)) * 20)
    path = convert(
        directory, str(tmp_path / "q5.rbe"), "--preset", "q5", "--calibration", str(text), "--calibration-windows", "2"
    )
    decoded = str(tmp_path / "decoded")
    assert main(["decode", path, decoded, "--quiet"]) == 0
    lossy = transformers.LlamaForCausalLM.from_pretrained(decoded).eval()
    prompt = [5, 17, 42, 8, 99, 3]
    assert ort_greedy(dense_session(path), prompt, 5, model.config) == hf_greedy(lossy, prompt, 5)
    with Reader(path) as r:
        calibrated = [r.entry(s.tensor).transform for s in graph_initializers(r).values() if s.transposed]
        assert calibrated and all(transform is not None for transform in calibrated)


def test_a_bf16_checkpoint_is_wired_widened_into_the_float32_graph(llama, tmp_path):
    _, model, _ = llama
    directory = str(tmp_path / "bf16")
    copy.deepcopy(model).to(torch.bfloat16).save_pretrained(directory)
    widened = transformers.LlamaForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    word_tokenizer(common_words(150)).save_pretrained(directory)
    path = convert(directory, str(tmp_path / "bf16.rbe"))
    with Reader(path) as r:
        wiring = graph_initializers(r)
        hf_tensors = {name for name in r.keys() if not name.startswith(OWN_PREFIX)}
        assert {r.entry(name).dtype.name for name in hf_tensors} == {"BF16"}
    # every weight stored once, in bf16: none is stored again as a float32 constant of the graph
    assert {s.tensor for s in wiring.values() if s.widened} == hf_tensors
    prompt = [5, 17, 42, 8, 99, 3]
    session, report = ort_session(path, quiet=True)
    assert any("widened from BF16" in row.form for row in report.rows)
    assert ort_greedy(session, prompt, 5, model.config) == hf_greedy(widened, prompt, 5)
    quantized = convert(directory, str(tmp_path / "q8.rbe"), "--preset", "q8")
    decoded = str(tmp_path / "decoded")
    assert main(["decode", quantized, decoded, "--quiet"]) == 0
    lossy = transformers.LlamaForCausalLM.from_pretrained(decoded, dtype=torch.float32).eval()
    session, report = ort_session(quantized, quiet=True)  # runs on the q8 weights, widened
    assert ort_greedy(session, prompt, 5, model.config) == hf_greedy(lossy, prompt, 5)


# -- real checkpoints -------------------------------------------------------------------

SENTENCES = [
    "The container keeps the weights compressed.",
    "ONNX Runtime runs the graph without torch.",
    "A short one.",
]


def test_minilm_with_onnx_runs_in_onnx_runtime_as_transformers(minilm_dir, tmp_path):
    path = convert(minilm_dir, str(tmp_path / "minilm.rbe"))
    tokenizer = rbe_loaders.tokenizer(path)
    tokenizer.enable_padding()
    encodings = tokenizer.encode_batch(SENTENCES)
    feed = {
        "input_ids": np.array([e.ids for e in encodings], np.int64),
        "attention_mask": np.array([e.attention_mask for e in encodings], np.int64),
        "token_type_ids": np.array([e.type_ids for e in encodings], np.int64),
    }
    (hidden,) = dense_session(path).run(["last_hidden_state"], feed)
    model = transformers.AutoModel.from_pretrained(minilm_dir).eval()
    diff = np.abs(hidden - torch_hidden(model, feed)).max()
    print(f"all-MiniLM-L6-v2: max abs diff ORT vs transformers {diff:.2e}")
    assert diff < TOLERANCE


@pytest.mark.slow  # about 4 minutes on one thread, 3.5 GB at most (the export)
def test_smollm2_with_onnx_generates_as_transformers(smollm2_dir, tmp_path):
    path = convert(smollm2_dir, str(tmp_path / "smollm2.rbe"))
    prompt = rbe_loaders.tokenizer(path).encode("The capital of France is").ids
    model = transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir).eval()
    expected = hf_greedy(model, prompt, 8)
    del model  # one copy of the weights at a time besides the session's
    assert ort_greedy(dense_session(path), prompt, 8, transformers.AutoConfig.from_pretrained(smollm2_dir)) == expected


def test_the_stored_graph_carries_no_path_of_the_converting_machine(bert):
    """The exporter's per-node stack traces name this machine's files; they are dropped."""
    import sys

    _, _, _, path = bert
    with Reader(path) as r:
        model = stored_graph(r)
    assert not [p for n in model.graph.node for p in n.metadata_props if p.key == onnx_export.STACK_TRACE_KEY]
    data = model.SerializeToString()
    for place in (os.path.dirname(onnx_export.__file__), sys.prefix, os.path.dirname(os.__file__)):
        assert place.encode() not in data
