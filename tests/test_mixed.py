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
    c = [mixed.Candidate("big", 1000, (4.0, 6.0), (101.0, 1.0)), mixed.Candidate("small", 10, (4.0, 8.0), (6.0, 1.0)),
         mixed.Candidate("useless", 10, (4.0, 6.0), (1.0, 1.0))]
    assert mixed.pick(c, 4.0) == {}
    assert mixed.pick(c, 4.05) == {"small": 1}  # 5 / 40 bits of gain per extra bit beats 100 / 2000
    assert mixed.pick(c, 6.1) == {"big": 1, "small": 1}  # never a tensor the upgrade does not help


def test_pick_climbs_a_ladder_of_upgrades_along_its_convex_hull():
    # Level 1 gains little for its bits; level 2 lies below the line from 0 to 1: the hull skips 1.
    skip = mixed.Candidate("skip", 100, (3.0, 3.5, 4.0), (100.0, 95.0, 20.0))
    assert mixed._hull_steps(skip) == [(0, 2, 80.0 / 100)]
    steady = mixed.Candidate("steady", 100, (2.0, 3.0, 4.0), (100.0, 40.0, 25.0))
    assert [s[:2] for s in mixed._hull_steps(steady)] == [(0, 1), (1, 2)]
    both = [skip, steady]
    average = (3.0 + 2.0) / 2
    assert mixed.pick(both, average) == {}
    assert mixed.pick(both, average + 0.5) == {"skip": 2}  # 0.8 of error per extra bit, the best step
    assert mixed.pick(both, average + 1.0) == {"skip": 2, "steady": 1}  # then 0.6
    assert mixed.pick(both, average + 1.5) == {"skip": 2, "steady": 2}  # then 0.15
    # A step that does not fit blocks the tensor's later steps, which build on it.
    assert mixed.pick([steady], 2.5) == {}


def test_an_upgrade_list_in_a_recipe_is_a_ladder():
    doc = {"budget_bits": 4.0, "rule": [{"match": "*", "codec": "gquant(bits=3, group=64)",
                                         "upgrade": ["gquant(bits=4, group=64)", "gquant(bits=6, group=64)"]}]}
    rule = policy_from_document(doc, "r").rules[0]
    assert [c.codec.bits for c in rule.upgrades] == [4, 6]
    with pytest.raises(UsageError, match="list of codec chains"):
        policy_from_document({**doc, "rule": [{**doc["rule"][0], "upgrade": []}]}, "r")



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
