"""Helpers of bench/presets.py: anchor bit counts, ONNX Runtime's read-back, row flags and the goal summary."""

from __future__ import annotations

import numpy as np
import pytest

from bench import presets
from bench.presets import Row
from rbeformat import Writer
from rbeformat.chain import parse_chain
from rbeformat.codecs.registry import TENSOR_CODECS


def _ort():
    pytest.importorskip(
        "onnxruntime.quantization.matmul_nbits_quantizer",
        reason="ONNX Runtime's quantization tools are in the bench extra",
    )


@pytest.mark.parametrize("shape, block", [((8, 576), 128), ((8, 576), 64), ((4, 384), 128), ((6, 1536), 64)])
def test_ort_rtn_bits_are_its_initializers_and_its_values_a_4bit_grid(shape, block):
    _ort()
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    bits, y = presets.ort_quantize(block, None)("w", x)
    assert bits == presets.ort_bits(shape, block)  # the formula the padded GPTQ path counts with
    assert y.shape == x.shape and np.linalg.norm(y - x) / np.linalg.norm(x) < 0.15
    for row in y:
        for start in range(0, shape[1], block):
            assert len(np.unique(row[start : start + block])) <= 16


def test_ort_gptq_pads_odd_block_counts_and_with_identity_inputs_is_rtn():
    _ort()
    x = np.random.default_rng(1).standard_normal((5, 576)).astype(np.float32)  # 576 / 128: 5 blocks, odd
    checks = {}
    bits, y = presets.ort_quantize(128, {"w": np.eye(576)}, checks)("w", x)
    _, plain = presets.ort_quantize(128, None)("w", x)
    assert bits == presets.ort_bits(x.shape, 128) and y.shape == x.shape
    np.testing.assert_allclose(y, plain, atol=1e-6)  # H = I: nothing to compensate
    assert checks["differ"] == 0 and checks["weights"] == x.size


def test_ort_bits_formula():
    # 576 inputs in blocks of 128: 5 blocks of 64 code bytes and a 4-byte scale, 3 zero-point bytes per row.
    assert presets.ort_bits((10, 576), 128) == 8 * 10 * (5 * 68 + 3)
    assert presets.ort_bits((1, 64), 64) == 8 * (36 + 1)


def test_gguf_q4_k_is_reported_when_it_has_no_quantizer():
    pytest.importorskip("gguf")
    assert presets.gguf_missing("Q4_0") == ""
    missing = presets.gguf_missing("Q4_K")
    assert missing == "" or "no Q4_K quantizer" in missing


def test_four_bit_g32_reads_the_top_codec_of_the_linear_weights(tmp_path):
    w = np.random.default_rng(2).standard_normal((8, 64)).astype(np.float32)
    path = str(tmp_path / "m.rbe")
    with Writer(path) as out:
        out.add_transformed("a.weight", "F32", w, parse_chain("gquant(bits=4, group=32)", TENSOR_CODECS))
        out.add_transformed("b.weight", "F32", w, parse_chain("gquant(bits=4, group=64, mode=asym)", TENSOR_CODECS))
        out.add_transformed("c.weight", "F32", w, parse_chain("gquant(bits=8, group=32)", TENSOR_CODECS))
    assert presets.four_bit_g32(path, {"a.weight"})
    assert not presets.four_bit_g32(path, {"b.weight", "c.weight"})


def test_parameter_and_exact_share():
    torch = pytest.importorskip("torch")

    class Net(torch.nn.Module):
        base_model_prefix = "net"

        def __init__(self):
            super().__init__()
            self.net = torch.nn.Module()
            self.net.fc = torch.nn.Linear(4, 2, bias=False)

    dense, other = Net(), Net()
    with torch.no_grad():
        other.net.fc.weight.copy_(dense.net.fc.weight)
        other.net.fc.weight[0, :2] += 1
    assert presets.parameter(dense, "fc.weight") is dense.net.fc.weight  # the prefix is added
    assert presets.parameter(dense, "net.fc.weight") is dense.net.fc.weight
    assert presets.exact_share(other, dense, ["fc.weight"]) == pytest.approx(6 / 8)


def _row(
    model,
    name,
    kind="preset",
    linear=4.0,
    file=4.5,
    change=1.0,
    exact=0.0,
    g32=False,
    encode=1.0,
    calibrated=False,
    ratio=7.0,
):
    scores = (
        {"perplexity": 10 + change, "perplexity_change_pct": change}
        if model == "smollm2"
        else {"mean_cosine": 1 - change / 100, "nn_agreement": 1 - change / 50}
    )
    return Row(
        model,
        name,
        kind,
        linear,
        file,
        1000,
        False,
        ratio,
        scores,
        encode_s=encode,
        peak_rss=10**9,
        exact_share=exact,
        calibrated=calibrated,
        four_bit_g32=g32,
    )


def test_flags_and_order():
    grid = _row("smollm2", "a", exact=0.5)
    apart = _row("smollm2", "b", g32=True)
    assert grid.grid and not grid.apart and apart.apart and not apart.grid
    assert not _row("minilm", "c", exact=0.5, g32=True).grid | _row("minilm", "c", g32=True).apart
    assert not _row("smollm2", "dense", kind="dense", exact=1.0).grid
    rows = presets.order(
        [
            apart,
            _row("minilm", "m"),
            grid,
            _row("smollm2", "dense", kind="dense", linear=32),
            Row("smollm2", "x", "anchor", note="not measured"),
        ]
    )
    assert [r.name for r in rows] == ["dense", "a", "b", "x", "m"]


def test_heaviest_prefers_calibrated_presets():
    rows = [
        _row("smollm2", "slow", encode=100),
        _row("smollm2", "cal", encode=50, calibrated=True),
        _row("minilm", "cal2", encode=500, calibrated=True),
    ]
    assert presets.heaviest(rows)[0].name == "cal"
    assert presets.heaviest(rows[:1])[0].name == "slow"
    assert presets.heaviest(rows[2:]) is None


def test_goals_skip_rows_that_do_not_count():
    rows = [
        _row("smollm2", "g32", linear=4.25, change=0.1, g32=True),
        _row("smollm2", "grid", linear=4.25, change=0.2, exact=0.9),
        _row("smollm2", "q4", linear=4.4, change=3.0, ratio=8.5),
        _row("smollm2", "anchor", kind="anchor", linear=3.0, change=1.0),
    ]
    lines = presets.goals(rows)
    assert "q4: 4.400 b/w, +3.00% -> met" in lines[0]
    assert "no preset -> not met" in lines[1]
    assert "q4: ratio 8.50" in lines[3] and lines[3].endswith("met")


def test_table_and_plot(tmp_path):
    pytest.importorskip("matplotlib")
    rows = [
        _row("smollm2", "dense", kind="dense", linear=32.0),
        _row("smollm2", "q4"),
        _row("smollm2", "GGUF Q4_0", kind="anchor", g32=True),
        _row("minilm", "q4"),
        Row("minilm", "GGUF Q4_K", "anchor", note="not measured: no quantizer"),
    ]
    text = presets.table(presets.order(rows))
    assert "not measured: no quantizer" in text and "g32" in text
    presets.plot(rows, ["smollm2", "minilm"], str(tmp_path / "p.png"))
    assert (tmp_path / "p.png").stat().st_size > 1000
