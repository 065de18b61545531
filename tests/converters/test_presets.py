"""Recipes by tensor role and layer, the built-in presets, and `rbe convert --preset` / `rbe presets`."""

from __future__ import annotations

import json
import os
import tomllib

import numpy as np
import pytest
from conftest import write_safetensors

from rbe_converters.cli import main
from rbe_converters.compress.plan import choose_chains, plan_roles
from rbe_converters.compress.recipe import (
    CALIBRATIONS,
    Policy,
    Rule,
    policy_from_document,
    policy_from_preset,
    policy_from_recipe,
    preset_descriptions,
    preset_names,
)
from rbe_converters.compress.roles import ROLES, TensorRole, classify
from rbe_converters.sources.safetensors import plan_conversion
from rbeformat import InputError, Reader, UsageError
from rbeformat.chain import Chain

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PRESETS = os.path.join(ROOT, "converters", "compress", "presets")
LLAMA_LAYERS = 4


def _doc(*rules: str, top: str = "") -> dict:
    return tomllib.loads(top + "".join(f"[[rule]]\n{r}\n" for r in rules))


def _llama_tensors(layers: int = LLAMA_LAYERS) -> dict[str, tuple[str, tuple[int, ...]]]:
    tensors = {"model.embed_tokens.weight": ("F32", (256, 64)), "model.norm.weight": ("F32", (64,))}
    for i in range(layers):
        block = f"model.layers.{i}."
        tensors |= {
            block + "self_attn.q_proj.weight": ("F32", (64, 64)),
            block + "self_attn.v_proj.weight": ("F32", (32, 64)),
            block + "mlp.down_proj.weight": ("F32", (64, 128)),
            block + "mlp.up_proj.weight": ("F32", (128, 64)),
            block + "input_layernorm.weight": ("F32", (64,)),
        }
    return tensors


LLAMA_CONFIG = {"model_type": "llama", "hidden_size": 64, "vocab_size": 256}


def _chosen(policy: Policy, tensors: dict, config: dict | None) -> dict[str, str | None]:
    roles = classify(tensors, config)
    out = {}
    for name, (dtype, shape) in tensors.items():
        chain = policy.choose(name, dtype, shape, roles[name])
        out[name] = chain.text() if chain is not None else None
    return out


# -- rules by role and layer ----------------------------------------------------------


def test_rules_select_by_role_layers_and_pattern():
    policy = policy_from_document(
        _doc(
            'roles = ["attn_v", "mlp_down"]\nlayers = [0, -1]\ncodec = "gquant(bits=8, group=64)"',
            'role = "attn_v"\nmatch = "*.layers.2.*"\ncodec = "gquant(bits=6, group=64)"',
            'match = "*_proj.weight"\ncodec = "gquant(bits=4, group=64)"',
        ),
        "r",
    )
    chosen = _chosen(policy, _llama_tensors(), LLAMA_CONFIG)
    for i in range(LLAMA_LAYERS):
        v, down = chosen[f"model.layers.{i}.self_attn.v_proj.weight"], chosen[f"model.layers.{i}.mlp.down_proj.weight"]
        outer = i in (0, LLAMA_LAYERS - 1)
        assert ("bits=8" in v) == outer and ("bits=8" in down) == outer
        assert ("bits=6" in v) == (i == 2)  # role and pattern must both match
        assert "bits=4" in chosen[f"model.layers.{i}.self_attn.q_proj.weight"]
        assert chosen[f"model.layers.{i}.input_layernorm.weight"] is None  # no rule takes it
    assert chosen["model.embed_tokens.weight"] is None


def test_a_rule_about_roles_takes_no_tensor_without_a_role():
    policy = policy_from_document(_doc('role = "attn_q"\ncodec = "gquant(bits=4, group=64)"'), "r")
    assert policy.uses_roles
    assert policy.choose("model.layers.0.self_attn.q_proj.weight", "F32", (64, 64)) is None
    role = TensorRole("attn_q", 0, True, 1)
    assert policy.choose("model.layers.0.self_attn.q_proj.weight", "F32", (64, 64), role) is not None
    assert not policy_from_document(_doc('match = "*"\ncodec = "gquant(bits=4, group=64)"'), "r").uses_roles


def test_input_last_selects_transposed_weights():
    policy = policy_from_document(
        _doc(
            'match = "*"\ninput_last = false\ncodec = "gquant(bits=8, group=0)"',
            'match = "*"\nndim = 2\ncodec = "gquant(bits=4, group=64)"',
        ),
        "r",
    )
    gpt2 = {"transformer.h.0.attn.c_attn.weight": ("F32", (64, 192)), "transformer.wte.weight": ("F32", (100, 64))}
    chosen = _chosen(policy, gpt2, {"n_embd": 64, "vocab_size": 100})
    assert "group=0" in chosen["transformer.h.0.attn.c_attn.weight"]
    assert "group=64" in chosen["transformer.wte.weight"]  # an embedding has no input axis: not selected


def test_choose_rule_exposes_the_rule_and_its_calibration():
    policy = policy_from_document(
        _doc(
            'role = "mlp_up"\ncodec = "gquant(bits=4, group=64)"\ncalibration = "gptq"',
            'role = "mlp_down"\ncodec = "lossless"\ncalibration = "wanda"',
        ),
        "r",
    )
    up, down = TensorRole("mlp_up", 0, True, 1), TensorRole("mlp_down", 0, True, 1)
    rule = policy.choose_rule("x.weight", "F32", (128, 64), up)
    assert isinstance(rule, Rule) and rule.calibration == "gptq"
    assert policy.choose("x.weight", "F32", (128, 64), up) is rule.chain
    assert policy.choose_rule("y.weight", "F32", (64, 128), down) is None  # lossless: no encoder to calibrate
    assert policy.choose_rule("x.weight", "I32", (128, 64), up) is None  # integers stay lossless
    assert policy.choose_rule("x.weight", "F32", (128, 64), None) is None


@pytest.mark.parametrize(
    "rule, message",
    [
        ('codec = "gquant()"', "needs 'match'"),
        ('match = "*"', "needs a string key 'codec'"),
        ('match = 3\ncodec = "gquant()"', "'match' must be a string"),
        ('role = "attention"\ncodec = "gquant()"', "unknown role(s) ['attention']"),
        ('roles = []\ncodec = "gquant()"', "'roles' must be a non-empty list"),
        ('roles = "attn_q"\ncodec = "gquant()"', "'roles' must be a non-empty list"),
        ('role = ["attn_q"]\ncodec = "gquant()"', "'role' must be a string"),
        ('role = "attn_q"\nroles = ["attn_k"]\ncodec = "gquant()"', "not both"),
        ('role = "attn_q"\nlayers = []\ncodec = "gquant()"', "'layers' must be a non-empty list"),
        ('role = "attn_q"\nlayers = [0, true]\ncodec = "gquant()"', "'layers' must be a non-empty list"),
        ('role = "attn_q"\nlayers = [1.5]\ncodec = "gquant()"', "'layers' must be a non-empty list"),
        ('role = "attn_q"\ninput_last = 1\ncodec = "gquant()"', "'input_last' must be true or false"),
        ('role = "attn_q"\ncalibration = "hqq"\ncodec = "gquant()"', "'calibration' must be one of 'gptq', 'wanda'"),
        ('role = "attn_q"\nndim = -1\ncodec = "gquant()"', "'ndim' must be a non-negative integer"),
        ('role = "attn_q"\nlayer = 0\ncodec = "gquant()"', "unknown key(s) ['layer']"),
        ('role = "attn_q"\ncodec = "gquant(bits=9)"', "codec chain"),
    ],
)
def test_bad_rules_are_usage_errors(rule, message):
    with pytest.raises(UsageError) as exc:
        policy_from_document(_doc(rule), "r.toml")
    assert message in str(exc.value) and "r.toml: rule 1" in str(exc.value)


@pytest.mark.parametrize(
    "top, message",
    [
        ("description = 3\n", "'description' must be a string"),
        ('name = "x"\n', "unknown top-level key(s) ['name']"),
        ("rule = 3\n", "'rule' must be an array of tables"),
    ],
)
def test_bad_top_level_keys_are_usage_errors(top, message):
    with pytest.raises(UsageError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        policy_from_document(tomllib.loads(top), "r.toml")


def test_every_calibration_is_accepted_and_stored():
    for name in CALIBRATIONS:
        (rule,) = policy_from_document(_doc(f'role = "mlp_up"\ncodec = "gquant()"\ncalibration = "{name}"'), "r").rules
        assert rule.calibration == name


def test_a_recipe_file_with_a_description_and_roles(tmp_path):
    path = tmp_path / "r.toml"
    path.write_text('description = "mine"\n[[rule]]\nrole = "norm_weight"\ncodec = "normdelta(mode=bits)"\n')
    policy = policy_from_recipe(str(path))
    assert policy.description == "mine" and policy.rules[0].roles == frozenset({"norm_weight"})


# -- the converter computes roles --------------------------------------------------------


def _llama_dir(root, config: str | None = json.dumps(LLAMA_CONFIG)) -> str:
    rng = np.random.default_rng(0)
    arrays = {
        name: (rng.standard_normal(shape) * 0.05).astype(np.float32) for name, (_, shape) in _llama_tensors().items()
    }
    os.makedirs(root)
    write_safetensors(os.path.join(root, "model.safetensors"), arrays, {"format": "pt"})
    if config is not None:
        with open(os.path.join(root, "config.json"), "w") as fh:
            fh.write(config)
    return str(root)


def test_choose_chains_uses_roles_from_the_plan(tmp_path):
    src = _llama_dir(tmp_path / "m")
    policy = policy_from_document(_doc('role = "attn_v"\nlayers = [-1]\ncodec = "gquant(bits=8, group=64)"'), "r")
    alone, groups = choose_chains(plan_conversion(src), policy)
    assert list(alone) == [f"model.layers.{LLAMA_LAYERS - 1}.self_attn.v_proj.weight"] and not groups
    roles = plan_roles(plan_conversion(src))
    assert roles["model.embed_tokens.weight"].role == "token_embedding"  # the config's vocab_size agrees


def test_a_broken_config_is_an_input_error_only_when_roles_are_needed(tmp_path):
    src = _llama_dir(tmp_path / "m", config="{not json")
    with pytest.raises(InputError, match="config.json: not valid JSON"):
        choose_chains(plan_conversion(src), policy_from_preset("q8"))
    by_name = policy_from_document(_doc('match = "*"\nndim = 2\ncodec = "gquant()"'), "r")
    alone, _ = choose_chains(plan_conversion(src), by_name)
    assert alone  # a name-only policy never reads config.json
    src = _llama_dir(tmp_path / "n", config="[1, 2]")
    with pytest.raises(InputError, match="not a JSON object"):
        plan_roles(plan_conversion(src))


def test_roles_without_a_config_come_from_names(tmp_path):
    src = _llama_dir(tmp_path / "m", config=None)
    alone, _ = choose_chains(plan_conversion(src), policy_from_preset("q4"))
    assert "bits=4" in alone["model.layers.0.self_attn.v_proj.weight"].text()
    assert "gptq_order=activation" in alone["model.layers.1.self_attn.q_proj.weight"].text()
    assert "bits=6" in alone["model.embed_tokens.weight"].text() and "model.norm.weight" not in alone


# -- the presets ------------------------------------------------------------------------

EXPECTED_PRESETS = {
    "lossless",
    "q8",
    "q6",
    "q5",
    "q4",
    "q4-small",
    "q3",
    "q2",
    "seed",
    "vq",
    "minilm-layerwise",
    "encoder-q4",
    "encoder-q3",
    "encoder-q2",
}


def test_every_preset_file_is_listed_loads_and_describes_itself():
    files = {f[: -len(".toml")] for f in os.listdir(PRESETS) if f.endswith(".toml")}
    assert set(preset_names()) == files and files >= EXPECTED_PRESETS
    descriptions = preset_descriptions()
    for name in files:
        assert descriptions[name] and "\n" not in descriptions[name], name
        policy = policy_from_preset(name)
        assert policy.lossless == (name == "lossless"), name
        for rule in policy.rules:
            assert rule.roles is None or rule.roles <= set(ROLES)


def _codecs(chain: Chain):
    yield chain.codec
    for part in chain.parts.values():
        yield from _codecs(part)


def test_no_preset_quantizes_to_4_bits_in_groups_under_64():
    """SmolLM2's weights lie on a 4-bit grid per 32-wide block: a 32-wide 4-bit group reproduces them."""
    for name in preset_names():
        for rule in policy_from_preset(name).rules:
            for codec in _codecs(rule.chain):
                if codec is not None and codec.name == "gquant" and codec.bits <= 4:
                    assert codec.group == 0 or codec.group >= 64, (name, rule.chain.text())


def test_unknown_preset_lists_the_available_ones():
    with pytest.raises(UsageError) as exc:
        policy_from_preset("q1")
    assert "unknown preset 'q1'" in str(exc.value) and "q4" in str(exc.value) and "minilm-layerwise" in str(exc.value)


def test_convert_options_refuse_an_unknown_preset_where_they_are_made():
    from rbe_converters.pipeline import ConvertOptions

    with pytest.raises(UsageError, match=r"unknown preset 'q44' \(did you mean 'q4'"):
        ConvertOptions(preset="q44")
    assert ConvertOptions(preset="Q4").preset == "Q4"  # any case, as --preset takes it


def test_the_encoder_presets_choose_every_embedding_and_linear_level_by_the_models_drift():
    linear_bits = {
        "encoder-q4": [2, 3, 4, 5, 6, 8],
        "encoder-q3": [2, 3, 4, 5, 6, 8],
        "encoder-q2": [2, 2, 3, 4, 5, 6, 8],
    }
    word_levels = {"encoder-q4": 6, "encoder-q3": 6, "encoder-q2": 8}  # encoder-q2 adds 2 bits in groups of 128, 64
    for name, bits in linear_bits.items():
        policy = policy_from_preset(name)
        assert (policy.budget_counts, policy.budget_sensitivity) == ("stored", "model")
        v = policy.choose_rule(
            "encoder.layer.0.attention.self.value.weight", "F32", (64, 64), TensorRole("attn_v", 0, True, 2)
        )
        assert v.calibration == "gptq" and [c.codec.bits for c in (v.chain, *v.upgrades)] == bits
        words = policy.choose_rule(
            "embeddings.word_embeddings.weight", "F32", (1000, 64), TensorRole("token_embedding", None, True, 2)
        )
        assert words.calibration is None and len(words.upgrades) == word_levels[name] - 1
        norm = policy.choose_rule("embeddings.LayerNorm.weight", "F32", (64,), TensorRole("norm_weight", None, None, 2))
        assert norm is None or norm.chain.lossless
    budgets = [policy_from_preset(name).budget_bits for name in ("encoder-q2", "encoder-q3", "encoder-q4")]
    assert budgets == sorted(budgets) and len(set(budgets)) == 3


def test_q4_calibrates_linear_layers_and_upgrades_them_by_mixed_precision():
    policy = policy_from_preset("q4")
    assert policy.budget_bits == 4.8 and policy.budget_counts == "raw"
    small = policy_from_preset("q4-small")
    assert (small.budget_bits, small.budget_counts) == (3.91, "stored")  # the file's size is the point
    q = policy.choose_rule(
        "model.layers.0.self_attn.q_proj.weight", "F32", (64, 64), TensorRole("attn_q", 0, True, LLAMA_LAYERS)
    )
    assert q.calibration == "gptq" and "bits=4" in q.chain.text() and [c.codec.bits for c in q.upgrades] == [5, 6]
    chosen = _chosen(policy, _llama_tensors(), LLAMA_CONFIG)
    assert "bits=6" in chosen["model.embed_tokens.weight"]
    assert chosen["model.norm.weight"] is None and chosen["model.layers.0.input_layernorm.weight"] is None


def test_presets_group_gpt2_conv1d_weights_along_their_inputs():
    """GPT-2 stores its Conv1D weights input x output: a preset's grouped chain reaches them wrapped
    in transpose, so that its groups run along the input axis as on any Linear weight."""
    transformers = pytest.importorskip("transformers")
    from rbe_converters.compress.plan import input_axis_grouped

    config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=100, n_positions=32)
    model = transformers.GPT2LMHeadModel(config)
    tensors = {n: ("F32", tuple(t.shape)) for n, t in model.state_dict().items()}
    roles = classify(tensors, config.to_dict())
    conv1d = [n for n in tensors if roles[n].input_last is False]
    assert len(conv1d) == 4 * 2
    for name in preset_names():
        policy = policy_from_preset(name)
        for tensor in conv1d:
            rule = policy.choose_rule(tensor, *tensors[tensor], roles[tensor])
            if rule is None or rule.chain.lossless:
                continue
            chain = input_axis_grouped(rule.chain, rule, roles[tensor])
            assert chain.codec.name == "transpose" and chain.parts["values"] is rule.chain, (name, tensor)


# -- the command line -------------------------------------------------------------------


def test_rbe_presets_ends_with_each_description(capsys):
    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    lines = out[out.rindex("\n\n") + 2 :].splitlines()
    descriptions = preset_descriptions()
    assert len(lines) == len(descriptions)
    for line in lines:
        name = line.split()[0]
        assert line.endswith("  " + descriptions[name])


def test_convert_takes_a_preset_in_any_case_and_suggests_for_a_misspelled_one(tmp_path, capsys):
    src = _llama_dir(tmp_path / "m")
    out = tmp_path / "q.rbe"
    assert main(["convert", src, str(out), "--quiet", "--preset", "Q8"]) == 0
    capsys.readouterr()
    assert main(["info", str(out), "--json"]) == 0
    rows = {row["name"]: row for row in json.loads(capsys.readouterr().out)["tensors"]}
    assert rows["model.layers.0.self_attn.v_proj.weight"]["codec"].startswith("gquant(bits=8")
    assert main(["convert", src, str(tmp_path / "r.rbe"), "--preset", "q88"]) == 2
    err = capsys.readouterr().err
    assert "unknown preset 'q88' (did you mean 'q8'?)" in err and len(err.strip().splitlines()) == 1


def test_convert_with_a_preset_records_roles_in_info(tmp_path, capsys):
    src = _llama_dir(tmp_path / "m")
    out = str(tmp_path / "q.rbe")
    assert main(["convert", src, out, "--quiet", "--preset", "q8"]) == 0
    capsys.readouterr()
    assert main(["info", out, "--json"]) == 0
    rows = {row["name"]: row for row in json.loads(capsys.readouterr().out)["tensors"]}
    assert rows["model.layers.0.self_attn.v_proj.weight"]["role"] == "attn_v"
    assert rows["model.layers.0.self_attn.v_proj.weight"]["codec"].startswith("gquant(bits=8")
    assert rows["model.norm.weight"]["role"] == "norm_weight" and rows["model.norm.weight"]["codec"] == "byteplane"
    assert main(["info", out]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:5] == ["tensor", "dtype", "shape", "role", "codec"]
    line = next(x for x in table if x.startswith("model.layers.1.mlp.down_proj.weight"))
    assert line.split()[3] == "mlp_down"


def test_convert_preset_usage_errors(tmp_path, capsys):
    src = _llama_dir(tmp_path / "m")
    out = tmp_path / "q.rbe"
    assert main(["convert", src, str(out), "--preset", "nope"]) == 2
    err = capsys.readouterr().err
    assert "unknown preset 'nope'; available: " in err and "q4" in err and len(err.strip().splitlines()) == 1
    with pytest.raises(SystemExit) as exc:
        main(["convert", src, str(out), "--preset", "q4", "--codec", "gquant()"])
    assert exc.value.code == 2 and "not allowed with" in capsys.readouterr().err
    assert not out.exists()


def test_info_roles_of_internal_tensors_and_damaged_configs(tmp_path, capsys):
    src = _llama_dir(tmp_path / "m", config="{not json")
    recipe = tmp_path / "r.toml"
    recipe.write_text('[[rule]]\nmatch = "*layernorm.weight"\ncodec = "normdelta(mode=bits)"\n')
    out = str(tmp_path / "n.rbe")
    assert main(["convert", src, out, "--quiet", "--recipe", str(recipe)]) == 0
    capsys.readouterr()
    assert main(["info", out, "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["tensors"]
    assert all(row["role"] is None for row in rows if row["internal"]) and any(row["internal"] for row in rows)
    # a config.json that is not JSON: the roles still come from the names
    assert {row["role"] for row in rows if row["name"].endswith("layernorm.weight")} == {"norm_weight"}


# -- the real models --------------------------------------------------------------------


@pytest.mark.slow
def test_minilm_layerwise_uses_every_technique(minilm_dir, tmp_path, capsys):
    out = str(tmp_path / "m.rbe")
    assert main(["convert", minilm_dir, out, "--quiet", "--preset", "minilm-layerwise"]) == 0
    capsys.readouterr()
    assert main(["info", out, "--json"]) == 0
    rows = [row for row in json.loads(capsys.readouterr().out)["tensors"] if not row["internal"]]
    codecs = {}
    for row in rows:
        codecs.setdefault(row["role"], set()).add(row["codec"].split("(")[0])
    assert codecs["position_embedding"] == {"posdct"}
    assert codecs["norm_weight"] == {"normdelta"}
    assert codecs["norm_bias"] == codecs["linear_bias"] == {"gquant"}
    assert codecs["token_embedding"] == {"vq"}
    for role in ("attn_q", "attn_k", "attn_v", "attn_o", "mlp_up", "mlp_down"):
        assert codecs[role] == {"gquant"}, role


def test_a_calibrated_preset_on_a_model_transformers_cannot_load_is_one_clear_error(tmp_path, capsys):
    src = _llama_dir(tmp_path / "m")  # its weights do not match a loadable model
    out = tmp_path / "q.rbe"
    assert main(["convert", src, str(out), "--quiet", "--preset", "q4"]) == 3
    err = capsys.readouterr().err.strip().splitlines()
    # config.json is checked against the stored shapes before transformers builds anything
    assert len(err) == 1 and src in err[0] and "config.json" in err[0] and "has shape" in err[0]
    assert not out.exists()


def test_a_level_on_an_encoders_safetensors_file_runs_the_encoder_recipe(bert, tmp_path, capsys):
    """The file alone has no config.json; its calibration runs the model of the directory it lies in,
    whose config.json picks the recipe, as for the directory: the same tensors, without its files."""
    pytest.importorskip("torch")
    directory = bert[0]
    text = tmp_path / "text.txt"
    text.write_text(" ".join(bert[2].get_vocab()) * 20)
    calibration = ["--calibration", str(text), "--calibration-windows", "1", "--threads", "1"]
    from_file, from_dir = str(tmp_path / "file.rbe"), str(tmp_path / "dir.rbe")
    model_file = os.path.join(directory, "model.safetensors")
    assert main(["convert", model_file, from_file, "--preset", "q4", *calibration]) == 0
    err = capsys.readouterr().err
    assert "rbe: preset q4 -> encoder-q4 for a BertModel encoder" in err
    assert f"rbe: {model_file}: calibrating with the model directory it lies in ({directory}: " in err
    assert main(["convert", directory, from_dir, "--preset", "q4", "--quiet", *calibration]) == 0
    with Reader(from_file) as f, Reader(from_dir) as d:
        assert f.keys() == d.keys() and "config.json" not in f.files() and "config.json" in d.files()
        for name in f.keys():
            assert np.array_equal(f.get_tensor(name), d.get_tensor(name)), name


@pytest.mark.slow
def test_q4_on_minilm_runs_the_encoder_recipe_within_4_6_bits(minilm_dir, tmp_path, capsys):
    """all-MiniLM-L6-v2 is a BERT encoder: --preset q4 runs encoder-q4 (the generic q4's 6-bit word
    embeddings, half of its weights, made 5.59 bits per weight).  One calibration window keeps the
    end-to-end survey short; the file's size is set by the stored-bit budget, not by the text."""
    out = str(tmp_path / "q4.rbe")
    argv = ["convert", minilm_dir, out, "--preset", "Q4", "--calibration-windows", "1"]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "rbe: preset q4 -> encoder-q4 for a BertModel encoder" in err
    assert main(["info", out, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["totals"]["bits_per_weight"] <= 4.6
