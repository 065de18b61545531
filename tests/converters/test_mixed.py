"""Mixed precision: a rule's costlier chain goes to the tensors that gain most, within the bit budget."""

import doctest

import numpy as np
import pytest
from conftest import write_safetensors

from rbe_converters.compress import mixed
from rbe_converters.compress.recipe import policy_from_document
from rbe_converters.pipeline import convert
from rbeformat import Reader, UsageError


def _recipe(budget, extra=""):
    doc = {
        "rule": [
            {"match": "*.weight", "ndim": 2, "codec": "gquant(bits=3, group=64)", "upgrade": "gquant(bits=6, group=64)"}
        ]
    }
    if budget is not None:
        doc["budget_bits"] = budget
    return doc


def test_pick_spends_the_budget_on_the_best_gain_per_bit():
    assert doctest.testmod(mixed).failed == 0
    c = [
        mixed.Candidate("big", 1000, (4.0, 6.0), (101.0, 1.0)),
        mixed.Candidate("small", 10, (4.0, 8.0), (6.0, 1.0)),
        mixed.Candidate("useless", 10, (4.0, 6.0), (1.0, 1.0)),
    ]
    assert mixed.pick(c, 4.0) == {}
    assert mixed.pick(c, 4.05) == {"small": 1}  # 5 / 40 bits of gain per extra bit beats 100 / 2000
    assert mixed.pick(c, 6.1) == {"big": 1, "small": 1}  # never a tensor the upgrade does not help


def test_pick_climbs_a_ladder_of_upgrades_along_its_convex_hull():
    # Level 1 gains little for its bits; level 2 lies below the line from 0 to 1: the hull skips 1.
    skip = mixed.Candidate("skip", 100, (3.0, 3.5, 4.0), (100.0, 95.0, 20.0))
    assert mixed.hull_steps(skip) == [(0, 2, 80.0 / 100)]
    steady = mixed.Candidate("steady", 100, (2.0, 3.0, 4.0), (100.0, 40.0, 25.0))
    assert [s[:2] for s in mixed.hull_steps(steady)] == [(0, 1), (1, 2)]
    both = [skip, steady]
    average = (3.0 + 2.0) / 2
    assert mixed.pick(both, average) == {}
    assert mixed.pick(both, average + 0.5) == {"skip": 2}  # 0.8 of error per extra bit, the best step
    assert mixed.pick(both, average + 1.0) == {"skip": 2, "steady": 1}  # then 0.6
    assert mixed.pick(both, average + 1.5) == {"skip": 2, "steady": 2}  # then 0.15
    # A step that does not fit blocks the tensor's later steps, which build on it.
    assert mixed.pick([steady], 2.5) == {}


def test_an_upgrade_list_in_a_recipe_is_a_ladder():
    doc = {
        "budget_bits": 4.0,
        "rule": [
            {
                "match": "*",
                "codec": "gquant(bits=3, group=64)",
                "upgrade": ["gquant(bits=4, group=64)", "gquant(bits=6, group=64)"],
            }
        ],
    }
    rule = policy_from_document(doc, "r").rules[0]
    assert [c.codec.bits for c in rule.upgrades] == [4, 6]
    with pytest.raises(UsageError, match="list of codec chains"):
        policy_from_document({**doc, "rule": [{**doc["rule"][0], "upgrade": []}]}, "r")


def test_the_noisiest_tensors_get_the_upgrade_and_the_budget_holds(tmp_path):
    rng = np.random.default_rng(5)
    tensors = {f"layer.{i}.weight": (rng.standard_t(2 + i, (64, 128)) * (1 + i)).astype(np.float32) for i in range(6)}
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


@pytest.mark.parametrize(
    "doc,says",
    [
        ({"rule": [{"match": "*", "codec": "gquant()", "upgrade": "gquant(bits=6)"}]}, "go together"),
        ({"budget_bits": 4.0, "rule": [{"match": "*", "codec": "gquant()"}]}, "go together"),
        (
            {"budget_bits": -1, "rule": [{"match": "*", "codec": "gquant()", "upgrade": "gquant(bits=6)"}]},
            "budget_bits",
        ),
        (
            {"budget_bits": 4.0, "rule": [{"match": "*", "codec": "gquant()", "upgrade": "gquant(bits=99)"}]},
            "gquant.bits",
        ),
    ],
)
def test_bad_mixed_precision_recipes_are_usage_errors(doc, says):
    with pytest.raises(UsageError, match=says):
        policy_from_document(doc, "r")


def test_stored_part_bytes_are_what_a_writer_stores(tmp_path):
    from rbe_converters.evaluate.eval import rbe_sizes
    from rbeformat.writer import Writer, stored_part_bytes

    rng = np.random.default_rng(3)
    codes = rng.binomial(15, 0.5, 3 * 1024 * 1024).astype(np.uint8)  # peaked, as GPTQ's codes are
    packed = (codes[0::2] | (codes[1::2] << 4)).astype(np.uint8)
    scales = rng.standard_normal(4096).astype(np.float16)
    with Writer(tmp_path / "p.rbe") as w:
        w.add_array("packed", packed)
        w.add_array("scales", scales)
    stored = rbe_sizes(str(tmp_path / "p.rbe")).tensors
    assert stored_part_bytes(packed) == stored["packed"][2] < packed.nbytes
    assert stored_part_bytes(scales) == stored["scales"][2]


def test_a_stored_budget_counts_what_the_file_holds(tmp_path):
    from rbe_converters.evaluate.eval import rbe_sizes

    rng = np.random.default_rng(11)
    tensors = {f"layer.{i}.weight": (rng.standard_normal((128, 256)) * (1 + i)).astype(np.float32) for i in range(6)}
    src = tmp_path / "m.safetensors"
    write_safetensors(str(src), tensors)
    doc = {
        "budget_bits": 3.9,
        "budget_counts": "stored",
        "rule": [
            {
                "match": "*.weight",
                "codec": "gquant(bits=3, group=64, mode=asym)",
                "upgrade": ["gquant(bits=4, group=64, mode=asym)"],
            }
        ],
    }
    policy = policy_from_document(doc, "r")
    assert policy.budget_counts == "stored"
    stored_out, raw_out = tmp_path / "stored.rbe", tmp_path / "raw.rbe"
    convert(str(src), str(stored_out), policy=policy)
    convert(str(src), str(raw_out), policy=policy_from_document({**doc, "budget_counts": "raw"}, "r"))
    weights = sum(t.size for t in tensors.values())

    def upgraded_and_bits(path):
        with Reader(path) as r:
            up = {n for n in tensors if r.manifest.tensors[n].transform.codec.bits == 4}
        return up, 8 * sum(rbe_sizes(str(path)).tensors[n][2] for n in tensors) / weights

    stored_up, stored_bits = upgraded_and_bits(stored_out)
    raw_up, raw_bits = upgraded_and_bits(raw_out)
    # Raw, an upgrade costs 1 bit per weight (3.5 -> 4.5): two of six fit 3.9.  Stored, 4-bit
    # codes compress, 3-bit ones hardly: the upgrade costs less, more tensors get it, and what
    # the file holds stays within the budget.
    assert len(raw_up) == 2 and raw_bits < 3.9
    assert len(stored_up) > len(raw_up) and stored_bits <= 3.9


def test_budget_counts_must_name_a_way_to_count():
    doc = {
        "budget_bits": 4.0,
        "budget_counts": "bytes",
        "rule": [{"match": "*", "codec": "gquant()", "upgrade": "gquant(bits=6)"}],
    }
    with pytest.raises(UsageError, match="budget_counts"):
        policy_from_document(doc, "r")
    with pytest.raises(UsageError, match="budget_counts"):
        policy_from_document({"budget_counts": "raw", "rule": [{"match": "*", "codec": "gquant()"}]}, "r")
