"""On-the-fly ONNX Runtime sessions on Hugging Face checkpoints converted with --onnx."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("onnxscript")
pytest.importorskip("onnxruntime")

from tiny_models import encoder_inputs, hf_greedy, ort_greedy, torch_hidden  # noqa: E402

from rbe_converters.cli import main  # noqa: E402
from rbe_loaders import ort as rbe_ort  # noqa: E402

# Linear weights and embeddings at 4 bits: every form the loader has for gquant.
Q4 = """[[rule]]
roles = ["attn_q", "attn_k", "attn_v", "attn_o", "mlp_up", "mlp_gate", "mlp_down", "lm_head", "linear"]
codec = "gquant(bits=4, group=16, mode=asym)"
[[rule]]
roles = ["token_embedding", "tied_embedding", "position_embedding"]
codec = "gquant(bits=4, group=16, mode=asym)"
"""


def _q4(directory: str, tmp_path) -> tuple[str, str]:
    """The directory converted at 4 bits with --onnx, and the same file decoded to a directory."""
    recipe = tmp_path / "q4.toml"
    recipe.write_text(Q4)
    path, decoded = str(tmp_path / "q4.rbe"), str(tmp_path / "decoded")
    assert main(["convert", directory, path, "--quiet", "--onnx", "--threads", "1", "--recipe", str(recipe)]) == 0
    assert main(["decode", path, decoded, "--quiet"]) == 0
    return path, decoded


def _forms(report) -> dict[str, str]:
    return {row.name: row.form for row in report.rows}


def test_an_encoders_linear_weights_run_as_matmulnbits_and_match_the_decoded_model(bert, tmp_path):
    directory = bert[0]
    path, decoded = _q4(directory, tmp_path)
    session, report = rbe_ort.session(path, quiet=True)
    forms = _forms(report)
    assert sum(f.startswith("MatMulNBits 4-bit") for f in forms.values()) == 2 * 6  # every Linear of 2 layers
    assert sum(f.startswith("GatherBlockQuantized 4-bit") for f in forms.values()) == 2  # words, positions
    assert not report.decoded_at_build()
    lossy = transformers.BertModel.from_pretrained(decoded).eval()
    feed = encoder_inputs(lossy.config.vocab_size)
    got = session.run(["last_hidden_state"], {i.name: feed[i.name] for i in session.get_inputs()})[0]
    np.testing.assert_allclose(got, torch_hidden(lossy, feed), atol=1e-4)
    assert report.resident_bytes < 0.5 * report.dense_bytes


def test_a_tied_causal_lm_generates_from_compressed_weights_as_its_decoded_model(llama, tmp_path):
    directory, model, _ = llama
    path, decoded = _q4(directory, tmp_path)
    session, report = rbe_ort.session(path, quiet=True)
    forms = _forms(report)
    assert sum(f.startswith("MatMulNBits") for f in forms.values()) == 2 * 7 + 1  # + the tied head (with the lookups)
    # The tied table: the head's MatMul and the lookups on one set of codes, packed once each.
    (tied,) = [f for f in forms.values() if "+ GatherBlockQuantized 4-bit" in f]
    assert tied.startswith("MatMulNBits 4-bit")
    assert not report.decoded_at_build()
    lossy = transformers.LlamaForCausalLM.from_pretrained(decoded).eval()
    prompt = [5, 17, 42, 8, 99, 3]
    assert ort_greedy(session, prompt, 6, model.config) == hf_greedy(lossy, prompt, 6)
