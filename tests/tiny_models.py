"""Small models built here for tests in several folders, and the helpers they share.

``word_tokenizer`` and ``common_words`` make a word-level tokenizer over the evaluation
text; ``bert`` and ``llama`` (module-scoped fixtures: import them into a test module) are
randomly initialised transformers models saved as directories and converted with ``--onnx``;
``run`` and ``one_error_line`` call the command line and read its one-line error.
"""

from __future__ import annotations

import numpy as np
import pytest

from rbe_converters import onnx_export
from rbe_converters.cli import main
from rbe_converters.evaluate import quality


def run(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as exc:  # argparse's own errors
        return exc.code


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.count("\n") == 1 and err.startswith("rbe: error: "), err
    return err


def word_tokenizer(words: list[str]):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", model_max_length=64)


def common_words(count: int) -> list[str]:
    from collections import Counter

    return [w for w, _ in Counter(quality.evaluation_text().split()).most_common(count)]


def perturb(model, seed: int) -> None:
    """Random values for every parameter: fresh models hold zero biases and unit norms, which
    the exporter merges into one initializer and any tensor of equal bytes could fill."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.05)


def tiny_llama(vocab: int, seed: int, **config):
    """A small LlamaForCausalLM (hidden 64, MLP 128, 4 heads, 2 KV heads, 64 positions, untied) with
    ``config`` overriding any of those, its weights drawn after ``torch.manual_seed(seed)``."""
    import torch
    import transformers

    settings = {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 64,
        "tie_word_embeddings": False,
        **config,
    }
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(vocab_size=vocab, **settings))


def saved_llama(root, seed: int, **config) -> tuple[str, str]:
    """(model directory, calibration text file) under ``root``: ``tiny_llama`` saved in bf16 with a
    word tokenizer over the evaluation text, and a text made of the same words."""
    import torch

    directory = str(root / "llama")
    tokenizer = word_tokenizer(common_words(150))
    tiny_llama(len(tokenizer), seed, **config).to(torch.bfloat16).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    text = root / "calibration.txt"
    text.write_text(" ".join(common_words(150)) * 40)
    return directory, str(text)


def convert(directory: str, out: str, *extra: str) -> str:
    assert main(["convert", directory, out, "--quiet", "--onnx", "--threads", "1", *extra]) == 0
    return out


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    import torch
    import transformers

    root = tmp_path_factory.mktemp("bert")
    directory = str(root / "bert")
    tokenizer = word_tokenizer(common_words(120))
    torch.manual_seed(2)
    model = transformers.BertModel(
        transformers.BertConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=64,
        )
    ).eval()
    perturb(model, 3)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory, model, tokenizer, convert(directory, str(root / "bert.rbe"))


def encoder_inputs(vocab: int, batch: int = 3, seq: int = 9) -> dict[str, np.ndarray]:
    """Shapes other than the export's example (2 x 5), with padding in the mask."""
    rng = np.random.default_rng(4)
    ids = rng.integers(0, vocab, (batch, seq), dtype=np.int64)
    mask = np.ones((batch, seq), np.int64)
    mask[1, 6:] = 0
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": rng.integers(0, 2, (batch, seq))}


def torch_hidden(model, feed: dict[str, np.ndarray]) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(**{k: torch.from_numpy(v) for k, v in feed.items()}).last_hidden_state.numpy()


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    import torch
    import transformers

    root = tmp_path_factory.mktemp("llama")
    directory = str(root / "llama")
    tokenizer = word_tokenizer(common_words(150))
    torch.manual_seed(5)
    model = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            tie_word_embeddings=True,
        )
    ).eval()
    perturb(model, 6)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory, model, convert(directory, str(root / "llama.rbe"))


def ort_greedy(session, prompt: list[int], steps: int, config) -> list[int]:
    """Greedy decoding in ONNX Runtime, the KV cache carried from step to step; the first step's past is empty."""
    layers, kv_heads, head_dim = onnx_export.cache_geometry(config)
    past = {name: np.zeros((1, kv_heads, 0, head_dim), np.float32) for name in onnx_export.cache_names(layers)}
    ids, done, tokens = np.array([prompt], np.int64), 0, []
    for _ in range(steps):
        seq = ids.shape[1]
        feed = {
            "input_ids": ids,
            "attention_mask": np.ones((1, done + seq), np.int64),
            "position_ids": np.arange(done, done + seq, dtype=np.int64)[None],
            **past,
        }
        logits, *present = session.run(None, feed)
        tokens.append(int(logits[0, -1].argmax()))
        past = dict(zip(past, present))
        done += seq
        ids = np.array([[tokens[-1]]], np.int64)
    return tokens


def hf_greedy(model, prompt: list[int], steps: int) -> list[int]:
    import torch

    model.generation_config.eos_token_id = None  # a random model may pick the end token; keep going as ORT does
    model.generation_config.pad_token_id = 0
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=steps, do_sample=False)
    return out[0, len(prompt) :].tolist()
