"""The checks every tensor codec's tests share.

``roundtrip`` encodes, checks the parts against the codec's declaration and
the bit cost against the stored bytes, and decodes; ``assert_config_roundtrip``
and ``assert_hostile_parts_refused`` check what a reader relies on.
``tests/rbeformat/codecs/test_contract.py`` runs all of them, plus each codec module's
doctests, on every registered codec; a codec's own test file adds what is
specific to it (error bounds, encoder choices, special values).
"""

from __future__ import annotations

import doctest
import importlib
import json
import os

import numpy as np
import pytest

from rbeformat import FormatError
from rbeformat.codecs.core.fields import fields_by_role
from rbeformat.codecs.core.tensor import TensorCodec
from rbeformat.codecs.registry import TENSOR_CODECS, tensor_codec_from_record
from rbeformat.spec import DTYPES


def rel_err(x: np.ndarray, y: np.ndarray) -> float:
    """Relative Frobenius error |x - y| / |x|."""
    return float(np.linalg.norm(x - y) / np.linalg.norm(x))


def roundtrip(codec: TensorCodec, x: np.ndarray, refs: dict | None = None, max_rel_err: float | None = None):
    """(encoded, decoded): parts as declared, bit cost equal to the stored bytes, float32 of x's shape."""
    enc = codec.encode(x, refs)
    specs = codec.part_specs(enc.params, x.shape, "t")
    assert set(specs) == set(enc.parts)
    for name, spec in specs.items():
        part = enc.parts[name]
        assert part.dtype == np.dtype(DTYPES[spec.dtype].numpy_storage) and part.shape == spec.shape, name
    assert codec.bit_cost(enc.params, x.shape) == sum(p.nbytes * 8 for p in enc.parts.values())
    json.dumps(enc.params, allow_nan=False)  # params go into the manifest as strict JSON
    out = codec.decode(enc.parts, enc.params, x.shape, "t", refs)
    assert out.dtype == np.float32 and out.shape == x.shape
    if max_rel_err is not None:
        assert rel_err(x, out) <= max_rel_err, (codec, rel_err(x, out))
    return enc, out


def assert_config_roundtrip(codec: TensorCodec) -> None:
    """The manifest record rebuilds an equal codec; its decode plan is strict JSON."""
    record = json.loads(json.dumps(codec.describe(), allow_nan=False))
    again = tensor_codec_from_record(record, "codec")
    assert again.describe() == codec.describe()
    assert type(again) is type(codec) and TENSOR_CODECS[codec.name] is type(codec)
    with pytest.raises(FormatError, match="unexpected key"):
        tensor_codec_from_record({**record, "config": {**record["config"], "no_such_setting": 1}}, "codec")


def assert_hostile_parts_refused(codec: TensorCodec, enc, shape: tuple[int, ...], refs: dict | None = None) -> None:
    """Missing, extra, re-typed and re-shaped parts, and bad params, are FormatErrors."""
    parts = enc.parts

    def refused(bad_parts, params=enc.params):
        with pytest.raises(FormatError):
            codec.decode(bad_parts, params, shape, "t", refs)

    refused({**parts, "extra": np.zeros(1, np.uint8)})
    for name, part in parts.items():
        refused({k: v for k, v in parts.items() if k != name})
        other = np.float64 if part.dtype != np.float64 else np.float32
        refused({**parts, name: part.astype(other)})
        refused({**parts, name: np.zeros(part.size + 1, part.dtype)})
    refused(parts, params=["not", "params"])
    refused(parts, params={**(enc.params if isinstance(enc.params, dict) else {}), "no_such_param": 1})


def assert_recorded_settings_ignored(codec: TensorCodec, x: np.ndarray, refs: dict | None = None) -> None:
    """A config with any value of a recorded encoder setting, or without it, opens and decodes the same."""
    recorded = [f.name for f in fields_by_role(type(codec), "recorded")]
    assert recorded, f"{codec.name} records no encoder setting"
    enc = codec.encode(x, refs)
    expected = codec.decode(enc.parts, enc.params, x.shape, "t", refs).tobytes()
    stored = {k: v for k, v in codec.config().items() if k not in recorded}
    configs = [stored, codec.config()] + [
        {**stored, name: value} for name in recorded for value in (None, -1, 0, 2**40, 0.5, "1", [1], {"a": 1})
    ]
    for config in configs:
        reader = type(codec).from_config(config, "c")
        assert reader.decode(enc.parts, enc.params, x.shape, "t", refs).tobytes() == expected, config


def run_doctests(module_name: str) -> None:
    module = importlib.import_module(module_name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0, f"{module_name} has no doctest"
    assert result.failed == 0, f"{module_name}: {result.failed} doctest(s) failed"


def check_contract(
    codec: TensorCodec, x: np.ndarray, refs: dict | None = None, max_rel_err: float | None = None
) -> None:
    """Everything above, on one codec and one sample tensor, plus the codec module's doctests."""
    enc, _ = roundtrip(codec, x, refs, max_rel_err)
    assert_config_roundtrip(codec)
    if fields_by_role(type(codec), "recorded"):
        assert_recorded_settings_ignored(codec, x, refs)
    assert_hostile_parts_refused(codec, enc, x.shape, refs)
    plan = codec.decode_plan(enc.params, x.shape, "t")
    assert plan.parts == codec.part_specs(enc.params, x.shape, "t")
    json.dumps(plan.constants, allow_nan=False)
    assert f"`{plan.formula}`" in codec_spec_text(codec), f"the codec's spec file does not name {plan.formula}"
    run_doctests(type(codec).__module__)


SPEC_CODECS = os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))), "spec", "codecs"
)


def codec_spec_text(codec: TensorCodec) -> str:
    """The specification file of the codec's module (spec/codecs/<module>.md)."""
    module = type(codec).__module__.rsplit(".", 1)[-1]
    with open(os.path.join(SPEC_CODECS, f"{module}.md"), encoding="utf-8") as fh:
        return fh.read()


def assert_params_refused(codec: TensorCodec, params, shape: tuple[int, ...]) -> None:
    """Params a file could hold that do not fit the shape: refused by part_specs and by decode."""
    with pytest.raises(FormatError):
        codec.part_specs(params, shape, "x")
    with pytest.raises(FormatError):
        codec.decode({}, params, shape, "x")


def assert_energy_target_met_minimally(energy: float, error: float, kept: int, error_with_one_less) -> None:
    """An energy target keeps the fewest components whose relative error is within sqrt(1 - energy)."""
    bound = np.sqrt(1 - energy)
    assert error <= bound + 1e-5
    if kept > 1:
        assert error_with_one_less(kept - 1) > bound - 1e-9
