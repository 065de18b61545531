"""Calibration on a streamed model: one part's weights in memory at a time, the same numbers as the whole model."""

import numpy as np
import pytest
from tiny_models import common_words, tiny_llama, word_tokenizer

from rbe_converters.compress.calibrate import stream
from rbe_converters.compress.calibrate import torch as calibrate
from rbeformat import UsageError

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TEXT = " ".join(common_words(150)) * 40


def _save_llama(directory: str, dtype, tied: bool = False, layers: int = 3):
    tokenizer = word_tokenizer(common_words(150))
    model = tiny_llama(len(tokenizer), 7, num_hidden_layers=layers, tie_word_embeddings=tied).to(dtype)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return model


def _real(module) -> bool:
    return all(p.device.type != "meta" for p in module.parameters())


def _meta(module) -> bool:
    return all(p.device.type == "meta" for p in module.parameters())


def test_a_streamed_model_holds_a_parts_weights_only_while_it_runs(tmp_path):
    directory = str(tmp_path / "llama")
    _save_llama(directory, torch.float32)
    _, streamed, _, causal = stream.open_streamed(directory, 1)
    model = streamed.model
    blocks = model.model.layers
    assert causal and _meta(model)
    assert all(b.device.type == "cpu" for b in model.buffers())  # rope tables are real
    with streamed.loaded(streamed.slots([blocks[1]])):
        assert _real(blocks[1]) and _meta(blocks[0]) and _meta(blocks[2]) and _meta(model.lm_head)
    assert _meta(model)
    with streamed.loaded(streamed.front(blocks)):
        assert _real(model.model.embed_tokens) and _meta(model.lm_head) and _meta(blocks)
    with streamed.loaded(streamed.outside(blocks)):
        assert _real(model.lm_head) and _real(model.model.norm) and _meta(blocks)
    assert _meta(model)


@pytest.mark.parametrize("tied", [False, True])
def test_bf16_statistics_are_those_of_the_whole_model_widened_to_float32(tmp_path, tied):
    # The streamed model widens each bf16 tensor as its part runs; the whole model loaded in float32
    # computes the same numbers, for the blocks' layers and for the head after the final norm.
    directory = str(tmp_path / "llama")
    _save_llama(directory, torch.bfloat16, tied=tied)
    whole = transformers.LlamaForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    head = "model.embed_tokens.weight" if tied else "lm_head.weight"
    weights = {
        "model.layers.0.self_attn.q_proj.weight": "gptq",
        "model.layers.2.mlp.down_proj.weight": "gptq",
        head: "gptq",
    }
    text = calibrate.CalibrationText(TEXT, "test", window=32, windows=2)
    stats = calibrate.collect(directory, weights, text, threads=1)
    tokenizer = word_tokenizer(common_words(150))
    for name, module in [
        ("model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.q_proj"),
        ("model.layers.2.mlp.down_proj.weight", "model.layers.2.mlp.down_proj"),
        (head, "lm_head"),
    ]:
        expected = _input_moments(whole, tokenizer, module, windows=2)
        np.testing.assert_array_equal(stats[name].hessian, expected)


def _input_moments(model, tokenizer, module_name, windows, width=32):
    """E[x x^T] of a module's input over the first windows of TEXT, in one batch as calibration runs them."""
    total, count = None, 0
    module = dict(model.named_modules())[module_name]

    def hook(m, inputs):
        nonlocal total, count
        x = inputs[0].reshape(-1, inputs[0].shape[-1])
        product = (x.T @ x).double().numpy()
        total = product if total is None else total + product
        count += x.shape[0]

    handle = module.register_forward_pre_hook(hook)
    ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        model(input_ids=torch.tensor([ids[i * width : (i + 1) * width] for i in range(windows)]))
    handle.remove()
    return total / count


def test_sequential_encoding_labels_each_block_and_stage(tmp_path):
    directory = str(tmp_path / "llama")
    model = _save_llama(directory, torch.float32, layers=2)
    weights = {f"{n}.weight": "gptq" for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    text = calibrate.CalibrationText(TEXT, "test", window=32, windows=2)

    class Seen:
        labels, blocks = [], 0

        def label(self, text):
            self.labels.append(text)

        def update(self, n):
            self.blocks += n

    seen = Seen()
    encoded = []

    def encode(name, calibration):
        encoded.append(name)
        return dict(model.named_parameters())[name].detach().numpy()

    before = calibrate.collect(directory, {"lm_head.weight": "gptq"}, text, threads=1)
    calibrate.sequential(directory, weights, text, calibrate.per_tensor(encode), before, threads=1, progress=seen)
    assert seen.blocks == 2 and encoded[0] == "lm_head.weight" and len(encoded) == len(weights)
    assert "block 1/2: encoding self_attn.q_proj, self_attn.k_proj, self_attn.v_proj" in seen.labels
    assert "block 2/2: encoding mlp.down_proj" in seen.labels


def test_a_parameter_with_no_stored_tensor_is_refused(tmp_path):
    directory = str(tmp_path / "llama")
    _save_llama(directory, torch.float32)
    import json
    import os

    from safetensors.numpy import load_file, save_file

    path = os.path.join(directory, "model.safetensors")
    tensors = load_file(path)
    tensors["model.layers.1.mlp.up_proj.renamed"] = tensors.pop("model.layers.1.mlp.up_proj.weight")
    save_file(tensors, path, metadata={"format": "pt"})
    assert json.load(open(os.path.join(directory, "config.json")))["num_hidden_layers"] == 3
    with pytest.raises(UsageError, match="no tensor for the model's parameter 'model.layers.1.mlp.up_proj.weight'"):
        stream.open_streamed(directory, 1)


@pytest.mark.parametrize("tied", [False, True])
def test_streamed_perplexity_is_the_whole_models(tmp_path, tied):
    from rbe_converters.evaluate import quality

    directory = str(tmp_path / "llama")
    _save_llama(directory, torch.bfloat16, tied=tied)
    whole = quality.load_model(directory, True)
    ids = word_tokenizer(common_words(150))(TEXT, add_special_tokens=False)["input_ids"]
    parts = quality.windows(ids, 32, 3)
    expected = quality.perplexity(whole, parts)
    assert stream.perplexity(directory, parts, max(map(max, parts)), directory) == expected
    with pytest.raises(Exception, match="token id 10000, but the model's token embedding has"):
        stream.perplexity(directory, parts, 10_000, directory)


def test_a_bf16_checkpoint_converted_with_a_calibrated_preset_keeps_its_lossless_tensors_in_bf16(tmp_path):
    # Tensors that stay lossless pass through as their stored bytes; the calibrated ones declare bf16.
    from safetensors import safe_open

    from rbe_converters.pipeline import ConvertOptions, convert_model
    from rbeformat import Reader

    directory = str(tmp_path / "llama")
    _save_llama(directory, torch.bfloat16, layers=2)
    text = tmp_path / "calibration.txt"
    text.write_text(TEXT)
    out = str(tmp_path / "q4.rbe")
    options = ConvertOptions(preset="q4", calibration=str(text), calibration_windows=2, threads=1)
    convert_model(directory, out, options)
    with Reader(out) as r, safe_open(f"{directory}/model.safetensors", "pt") as st:
        for name in st.keys():
            assert r.entry(name).dtype.name == "BF16"
            if "norm" in name:
                assert bytes(r.tensor_bytes(name)) == st.get_tensor(name).view(torch.int16).numpy().tobytes()


def test_hidden_states_spilled_to_a_file_give_the_same_numbers(tmp_path, monkeypatch):
    directory = str(tmp_path / "llama")
    model = _save_llama(directory, torch.bfloat16, layers=2)
    weights = {f"{n}.weight": "gptq" for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    text = calibrate.CalibrationText(TEXT, "test", window=32, windows=2)
    ids = word_tokenizer(common_words(150))(TEXT, add_special_tokens=False)["input_ids"]
    parts = [ids[i * 32 : (i + 1) * 32] for i in range(3)]

    def run_all():
        stats = calibrate.collect(directory, weights, text, threads=1)
        encoded = {}

        def encode(name, calibration):  # a coarse codec: later blocks run on what it decodes to
            original = dict(model.named_parameters())[name].detach().float().numpy()
            encoded[name] = calibration.hessian
            return (np.round(original * 20) / 20).astype(np.float32)

        # sequential takes the outside weights' statistics out of what it is given: a copy, to compare them
        calibrate.sequential(directory, weights, text, calibrate.per_tensor(encode), dict(stats), threads=1)
        return stats, encoded, stream.perplexity(directory, parts, max(map(max, parts)), directory)

    in_memory = run_all()
    files = []
    mkstemp = stream.tempfile.mkstemp
    monkeypatch.setattr(stream, "SPILL_BYTES", 0)  # every boundary's hidden states go to a file
    monkeypatch.setattr(stream.tempfile, "mkstemp", lambda **kw: files.append(1) or mkstemp(**kw))
    on_disk = run_all()
    assert len(files) > 6  # the survey's, the encoding's and the perplexity's boundaries
    for name in weights:
        np.testing.assert_array_equal(in_memory[0][name].hessian, on_disk[0][name].hessian)
        np.testing.assert_array_equal(in_memory[1][name], on_disk[1][name])  # the stage's H, block by block
    assert in_memory[2] == on_disk[2]
