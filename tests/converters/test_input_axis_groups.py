"""Weights stored input x output get transpose(values=CHAIN) when their chain groups along the last axis."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import write_safetensors

from rbe_converters import pipeline
from rbe_converters.compress import plan
from rbe_converters.compress.recipe import policy_from_document
from rbe_converters.compress.roles import TensorRole
from rbe_converters.evaluate.report import chain_text
from rbeformat import Reader
from rbeformat.chain import parse_chain
from rbeformat.codecs.registry import TENSOR_CODECS

CONV1D = TensorRole("attn_qkv", 0, False, 1)
LINEAR = TensorRole("attn_q", 0, True, 1)


def rule_for(**raw):
    return policy_from_document({"rule": [raw]}, "r").rules[0]


@pytest.mark.parametrize(
    "text,wrapped",
    [
        ("gquant(bits=4, group=32, mode=asym)", True),
        ("gquant(bits=8, group=0)", False),  # one scale for the tensor: no axis to group along
        ("palette(bits=3, scope=row)", True),
        ("palette(bits=3, scope=tensor)", False),
        ("vq(dim=4, bits=6)", True),
        ("seed()", True),
        ("lowrank(rank=4)", False),
        ("sparse(density=0.5)", False),
    ],
)
def test_which_chains_are_wrapped(text, wrapped):
    rule = rule_for(role="attn_qkv", codec=text)
    chosen = plan.input_axis_grouped(rule.chain, rule, CONV1D)
    if wrapped:
        assert chosen.codec.name == "transpose" and chosen.parts["values"] is rule.chain
        assert chosen.text() == f"transpose(values={rule.chain.text()})"
    else:
        assert chosen is rule.chain
    assert plan.input_axis_grouped(rule.chain, rule, LINEAR) is rule.chain  # input last already
    assert plan.input_axis_grouped(rule.chain, rule, None) is rule.chain


def test_a_rule_that_names_input_last_gets_exactly_its_chain():
    rule = rule_for(match="*", input_last=False, codec="gquant(bits=4, group=32)")
    assert plan.input_axis_grouped(rule.chain, rule, CONV1D) is rule.chain


# A GPT-2-like checkpoint: Conv1D weights stored input x output, named as transformers names them.
HIDDEN = 64


def gpt2_dir(root) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(3)
    # Each output column has a scale of its own, 30x apart: groups along the outputs mix them.
    column_scale = np.exp(rng.uniform(np.log(0.003), np.log(0.1), 3 * HIDDEN)).astype(np.float32)
    tensors = {
        "transformer.h.0.attn.c_attn.weight": rng.standard_normal((HIDDEN, 3 * HIDDEN)).astype(np.float32)
        * column_scale,
        "transformer.h.0.mlp.c_fc.weight": (rng.standard_normal((HIDDEN, 4 * HIDDEN)) * 0.02).astype(np.float32),
        "transformer.wte.weight": (rng.standard_normal((100, HIDDEN)) * 0.02).astype(np.float32),
    }
    root.mkdir()
    write_safetensors(str(root / "model.safetensors"), tensors)
    (root / "config.json").write_text(json.dumps({"n_embd": HIDDEN, "vocab_size": 100, "model_type": "gpt2"}))
    return tensors


def chains_and_errors(path) -> tuple[dict[str, str], dict[str, np.ndarray]]:
    with Reader(path) as r:
        chains = {n: chain_text(r.stored_entry(n).transform) for n in r.keys() if r.stored_entry(n).transform}
        return chains, {n: r.get_tensor(n) for n in r.keys()}


def convert(src, dst, *rules: str, budget: float | None = None):
    doc = {"rule": [dict(r) for r in rules]}
    if budget is not None:
        doc["budget_bits"] = budget
    pipeline.convert(str(src), str(dst), policy=policy_from_document(doc, "r"))
    return chains_and_errors(dst)


def test_gpt2_conv1d_weights_are_grouped_along_their_inputs(tmp_path):
    tensors = gpt2_dir(tmp_path / "gpt2")
    rule = {"roles": ["attn_qkv", "mlp_up", "token_embedding"], "codec": "gquant(bits=4, group=32, mode=asym)"}
    chains, decoded = convert(tmp_path / "gpt2", tmp_path / "t.rbe", rule)
    qkv = "transformer.h.0.attn.c_attn.weight"
    assert chains[qkv].startswith("transpose(values=gquant(bits=4, group=32, mode=asym")
    assert chains["transformer.h.0.mlp.c_fc.weight"].startswith("transpose(")
    assert chains["transformer.wte.weight"].startswith("gquant(")  # an embedding has no input axis
    inner = parse_chain(rule["codec"], TENSOR_CODECS).codec
    transposed = np.ascontiguousarray(tensors[qkv].T)
    enc = inner.encode(transposed)
    expected = inner.decode(enc.parts, enc.params, transposed.shape, "v").T  # gquant of (out, in), read back
    assert decoded[qkv].tobytes() == np.ascontiguousarray(expected).tobytes()

    _, plain = convert(tmp_path / "gpt2", tmp_path / "p.rbe", {**rule, "input_last": False})
    chains_plain, _ = chains_and_errors(tmp_path / "p.rbe")
    assert chains_plain[qkv].startswith("gquant(")  # input_last = false named: exactly the chain
    error = {name: column_errors(tensors[qkv], out[qkv]) for name, out in (("grouped", decoded), ("plain", plain))}
    assert error["grouped"] < 0.5 * error["plain"], error


def column_errors(x: np.ndarray, decoded: np.ndarray) -> float:
    """The mean over output columns of each column's relative error."""
    return float(np.mean(np.linalg.norm(decoded - x, axis=0) / np.linalg.norm(x, axis=0)))


def test_mixed_precision_upgrades_are_grouped_along_the_inputs_too(tmp_path):
    gpt2_dir(tmp_path / "gpt2")
    rule = {
        "roles": ["attn_qkv", "mlp_up"],
        "codec": "gquant(bits=3, group=32, mode=asym)",
        "upgrade": "gquant(bits=6, group=32, mode=asym)",
    }
    # 4 bits raw per weight at 3 bits (asym, F16 scales and offsets per 32), 7 at 6 bits: 5.5 on
    # average buys the upgrade for c_attn (12288 weights, 5.29) but not for c_fc (16384, 5.71).
    chains, _ = convert(tmp_path / "gpt2", tmp_path / "m.rbe", rule, budget=5.5)
    bits = sorted(c.split("bits=")[1][0] for c in chains.values())
    assert bits == ["3", "6"], chains
    assert all(c.startswith("transpose(values=gquant(") for c in chains.values()), chains
