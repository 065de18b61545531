"""Seed-coded Linear weights on the fly in ONNX Runtime: `rbe_loaders.ort.rewriters.seed`."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from rbe_converters.cli import main  # noqa: E402
from rbe_loaders import ort as rbe_ort  # noqa: E402
from rbeformat import Reader  # noqa: E402

ROWS = 5


def seed(block: int, rank: int, seed_bits: int, coef_bits: int = 4) -> str:
    return f"seed(block={block}, rank={rank}, seed_bits={seed_bits}, coef_bits={coef_bits}, candidates=2)"


def matmul_model(k_in: int, n_out: int, opset: int = 17, seed_value: int = 0) -> onnx.ModelProto:
    """x (ROWS, K) through a MatMul weight (K, N) and a Gemm weight (N, K, transB=1) with a bias."""
    rng = np.random.default_rng(seed_value)
    inits = {
        "w_matmul": rng.standard_normal((k_in, n_out)).astype(np.float32) * 0.1,
        "w_gemm": rng.standard_normal((n_out, k_in)).astype(np.float32) * 0.1,
        "b_gemm": rng.standard_normal(n_out).astype(np.float32),
    }
    nodes = [
        helper.make_node("MatMul", ["x", "w_matmul"], ["y_matmul"]),
        helper.make_node("Gemm", ["x", "w_gemm", "b_gemm"], ["y_gemm"], transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "seeded",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [ROWS, k_in])],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in ("y_matmul", "y_gemm")],
        [numpy_helper.from_array(v, k) for k, v in inits.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)


def toml_rules(rules: list[dict]) -> str:
    return "".join("[[rule]]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in rule.items()) for rule in rules)


def convert(tmp_path, model: onnx.ModelProto, rules: list[dict]) -> str:
    """``rbe convert model.onnx m.rbe --recipe recipe.toml``; returns the .rbe path."""
    src, out, recipe = tmp_path / "m.onnx", tmp_path / "m.rbe", tmp_path / "recipe.toml"
    src.write_bytes(model.SerializeToString())
    recipe.write_text(toml_rules(rules))
    assert main(["convert", str(src), str(out), "--recipe", str(recipe), "--quiet"]) == 0
    return str(out)


def seed_rules(chain: str, gemm_chain: str | None = None) -> list[dict]:
    """The MatMul weight grouped along its input axis; the Gemm weight (N, K) has it last already."""
    return [
        {"match": "w_matmul", "input_last": False, "codec": f"transpose(values={chain})"},
        {"match": "w_gemm", "codec": gemm_chain or chain},
    ]


def reference(path: str, x: np.ndarray) -> dict[str, np.ndarray]:
    """The outputs from the numpy reference decode, in float64."""
    with Reader(path) as r:
        w = {name: r.get_tensor(name).astype(np.float64) for name in r.keys()}
    x = x.astype(np.float64)
    return {"y_matmul": x @ w["w_matmul"], "y_gemm": x @ w["w_gemm"].T + w["b_gemm"]}


def feeds(k_in: int) -> dict:
    return {"x": np.random.default_rng(1).standard_normal((ROWS, k_in)).astype(np.float32)}


def outputs(session, inputs: dict) -> dict[str, np.ndarray]:
    return dict(zip([o.name for o in session.get_outputs()], session.run(None, inputs)))


def relative_error(got: np.ndarray, want: np.ndarray) -> float:
    """Max abs error over the output's scale (its largest magnitude)."""
    return float(np.abs(got - want).max() / np.abs(want).max())


SETTINGS = [(8, 3, 10), (12, 4, 8), (16, 3, 9)]  # (C, P, S): about 4, 3 and 2 bits per weight


@pytest.mark.parametrize("block, rank, seed_bits", SETTINGS)
def test_seed_weights_run_on_a_shared_basis_table(tmp_path, block, rank, seed_bits):
    k_in, n_out = 192, 96
    path = convert(tmp_path, matmul_model(k_in, n_out), seed_rules(seed(block, rank, seed_bits)))
    session, report = rbe_ort.session(path, quiet=True)
    inputs = feeds(k_in)
    got, want = outputs(session, inputs), reference(path, inputs["x"])
    form = f"seed: shared basis table (S={seed_bits}, C={block}, P={rank}) + Gather + Einsum"
    for name, output in (("w_matmul", "y_matmul"), ("w_gemm", "y_gemm")):
        assert report.form_of(name) == form
        error = relative_error(got[output], want[output])
        print(
            f"C={block} P={rank} S={seed_bits} {name}: max abs error {np.abs(got[output] - want[output]).max():.2e}, "
            f"over the output scale {error:.2e}"
        )
        assert error < 2e-6
    assert not report.decoded_at_build()


def test_the_decoded_matrix_is_the_dense_decode_bit_for_bit(tmp_path):
    """The graph's W (an intermediate made a graph output) equals the reference decode exactly."""
    path = convert(tmp_path, matmul_model(128, 64), seed_rules(seed(8, 3, 10, coef_bits=6)))
    model, _ = rbe_ort.on_the_fly_model(path)
    weights = [n.output[0] for n in model.graph.node if n.op_type == "Reshape" and n.output[0].endswith(":weight")]
    assert len(weights) == 2
    model.graph.output.extend(helper.make_tensor_value_info(w, TensorProto.FLOAT, None) for w in weights)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    got = outputs(session, feeds(128))
    with Reader(path) as r:
        np.testing.assert_array_equal(got["rbe:y_matmul:weight"], r.get_tensor("w_matmul"))
        np.testing.assert_array_equal(got["rbe:rbe:y_gemm:linear:weight"], r.get_tensor("w_gemm").T)


def test_a_plain_seed_matmul_weight_blocks_along_its_outputs(tmp_path):
    rules = [{"match": "w_matmul", "codec": seed(8, 2, 8)}, {"match": "w_gemm", "codec": seed(8, 2, 8)}]
    path = convert(tmp_path, matmul_model(40, 64), rules)
    session, report = rbe_ort.session(path, quiet=True)
    got, want = outputs(session, feeds(40)), reference(path, feeds(40)["x"])
    assert report.form_of("w_matmul").startswith("seed: shared basis table (S=8, C=8, P=2)")
    assert relative_error(got["y_matmul"], want["y_matmul"]) < 2e-6


def test_the_report_counts_each_weight_and_the_shared_table_once(tmp_path):
    k_in, n_out = 128, 64
    path = convert(tmp_path, matmul_model(k_in, n_out), seed_rules(seed(8, 3, 10)))
    _, report = rbe_ort.on_the_fly_model(path)
    rows = {row.name: row for row in report.rows}
    blocks = k_in * n_out // 8
    own = blocks * 2 + blocks * 3 + blocks + 16 * 4 + 2 * 8  # seeds, coefficients, exponents, scales, shape
    assert rows["w_matmul"].resident_bytes == rows["w_gemm"].resident_bytes == own
    table = rows["rbe:seed_basis:10:8:3"]
    assert table.resident_bytes == 2**10 * 8 * 3 * 2 and table.dense_bytes == 0
    assert table.form.startswith("shared")
    assert report.resident_bytes == sum(row.resident_bytes for row in report.rows)
    shared = [name for name in rows if name.startswith("rbe:")]
    assert sorted(shared) == ["rbe:int64:0", "rbe:int64:[1]", "rbe:seed_basis:10:8:3", "rbe:seed_centre:4"]
    print(report)


def test_a_table_larger_than_the_weights_it_serves_is_dense(tmp_path):
    path = convert(tmp_path, matmul_model(64, 32), seed_rules(seed(8, 3, 16)))  # 3 MB table, 16 KB weights
    session, report = rbe_ort.session(path, quiet=True)
    assert sorted(report.decoded_at_build()) == ["w_gemm", "w_matmul"]
    assert "3,145,728 bytes, more than the 16,384 dense bytes" in report.form_of("w_matmul")
    got, want = outputs(session, feeds(64)), reference(path, feeds(64)["x"])
    assert relative_error(got["y_matmul"], want["y_matmul"]) < 2e-6


def test_an_opset_without_einsum_is_dense(tmp_path):
    path = convert(tmp_path, matmul_model(64, 32, opset=11), seed_rules(seed(8, 3, 8)))
    _, report = rbe_ort.on_the_fly_model(path)
    assert (
        report.form_of("w_matmul") == "dense (decoded at build: seed needs Einsum (opset 12); the graph has opset 11)"
    )


def test_exported_file_runs_in_a_plain_session(tmp_path):
    path = convert(tmp_path, matmul_model(192, 96), seed_rules(seed(12, 4, 8)))
    out = str(tmp_path / "fly.onnx")
    assert main(["export-onnx", path, out, "--on-the-fly", "--quiet"]) == 0
    model = onnx.load_model(out)
    assert not {"w_matmul", "w_gemm"} & {t.name for t in model.graph.initializer}
    assert {"Gather", "Einsum"} <= {n.op_type for n in model.graph.node}
    plain = outputs(ort.InferenceSession(out), feeds(192))
    session, _ = rbe_ort.session(path, quiet=True)
    for name, value in outputs(session, feeds(192)).items():
        np.testing.assert_array_equal(plain[name], value)


def initializer_bytes_after_optimization(model: onnx.ModelProto, folder) -> int:
    """Bytes of the initializers of the graph ONNX Runtime runs, after its constant folding."""
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(folder / "optimized.onnx")
    ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    optimized = onnx.load_model(options.optimized_model_filepath)
    return sum(numpy_helper.to_array(t).nbytes for t in optimized.graph.initializer)


def without_the_input_dependency(model: onnx.ModelProto) -> onnx.ModelProto:
    """The graph with each code initializer read directly instead of through Expand by the input's ones."""
    bare = onnx.ModelProto()
    bare.CopyFrom(model)
    rename = {n.output[0]: n.input[0] for n in bare.graph.node if n.op_type == "Expand"}
    kept = [n for n in bare.graph.node if n.op_type != "Expand"]
    for node in kept:
        node.input[:] = [rename.get(name, name) for name in node.input]
    del bare.graph.node[:]
    bare.graph.node.extend(kept)
    return bare


def test_runtime_does_not_fold_the_weights_back_to_dense(tmp_path):
    path = convert(tmp_path, matmul_model(256, 128), seed_rules(seed(8, 3, 8)))
    model, report = rbe_ort.on_the_fly_model(path)
    held = initializer_bytes_after_optimization(model, tmp_path)
    folded = initializer_bytes_after_optimization(without_the_input_dependency(model), tmp_path)
    print(
        f"initializers after ONNX Runtime's optimizations: {held:,} bytes (report {report.resident_bytes:,}, "
        f"dense {report.dense_bytes:,}); {folded:,} without the input dependency"
    )
    assert report.resident_bytes < 0.25 * report.dense_bytes
    assert held <= report.resident_bytes + 1024  # optimizers may add a few small constants
    assert folded > report.dense_bytes  # what the dependency prevents: the decode folded at session creation


# Runs in the child: argv = model path; prints its RSS growth in bytes (see bench.ort_memory).
RSS_CHILD = r"""
import os, sys
import onnxruntime as ort
from onnx import TensorProto, helper

def rss():
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

empty = helper.make_model(helper.make_graph(
    [helper.make_node("Identity", ["x"], ["y"])], "empty",
    [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
    [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])]), opset_imports=[helper.make_opsetid("", 17)])
keep = ort.InferenceSession(empty.SerializeToString())
before = rss()
session = ort.InferenceSession(sys.argv[1])
print(rss() - before)
"""


def resident_growth(model_path: str) -> int:
    done = subprocess.run([sys.executable, "-c", RSS_CHILD, model_path], check=True, capture_output=True, text=True)
    return int(done.stdout.split()[-1])


@pytest.mark.slow
def test_a_fresh_session_holds_the_codes_not_the_dense_weights(tmp_path):
    """1024 x 1024 weights (4 MiB dense each): the session grows by far less than dense."""
    path = convert(tmp_path, matmul_model(1024, 1024), seed_rules(seed(8, 3, 12)))
    dense, fly = str(tmp_path / "dense.onnx"), str(tmp_path / "fly.onnx")
    assert main(["export-onnx", path, dense, "--quiet"]) == 0
    assert main(["export-onnx", path, fly, "--on-the-fly", "--quiet"]) == 0
    dense_mb = np.median([resident_growth(dense) for _ in range(3)]) / 2**20
    fly_mb = np.median([resident_growth(fly) for _ in range(3)]) / 2**20
    print(f"resident after InferenceSession: dense {dense_mb:.1f} MiB, on the fly {fly_mb:.1f} MiB")
    assert fly_mb < 0.5 * dense_mb
