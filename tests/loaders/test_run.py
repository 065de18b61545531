"""rbe_loaders.ort.run and rbe run: embeddings and greedy generation from a --onnx container in ONNX Runtime."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from tiny_models import common_words, convert, hf_greedy  # noqa: E402

import rbe_loaders  # noqa: E402
from rbe_converters.cli import main  # noqa: E402
from rbe_loaders.ort import run  # noqa: E402
from rbeformat import UsageError  # noqa: E402

TOLERANCE = 1e-4
WORDS = common_words(120)
TEXTS = [" ".join(WORDS[:12]), " ".join(WORDS[20:23]) + " unheardofword", WORDS[50]]  # of different lengths
PROMPT = " ".join(WORDS[3:9])


def _hf_mean_pooled(model, tokenizer, texts: list[str]) -> np.ndarray:
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"][..., None].float()
    return ((hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)).numpy()


def _hf_generate_with_eos(model, prompt: list[int], steps: int, eos: list[int]) -> list[int]:
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]), max_new_tokens=steps, do_sample=False, eos_token_id=eos, pad_token_id=0
        )
    return out[0, len(prompt) :].tolist()


def _ids_of_words(path: str, text: str) -> list[int]:
    """The word-level tokenizer decodes to its tokens joined by spaces; each word is one id back."""
    tok = rbe_loaders.tokenizer(path)
    return [tok.token_to_id(word) for word in text.split(" ")] if text else []


# -- encoders ---------------------------------------------------------------------------


def test_embed_is_transformers_mean_pooling(bert):
    _, model, tokenizer, path = bert
    vectors = run.embed(path, TEXTS)
    expected = _hf_mean_pooled(model, tokenizer, TEXTS)
    assert vectors.shape == (3, 32) and vectors.dtype == np.float32
    diff = np.abs(vectors - expected).max()
    print(f"embed: max abs diff ORT vs transformers mean pooling {diff:.2e}")
    assert diff < TOLERANCE
    assert not np.allclose(np.linalg.norm(vectors, axis=1), 1.0)  # mean pooling alone, no normalisation


def test_one_string_is_one_text_with_one_vector(bert):
    path = bert[3]
    model = run.open_model(path, threads=1)
    vector = run.embed(model, "The cat sat on the mat.")  # never one text per character
    assert vector.shape == (32,) and vector.dtype == np.float32
    assert np.array_equal(vector, run.embed(model, ["The cat sat on the mat."])[0])
    assert run.embed(model, ("The cat sat on the mat.", TEXTS[0])).shape == (2, 32)


def test_padding_leaves_a_texts_embedding_unchanged(bert):
    path = bert[3]
    model = run.open_model(path, threads=1)
    alone = run.embed(model, [TEXTS[2]])
    in_batch = run.embed(model, TEXTS)  # padded to the longest text
    assert np.abs(alone[0] - in_batch[2]).max() < TOLERANCE


def test_rbe_run_prints_an_encoders_embedding(bert, capsys):
    path = bert[3]
    assert main(["run", path, TEXTS[0], "--threads", "1"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("embedding (mean-pooled, dimension 32): ") and line.endswith(" ...")
    assert main(["run", path, TEXTS[0], "--json", "--threads", "1"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["dimension"] == 32 and report["kind"] == "encoder"
    assert np.abs(np.array(report["embedding"]) - run.embed(path, [TEXTS[0]])[0]).max() < 1e-6
    first = [float(v) for v in line.split(": ")[1].split()[:8]]
    assert np.abs(np.array(first) - report["embedding"][:8]).max() < 1e-5


# -- causal LMs -------------------------------------------------------------------------

# The tiny random Llama mostly repeats one token; these prompts make it change token once (the cache
# has to carry the context), and emit the end token (id 2 in its generation_config.json) first.
CHANGING_PROMPT = [127, 27, 15, 129, 5, 82]
ENDING_PROMPT = [84, 140, 43, 122, 101, 2]


def _prompt_text(loaded, ids: list[int]) -> str:
    text = loaded.tokenizer.decode(ids)
    assert loaded.tokenizer.encode(text).ids == ids  # the word-level tokenizer gives the prompt back
    return text


def test_generate_is_transformers_greedy_generate(llama):
    _, model, path = llama
    loaded = run.open_model(path, threads=1)
    expected = hf_greedy(model, CHANGING_PROMPT, 8)
    assert len(set(expected)) > 1 and not set(expected) & loaded.eos_ids
    assert run.greedy_ids(loaded.session, CHANGING_PROMPT, 8) == expected
    prompt = _prompt_text(loaded, CHANGING_PROMPT)
    assert run.generate_ids(loaded, prompt, 8) == _hf_generate_with_eos(model, CHANGING_PROMPT, 8, [2]) == expected
    words = [i for i in expected if i not in (0, 1)]  # [PAD] and [UNK] are special: decoding leaves them out
    assert _ids_of_words(path, run.generate(loaded, prompt, 8)) == words


def test_generation_stops_at_the_configs_end_token_as_transformers(llama):
    _, model, path = llama
    loaded = run.open_model(path, threads=1)
    assert loaded.eos_ids == {2}
    expected = _hf_generate_with_eos(model, ENDING_PROMPT, 8, [2])
    assert expected[-1] == 2 and len(expected) < 8 and len(hf_greedy(model, ENDING_PROMPT, 8)) == 8
    assert run.greedy_ids(loaded.session, ENDING_PROMPT, 8, loaded.eos_ids) == expected


def test_generation_stops_at_any_end_token_given(llama):
    loaded = run.open_model(llama[2], threads=1)
    free = run.greedy_ids(loaded.session, CHANGING_PROMPT, 8)
    end = free[-1]  # first reached after a few other tokens
    stopped = run.greedy_ids(loaded.session, CHANGING_PROMPT, 8, frozenset({end, 12345}))
    assert stopped == free[: free.index(end) + 1] and 1 < len(stopped) < 8


def test_the_end_tokens_come_from_the_containers_config(llama):
    directory, _, path = llama
    with open(os.path.join(directory, "generation_config.json")) as fh:
        expected = fh.read()
    assert run.open_model(path).eos_ids == {json.loads(expected)["eos_token_id"]}
    assert run.eos_token_ids({"eos_token_id": 2}, {"eos_token_id": [7, 9]}) == {7, 9}  # generation_config first
    assert run.eos_token_ids({"eos_token_id": [3, 4]}, {}) == {3, 4}
    assert run.eos_token_ids({"text_config": {"eos_token_id": 5}}, {"eos_token_id": None}) == {5}
    assert run.eos_token_ids({"eos_token_id": True}, {}) == frozenset()


def test_token_logprobs_give_transformers_perplexity(llama):
    _, model, path = llama
    ids = np.random.default_rng(9).integers(0, model.config.vocab_size, 20).tolist()
    logprobs = run.token_logprobs(run.open_model(path, threads=1).session, ids)
    with torch.no_grad():
        loss = model(torch.tensor([ids]), labels=torch.tensor([ids])).loss.item()
    assert logprobs.shape == (19,) and (logprobs < 0).all()
    assert abs(-logprobs.mean() - loss) < TOLERANCE
    print(f"perplexity ORT {np.exp(-logprobs.mean()):.4f}, transformers {np.exp(loss):.4f}")


def test_rbe_run_prints_a_causal_lms_continuation(llama, capsys):
    path = llama[2]
    prompt = _prompt_text(run.open_model(path), CHANGING_PROMPT)
    assert main(["run", path, prompt, "--max-new-tokens", "5", "--threads", "1"]) == 0
    assert capsys.readouterr().out == run.generate(path, prompt, 5) + "\n"
    assert main(["run", path, prompt, "--max-new-tokens", "5", "--json", "--threads", "1"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["token_ids"] == run.generate_ids(path, prompt, 5) and len(report["token_ids"]) == 5


# -- refusals and imports ---------------------------------------------------------------


def test_a_container_without_a_graph_is_refused(bert, tmp_path, capsys):
    directory = bert[0]
    bare = str(tmp_path / "bare.rbe")
    assert main(["convert", directory, bare, "--quiet"]) == 0
    capsys.readouterr()
    assert main(["run", bare, "some text"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("rbe: error: ") and "rbe convert" in err and "--onnx" in err
    with pytest.raises(UsageError, match="--onnx"):
        run.embed(bare, ["some text"])


def test_a_container_of_a_bare_onnx_file_runs_with_the_tokenizer_given_at_conversion(bert, tmp_path, capsys):
    directory, with_graph = bert[0], bert[3]
    bare_onnx, converted = str(tmp_path / "m.onnx"), str(tmp_path / "m.rbe")
    assert main(["decode", with_graph, bare_onnx, "--quiet"]) == 0
    assert main(["convert", bare_onnx, converted, "--quiet"]) == 0
    capsys.readouterr()
    assert main(["run", converted, "some text"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "rbe_loaders.ort.session(" in err and "--tokenizer" in err
    assert main(["convert", bare_onnx, converted, "--tokenizer", directory, "--force", "--quiet"]) == 0
    np.testing.assert_allclose(run.embed(converted, TEXTS), run.embed(with_graph, TEXTS), rtol=1e-6, atol=1e-6)


def test_the_wrong_kind_of_model_is_refused(bert, llama):
    with pytest.raises(UsageError, match="encoder"):
        run.generate(bert[3], PROMPT, 2)
    with pytest.raises(UsageError, match="causal LM"):
        run.embed(llama[2], TEXTS)


def test_running_imports_neither_torch_nor_transformers(bert, llama):
    script = (
        "import sys\n"
        "from rbe_loaders.ort import run\n"
        "from rbe_converters.cli import main\n"
        f"assert run.embed({bert[3]!r}, ['a text']).shape == (1, 32)\n"
        f"assert run.generate({llama[2]!r}, {PROMPT!r}, 2) is not None\n"
        f"assert main(['run', {llama[2]!r}, {PROMPT!r}, '--max-new-tokens', '2', '--threads', '1']) == 0\n"
        "print('LEAKED', sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers')))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "LEAKED []" in done.stdout


# -- real checkpoints -------------------------------------------------------------------


def test_minilm_embeddings_are_transformers_mean_pooling(minilm_dir, tmp_path):
    path = convert(minilm_dir, str(tmp_path / "minilm.rbe"))
    sentences = ["The container keeps the weights compressed.", "A short one."]
    model = transformers.AutoModel.from_pretrained(minilm_dir).eval()
    expected = _hf_mean_pooled(model, transformers.AutoTokenizer.from_pretrained(minilm_dir), sentences)
    diff = np.abs(run.embed(path, sentences) - expected).max()
    print(f"all-MiniLM-L6-v2: max abs diff of mean-pooled embeddings {diff:.2e}")
    assert diff < TOLERANCE
