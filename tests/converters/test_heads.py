"""Attention-head pruning (converters/compress/heads.py) on small randomly initialised BERT, Llama and GPT-2 models."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from rbe_converters.compress import heads
from rbe_converters.compress.recipe import policy_from_document
from rbe_converters.compress.roles import classify
from rbeformat import UsageError

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

SIZES = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, vocab_size=100)
LAYERS = 3


def _varied_heads(model, o_names, seed=0):
    """Scales each head's o-projection columns by its own factor, so that heads differ in importance."""
    rng = np.random.default_rng(seed)
    geometry = heads.heads_of(model.config.to_dict())
    state = model.state_dict()
    with torch.no_grad():
        for name in o_names:
            factors = np.repeat(np.exp(rng.normal(0, 0.8, geometry.heads)), geometry.head_dim)
            state[name].mul_(torch.tensor(factors, dtype=torch.float32))
    return model


def _bert():
    torch.manual_seed(0)
    config = transformers.BertConfig(num_hidden_layers=LAYERS, max_position_embeddings=32, **SIZES)
    model = transformers.BertModel(config).eval()
    return _varied_heads(model, [f"encoder.layer.{i}.attention.output.dense.weight" for i in range(LAYERS)])


def _llama():
    torch.manual_seed(1)
    config = transformers.LlamaConfig(num_hidden_layers=LAYERS, num_key_value_heads=2, **SIZES)
    model = transformers.LlamaModel(config).eval()
    return _varied_heads(model, [f"layers.{i}.self_attn.o_proj.weight" for i in range(LAYERS)])


def _gpt2():
    torch.manual_seed(2)
    config = transformers.GPT2Config(n_layer=LAYERS, n_embd=64, n_head=4, vocab_size=100, n_positions=32)
    return transformers.GPT2Model(config).eval()


@pytest.fixture(scope="module")
def bert():
    return _bert()


@pytest.fixture(scope="module")
def llama():
    return _llama()


def _weights(model) -> dict[str, np.ndarray]:
    return {n: t.detach().numpy().astype(np.float32) for n, t in model.state_dict().items() if t.is_floating_point()}


def _roles(model):
    dtypes = {torch.float32: "F32", torch.int64: "I64"}
    return classify(
        {n: (dtypes[t.dtype], tuple(t.shape)) for n, t in model.state_dict().items()}, model.config.to_dict()
    )


def _o_names(model) -> list[str]:
    return [name for name, role in _roles(model).items() if role.role == "attn_o"]


def _ids(seed, batch=4, length=24):
    return torch.tensor(np.random.default_rng(seed).integers(0, SIZES["vocab_size"], (batch, length)))


def _o_inputs(model, ids) -> dict[str, np.ndarray]:
    """The inputs each o-projection sees on ``ids``, as (tokens, in) float64 arrays."""
    modules = dict(model.named_modules())
    found: dict[str, list[np.ndarray]] = {}
    handles = []
    for name in _o_names(model):

        def hook(module, inputs, name=name):
            found.setdefault(name, []).append(inputs[0].detach().reshape(-1, inputs[0].shape[-1]).double().numpy())

        handles.append(modules[name[: -len(".weight")]].register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            model(input_ids=ids)
    finally:
        for handle in handles:
            handle.remove()
    return {name: np.concatenate(parts) for name, parts in found.items()}


def _hessians(model, ids) -> dict[str, np.ndarray]:
    return {name: x.T @ x / len(x) for name, x in _o_inputs(model, ids).items()}


def _output(model, changed: dict[str, np.ndarray], ids) -> np.ndarray:
    """last_hidden_state of the model with some tensors replaced."""
    other = copy.deepcopy(model)
    state = other.state_dict()
    with torch.no_grad():
        for name, array in changed.items():
            state[name].copy_(torch.from_numpy(array))
        return other(input_ids=ids).last_hidden_state.double().numpy()


def _o_columns_only(model, pruned) -> dict[str, np.ndarray]:
    """Only the o-projections' columns of the pruned heads zeroed (nn.Linear: out x in)."""
    geometry = heads.heads_of(model.config.to_dict())
    weights, layers = _weights(model), heads.attention_layers(_roles(model))
    out = {}
    for index, chosen in pruned.items():
        name = layers[index].o
        w = weights[name].copy()
        for h in chosen:
            span = slice(h * geometry.head_dim, (h + 1) * geometry.head_dim)
            if layers[index].orientation["attn_o"]:
                w[:, span] = 0
            else:
                w[span] = 0
        out[name] = w
    return out


# -- scores ---------------------------------------------------------------------------


@pytest.mark.parametrize("build", [_bert, _llama], ids=["bert", "llama"])
def test_scores_are_each_heads_share_of_the_o_projection_output_energy(build):
    model = build()
    ids = _ids(3)
    scores = heads.head_scores(model.config.to_dict(), _roles(model), _hessians(model, ids), _weights(model))
    layers = heads.attention_layers(_roles(model))
    assert sorted(scores) == list(range(LAYERS))
    d = heads.heads_of(model.config.to_dict()).head_dim
    for index, x in ((i, _o_inputs(model, ids)[layers[i].o]) for i in scores):
        w = _weights(model)[layers[index].o].astype(np.float64)
        total = np.mean(np.sum((x @ w.T) ** 2, axis=1))
        direct = [
            np.mean(np.sum((x[:, h * d : (h + 1) * d] @ w[:, h * d : (h + 1) * d].T) ** 2, axis=1)) / total
            for h in range(4)
        ]
        np.testing.assert_allclose(scores[index], direct, rtol=1e-6)


def test_scores_are_normalised_per_layer(bert):
    config, roles, weights = bert.config.to_dict(), _roles(bert), _weights(bert)
    hessians = _hessians(bert, _ids(3))
    name = heads.attention_layers(roles)[1].o
    louder = {**weights, name: weights[name] * 10}
    busier = {**hessians, name: hessians[name] * 7}
    base = heads.head_scores(config, roles, hessians, weights)
    for w, h in ((louder, hessians), (weights, busier)):
        np.testing.assert_allclose(heads.head_scores(config, roles, h, w)[1], base[1], rtol=1e-6)


def test_calibrations_from_collect_are_accepted(bert):
    from rbeformat.codecs.core.tensor import Calibration

    config, roles, weights = bert.config.to_dict(), _roles(bert), _weights(bert)
    hessians = _hessians(bert, _ids(3))
    wrapped = {n: Calibration("gptq", h) for n, h in hessians.items()}
    assert heads.choose_heads(config, roles, wrapped, weights, 0.25) == heads.choose_heads(
        config, roles, hessians, weights, 0.25
    )
    with pytest.raises(ValueError, match="no calibration Hessian"):
        heads.head_scores(config, roles, dict(list(hessians.items())[1:]), weights)


# -- choosing -------------------------------------------------------------------------


def test_the_lowest_scores_of_the_whole_model_are_chosen(bert):
    config, roles, weights = bert.config.to_dict(), _roles(bert), _weights(bert)
    hessians = _hessians(bert, _ids(3))
    scores = heads.head_scores(config, roles, hessians, weights)
    chosen = heads.choose_heads(config, roles, hessians, weights, 0.25)
    assert sum(map(len, chosen.values())) == 3  # a quarter of 12
    picked = [scores[i][h] for i, hs in chosen.items() for h in hs]
    rest = [scores[i][h] for i in scores for h in range(4) if h not in chosen.get(i, [])]
    assert max(picked) <= min(rest)
    assert heads.choose_heads(config, roles, hessians, weights, 0.0) == {}
    assert sum(map(len, heads.choose_heads(config, roles, hessians, weights, 0.1).values())) == 1  # 1.2 rounds to 1


def test_never_every_head_of_a_layer():
    # Layer 0's heads are all below layer 1's: a plain ranking would take all of them.
    scores = {0: np.array([0.01, 0.02, 0.03, 0.04]), 1: np.array([0.5, 0.6, 0.7, 0.8])}
    assert heads.select(scores, 5) == {0: [0, 1, 2], 1: [0, 1]}
    assert heads.select(scores, 100) == {0: [0, 1, 2], 1: [0, 1, 2]}  # at most all but one per layer


def test_a_large_fraction_leaves_one_head_per_layer(bert):
    config, roles, weights = bert.config.to_dict(), _roles(bert), _weights(bert)
    chosen = heads.choose_heads(config, roles, _hessians(bert, _ids(3)), weights, 0.99)
    assert sorted(chosen) == [0, 1, 2] and all(len(h) == 3 for h in chosen.values())


@pytest.mark.parametrize("fraction", [-0.1, 1.0, 1.5, float("nan")])
def test_fractions_outside_zero_to_one_are_refused(bert, fraction):
    with pytest.raises(ValueError, match="fraction"):
        heads.choose_heads(bert.config.to_dict(), _roles(bert), {}, _weights(bert), fraction)


# -- the pruned tensors ----------------------------------------------------------------


def test_bert_zeroes_the_o_columns_and_the_q_k_v_rows_and_biases(bert):
    weights = _weights(bert)
    pruned = {0: [1], 2: [0, 3]}
    out = heads.prune(bert.config.to_dict(), _roles(bert), weights, pruned)
    expected = set()
    for i in pruned:
        block = f"encoder.layer.{i}.attention."
        expected |= {block + "output.dense.weight"}
        expected |= {f"{block}self.{p}.{kind}" for p in ("query", "key", "value") for kind in ("weight", "bias")}
    assert set(out) == expected  # the o bias, the norms and the other layers do not change
    for i, chosen in pruned.items():
        block = f"encoder.layer.{i}.attention."
        for h in range(4):
            span = slice(16 * h, 16 * (h + 1))
            o = out[block + "output.dense.weight"][:, span]
            rows = [
                out[f"{block}self.{p}.{kind}"][span] for p in ("query", "key", "value") for kind in ("weight", "bias")
            ]
            if h in chosen:
                assert not o.any() and not any(r.any() for r in rows)
            else:
                assert np.array_equal(o, weights[block + "output.dense.weight"][:, span])
                assert np.array_equal(rows[0], weights[block + "self.query.weight"][span])
    assert all(a.dtype == np.float32 and a.shape == weights[n].shape for n, a in out.items())


def test_gqa_zeroes_k_and_v_only_for_a_wholly_pruned_group(llama):
    weights = _weights(llama)
    geometry = heads.heads_of(llama.config.to_dict())
    assert (geometry.heads, geometry.kv_heads, geometry.head_dim) == (4, 2, 16)
    out = heads.prune(llama.config.to_dict(), _roles(llama), weights, {0: [0], 1: [2, 3]})
    assert set(out) == {
        "layers.0.self_attn.o_proj.weight",
        "layers.1.self_attn.o_proj.weight",
        "layers.1.self_attn.k_proj.weight",
        "layers.1.self_attn.v_proj.weight",
    }
    o = "layers.0.self_attn.o_proj.weight"
    assert not out[o][:, :16].any() and np.array_equal(out[o][:, 16:], weights[o][:, 16:])
    assert not out["layers.1.self_attn.o_proj.weight"][:, 32:].any()
    for p in ("k", "v"):  # group 1 (query heads 2 and 3) is gone, group 0 stays
        w = out[f"layers.1.self_attn.{p}_proj.weight"]
        assert w.shape == (32, 64) and not w[16:].any()
        assert np.array_equal(w[:16], weights[f"layers.1.self_attn.{p}_proj.weight"][:16])


@pytest.mark.parametrize(
    "build,pruned",
    [(_bert, {0: [1], 2: [0, 3]}), (_llama, {0: [0], 1: [2, 3], 2: [1]}), (_gpt2, {1: [0, 2], 2: [3]})],
    ids=["bert", "llama", "gpt2"],
)
def test_pruning_changes_nothing_but_what_the_o_columns_remove(build, pruned):
    """The q, k, v rows a pruned head alone reads can go: the output is that of zeroing its o-columns."""
    model = build()
    out = heads.prune(model.config.to_dict(), _roles(model), _weights(model), pruned)
    ids = _ids(4)
    reference = _output(model, _o_columns_only(model, pruned), ids)
    np.testing.assert_allclose(_output(model, out, ids), reference, rtol=0, atol=1e-5)
    assert np.abs(reference - _output(model, {}, ids)).max() > 1e-3  # the heads did matter


def test_gpt2_transposed_and_fused_weights():
    model = _gpt2()
    weights = _weights(model)
    out = heads.prune(model.config.to_dict(), _roles(model), weights, {1: [2]})
    assert set(out) == {"h.1.attn.c_proj.weight", "h.1.attn.c_attn.weight", "h.1.attn.c_attn.bias"}
    assert not out["h.1.attn.c_proj.weight"][32:48].any()  # Conv1D: input x output, the head's input rows
    qkv = out["h.1.attn.c_attn.weight"]
    for offset in (0, 64, 128):  # its q, k and v output columns
        span = slice(offset + 32, offset + 48)
        assert not qkv[:, span].any() and not out["h.1.attn.c_attn.bias"][span].any()
    assert np.count_nonzero(qkv == 0) == np.count_nonzero(weights["h.1.attn.c_attn.weight"] == 0) + 3 * 16 * 64


def test_the_slices_codec_stores_only_the_kept_heads(bert):
    from rbeformat.codecs.slices import Slices

    out = heads.prune(bert.config.to_dict(), _roles(bert), _weights(bert), {0: [1]})
    block = "encoder.layer.0.attention."
    assert Slices(axis=1).encode(out[block + "output.dense.weight"]).parts["values"].shape == (64, 48)
    for name in (block + "self.query.weight", block + "self.value.weight"):
        assert Slices(axis=0).encode(out[name]).params == {"count": 48}


def test_bad_head_lists_are_refused(bert):
    config, roles, weights = bert.config.to_dict(), _roles(bert), _weights(bert)
    for pruned, message in (({0: [0, 1, 2, 3]}, "not all"), ({0: [4]}, "below 4"), ({7: [0]}, "block 7")):
        with pytest.raises(ValueError, match=message):
            heads.prune(config, roles, weights, pruned)
    assert heads.prune(config, roles, weights, {0: []}) == {}


def test_lowest_scored_heads_harm_the_output_less_than_the_highest(bert):
    config, roles, weights = bert.config.to_dict(), _roles(bert), _weights(bert)
    scores = heads.head_scores(config, roles, _hessians(bert, _ids(5, batch=8)), weights)
    lowest = heads.select(scores, 3)
    highest = heads.select({i: -s for i, s in scores.items()}, 3)
    ids = _ids(6, batch=8)  # other sentences than the calibration ones
    reference = _output(bert, {}, ids)

    def harm(pruned):
        out = _output(bert, heads.prune(config, roles, weights, pruned), ids)
        return np.linalg.norm(out - reference) / np.linalg.norm(reference)

    # Measured: 0.012 against 0.024.
    assert harm(lowest) < 0.7 * harm(highest), (harm(lowest), harm(highest))


def test_summary_is_one_line(bert):
    line = heads.summary(bert.config.to_dict(), {0: [1], 2: [0, 3]})
    assert "\n" not in line and line.startswith("pruned 3 of 12 (25.0%) attention heads")
    assert "0: 1; 2: 0, 3" in line
    assert "none" in heads.summary(bert.config.to_dict(), {})


def test_config_without_heads_is_refused():
    with pytest.raises(ValueError, match="num_attention_heads"):
        heads.heads_of({"hidden_size": 64})
    with pytest.raises(ValueError, match="evenly"):
        heads.heads_of({"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 3})
    assert heads.heads_of({"hidden_size": 64, "num_attention_heads": 4, "head_dim": 32}).head_dim == 32


# -- the recipe key -------------------------------------------------------------------


def test_recipe_prune_heads():
    rule = {"match": "*", "codec": "gquant()"}
    assert policy_from_document({"rule": [rule]}, "r").prune_heads is None
    assert policy_from_document({"prune_heads": 0.25, "rule": [rule]}, "r").prune_heads == 0.25
    assert policy_from_document({"prune_heads": 0, "rule": [rule]}, "r").prune_heads == 0.0


@pytest.mark.parametrize("value", [1, 1.0, -0.1, "0.1", True, float("nan"), float("inf"), [0.1]])
def test_recipe_prune_heads_outside_zero_to_one_is_a_usage_error(value):
    with pytest.raises(UsageError, match="'prune_heads' must be the fraction"):
        policy_from_document({"prune_heads": value, "rule": [{"match": "*", "codec": "gquant()"}]}, "r")


def test_rbe_convert_prunes_heads_and_stores_them_as_slices(tmp_path, capsys):
    """End to end: a recipe with prune_heads, calibrated o-projections stored by ``slices``."""
    from tiny_models import common_words, word_tokenizer

    from rbe_converters.cli import main
    from rbeformat import Reader

    tokenizer = word_tokenizer(common_words(96))
    torch.manual_seed(3)
    model = transformers.BertModel(
        transformers.BertConfig(
            num_hidden_layers=LAYERS, max_position_embeddings=64, **{**SIZES, "vocab_size": len(tokenizer)}
        )
    )
    directory = str(tmp_path / "bert")
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    recipe = tmp_path / "prune.toml"
    recipe.write_text(
        'prune_heads = 0.25\n\n[[rule]]\nrole = "attn_o"\n'
        'codec = "slices(axis=1, values=gquant(bits=8, group=16))"\ncalibration = "gptq"\n\n'
        '[[rule]]\nroles = ["attn_q", "attn_k", "attn_v"]\ncodec = "slices(axis=0)"\n'
    )
    text = tmp_path / "calibration.txt"
    text.write_text(" ".join(common_words(96)) * 30)
    out = str(tmp_path / "pruned.rbe")
    assert (
        main(
            [
                "convert",
                directory,
                out,
                "--recipe",
                str(recipe),
                "--calibration",
                str(text),
                "--calibration-windows",
                "4",
            ]
        )
        == 0
    )
    assert "pruned 3 of 12 (25.0%) attention heads" in capsys.readouterr().out  # a result: stdout
    zero_heads = 0
    with Reader(out) as r:
        for i in range(LAYERS):
            o = r.get_tensor(f"encoder.layer.{i}.attention.output.dense.weight")
            q = r.get_tensor(f"encoder.layer.{i}.attention.self.query.weight")
            assert o.shape == (64, 64) and q.shape == (64, 64)  # the original shapes
            dead = [h for h in range(4) if not o[:, h * 16 : (h + 1) * 16].any()]
            assert dead == [h for h in range(4) if not q[h * 16 : (h + 1) * 16].any()]
            zero_heads += len(dead)
            entry = r.manifest.tensors[f"encoder.layer.{i}.attention.output.dense.weight"]
            assert entry.transform.codec.name == "slices"
            # The recorded weight error is against the original, pruned heads included.
            original = model.state_dict()[f"encoder.layer.{i}.attention.output.dense.weight"].numpy()
            removed = np.linalg.norm(original[:, [c for h in dead for c in range(h * 16, h * 16 + 16)]])
            assert entry.extra["stats"]["rel_error"] >= 0.99 * removed / np.linalg.norm(original)
    assert zero_heads == 3


def test_prune_heads_needs_calibrated_o_projections(tmp_path):
    from rbe_converters.compress import plan
    from rbe_converters.sources.safetensors import plan_conversion

    model = _bert()
    directory = str(tmp_path / "bert")
    model.save_pretrained(directory)
    policy = policy_from_document(
        {"prune_heads": 0.25, "rule": [{"role": "attn_o", "codec": "gquant(bits=8, group=16)"}]}, "t"
    )
    with pytest.raises(UsageError, match="calibration"):
        plan.prune_heads(plan_conversion(directory), policy, {})


def test_prune_heads_without_calibrated_o_projections_is_refused_before_the_model_runs(tmp_path, monkeypatch):
    from rbe_converters.compress import plan
    from rbe_converters.compress.calibrate import torch as calibrate
    from rbe_converters.sources.safetensors import plan_conversion

    model = _bert()
    directory = str(tmp_path / "bert")
    model.save_pretrained(directory)
    doc = {
        "prune_heads": 0.25,
        "rule": [
            {"role": "attn_q", "codec": "gquant(bits=8, group=16)", "calibration": "gptq"},
            {"role": "attn_o", "codec": "gquant(bits=8, group=16)"},
        ],
    }

    def no_run(*args, **kwargs):
        raise AssertionError("the model ran")

    monkeypatch.setattr(calibrate, "survey", no_run)
    monkeypatch.setattr(calibrate, "collect", no_run)
    with pytest.raises(UsageError, match="attn_o rule calibration"):
        plan.calibrate_for(plan_conversion(directory), policy_from_document(doc, "t"))
