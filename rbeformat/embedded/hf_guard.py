"""What rbe hands to transformers: data, never code, checked before any model is built.

A container, and an input model directory, are data.  Given a folder,
transformers may import Python files from it (a config.json with
``auto_map``), unpickle ``pytorch_model.bin`` when it finds no safetensors
weights under the names it looks for, and build modules and buffers as large
as config.json's numbers say.  So wherever rbe loads a model or a tokenizer
with transformers (``rbe eval``, calibration, ``--onnx`` export,
``rbe_loaders.torch.load_model``):

* the folder transformers reads holds only data files (``DATA_FILES``: the
  config, the generation config, tokenizer files) and safetensors weights under
  names transformers loads (``model.safetensors``, or shards with an index
  written by rbe itself): never a .py file, never a pickle (the converters'
  ``hf_folder.write_container_folder`` and ``hf_folder.stage_directory``);
* every call passes ``trust_remote_code=False`` (``NO_CODE``), and loading a
  model also ``use_safetensors=True`` (``SAFE_WEIGHTS``);
* config.json must name a model type transformers has built in, must not
  carry ``auto_map`` nor name a Hub kernel as an ``*_implementation``;
  tokenizer_config.json must not carry ``auto_map`` either: refused in one
  line, never a prompt (``check_config``, ``check_tokenizer_config``);
* config.json's sizes are checked against the tensors the weights declare
  (``check_config``), and the memory of the model it describes is measured by
  building it on the meta device and checked against the memory limit
  (``rbeformat.budget``) before a real module exists (``model_memory``);
* what transformers, tokenizers or safetensors raise on that content becomes
  one InputError naming the file (``content_errors``).
"""

from __future__ import annotations

import contextlib
import json
import os

from rbeformat import InputError, RbeError, budget

CONFIG_FILE = "config.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
# Files AutoTokenizer reads from a model directory (top level only).
TOKENIZER_FILES = (
    "tokenizer.json",
    TOKENIZER_CONFIG,
    "special_tokens_map.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
)
# Everything rbe lets transformers read besides the weights.
DATA_FILES = (CONFIG_FILE, "generation_config.json", *TOKENIZER_FILES)
WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"

NO_CODE = {"trust_remote_code": False}
SAFE_WEIGHTS = {"trust_remote_code": False, "use_safetensors": True}

INT_LIMIT = 1 << 31  # no size of any model comes near; larger integers in a config are refused
JSON_LIMIT = 16 << 20  # config.json and tokenizer_config.json: no model's is near
MAX_POSITIONS = 1 << 24  # max_position_embeddings above this is refused unless a stored table has as many rows

# config.json sizes (transformers' canonical names; a config class's attribute_map gives other spellings).
LAYER_COUNTS = ("num_hidden_layers", "num_layers", "n_layer", "num_decoder_layers", "encoder_layers", "decoder_layers")
STORED_SIZES = ("hidden_size", "vocab_size")  # each must be a dimension of a stored tensor
BOUNDED_SIZES = (
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "moe_intermediate_size",
    "num_experts",
    "num_local_experts",
    "n_routed_experts",
    "n_inner",
    "d_ff",
    "ffn_dim",
    "encoder_ffn_dim",
    "decoder_ffn_dim",
    "encoder_attention_heads",
    "decoder_attention_heads",
    "type_vocab_size",
)
POSITIONS = ("max_position_embeddings",)
POSITIVE = {
    "num_hidden_layers",
    "hidden_size",
    "vocab_size",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "max_position_embeddings",
}


# -- errors from transformers, tokenizers and safetensors -------------------------------


@contextlib.contextmanager
def content_errors(source: str, what: str):
    """What transformers, tokenizers or safetensors raise on a file's content, as one InputError naming it.

    Wrap only calls that read the file's content: rbe's own errors and
    MemoryError pass through, and a stop signal is no Exception.
    """
    try:
        yield
    except (RbeError, MemoryError):
        raise
    except Exception as exc:
        raise InputError(f"{source}: transformers cannot load its {what} ({_one_line(exc)})") from None


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:200]}{' ...' if len(text) > 200 else ''}" if text else type(exc).__name__


# -- config.json --------------------------------------------------------------------


def parse_json(data: bytes, source: str, name: str) -> dict:
    """A JSON object from a model's file, or one InputError naming it."""
    try:
        value = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise InputError(f"{source}: {name} is not JSON ({' '.join(str(exc).split())[:200]})") from None
    if not isinstance(value, dict):
        raise InputError(f"{source}: {name} is not a JSON object")
    return value


def native_model_types() -> frozenset[str]:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    return frozenset(CONFIG_MAPPING_NAMES)


def check_config(config: dict, shapes: dict[str, tuple], source: str) -> None:
    """Refuses a config.json that would make transformers run code, or build more than the tensors hold.

    ``shapes``: {tensor name: shape} of the weights that go with it.  Checked:
    ``model_type`` is one transformers has built in, no ``auto_map`` is
    present (at any depth) and no ``*_implementation`` setting names a Hub
    repository (a kernel transformers would download and run); every integer is below ``INT_LIMIT``; the sizes
    that decide work and memory are positive integers; ``num_hidden_layers``
    (and the other layer counts) are at most the number of distinct indices
    of a numbered module list in the tensor names; ``hidden_size`` and
    ``vocab_size`` are dimensions of stored tensors; other sizes (heads,
    head_dim, intermediate_size, experts) are at most the largest stored
    dimension; ``max_position_embeddings`` is at most ``MAX_POSITIONS`` or
    a stored dimension.  Nested sub-configs (``text_config``, ...) are
    checked the same way.
    """
    where = f"{source}: {CONFIG_FILE}"
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        raise InputError(f"{where} names no model_type; rbe loads only models that transformers has built in")
    if model_type not in native_model_types():
        raise InputError(
            f"{where}: model_type {model_type[:80]!r} is not built into transformers; it would need "
            "the model's own Python code, which rbe never runs"
        )
    path = _find_key(config, "auto_map")
    if path is not None:
        raise InputError(
            f"{where} has {path} (the model's own Python code); rbe never runs code from a model's "
            "files and loads only models that transformers has built in"
        )
    kernel = _hub_kernel(config)
    if kernel is not None:
        raise InputError(
            f"{where}: {kernel[0]} names {kernel[1][:80]!r}, code from the Hugging Face Hub; rbe "
            "uses transformers' built-in implementations only"
        )
    big = _large_int(config)
    if big is not None:
        raise InputError(f"{where}: {big[0]} is {big[1]}, larger than any model size ({INT_LIMIT})")
    if not shapes:
        raise InputError(f"{source}: holds no tensors for the model its {CONFIG_FILE} describes")
    dims = {int(d) for shape in shapes.values() for d in shape}
    layers = _layer_count(shapes)
    for prefix, sub in _sub_configs(config):
        _check_sizes(sub, prefix, dims, layers, where)


def check_tokenizer_config(config: dict, source: str) -> None:
    path = _find_key(config, "auto_map")
    if path is not None:
        raise InputError(
            f"{source}: {TOKENIZER_CONFIG} has {path} (the tokenizer's own Python code); rbe never "
            "runs code from a model's files"
        )


def _find_key(value, key: str, path: str = "") -> str | None:
    """The dotted path of the first ``key`` at any depth of a JSON value, or None."""
    stack = [(value, path)]
    while stack:
        node, where = stack.pop()
        if isinstance(node, dict):
            for k, v in node.items():
                here = f"{where}.{k}" if where else str(k)
                if k == key:
                    return here
                stack.append((v, here))
        elif isinstance(node, list):
            stack.extend((v, f"{where}[{i}]") for i, v in enumerate(node))
    return None


def _hub_kernel(value) -> tuple[str, str] | None:
    """(dotted path, value) of the first ``*_implementation`` setting at any depth that names a repository
    ("org/name", transformers loads such kernels from the Hub), or None."""
    stack = [(value, "")]
    while stack:
        node, where = stack.pop()
        if isinstance(node, dict):
            for k, v in node.items():
                here = f"{where}.{k}" if where else str(k)
                if str(k).endswith("_implementation") and isinstance(v, str) and ("/" in v or ":" in v):
                    return here, v
                stack.append((v, here))
        elif isinstance(node, list):
            stack.extend((v, f"{where}[{i}]") for i, v in enumerate(node))
    return None


def _large_int(value) -> tuple[str, int] | None:
    """(dotted path, value) of the first integer at any depth of a JSON value above INT_LIMIT in magnitude."""
    stack = [(value, "")]
    while stack:
        node, where = stack.pop()
        if isinstance(node, dict):
            stack.extend((v, f"{where}.{k}" if where else str(k)) for k, v in node.items())
        elif isinstance(node, list):
            stack.extend((v, f"{where}[{i}]") for i, v in enumerate(node))
        elif isinstance(node, int) and not isinstance(node, bool) and abs(node) > INT_LIMIT:
            return where, node
    return None


def _sub_configs(config: dict):
    """(dotted prefix, dict) of the config and of each nested sub-config (a dict with a model_type, or a
    ``*_config`` dict other than quantization settings), at any depth."""
    stack = [("", config)]
    while stack:
        prefix, node = stack.pop()
        yield prefix, node
        for key, value in node.items():
            if isinstance(value, dict) and (
                "model_type" in value or (str(key).endswith("_config") and key != "quantization_config")
            ):
                stack.append((f"{prefix}{key}.", value))


def _attribute_map(model_type) -> dict:
    """A built-in config class's other spellings of the canonical names (GPT-2's n_layer, T5's d_model)."""
    if not isinstance(model_type, str) or model_type not in native_model_types():
        return {}
    try:
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING

        return dict(getattr(CONFIG_MAPPING[model_type], "attribute_map", {}) or {})
    except Exception:  # a config class that fails to import: its canonical names only
        return {}


def _layer_count(shapes: dict[str, tuple]) -> int:
    """The most distinct indices of one numbered module list in the tensor names (``model.layers.N``)."""
    stacks: dict[str, set[str]] = {}
    for name in shapes:
        parts = name.split(".")
        for i, part in enumerate(parts):
            if part.isdigit():
                stacks.setdefault(".".join(parts[:i]), set()).add(part)
    return max((len(indices) for indices in stacks.values()), default=0)


def _check_sizes(config: dict, prefix: str, dims: set[int], layers: int, where: str) -> None:
    aliases = _attribute_map(config.get("model_type"))
    largest = max(max(dims, default=0), layers)

    def fields(names):
        for name in names:
            for key in dict.fromkeys((aliases.get(name, name), name)):
                if key in config and config[key] is not None:
                    yield name, key, config[key]

    def size(name, key, value) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise InputError(f"{where}: {prefix}{key} is {json.dumps(value)[:40]}, not a whole number")
        low = 1 if name in POSITIVE else 0
        if value < low:
            raise InputError(f"{where}: {prefix}{key} is {value}; it must be at least {low}")
        return value

    for name, key, value in fields(LAYER_COUNTS):
        if size(name, key, value) > layers:
            raise InputError(
                f"{where}: {prefix}{key} is {value}, but the tensors hold "
                f"{'at most ' + str(layers) if layers else 'no'} numbered layers"
            )
    for name, key, value in fields(STORED_SIZES):
        if size(name, key, value) not in dims:
            raise InputError(f"{where}: {prefix}{key} is {value}, which no stored tensor has as a dimension")
    for name, key, value in fields(BOUNDED_SIZES):
        if size(name, key, value) > largest:
            raise InputError(
                f"{where}: {prefix}{key} is {value}, larger than every stored tensor's dimensions (at most {largest})"
            )
    for name, key, value in fields(POSITIONS):
        if size(name, key, value) > MAX_POSITIONS and value not in dims:
            raise InputError(
                f"{where}: {prefix}{key} is {value}, more than {MAX_POSITIONS} positions and no "
                "stored table has that many rows"
            )


# -- the memory of the model a config describes -----------------------------------------


def meta_model(auto, hf_config, dtype, source: str):
    """The model ``auto.from_config`` builds from ``hf_config``, on the meta device: nothing allocated.

    Call ``check_config`` first (a huge layer count would make even this slow).
    """
    import torch

    with content_errors(source, f"model from its {CONFIG_FILE}"), torch.device("meta"):
        return auto.from_config(hf_config, dtype=dtype, **NO_CODE)


def model_memory(auto, hf_config, dtype, source: str) -> tuple[int, int]:
    """(parameter bytes, buffer bytes) of the model ``auto.from_config`` builds from ``hf_config``: every
    parameter and buffer the config's numbers decide, rope tables and masks included, counted exactly on
    the meta device."""
    return model_bytes(meta_model(auto, hf_config, dtype, source))


def model_bytes(model) -> tuple[int, int]:
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    return params, buffers


def check_shapes(model, shapes: dict[str, tuple], source: str) -> None:
    """Every stored tensor that fills a parameter or buffer of ``model`` (by name, with or without the base
    model's prefix) has its shape."""
    prefix = getattr(model, "base_model_prefix", "") or ""
    wanted = dict(model.named_parameters(remove_duplicate=False))
    wanted.update(model.named_buffers(remove_duplicate=False))
    for name, tensor in wanted.items():
        for candidate in (name, name.removeprefix(prefix + "."), f"{prefix}.{name}"):
            if candidate in shapes:
                if tuple(shapes[candidate]) != tuple(tensor.shape):
                    raise InputError(
                        f"{source}: tensor {candidate!r} has shape {list(shapes[candidate])}, but the "
                        f"model its {CONFIG_FILE} describes needs {list(tensor.shape)} for {name!r}"
                    )
                break


def check_memory(nbytes: int, source: str, what: str) -> None:
    """The one place where the memory a model will take is compared with the limit (``--max-memory``)."""
    budget.check(nbytes, f"{source}: {what}")


# -- the tokenizer folder --------------------------------------------------------------


def check_tokenizer_folder(folder: str, source: str) -> None:
    """The tokenizer_config.json of a folder written or staged here (when it has one) names no code."""
    path = os.path.join(folder, TOKENIZER_CONFIG)
    if os.path.isfile(path):
        check_tokenizer_config(parse_json(small_file(path, source, TOKENIZER_CONFIG), source, TOKENIZER_CONFIG), source)


def small_file(path: str, source: str, name: str) -> bytes:
    with open(path, "rb") as fh:
        data = fh.read(JSON_LIMIT + 1)
    if len(data) > JSON_LIMIT:
        raise InputError(f"{source}: {name} is larger than {JSON_LIMIT >> 20} MiB; no model's is")
    return data


# -- loading --------------------------------------------------------------------------


def load_tokenizer(folder: str, source: str):
    """AutoTokenizer on a folder written or staged here, no code run; errors name ``source``."""
    import transformers

    with content_errors(source, "tokenizer"):
        return transformers.AutoTokenizer.from_pretrained(folder, **NO_CODE)
