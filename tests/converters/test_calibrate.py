"""Calibration statistics from a model run, and calibrated presets end to end, on a small Llama built here."""

import numpy as np
import pytest
from tiny_models import common_words, word_tokenizer

from rbe_converters.cli import main
from rbe_converters.compress.calibrate import torch as calibrate
from rbeformat import Reader, UsageError

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TEXT = " ".join(common_words(150)) * 40


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("cal") / "llama")
    tokenizer = word_tokenizer(common_words(150))
    torch.manual_seed(1)
    model = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            tie_word_embeddings=False,
        )
    )
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory, model, tokenizer


def _linear_weights(model):
    return {f"{n}.weight": m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "layers." in n}


def test_second_moments_match_the_layers_inputs(llama):
    directory, model, tokenizer = llama
    weights = _linear_weights(model)
    text = calibrate.CalibrationText(TEXT, "test", window=32, windows=3)
    stats = calibrate.collect(directory, {name: "gptq" for name in weights}, text)
    assert set(stats) == set(weights)
    # Layers that read one input share one matrix.
    q, k = stats["model.layers.0.self_attn.q_proj.weight"], stats["model.layers.0.self_attn.k_proj.weight"]
    assert q.hessian is k.hessian and q.method == "gptq"
    # Independently: the mean of x x^T over the same windows, from a hook of the test's own.
    expected = _input_moments(model, tokenizer, "model.layers.1.mlp.down_proj", windows=3)
    np.testing.assert_allclose(stats["model.layers.1.mlp.down_proj.weight"].hessian, expected, rtol=1e-4, atol=1e-7)


def _input_moments(model, tokenizer, module_name, windows, width=32):
    """E[x x^T] of a module's input over the first windows of TEXT, measured with a hook here."""
    seen = []
    module = dict(model.named_modules())[module_name]
    handle = module.register_forward_pre_hook(
        lambda m, inputs: seen.append(inputs[0].reshape(-1, inputs[0].shape[-1]).double())
    )
    ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        for i in range(windows):
            model(input_ids=torch.tensor([ids[i * width : (i + 1) * width]]))
    handle.remove()
    x = torch.cat(seen).numpy()
    return x.T @ x / len(x)


def test_inputs_are_kept_beside_their_sum_only_while_they_are_few():
    torch.manual_seed(0)
    linears = {"a.weight": torch.nn.Linear(64, 8), "b.weight": torch.nn.Linear(64, 8)}
    windows = [torch.randn(8, 64) for _ in range(3)]

    def moments_of(count: int) -> dict:
        moments = calibrate._Moments(linears, {name: "gptq" for name in linears})
        with torch.no_grad():
            for x in windows[:count]:
                linears["a.weight"](x)
                linears["b.weight"](x)  # the same input: one sum, one set of samples
                moments.next_window()
        moments.close()
        return moments.calibrations()

    kept = moments_of(2)  # 16 tokens, a quarter of the 64 inputs: kept
    samples = kept["b.weight"].samples
    assert kept["a.weight"].samples is samples and samples.shape == (16, 64)
    np.testing.assert_array_equal(samples, torch.cat(windows[:2]).numpy())
    np.testing.assert_allclose(kept["a.weight"].hessian, samples.T.astype(np.float64) @ samples / 16, atol=1e-5)
    assert moments_of(3)["a.weight"].samples is None  # 24 tokens: past the quarter, none kept


def test_moments_summed_in_bands_equal_the_whole_product(monkeypatch):
    monkeypatch.setattr(calibrate, "MOMENT_ROWS", 24)  # 64 rows: bands of 24, 24 and 16
    torch.manual_seed(1)
    windows = [torch.randn(40, 64) for _ in range(3)]
    total = None
    for x in windows:
        total = calibrate.add_moments(total, x)
    expected = (windows[0].T @ windows[0]).numpy().astype(np.float64)
    for x in windows[1:]:
        expected += (x.T @ x).numpy()
    assert total.dtype == np.float64
    np.testing.assert_array_equal(total, expected)


def test_only_linear_weights_and_enough_text(llama):
    directory, _, _ = llama
    with pytest.raises(UsageError, match="Linear weights only"):
        calibrate.collect(directory, {"model.embed_tokens.weight": "gptq"}, calibrate.CalibrationText(TEXT, "t"))
    with pytest.raises(UsageError, match="fewer than one window"):
        calibrate.collect(
            directory,
            {"model.layers.0.mlp.up_proj.weight": "gptq"},
            calibrate.CalibrationText("too short", "t", window=32),
        )


def test_a_calibrated_mixed_precision_preset_converts_and_decodes(llama, tmp_path, capsys):
    directory, model, _ = llama
    text = tmp_path / "calibration.txt"
    text.write_text(TEXT)
    out = str(tmp_path / "q3.rbe")
    assert (
        main(
            [
                "convert",
                directory,
                out,
                "--quiet",
                "--preset",
                "q3",
                "--calibration",
                str(text),
                "--calibration-windows",
                "4",
            ]
        )
        == 0
    )
    with Reader(out) as r:
        bits = [r.manifest.tensors[name].transform.codec.bits for name in _linear_weights(model)]
        assert set(bits) <= {3, 4} and 3 in bits  # mixed precision upgraded some, within the budget
        for name, module in _linear_weights(model).items():
            decoded = r.get_tensor(name)
            original = module.weight.detach().numpy()
            assert decoded.shape == original.shape
            assert np.linalg.norm(decoded - original) < 0.5 * np.linalg.norm(original)


def _round_to(step):
    return lambda values: np.round(values / step) * step


def test_sequential_encodes_block_by_block_on_what_earlier_blocks_decode_to(llama):
    directory, model, tokenizer = llama
    weights = _linear_weights(model)
    methods = {name: "gptq" for name in weights}
    text = calibrate.CalibrationText(TEXT, "test", window=32, windows=3)
    originals = {name: m.weight.detach().numpy().copy() for name, m in weights.items()}
    calls, seen = [], {}

    def encode(name, calibration):
        calls.append(name)
        seen[name] = calibration
        return _round_to(0.05)(originals[name]).astype(np.float32)  # a coarse "codec"

    calibrate.sequential(directory, methods, text, calibrate.per_tensor(encode), before={}, threads=1)
    assert sorted(calls) == sorted(weights) and len(calls) == len(set(calls))
    stages = [name.split(".")[-2] for name in calls[:7]]
    assert stages[:3] == ["q_proj", "k_proj", "v_proj"] and stages[3] == "o_proj"
    assert stages[4:6] == ["gate_proj", "up_proj"] and stages[6] == "down_proj"
    assert all(name.startswith("model.layers.0.") for name in calls[:7])
    # Independently: block 1's q input moments on a model whose block 0 holds the rounded weights.
    rounded = transformers.LlamaForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    for name, module in _linear_weights(rounded).items():
        if name.startswith("model.layers.0."):
            module.weight.data.copy_(torch.from_numpy(_round_to(0.05)(originals[name]).astype(np.float32)))
    expected = _input_moments(rounded, tokenizer, "model.layers.1.self_attn.q_proj", windows=3)
    hessian = seen["model.layers.1.self_attn.q_proj.weight"].hessian
    np.testing.assert_allclose(hessian, expected, rtol=1e-4, atol=1e-7)
    plain = calibrate.collect(directory, {"model.layers.1.self_attn.q_proj.weight": "gptq"}, text)
    assert not np.allclose(plain["model.layers.1.self_attn.q_proj.weight"].hessian, expected, rtol=1e-3)
    assert seen["model.layers.1.self_attn.k_proj.weight"].hessian is hessian  # one stage, one matrix


def test_a_tied_embedding_is_calibrated_as_the_output_head(tmp_path):
    tokenizer = word_tokenizer(common_words(150))
    torch.manual_seed(2)
    model = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
            max_position_embeddings=64,
            tie_word_embeddings=True,
        )
    )
    directory = str(tmp_path / "tied")
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    text = calibrate.CalibrationText(TEXT, "test", window=32, windows=2)
    stats = calibrate.collect(directory, {"model.embed_tokens.weight": "gptq"}, text)
    seen = []
    handle = model.lm_head.register_forward_pre_hook(lambda m, inputs: seen.append(inputs[0].reshape(-1, 32).double()))
    ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        for i in range(2):
            model(input_ids=torch.tensor([ids[i * 32 : (i + 1) * 32]]))
    handle.remove()
    x = torch.cat(seen).numpy()
    np.testing.assert_allclose(stats["model.embed_tokens.weight"].hessian, x.T @ x / len(x), rtol=1e-4, atol=1e-7)


class _Words:
    """A tokenizer stand-in: one id (below 60) per word, 101 and 102 around a text when asked."""

    def __call__(self, text, add_special_tokens=True, truncation=False, max_length=None):
        ids = [1 + len(word) % 50 for word in text.split()]
        if truncation:  # as real tokenizers do, the special tokens survive truncation
            ids = ids[: max_length - 2 * add_special_tokens]
        return {"input_ids": [101, *ids, 102] if add_special_tokens else ids}


class _Config:
    max_position_embeddings = 64


class _Model:
    config = _Config()


def test_an_encoder_calibrates_on_framed_sentences_a_causal_lm_on_windows():
    from rbe_converters.evaluate import quality

    text = calibrate.CalibrationText(quality.calibration_text(), "t", window=32, windows=4)
    sentences = calibrate.calibration_windows(_Words(), text, _Model(), causal=False)
    assert len(sentences) > 3 and all(s[0] == 101 and s[-1] == 102 for s in sentences)
    assert 4 * 32 <= sum(map(len, sentences)) < 4 * 32 + 32  # as many tokens as the windows, one sentence more
    windows = calibrate.calibration_windows(_Words(), text, _Model(), causal=True)
    assert len(windows) == 4 and all(len(w) == 32 and 101 not in w for w in windows)
    # A text without prose sentences is read in windows by an encoder too.
    code = calibrate.CalibrationText("x = 1\n" * 400, "code", window=32, windows=2)
    assert calibrate.calibration_windows(_Words(), code, _Model(), False) == calibrate.calibration_windows(
        _Words(), code, _Model(), True
    )


def test_sequential_runs_an_encoder_block_by_block_on_its_sentences(tmp_path):
    """BERT blocks take keyword arguments (the attention mask) caught at the first block."""
    from rbe_converters.evaluate import quality

    tokenizer = word_tokenizer(common_words(150))
    torch.manual_seed(4)
    model = transformers.BertModel(
        transformers.BertConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=64,
        )
    )
    directory = str(tmp_path / "bert")
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    weights = {
        f"{n}.weight": "gptq"
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and "encoder.layer." in n
    }
    text = calibrate.CalibrationText(quality.evaluation_text()[:20000], "test", window=32, windows=2)
    calls, seen = [], {}

    def encode(name, calibration):
        calls.append(name)
        seen[name] = calibration
        return dict(model.named_parameters())[name].detach().numpy()  # unchanged: stats as collect's

    calibrate.sequential(directory, weights, text, calibrate.per_tensor(encode), before={})
    assert sorted(calls) == sorted(weights)
    plain = calibrate.collect(directory, weights, text)
    for name in weights:  # nothing changed upstream, so each block sees what the whole model sees
        np.testing.assert_allclose(seen[name].hessian, plain[name].hessian, rtol=1e-4, atol=1e-6)


def test_a_survey_gives_collects_statistics_one_block_at_a_time(llama):
    directory, model, _ = llama
    weights = {name: "gptq" for name in _linear_weights(model)}
    weights["lm_head.weight"] = "gptq"  # outside the blocks: kept, not visited
    text = calibrate.CalibrationText(TEXT, "test", window=32, windows=3)
    visited = []
    kept = calibrate.survey(directory, weights, text, lambda name, c: visited.append((name, c)))
    assert set(kept) == {"lm_head.weight"} and sorted(n for n, _ in visited) == sorted(set(weights) - set(kept))
    # Block 0's weights come before block 1's, and each visit sees what collect measures.
    assert all(n.startswith("model.layers.0.") for n, _ in visited[:7])
    plain = calibrate.collect(directory, weights, text)
    for name, calibration in [*visited, *kept.items()]:
        np.testing.assert_allclose(calibration.hessian, plain[name].hessian, rtol=1e-4, atol=1e-7)


def test_a_surveys_progress_adds_up_to_the_windows(llama):
    directory, model, _ = llama
    weights = {name: "gptq" for name in _linear_weights(model)} | {"lm_head.weight": "gptq"}
    text = calibrate.CalibrationText(TEXT, "test", window=32, windows=3)
    steps = []
    calibrate.survey(directory, weights, text, lambda name, c: None, progress=steps.append)
    assert len(steps) == 1 + 2 and abs(sum(steps) - 3) < 1e-9  # 3 windows in one batch, then 2 blocks


def test_windows_are_batched_by_length_without_padding():
    windows = [[1, 2], [3], [4, 5], [6], [7, 8, 9]] + [[0, 0]] * 300
    batches = calibrate.batches_of(windows)
    per = calibrate.BATCH_TOKENS // 2  # two-token windows per batch
    assert batches[:3] == [[[1, 2], [4, 5]] + [[0, 0]] * (per - 2), [[3], [6]], [[7, 8, 9]]]
    assert batches[3] == [[0, 0]] * (302 - per) and len(batches) == 4  # a full batch starts the next
    assert sorted(map(tuple, (w for b in batches for w in b))) == sorted(map(tuple, windows))
    assert calibrate.batches_of([[0] * 512] * 3) == [[[0] * 512]] * 3  # long windows: one per call
