"""load_model: transformers models whose quantized weights stay compressed and decode on the fly."""

import os

import numpy as np
import pytest
from tiny_models import common_words, word_tokenizer

from rbe_converters.compress.recipe import policy_from_document
from rbe_converters.pipeline import convert
from rbeformat import ChecksumError, OutputExistsError, RbeError, Reader, UsageError

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from rbe_loaders.torch import load_model, load_state_dict, save_model  # noqa: E402

LINEAR = ["attn_q", "attn_k", "attn_v", "attn_o", "mlp_up", "mlp_gate", "mlp_down", "linear"]
EMBEDDINGS = ["token_embedding", "tied_embedding", "position_embedding"]


def _tiny(tmp_path_factory, name, model_class, config):
    tokenizer = word_tokenizer(common_words(150))
    model = model_class(
        config(
            vocab_size=len(tokenizer),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            max_position_embeddings=64,
        )
    )
    directory = str(tmp_path_factory.mktemp("tm") / name)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    torch.manual_seed(3)
    return _tiny(
        tmp_path_factory,
        "llama",
        transformers.LlamaForCausalLM,
        lambda **kw: transformers.LlamaConfig(
            num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True, **kw
        ),
    )


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    torch.manual_seed(4)
    return _tiny(
        tmp_path_factory,
        "bert",
        transformers.BertModel,
        lambda **kw: transformers.BertConfig(num_attention_heads=2, **kw),
    )


def _rules(linear: str, embedding: str | None = None) -> dict:
    rules = [{"roles": LINEAR, "codec": linear}]
    if embedding:
        rules.append({"roles": EMBEDDINGS, "codec": embedding})
    return {"rule": rules}


def _convert(directory, path, doc) -> str:
    convert(directory, str(path), policy=policy_from_document(doc, "test"), threads=1)
    return str(path)


def _decoded_model(directory, path, causal):
    """The reference: the same .rbe decoded to dense by the numpy decoder, in a plain transformers model."""
    auto = transformers.AutoModelForCausalLM if causal else transformers.AutoModel
    model = auto.from_pretrained(directory, dtype=torch.float32).eval()
    state = load_state_dict(path)
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not [k for k in unexpected if not k.endswith("position_ids")]  # an old checkpoint's buffer
    model.tie_weights()
    return model


def _ids(vocab, length=12, seed=0):
    return torch.from_numpy(np.random.default_rng(seed).integers(2, vocab, (1, length)))


@pytest.mark.parametrize(
    "linear, embedding",
    [
        ("gquant(bits=4, group=32, mode=asym)", "gquant(bits=6, group=32, mode=asym)"),
        ("gquant(bits=3, group=64, mode=sym)", None),
        ("gquant(bits=6, group=32, mode=asym)", "gquant(bits=8, group=64, mode=asym)"),
    ],
)
def test_causal_lm_logits_equal_the_decoded_model(llama_dir, tmp_path, linear, embedding):
    path = _convert(llama_dir, tmp_path / "m.rbe", _rules(linear, embedding))
    model = load_model(path)
    reference = _decoded_model(llama_dir, path, causal=True)
    ids = _ids(model.config.vocab_size)
    with torch.no_grad():
        got, want = model(ids).logits, reference(ids).logits
    scale = want.abs().max()
    # the int4 kernel computes with bf16 activations: about 0.3% of the output scale
    assert float((got - want).abs().max() / scale) < 3e-2
    report = model.rbe_report
    assert "model.layers.0.self_attn.q_proj.weight" in report.compressed
    assert (embedding is not None) == ("model.embed_tokens.weight" in report.compressed)
    assert report.resident_bytes < report.dense_bytes


def test_a_tied_head_shares_the_embedding_parts(llama_dir, tmp_path):
    path = _convert(
        llama_dir,
        tmp_path / "m.rbe",
        _rules("gquant(bits=4, group=32, mode=asym)", "gquant(bits=4, group=32, mode=asym)"),
    )
    model = load_model(path)
    assert model.lm_head.decoder is model.model.embed_tokens.decoder
    names = [row.name for row in model.rbe_report.rows]
    assert names.count("model.embed_tokens.weight") == 1


def test_no_parameter_of_a_compressed_module_is_dense(llama_dir, tmp_path):
    path = _convert(
        llama_dir,
        tmp_path / "m.rbe",
        _rules("gquant(bits=4, group=32, mode=asym)", "gquant(bits=6, group=32, mode=asym)"),
    )
    model = load_model(path)
    dense = {name for name, p in model.named_parameters() if p.dim() == 2}
    assert not dense, dense  # every 2-D weight is held as parts
    assert not any(p.device.type == "meta" for p in model.parameters())


def test_generate_runs_on_the_compressed_model(llama_dir, tmp_path):
    path = _convert(llama_dir, tmp_path / "m.rbe", _rules("gquant(bits=4, group=32, mode=asym)"))
    model, tokenizer = load_model(path, with_tokenizer=True)
    assert isinstance(tokenizer, transformers.PreTrainedTokenizerBase)
    encoded = tokenizer("the of and", return_tensors="pt")
    out = model.generate(**encoded, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert out.shape[1] == encoded["input_ids"].shape[1] + 5


def test_encoder_hidden_states_equal_the_decoded_model(bert_dir, tmp_path):
    path = _convert(
        bert_dir,
        tmp_path / "b.rbe",
        _rules("gquant(bits=5, group=32, mode=asym)", "gquant(bits=6, group=32, mode=asym)"),
    )
    model = load_model(path)
    assert isinstance(model, transformers.BertModel)
    reference = _decoded_model(bert_dir, path, causal=False)
    ids = _ids(model.config.vocab_size)
    with torch.no_grad():
        got, want = model(ids).last_hidden_state, reference(ids).last_hidden_state
    cos = torch.nn.functional.cosine_similarity(got.reshape(-1, 64), want.reshape(-1, 64), dim=1)
    assert float(cos.min()) > 0.999
    assert "embeddings.word_embeddings.weight" in model.rbe_report.compressed


def test_lossless_tensors_are_decoded_at_load_and_named(llama_dir, tmp_path):
    path = _convert(llama_dir, tmp_path / "m.rbe", {"rule": []})
    model = load_model(path)
    assert not model.rbe_report.compressed
    assert all(row.form.startswith("decoded at load") for row in model.rbe_report.rows)
    reference = _decoded_model(llama_dir, path, causal=True)
    ids = _ids(model.config.vocab_size)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)


def test_a_decoded_weight_cache_holds_what_it_says(llama_dir, tmp_path):
    path = _convert(llama_dir, tmp_path / "m.rbe", _rules("gquant(bits=4, group=32, mode=asym)"))
    model = load_model(path, cache_bytes=64 * 1024)
    ids = _ids(model.config.vocab_size)
    with torch.no_grad():
        first, second = model(ids).logits, model(ids).logits
    assert torch.equal(first, second)
    cache = model.model.layers[0].self_attn.q_proj._cache
    assert 0 < cache.used <= 64 * 1024
    assert "up to 0.1 MB" in str(model.rbe_report)


def test_save_model_writes_the_same_container(llama_dir, tmp_path):
    path = _convert(llama_dir, tmp_path / "m.rbe", _rules("gquant(bits=4, group=32, mode=asym)"))
    model = load_model(path)
    out = str(tmp_path / "again.rbe")
    save_model(model, out)
    with open(path, "rb") as a, open(out, "rb") as b:
        assert a.read() == b.read()
    with pytest.raises(OutputExistsError):
        save_model(model, out)
    with torch.no_grad():
        model.model.norm.weight.add_(1.0)
    with pytest.raises(UsageError, match="model.norm.weight"):
        save_model(model, str(tmp_path / "changed.rbe"), force=True)
    assert not os.path.exists(tmp_path / "changed.rbe")


def test_a_container_without_config_is_a_usage_error(tmp_path):
    from rbeformat import save_file

    path = str(tmp_path / "t.rbe")
    save_file({"w": np.ones((4, 4), np.float32)}, path)
    with pytest.raises(UsageError, match="config.json"):
        load_model(path)


def test_a_damaged_file_fails_with_the_format_error_before_any_module(llama_dir, tmp_path, monkeypatch):
    path = _convert(llama_dir, tmp_path / "m.rbe", _rules("gquant(bits=4, group=32, mode=asym)"))
    data = open(path, "rb").read()
    built = []
    monkeypatch.setattr(
        transformers.AutoModelForCausalLM,
        "from_config",
        lambda *a, **k: built.append(1) or (_ for _ in ()).throw(AssertionError("built")),
    )
    cut = str(tmp_path / "cut.rbe")
    with open(cut, "wb") as fh:
        fh.write(data[: len(data) // 2])
    with pytest.raises(RbeError):
        load_model(cut)
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0xFF
    bad = str(tmp_path / "bad.rbe")
    with open(bad, "wb") as fh:
        fh.write(bytes(flipped))
    with pytest.raises(ChecksumError):  # as safe_open raises for the same bytes
        load_model(bad)
    assert not built


def test_cuda_needs_a_cuda_device(llama_dir, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: tests/loaders/test_torch_model.py::test_cuda_matches_cpu covers it")
    path = _convert(llama_dir, tmp_path / "m.rbe", _rules("gquant(bits=4, group=32, mode=asym)"))
    with pytest.raises(UsageError, match="CUDA"):
        load_model(path, device="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_cuda_matches_cpu(llama_dir, tmp_path):
    path = _convert(
        llama_dir,
        tmp_path / "m.rbe",
        _rules("gquant(bits=4, group=32, mode=asym)", "gquant(bits=6, group=32, mode=asym)"),
    )
    cpu, gpu = load_model(path), load_model(path, device="cuda")
    print("GPU:", torch.cuda.get_device_name())
    ids = _ids(cpu.config.vocab_size)
    with torch.no_grad():
        want, got = cpu(ids).logits, gpu(ids.cuda()).logits.cpu()
    assert float((got - want).abs().max() / want.abs().max()) < 3e-2


@pytest.fixture(scope="module")
def minilm_q4(minilm_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("minilm") / "m.rbe"
    return _convert(
        minilm_dir, path, _rules("gquant(bits=4, group=64, mode=asym)", "gquant(bits=6, group=64, mode=asym)")
    )


@pytest.mark.parametrize("kernel", ["exact", "int4"])
def test_minilm_q4_embeddings_equal_the_decoded_file(minilm_dir, minilm_q4, kernel):
    from rbe_converters.evaluate import quality

    model, tokenizer = load_model(minilm_q4, with_tokenizer=True, kernel=kernel)
    reference = _decoded_model(minilm_dir, minilm_q4, causal=False)
    sentences = quality.default_sentences(32)
    with torch.no_grad():
        got = quality.sentence_embeddings(model, tokenizer, sentences)
        want = quality.sentence_embeddings(reference, tokenizer, sentences)
    cos = torch.nn.functional.cosine_similarity(got, want, dim=1)
    error = float((got - want).abs().max() / want.abs().max())
    print(
        f"MiniLM q4 on the fly ({kernel}) against decoded: min cosine {float(cos.min()):.7f}, "
        f"max abs error / scale {error:.2e}"
    )
    if kernel == "exact":
        assert error < 1e-5  # float rounding: the same decoded weights, another order of sums
    else:
        assert float(cos.min()) > 0.9999
    with Reader(minilm_q4) as r:
        lossy = {r.stored_entry(n).name for n in r.keys() if r.stored_entry(n).transform is not None}
    assert set(model.rbe_report.compressed) == lossy  # every quantized tensor is a Linear or an Embedding


def test_linear_weights_on_the_int4_kernel_hold_its_buffers_alone(llama_dir, tmp_path):
    path = _convert(
        llama_dir,
        tmp_path / "m.rbe",
        _rules("gquant(bits=4, group=32, mode=asym)", "gquant(bits=6, group=32, mode=asym)"),
    )
    fast, exact = load_model(path), load_model(path, kernel="exact")
    q_proj = "model.layers.0.self_attn.q_proj.weight"
    assert "kernel parts only" in fast.rbe_report.form_of(q_proj)
    assert "int4" not in exact.rbe_report.form_of(q_proj)
    # the tied table is looked up too: it keeps its codes beside the kernel's planes
    assert "kernel parts only" not in fast.rbe_report.form_of("model.embed_tokens.weight")
    reference = load_state_dict(path)[q_proj]
    weight = fast.model.layers[0].self_attn.q_proj.weight  # rebuilt by the kernel on the identity
    assert float((weight - reference).abs().max() / reference.abs().max()) < 2e-2


def test_smollm2_q4_generates_and_scores_as_the_decoded_file(smollm2_dir, tmp_path):
    from rbe_converters.evaluate import quality

    path = _convert(
        smollm2_dir,
        tmp_path / "s.rbe",
        _rules("gquant(bits=4, group=64, mode=asym)", "gquant(bits=6, group=64, mode=asym)"),
    )
    model, tokenizer = load_model(path, with_tokenizer=True)
    report = model.rbe_report
    assert report.resident_bytes < 0.3 * report.dense_bytes
    encoded = tokenizer("The Python interpreter", return_tensors="pt")
    out = model.generate(**encoded, max_new_tokens=8, do_sample=False)
    assert out.shape[1] == encoded["input_ids"].shape[1] + 8
    window = quality.windows(quality.token_ids(tokenizer), 256, 1)
    ppl = quality.perplexity(model, window)
    del model
    reference = quality.perplexity(_decoded_model(smollm2_dir, path, causal=True), window)
    print(f"SmolLM2 4-bit on the fly: perplexity {ppl:.4f}, decoded {reference:.4f}")
    assert abs(ppl / reference - 1) < 0.005
