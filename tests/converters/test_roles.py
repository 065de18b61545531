"""Tensor roles (converters/compress/roles.py) on small randomly initialised models and the real checkpoints."""

from __future__ import annotations

import json
import os

import pytest

from rbe_converters.compress.roles import ROLES, TensorRole, classify, layer_index
from rbe_converters.safetensors_io import read_header

TINY = dict(vocab=100, hidden=64, inter=128, layers=2, heads=4, positions=32)


def _state(model) -> dict[str, tuple[str, tuple[int, ...]]]:
    """{name: (dtype, shape)} as a safetensors header of the model would list them."""
    dtypes = {"torch.float32": "F32", "torch.int64": "I64"}
    return {name: (dtypes[str(t.dtype)], tuple(t.shape)) for name, t in model.state_dict().items()}


def _roles(model) -> dict[str, TensorRole]:
    return classify(_state(model), model.config.to_dict())


def _per_layer(template: dict[str, str], layers: int) -> dict[str, tuple[str, int]]:
    return {key.format(i=i): (role, i) for i in range(layers) for key, role in template.items()}


def _check(
    roles: dict[str, TensorRole], outside: dict[str, str], inside: dict[str, tuple[str, int]], num_layers: int
) -> None:
    expected = {name: (role, None) for name, role in outside.items()} | inside
    assert set(roles) == set(expected)
    for name, (role, layer) in expected.items():
        got = roles[name]
        assert (got.role, got.layer) == (role, layer), name
        assert got.num_layers == (num_layers if layer is not None else None), name


def test_gpt2_roles_and_transposed_conv1d():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(
        n_layer=TINY["layers"],
        n_embd=TINY["hidden"],
        n_head=TINY["heads"],
        vocab_size=TINY["vocab"],
        n_positions=TINY["positions"],
    )
    roles = _roles(transformers.GPT2LMHeadModel(config))
    inside = _per_layer(
        {
            "transformer.h.{i}.ln_1.weight": "norm_weight",
            "transformer.h.{i}.ln_1.bias": "norm_bias",
            "transformer.h.{i}.attn.c_attn.weight": "attn_qkv",
            "transformer.h.{i}.attn.c_attn.bias": "linear_bias",
            "transformer.h.{i}.attn.c_proj.weight": "attn_o",
            "transformer.h.{i}.attn.c_proj.bias": "linear_bias",
            "transformer.h.{i}.ln_2.weight": "norm_weight",
            "transformer.h.{i}.ln_2.bias": "norm_bias",
            "transformer.h.{i}.mlp.c_fc.weight": "mlp_up",
            "transformer.h.{i}.mlp.c_fc.bias": "linear_bias",
            "transformer.h.{i}.mlp.c_proj.weight": "mlp_down",
            "transformer.h.{i}.mlp.c_proj.bias": "linear_bias",
        },
        TINY["layers"],
    )
    outside = {
        "transformer.wte.weight": "token_embedding",
        "transformer.wpe.weight": "position_embedding",
        "transformer.ln_f.weight": "norm_weight",
        "transformer.ln_f.bias": "norm_bias",
        "lm_head.weight": "lm_head",
    }
    _check(roles, outside, inside, TINY["layers"])
    for name, role in roles.items():  # Conv1D: every Linear-like weight is stored input x output
        if role.role in ("attn_qkv", "attn_o", "mlp_up", "mlp_down"):
            assert role.input_last is False, name
    assert roles["lm_head.weight"].input_last is True


def test_bert_roles():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        num_hidden_layers=TINY["layers"],
        hidden_size=TINY["hidden"],
        intermediate_size=TINY["inter"],
        num_attention_heads=TINY["heads"],
        vocab_size=TINY["vocab"],
        max_position_embeddings=TINY["positions"],
    )
    roles = _roles(transformers.BertModel(config))
    block = "encoder.layer.{i}."
    inside = _per_layer(
        {
            block + k: v
            for k, v in {
                "attention.self.query.weight": "attn_q",
                "attention.self.query.bias": "linear_bias",
                "attention.self.key.weight": "attn_k",
                "attention.self.key.bias": "linear_bias",
                "attention.self.value.weight": "attn_v",
                "attention.self.value.bias": "linear_bias",
                "attention.output.dense.weight": "attn_o",
                "attention.output.dense.bias": "linear_bias",
                "attention.output.LayerNorm.weight": "norm_weight",
                "attention.output.LayerNorm.bias": "norm_bias",
                "intermediate.dense.weight": "mlp_up",
                "intermediate.dense.bias": "linear_bias",
                "output.dense.weight": "mlp_down",
                "output.dense.bias": "linear_bias",
                "output.LayerNorm.weight": "norm_weight",
                "output.LayerNorm.bias": "norm_bias",
            }.items()
        },
        TINY["layers"],
    )
    outside = {
        "embeddings.word_embeddings.weight": "token_embedding",
        "embeddings.position_embeddings.weight": "position_embedding",
        "embeddings.token_type_embeddings.weight": "token_type_embedding",
        "embeddings.LayerNorm.weight": "norm_weight",
        "embeddings.LayerNorm.bias": "norm_bias",
        "pooler.dense.weight": "linear",
        "pooler.dense.bias": "linear_bias",
    }
    state = _state(transformers.BertModel(config))
    if "embeddings.position_ids" in state:  # a buffer some transformers versions save
        outside["embeddings.position_ids"] = "other"
    _check(roles, outside, inside, TINY["layers"])
    assert all(r.input_last is True for r in roles.values() if r.role.startswith(("attn_", "mlp_")))


def test_bert_masked_lm_head():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        num_hidden_layers=1,
        hidden_size=TINY["hidden"],
        intermediate_size=TINY["inter"],
        num_attention_heads=TINY["heads"],
        vocab_size=TINY["vocab"],
    )
    roles = _roles(transformers.BertForMaskedLM(config))
    assert roles["cls.predictions.decoder.weight"].role == "lm_head"
    assert roles["cls.predictions.transform.dense.weight"].role == "linear"
    assert roles["cls.predictions.transform.LayerNorm.weight"].role == "norm_weight"
    assert roles["cls.predictions.bias"].role == "linear_bias"


LLAMA_BLOCK = {
    "model.layers.{i}." + k: v
    for k, v in {
        "self_attn.q_proj.weight": "attn_q",
        "self_attn.k_proj.weight": "attn_k",
        "self_attn.v_proj.weight": "attn_v",
        "self_attn.o_proj.weight": "attn_o",
        "mlp.gate_proj.weight": "mlp_gate",
        "mlp.up_proj.weight": "mlp_up",
        "mlp.down_proj.weight": "mlp_down",
        "input_layernorm.weight": "norm_weight",
        "post_attention_layernorm.weight": "norm_weight",
    }.items()
}


def _llama_like(config_class, model_class, **extra):
    config = config_class(
        num_hidden_layers=TINY["layers"],
        hidden_size=TINY["hidden"],
        intermediate_size=TINY["inter"],
        num_attention_heads=TINY["heads"],
        num_key_value_heads=2,
        vocab_size=TINY["vocab"],
        **extra,
    )
    return model_class(config)


def test_llama_roles():
    transformers = pytest.importorskip("transformers")
    roles = _roles(_llama_like(transformers.LlamaConfig, transformers.LlamaForCausalLM))
    outside = {
        "model.embed_tokens.weight": "token_embedding",
        "model.norm.weight": "norm_weight",
        "lm_head.weight": "lm_head",
    }
    _check(roles, outside, _per_layer(LLAMA_BLOCK, TINY["layers"]), TINY["layers"])
    # k/v have fewer rows than the hidden size (grouped-query attention): the shape fixes the input axis
    assert roles["model.layers.0.self_attn.k_proj.weight"].input_last is True
    assert roles["model.layers.1.mlp.down_proj.weight"].input_last is True


def test_a_tied_head_makes_the_token_embedding_a_tied_embedding():
    transformers = pytest.importorskip("transformers")
    model = _llama_like(transformers.LlamaConfig, transformers.LlamaForCausalLM, tie_word_embeddings=True)
    state = {k: v for k, v in _state(model).items() if k != "lm_head.weight"}  # as save_pretrained stores it
    config = {**model.config.to_dict(), "architectures": ["LlamaForCausalLM"]}  # as save_pretrained writes it
    assert classify(state, config)["model.embed_tokens.weight"] == TensorRole("tied_embedding", None, True, None)
    # A stored head, an untied config, or an encoder without a head: a plain token embedding.
    assert classify(_state(model), config)["model.embed_tokens.weight"].role == "token_embedding"
    assert (
        classify(state, {**config, "tie_word_embeddings": False})["model.embed_tokens.weight"].role == "token_embedding"
    )
    assert (
        classify(state, {**config, "architectures": ["LlamaModel"]})["model.embed_tokens.weight"].role
        == "token_embedding"
    )


def test_qwen2_biases_are_linear_biases():
    transformers = pytest.importorskip("transformers")
    roles = _roles(_llama_like(transformers.Qwen2Config, transformers.Qwen2ForCausalLM))
    for i in range(TINY["layers"]):
        for proj in "qkv":
            assert roles[f"model.layers.{i}.self_attn.{proj}_proj.bias"] == TensorRole("linear_bias", i, None, 2)
        assert roles[f"model.layers.{i}.self_attn.v_proj.weight"].role == "attn_v"


def test_hidden_size_decides_the_input_axis_where_the_shape_tells():
    config = {"hidden_size": 64}
    roles = classify(
        {
            "h.0.attn.c_attn.weight": ("F32", (192, 64)),  # a Conv1D name stored as nn.Linear
            "h.0.mlp.c_proj.weight": ("F32", (256, 64)),
            "h.0.attn.c_proj.weight": ("F32", (64, 64)),
        },
        config,
    )
    assert roles["h.0.attn.c_attn.weight"].input_last is True
    assert roles["h.0.mlp.c_proj.weight"].input_last is False
    assert roles["h.0.attn.c_proj.weight"].input_last is False  # square: the naming's convention


def test_fallback_by_shape_for_unknown_names():
    config = {"vocab_size": 1000, "hidden_size": 32, "max_position_embeddings": 128}
    tensors = {
        "net.tok.table": ("F16", (1000, 32)),
        "net.pos_table": ("F32", (128, 32)),
        "net.out_head.w": ("BF16", (1000, 32)),
        "net.blocks.3.mix.w": ("F32", (32, 96)),
        "net.blocks.3.final_norm.scale": ("F32", (32,)),
        "net.blocks.3.mix.bias": ("F32", (96,)),
        "net.blocks.3.gain": ("F32", (32,)),
        "net.mask": ("F32", (1, 1, 8, 8)),
        "net.ids": ("I64", (1, 128)),
        "net.step": ("F32", ()),
    }
    roles = classify(tensors, config)
    expected = {
        "net.tok.table": "token_embedding",
        "net.pos_table": "position_embedding",
        "net.out_head.w": "lm_head",
        "net.blocks.3.mix.w": "linear",
        "net.blocks.3.final_norm.scale": "norm_weight",
        "net.blocks.3.mix.bias": "linear_bias",
        "net.blocks.3.gain": "other",
        "net.mask": "other",
        "net.ids": "other",
        "net.step": "other",
    }
    assert {n: r.role for n, r in roles.items()} == expected
    assert roles["net.blocks.3.mix.w"] == TensorRole("linear", 3, True, 4)
    # without a config there is no vocabulary size: a 2-D table is a generic linear weight
    assert classify({"net.tok.table": ("F16", (1000, 32))}, None)["net.tok.table"].role == "linear"


def test_every_role_is_known_and_config_values_of_the_wrong_type_are_ignored():
    roles = classify({"x.weight": ("F32", (10, 4))}, {"vocab_size": "10", "hidden_size": True})
    assert roles["x.weight"].role == "linear"
    assert set(ROLES) >= {"token_embedding", "attn_qkv", "mlp_gate", "lm_head", "other"}


@pytest.mark.parametrize(
    "name, layer",
    [
        ("model.layers.7.mlp.up_proj.weight", 7),
        ("encoder.layer.12.x", 12),
        ("transformer.h.0.ln_1.weight", 0),
        ("blocks.3", 3),
        ("model.norm.weight", None),
        ("hh.4.w", None),
        ("layers.x.4", None),
    ],
)
def test_layer_index(name, layer):
    assert layer_index(name) == layer


def _header_roles(model_dir: str) -> dict[str, TensorRole]:
    st = read_header(os.path.join(model_dir, "model.safetensors"))
    with open(os.path.join(model_dir, "config.json")) as fh:
        config = json.load(fh)
    return classify({t.name: (t.dtype, t.shape) for t in st.tensors}, config)


def test_minilm_header_roles(minilm_dir):
    roles = _header_roles(minilm_dir)
    counts = {role: sum(r.role == role for r in roles.values()) for role in ROLES}
    assert {k: v for k, v in counts.items() if v} == {
        "token_embedding": 1,
        "position_embedding": 1,
        "token_type_embedding": 1,
        "attn_q": 6,
        "attn_k": 6,
        "attn_v": 6,
        "attn_o": 6,
        "mlp_up": 6,
        "mlp_down": 6,
        "norm_weight": 13,
        "norm_bias": 13,
        "linear_bias": 37,
        "linear": 1,
        "other": 1,
    }
    assert roles["encoder.layer.5.output.dense.weight"] == TensorRole("mlp_down", 5, True, 6)
    assert roles["embeddings.position_ids"].role == "other"


def test_smollm2_header_roles(smollm2_dir):
    roles = _header_roles(smollm2_dir)
    counts = {role: sum(r.role == role for r in roles.values()) for role in ROLES}
    assert {k: v for k, v in counts.items() if v} == {
        "tied_embedding": 1,
        "attn_q": 30,
        "attn_k": 30,
        "attn_v": 30,
        "attn_o": 30,
        "mlp_gate": 30,
        "mlp_up": 30,
        "mlp_down": 30,
        "norm_weight": 61,
    }
    assert roles["model.layers.29.self_attn.v_proj.weight"] == TensorRole("attn_v", 29, True, 30)
    assert all(r.input_last is True for r in roles.values() if r.role.startswith(("attn_", "mlp_")))
