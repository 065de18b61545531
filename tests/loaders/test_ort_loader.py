"""ONNX Runtime sessions on compressed weights: `rbe_loaders.ort`, `rbe export-onnx --on-the-fly`."""

from __future__ import annotations

import os

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from rbe_converters import decode, pipeline  # noqa: E402
from rbe_converters.cli import main  # noqa: E402
from rbe_converters.compress.recipe import policy_from_document  # noqa: E402
from rbe_loaders import ort as rbe_ort  # noqa: E402
from rbeformat import Reader, UsageError, save_file  # noqa: E402

ROWS = 5  # activations per call
VOCAB = 40


def linear_model(k_in: int, n_out: int, dim: int, seed: int = 0) -> onnx.ModelProto:
    """x (ROWS, K) through a MatMul weight (K, N) and a Gemm weight (N, K) with bias; ids through a table."""
    rng = np.random.default_rng(seed)
    inits = {
        "w_matmul": rng.standard_normal((k_in, n_out)).astype(np.float32) * 0.1,
        "w_gemm": rng.standard_normal((n_out, k_in)).astype(np.float32) * 0.1,
        "b_gemm": rng.standard_normal(n_out).astype(np.float32) * 0.1,
        "table": rng.standard_normal((VOCAB, dim)).astype(np.float32) * 0.1,
    }
    inits["table"][3] = 0.0  # a constant row: asym groups of scale 0
    nodes = [
        helper.make_node("MatMul", ["x", "w_matmul"], ["y_matmul"]),
        helper.make_node("Gemm", ["x", "w_gemm", "b_gemm"], ["y_gemm"], transB=1),
        helper.make_node("Gather", ["table", "ids"], ["rows"]),
    ]
    graph = helper.make_graph(
        nodes,
        "linear",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [ROWS, k_in]),
            helper.make_tensor_value_info("ids", TensorProto.INT64, [2, 3]),
        ],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in ("y_matmul", "y_gemm", "rows")],
        [numpy_helper.from_array(v, k) for k, v in inits.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def convert(tmp_path, model: onnx.ModelProto, rules: list[dict]) -> str:
    src, out = str(tmp_path / "m.onnx"), str(tmp_path / "m.rbe")
    with open(src, "wb") as fh:
        fh.write(model.SerializeToString())
    pipeline.convert(src, out, policy=policy_from_document({"rule": rules}, "test recipe"), force=True)
    return out


def gquant(bits: int, group: int, mode: str) -> str:
    return f"gquant(bits={bits}, group={group}, mode={mode})"


def quantized_rules(bits: int, group: int, mode: str, table_bits: int | None = None) -> list[dict]:
    chain = gquant(bits, group, mode)
    return [
        {"match": "w_matmul", "input_last": False, "codec": f"transpose(values={chain})"},
        {"match": "w_gemm", "codec": chain},
        {"match": "table", "codec": gquant(table_bits or bits, group, mode)},
    ]


def feeds(k_in: int, seed: int = 1) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "x": rng.standard_normal((ROWS, k_in)).astype(np.float32),
        "ids": np.array([[0, 3, 7], [VOCAB - 1, 3, 12]], np.int64),
    }


def reference(path: str, inputs: dict) -> dict[str, np.ndarray]:
    """The outputs from the numpy reference decode, in float64."""
    with Reader(path) as r:
        w = {name: r.get_tensor(name).astype(np.float64) for name in r.keys()}
    x = inputs["x"].astype(np.float64)
    return {"y_matmul": x @ w["w_matmul"], "y_gemm": x @ w["w_gemm"].T + w["b_gemm"], "rows": w["table"][inputs["ids"]]}


def run_on_the_fly(path: str, inputs: dict) -> tuple[dict[str, np.ndarray], rbe_ort.Report]:
    session, report = rbe_ort.session(path, quiet=True)
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, inputs))), report


def relative_error(got: np.ndarray, want: np.ndarray) -> float:
    """Max abs error over the output's scale (its largest magnitude)."""
    return float(np.abs(got - want).max() / np.abs(want).max())


# -- each mapping against the reference decode ----------------------------------------------


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("mode", ["sym", "asym"])
@pytest.mark.parametrize("k_in, group", [(64, 32), (100, 32), (72, 16), (90, 48)])
def test_linear_weights_run_as_matmul_nbits(tmp_path, bits, mode, k_in, group):
    path = convert(tmp_path, linear_model(k_in, 24, 64), quantized_rules(bits, group, mode))
    inputs = feeds(k_in)
    got, report = run_on_the_fly(path, inputs)
    want = reference(path, inputs)
    kernel = {2: "MatMulNBits 2-bit", 8: "MatMulNBits 8-bit"}.get(bits, "MatMulNBits 4-bit")
    if 4 < bits < 8:  # high and low bits in two 4-bit kernels
        kernel = "2 x " + kernel
    block = group & -group
    for name, output in (("w_matmul", "y_matmul"), ("w_gemm", "y_gemm")):
        assert report.form_of(name).startswith(f"{kernel} block {block}"), report.form_of(name)
        error = relative_error(got[output], want[output])
        print(f"{bits}-bit {mode} K={k_in} group {group} {name}: max abs error / output scale {error:.2e}")
        assert error < 2e-6


@pytest.mark.parametrize("bits", [2, 3, 4, 6, 8])
@pytest.mark.parametrize("mode", ["sym", "asym"])
@pytest.mark.parametrize("dim, group", [(64, 32), (96, 32), (100, 16), (72, 0)])
def test_embedding_tables_run_as_gather_block_quantized_exactly(tmp_path, bits, mode, dim, group):
    rules = [{"match": "table", "codec": gquant(bits, group, mode)}]
    path = convert(tmp_path, linear_model(64, 24, dim), rules)
    inputs = feeds(64)
    got, report = run_on_the_fly(path, inputs)
    assert report.form_of("table").startswith("GatherBlockQuantized"), report.form_of("table")
    np.testing.assert_array_equal(got["rows"], reference(path, inputs)["rows"].astype(np.float32))


def test_scale_zero_groups_decode_to_their_offset(tmp_path):
    model = linear_model(64, 24, 64)
    w = numpy_helper.to_array(model.graph.initializer[1]).copy()
    w[:, :32] = 0.25  # one constant group per row: scale 0, offset 0.25
    model.graph.initializer[1].CopyFrom(numpy_helper.from_array(w, "w_gemm"))
    path = convert(tmp_path, model, quantized_rules(4, 32, "asym"))
    inputs = feeds(64)
    got, _ = run_on_the_fly(path, inputs)
    assert relative_error(got["y_gemm"], reference(path, inputs)["y_gemm"]) < 2e-6


# -- what stays dense, and the report -------------------------------------------------------


def test_other_codecs_and_readers_are_decoded_at_build_and_listed(tmp_path):
    rules = [
        {"match": "w_gemm", "codec": "lowrank(rank=4)"},
        {"match": "w_matmul", "input_last": False, "codec": gquant(4, 32, "sym")},  # groups along N
        {"match": "table", "codec": gquant(4, 20, "sym")},
    ]  # no power-of-two block divides 20
    path = convert(tmp_path, linear_model(64, 24, 80), rules)
    inputs = feeds(64)
    got, report = run_on_the_fly(path, inputs)
    assert sorted(report.decoded_at_build()) == ["table", "w_gemm", "w_matmul"]
    assert report.form_of("w_gemm") == "dense (decoded at build: lowrank)"
    assert "read by MatMul" in report.form_of("w_matmul")
    assert report.form_of("b_gemm") == "initializer (lossless)"
    text = str(report)
    assert "3 decoded at build" in text and "b_gemm" in text
    want = reference(path, inputs)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-6)


def test_report_counts_resident_bytes_against_dense(tmp_path):
    path = convert(tmp_path, linear_model(128, 64, 128), quantized_rules(4, 32, "sym"))
    _, report = run_on_the_fly(path, feeds(128))
    dense = {row.name: row.dense_bytes for row in report.rows}
    assert dense == {"w_matmul": 128 * 64 * 4, "w_gemm": 128 * 64 * 4, "b_gemm": 64 * 4, "table": VOCAB * 128 * 4}
    resident = {row.name: row.resident_bytes for row in report.rows}
    assert resident["w_gemm"] == 64 * 128 // 2 + 64 * 4 * 4  # 4-bit codes, a float32 scale per 32
    assert resident["table"] == VOCAB * 64 + VOCAB * 4 * 4
    assert report.resident_bytes == sum(resident.values()) < 0.2 * report.dense_bytes


def test_a_file_without_a_graph_is_refused(tmp_path):
    path = str(tmp_path / "plain.rbe")
    save_file({"w": np.ones((4, 4), np.float32)}, path)
    with pytest.raises(UsageError, match="holds no ONNX graph"):
        rbe_ort.on_the_fly_model(path)


# -- rbe export-onnx ----------------------------------------------------------------------------


def run(argv) -> int:
    try:
        return main([*argv, "--quiet"])
    except SystemExit as exc:
        return exc.code


def test_exported_file_keeps_the_forms_in_a_plain_session(tmp_path):
    path = convert(tmp_path, linear_model(100, 24, 64), quantized_rules(4, 32, "asym"))
    out = str(tmp_path / "fly.onnx")
    assert run(["export-onnx", path, out, "--on-the-fly"]) == 0
    model = onnx.load_model(out)
    assert {"MatMulNBits", "GatherBlockQuantized"} <= {n.op_type for n in model.graph.node}
    assert not {"w_matmul", "w_gemm", "table"} & {t.name for t in model.graph.initializer}
    inputs = feeds(100)
    plain = ort.InferenceSession(out)
    names = [o.name for o in plain.get_outputs()]
    got, _ = run_on_the_fly(path, inputs)
    for name, value in zip(names, plain.run(None, inputs)):
        np.testing.assert_array_equal(value, got[name])


def test_export_without_on_the_fly_is_the_dense_decode(tmp_path):
    path = convert(tmp_path, linear_model(64, 24, 64), quantized_rules(4, 32, "sym"))
    assert run(["export-onnx", path, str(tmp_path / "dense.onnx")]) == 0
    assert run(["decode", path, str(tmp_path / "decoded.onnx")]) == 0
    assert (tmp_path / "dense.onnx").read_bytes() == (tmp_path / "decoded.onnx").read_bytes()


def test_export_prints_one_line_of_forms_and_a_row_per_weight_when_asked(tmp_path, capsys):
    path = convert(tmp_path, linear_model(100, 24, 64), quantized_rules(4, 32, "asym"))
    capsys.readouterr()
    assert main(["export-onnx", path, str(tmp_path / "a.onnx"), "--on-the-fly"]) == 0
    first, *rest = capsys.readouterr().out.splitlines()
    assert "tensors: " in first and "MatMulNBits" in first and "dense (" in first
    assert len(rest) == 1 and rest[0].startswith(str(tmp_path / "a.onnx"))  # then the result line
    assert main(["export-onnx", path, str(tmp_path / "b.onnx"), "--on-the-fly", "--forms"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:3] == ["tensor", "resident", "dense"] and len(table) > 3


def test_export_refuses_to_overwrite_and_keeps_the_file(tmp_path, capsys):
    path = convert(tmp_path, linear_model(64, 24, 64), quantized_rules(4, 32, "sym"))
    out = tmp_path / "fly.onnx"
    out.write_bytes(b"mine")
    assert run(["export-onnx", path, str(out), "--on-the-fly"]) == 4
    assert out.read_bytes() == b"mine"
    assert "--force" in capsys.readouterr().err
    assert run(["export-onnx", path, str(out), "--on-the-fly", "--force"]) == 0
    assert onnx.load_model(str(out)).graph.node
    assert sorted(os.listdir(tmp_path)) == ["fly.onnx", "m.onnx", "m.rbe"]


def test_export_of_a_file_without_a_graph_is_a_usage_error(tmp_path, capsys):
    path = str(tmp_path / "plain.rbe")
    save_file({"w": np.ones((4, 4), np.float32)}, path)
    assert run(["export-onnx", path, str(tmp_path / "x.onnx"), "--on-the-fly"]) == 2
    assert "holds no ONNX graph" in capsys.readouterr().err
    assert not (tmp_path / "x.onnx").exists()


def test_export_past_the_inline_limit_writes_external_data(tmp_path, monkeypatch):
    path = convert(tmp_path, linear_model(64, 24, 64), quantized_rules(4, 32, "sym"))
    monkeypatch.setattr(decode, "INLINE_LIMIT", 1000)
    out = str(tmp_path / "fly.onnx")
    assert run(["export-onnx", path, out, "--on-the-fly"]) == 0
    assert os.path.getsize(out) < 4000 and os.path.isfile(out + ".data")
    inputs = feeds(64)
    got, _ = run_on_the_fly(path, inputs)
    plain = ort.InferenceSession(out)
    for output, value in zip(plain.get_outputs(), plain.run(None, inputs)):
        np.testing.assert_array_equal(value, got[output.name])


def test_a_session_past_protobufs_limit_reads_its_weights_as_external_data(tmp_path, monkeypatch):
    from google.protobuf.message import EncodeError

    from rbe_loaders.ort import build

    path = convert(tmp_path, linear_model(64, 24, 64), quantized_rules(4, 32, "sym"))
    inputs = feeds(64)
    whole, _ = run_on_the_fly(path, inputs)
    monkeypatch.setattr(build, "PROTOBUF_LIMIT", 100)  # as a model of several GB: the external-data path
    apart, _ = run_on_the_fly(path, inputs)
    for name in whole:
        np.testing.assert_array_equal(apart[name], whole[name])

    class Huge:  # protobuf refuses to count a model past 2 GB
        def ByteSize(self):
            raise EncodeError("Failed to serialize proto")

    assert build.fits_one_proto(Huge()) is False


def test_reader_hands_out_the_parts_of_a_chain(tmp_path):
    path = convert(tmp_path, linear_model(64, 24, 64), quantized_rules(4, 32, "asym"))
    with Reader(path) as r:
        scales = r.get_part("w_matmul", "values.scales")
        assert scales.shape == (24, 2) and scales.dtype == np.float16
        assert r.get_part("w_gemm", "codes").shape == (24 * 64 // 2,)
        with pytest.raises(UsageError, match="no such part"):
            r.get_part("w_matmul", "values.nope")
        with pytest.raises(UsageError, match="no such part"):
            r.get_part("b_gemm", "codes")


def test_the_loader_imports_without_torch():
    import subprocess
    import sys

    code = "import sys, rbe_loaders.ort; sys.exit('torch' in sys.modules or 'transformers' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


# -- the real model: paraphrase-MiniLM-L3-v2 ------------------------------------------------------


@pytest.fixture(scope="module")
def sentence_feeds(minilm_dir):
    """16 sentences through all-MiniLM-L6-v2's tokenizer (the same uncased BERT vocabulary)."""
    tokenizers = pytest.importorskip("tokenizers")
    from rbe_converters.evaluate.quality import default_sentences

    tokenizer = tokenizers.Tokenizer.from_file(os.path.join(minilm_dir, "tokenizer.json"))
    tokenizer.enable_padding()
    tokenizer.enable_truncation(128)
    encoded = tokenizer.encode_batch(default_sentences(16))
    return {
        "input_ids": np.array([e.ids for e in encoded], np.int64),
        "attention_mask": np.array([e.attention_mask for e in encoded], np.int64),
    }


def pooled(session, feeds: dict) -> np.ndarray:
    (found,) = [o for o in session.run(None, feeds) if o.dtype == np.float32 and o.ndim == 2]
    return found.astype(np.float64)


def test_real_model_on_the_fly_matches_its_dense_decode(paraphrase_onnx, sentence_feeds, tmp_path):
    from bench.ort_memory import RECIPE, mean_cosine

    out = str(tmp_path / "p.rbe")
    pipeline.convert(paraphrase_onnx, out, policy=policy_from_document(RECIPE, "bench recipe"))
    assert run(["export-onnx", out, str(tmp_path / "dense.onnx")]) == 0
    assert run(["export-onnx", out, str(tmp_path / "fly.onnx"), "--on-the-fly"]) == 0
    fly = ort.InferenceSession(str(tmp_path / "fly.onnx"))
    got = pooled(fly, sentence_feeds)
    dense = pooled(ort.InferenceSession(str(tmp_path / "dense.onnx")), sentence_feeds)
    original = pooled(ort.InferenceSession(paraphrase_onnx), sentence_feeds)
    np.testing.assert_allclose(got, dense, rtol=1e-4, atol=1e-4 * np.abs(dense).max())
    print(
        f"on the fly: mean cosine {mean_cosine(got, dense):.6f} to the dense decode, "
        f"{mean_cosine(got, original):.4f} to the fp32 original"
    )
    _, report = rbe_ort.on_the_fly_model(out)
    weights = [row for row in report.rows if row.name.startswith("onnx::MatMul")]
    assert len(weights) == 18 and all(row.form.startswith("MatMulNBits 4-bit block 32") for row in weights)
    assert report.form_of("model.0.auto_model.embeddings.word_embeddings.weight").startswith(
        "GatherBlockQuantized 8-bit block 64"
    )
    assert not report.decoded_at_build()
    assert report.resident_bytes < 0.3 * report.dense_bytes
