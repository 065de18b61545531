"""Every registered tensor codec is checked by the shared harness, and the contract itself holds."""

import dataclasses
import os

import pytest
from harness import run_doctests

from rbeformat import UsageError
from rbeformat.chain import parse_chain
from rbeformat.codecs import registry
from rbeformat.codecs.core import fields
from rbeformat.codecs.registry import TENSOR_CODECS

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.mark.parametrize("name", sorted(TENSOR_CODECS))
def test_every_codec_runs_the_shared_contract_checks(name):
    module = TENSOR_CODECS[name].__module__.rsplit(".", 1)[-1]
    path = os.path.join(HERE, f"test_{module}.py")
    assert os.path.exists(path), f"codec {name} ({module}.py) has no tests/rbeformat/codecs/test_{module}.py"
    with open(path) as fh:
        text = fh.read()
    assert "check_contract(" in text and TENSOR_CODECS[name].__name__ in text, (
        f"{path} does not run harness.check_contract on {TENSOR_CODECS[name].__name__}"
    )


# A valid chain per codec whose defaults alone are not a complete configuration.
EXAMPLES = {"lowrank": "lowrank(rank=2)", "posdct": "posdct(keep=4)"}


@pytest.mark.parametrize("name", sorted(TENSOR_CODECS))
def test_codecs_are_frozen_and_validate_each_field_by_name(name):
    cls = TENSOR_CODECS[name]
    declared = fields.fields_by_role(cls, *fields.ROLES)
    assert all(f.metadata["doc"] for f in declared)
    codec = parse_chain(EXAMPLES.get(name, f"{name}()"), TENSOR_CODECS).codec
    for f in declared:
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(codec, f.name, getattr(codec, f.name))
        with pytest.raises(ValueError, match=rf"{name}\.{f.name} \("):
            codec.with_settings(**{f.name: object()})


def test_shared_modules_have_doctests():
    for module in ("rbeformat.codecs.util.arrays", "rbeformat.codecs.core.fields", "rbeformat.chain"):
        run_doctests(module)


@pytest.mark.parametrize(
    "text,message",
    [
        ("gquant(bits=4, grop=64)", "no setting 'grop'; valid: bits"),
        ("gquant(bits=4, bits=8)", "'bits' is given twice"),
        ("", "empty"),
        ("   ", "empty"),
        ("vq(bits=2)", "codebook"),
        ("gquant(bits=4, codes=gquant(bits=8))", "no setting 'codes'"),
        ("lowrank(rank=4, A=normdelta())", "shares state"),
        ("normdelta(mode=bits, delta=gquant())", "cannot chain"),
        ("nosuch(bits=4)", "unknown codec 'nosuch'"),
    ],
)
def test_bad_chains_are_usage_errors_naming_the_fix(text, message):
    with pytest.raises(UsageError, match=message.replace("(", r"\(")):
        parse_chain(text, TENSOR_CODECS)


def test_retired_names_are_refused_when_read(monkeypatch):
    from rbeformat import UnsupportedError
    from rbeformat.codecs.registry import codec_from_record, tensor_codec_from_record

    monkeypatch.setattr(registry, "RESERVED_NAMES", frozenset({"gquant", "zstd"}))
    record = TENSOR_CODECS["gquant"]().describe()
    with pytest.raises(UnsupportedError, match="retired"):
        tensor_codec_from_record(record, "codec")
    with pytest.raises(UnsupportedError, match="retired"):
        codec_from_record({"name": "zstd", "must_understand": True, "config": {}}, "codec")


def test_a_name_is_registered_once():
    from rbeformat.codecs.core.tensor import TensorCodec

    with pytest.raises(RuntimeError, match="'gquant' is used by"):

        @dataclasses.dataclass(frozen=True)
        class Impostor(TensorCodec):
            name = "gquant"
