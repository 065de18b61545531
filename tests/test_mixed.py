"""Mixed precision: a rule's costlier chain goes to the tensors that gain most, within the bit budget."""

import doctest

import numpy as np
import pytest

from conftest import write_safetensors
from rbe_converters import mixed
from rbe_converters.hf import convert
from rbe_converters.recipe import policy_from_document
from rbeformat import Reader, UsageError


def _recipe(budget, extra=""):
    doc = {"rule": [{"match": "*.weight", "ndim": 2, "codec": "gquant(bits=3, group=64)",
                     "upgrade": "gquant(bits=6, group=64)"}]}
    if budget is not None:
        doc["budget_bits"] = budget
    return doc


def test_pick_spends_the_budget_on_the_best_gain_per_bit():
    assert doctest.testmod(mixed).failed == 0
    c = [mixed.Candidate("big", 1000, 4.0, 6.0, 100.0), mixed.Candidate("small", 10, 4.0, 8.0, 5.0),
         mixed.Candidate("useless", 10, 4.0, 6.0, 0.0)]
    assert mixed.pick(c, 4.0) == set()
    assert mixed.pick(c, 4.05) == {"small"}  # 0.125 of gain per extra bit beats 0.05
    assert mixed.pick(c, 6.1) == {"big", "small"}  # never a tensor the upgrade does not help


def test_the_noisiest_tensors_get_the_upgrade_and_the_budget_holds(tmp_path):
    rng = np.random.default_rng(5)
    tensors = {f"layer.{i}.weight": (rng.standard_t(2 + i, (64, 128)) * (1 + i)).astype(np.float32)
               for i in range(6)}
    src = tmp_path / "m.safetensors"
    write_safetensors(str(src), tensors)
    out = tmp_path / "m.rbe"
    budget = 3.5 + 3.0 * 2 / 6 + 0.01  # room for two of the six at 6 bits (each costs 3.5 or 6.5 per weight)
    convert(str(src), str(out), policy=policy_from_document(_recipe(budget), "r"))
    with Reader(out) as r:
        bits = {n: r.manifest.tensors[n].transform.codec.bits for n in tensors}
    upgraded = {n for n, b in bits.items() if b == 6}
    assert len(upgraded) == 2
    # The upgrade removes the most squared error where the values are largest.
    assert upgraded == {"layer.4.weight", "layer.5.weight"}


@pytest.mark.parametrize("doc,says", [
    ({"rule": [{"match": "*", "codec": "gquant()", "upgrade": "gquant(bits=6)"}]}, "go together"),
    ({"budget_bits": 4.0, "rule": [{"match": "*", "codec": "gquant()"}]}, "go together"),
    ({"budget_bits": -1, "rule": [{"match": "*", "codec": "gquant()", "upgrade": "gquant(bits=6)"}]}, "budget_bits"),
    ({"budget_bits": 4.0, "rule": [{"match": "*", "codec": "gquant()", "upgrade": "gquant(bits=99)"}]}, "gquant.bits"),
])
def test_bad_mixed_precision_recipes_are_usage_errors(doc, says):
    with pytest.raises(UsageError, match=says):
        policy_from_document(doc, "r")
