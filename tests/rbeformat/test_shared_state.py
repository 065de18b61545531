"""Codecs that share state across tensors, and chains checked before encoding, through the converter."""

from dataclasses import dataclass

import numpy as np
import pytest
from conftest import write_safetensors

from rbe_converters.compress.recipe import Policy, Rule, policy_from_codec
from rbe_converters.pipeline import convert
from rbeformat import Reader, UsageError, Writer
from rbeformat.chain import Chain, parse_chain
from rbeformat.codecs import registry
from rbeformat.codecs.core.fields import setting, tensor_name
from rbeformat.codecs.core.tensor import Encoded, PartSpec, TensorCodec


@dataclass(frozen=True)
class RowMean(TensorCodec, register=False):
    """Test-only: matrices of one shape share their mean matrix, each stores its difference.

    It exists to show that a converter handles shared state from the codec's
    declaration alone, with no branch on its name.
    """

    name = "test-rowmean"
    mean: str = setting("rbe:pending", tensor_name, "the internal tensor holding the shared mean")

    def references(self):
        return [self.mean]

    def shared_group(self, dtype, shape):
        return ("mean", tuple(shape))

    def build_shared(self, members, dtype, shape):
        return {f"rbe:mean/{'x'.join(map(str, shape))}": np.mean(members, axis=0).astype(np.float32)}

    def bind_shared(self, names):
        return self.with_settings(mean=names[0])

    def part_specs(self, params, shape, where):
        return {"diff": PartSpec("F32", tuple(shape))}

    def encode_array(self, x, refs):
        return Encoded({"diff": x - refs[self.mean]}, {})

    def decode_parts(self, parts, params, shape, where, refs):
        return parts["diff"] + refs[self.mean]


@pytest.fixture
def rowmean_registered(monkeypatch):
    monkeypatch.setitem(registry.TENSOR_CODECS, RowMean.name, RowMean)


def test_a_new_shared_state_codec_needs_no_converter_change(tmp_path, rowmean_registered):
    rng = np.random.default_rng(3)
    tensors = {f"layer.{i}.weight": rng.standard_normal((8, 16)).astype(np.float32) for i in range(3)}
    tensors["other.weight"] = rng.standard_normal((4, 16)).astype(np.float32)
    src = tmp_path / "m.safetensors"
    write_safetensors(str(src), tensors)
    out = tmp_path / "m.rbe"
    convert(str(src), str(out), policy=Policy([Rule("*", Chain(RowMean()))]))
    with Reader(out) as r:
        internal = sorted(n for n in r.manifest.tensors if n.startswith("rbe:"))
        assert internal == ["rbe:mean/4x16", "rbe:mean/8x16"]  # one state per group, stored once
        for name, x in tensors.items():
            np.testing.assert_allclose(r.get_tensor(name), x, rtol=0, atol=1e-6)
        assert r.manifest.tensors["layer.1.weight"].transform.codec.references() == ["rbe:mean/8x16"]


def test_a_shared_state_codec_cannot_encode_a_part(rowmean_registered):
    chain = Chain(parse_chain("lowrank(rank=2)", registry.TENSOR_CODECS).codec, {"A": Chain(RowMean())})
    with pytest.raises(UsageError, match="shares state"):
        chain.validate()


def test_a_chain_is_checked_before_the_encoder_runs(tmp_path, monkeypatch):
    bad = Chain(
        parse_chain("gquant(bits=4, group=32)", registry.TENSOR_CODECS).codec,
        {"codes": parse_chain("gquant(bits=8, group=0)", registry.TENSOR_CODECS)},
    )
    monkeypatch.setattr(type(bad.codec), "encode_array", lambda *a: pytest.fail("encoded before the check"))
    with Writer(tmp_path / "x.rbe", force=True) as w, pytest.raises(UsageError, match="cannot chain"):
        w.add_transformed("w", "F32", np.zeros((4, 32), np.float32), bad)


@pytest.mark.parametrize(
    "policy",
    [
        policy_from_codec("gquant(bits=4, group=32)"),
        Policy([Rule("no.such.tensor", parse_chain("gquant()", registry.TENSOR_CODECS))]),
    ],
)
def test_a_policy_that_changes_no_tensor_is_refused_and_writes_nothing(tmp_path, policy):
    src = tmp_path / "v.safetensors"
    write_safetensors(str(src), {"bias": np.zeros(7, np.float32), "ids": np.arange(5)})
    with pytest.raises(UsageError, match="applies to no tensor"):
        convert(str(src), str(tmp_path / "v.rbe"), policy=policy)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v.safetensors"]
