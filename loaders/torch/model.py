"""Hugging Face models from rbe containers, their quantized weights kept compressed in memory.

>>> from rbe_loaders.torch import load_model                     # doctest: +SKIP
>>> model, tok = load_model("smollm2-q4.rbe", with_tokenizer=True)
>>> out = model.generate(**tok("The capital of France is", return_tensors="pt"), max_new_tokens=8)
>>> print(model.rbe_report)                                        # the form of every weight

``load_model`` builds the ``transformers`` model named by the container's
``config.json`` (``AutoModelForCausalLM`` for causal LMs, ``AutoModel``
otherwise) with its parameters on the meta device, so no dense copy of the
weights is ever allocated, then fills it:

* every ``nn.Linear`` and ``nn.Embedding`` whose stored tensor has a codec
  chain that ``rbe_loaders.torch.decoders`` maps (its top codec's formula has
  a row in ``decoders.DECODERS``) becomes a module holding the codec's parts
  (packed codes, scales, factors, ...), decoded at each forward
  (``CompressedLinear``: ``x @ W.T`` from the parts; ``CompressedEmbedding``:
  only the looked-up rows);
* a head tied to the token embedding shares that embedding's parts;
* everything else (norms, biases, tensors stored losslessly, codecs without a
  mapping) is decoded once at load, as ``load_state_dict`` would.

``model.rbe_report`` lists each tensor's form and resident bytes, and names
every fallback with its reason.  ``cache_bytes`` (default 0: off) keeps up to
that many bytes of decoded Linear weights between forwards, most recently used
first; the report states it.  ``save_model`` writes the loaded model back to
an .rbe file unchanged.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from rbeformat import ChecksumError, FormatError, InputError, Reader, UsageError, safe_open
from rbeformat.atomic import atomic_file
from rbeformat.embedded import hf_guard
from rbeformat.embedded.config import is_causal_lm
from rbeformat.extras import TORCH_MODELS

from ..report import FormReport
from .decoders import build_decoder, decode_at_load_reason, shared_bytes

CONFIG_FILE = hf_guard.CONFIG_FILE
# Files AutoTokenizer reads from a model directory (top level only).
TOKENIZER_FILES = hf_guard.TOKENIZER_FILES


# -- the report -------------------------------------------------------------------------


@dataclass
class LoadReport(FormReport):
    """Per stored tensor: how the loaded model holds it, and the bytes it keeps resident."""

    path: str = ""
    cache_bytes: int = 0

    @property
    def compressed(self) -> list[str]:
        return [row.name for row in self.rows if row.form.startswith("on the fly")]

    def summary(self) -> list[str]:
        cache = f"up to {self.cache_bytes / 1e6:.1f} MB" if self.cache_bytes else "off"
        return [
            f"{len(self.compressed)} of {len(self.rows)} tensors on the fly; weights resident "
            f"{self.resident_bytes / 1e6:.1f} MB against {self.dense_bytes / 1e6:.1f} MB dense "
            f"({self.ratio:.3f}x); decoded-weight cache {cache}"
        ]


# -- the modules ------------------------------------------------------------------------


class DecodedCache:
    """Decoded weights kept between forwards, least recently used dropped first, up to ``limit`` bytes."""

    def __init__(self, limit: int):
        self.limit, self.used, self.entries = limit, 0, OrderedDict()

    def weight(self, decoder: nn.Module) -> torch.Tensor:
        key = id(decoder)
        if key in self.entries:
            self.entries.move_to_end(key)
            return self.entries[key]
        weight = decoder()
        size = weight.numel() * weight.element_size()
        if size <= self.limit:
            while self.used + size > self.limit:
                _, old = self.entries.popitem(last=False)
                self.used -= old.numel() * old.element_size()
            self.entries[key] = weight
            self.used += size
        return weight


class CompressedLinear(nn.Module):
    """``nn.Linear`` whose weight is rebuilt from its codec's parts at each forward."""

    def __init__(self, decoder: nn.Module, bias: torch.Tensor | None, cache: DecodedCache | None = None):
        super().__init__()
        self.decoder = decoder
        self.out_features, self.in_features = decoder.shape
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self._cache = cache

    @property
    def weight(self) -> torch.Tensor:
        """The decoded weight (a new dense tensor at each access: for inspection, not for the forward)."""
        return self.decoder()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._cache is not None:
            y = F.linear(x, self._cache.weight(self.decoder).to(x.dtype))
        else:
            y = self.decoder.linear(x)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.decoder.form}"


class CompressedEmbedding(nn.Module):
    """``nn.Embedding`` that decodes only the rows it looks up."""

    def __init__(self, decoder: nn.Module, padding_idx: int | None, dtype: torch.dtype):
        super().__init__()
        self.decoder = decoder
        self.num_embeddings, self.embedding_dim = decoder.shape
        self.padding_idx = padding_idx
        self.dtype = dtype

    @property
    def weight(self) -> torch.Tensor:
        """The decoded table (a new dense tensor at each access)."""
        return self.decoder().to(self.dtype)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self.decoder.rows(ids.reshape(-1))
        return rows.to(self.dtype).reshape(*ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, {self.decoder.form}"


# -- loading ----------------------------------------------------------------------------


def load_model(
    path: str | os.PathLike,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    *,
    with_tokenizer: bool = False,
    cache_bytes: int = 0,
    kernel: str = "int4",
    quiet: bool = True,
):
    """The container's model with its compressed weights decoded on the fly (see the module doc).

    ``dtype`` (default float32) is the dtype of the tensors decoded at load and
    of the decoded weights' outputs.  Returns the model, or ``(model,
    tokenizer)`` with ``with_tokenizer``.  ``kernel="int4"`` (the default)
    multiplies group-quantized Linear weights with torch's int4 CPU kernel
    where it fits: bfloat16 activations, several times faster than decoding,
    within about 0.4% of the output scale of the reference; ``kernel="exact"``
    decodes every weight in float32 at each forward, equal to the reference
    decoder to float rounding.  A container without config.json is
    a UsageError; a damaged or hostile file fails with the format's error
    before any module is built.  Nothing from the container runs: only
    config.json (and the tokenizer files) reach transformers, with
    ``trust_remote_code=False``; a config.json that names a model type not
    built into transformers, carries ``auto_map``, or whose sizes the stored
    tensors do not bear out (``rbeformat.embedded.hf_guard.check_config``) is an
    InputError, as is a model whose buffers would exceed the memory limit
    (measured on the meta device first) and any error transformers or
    tokenizers raise on the container's files.
    """
    transformers = _transformers()
    dtype = dtype or torch.float32
    device = torch.device(device)
    if kernel not in ("int4", "exact"):
        raise UsageError(f"kernel must be 'int4' or 'exact', not {kernel!r}")
    if cache_bytes < 0:
        raise UsageError(f"cache_bytes must be 0 (off) or positive, not {cache_bytes}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("device='cuda' but torch sees no CUDA device here")
    path = os.fspath(path)
    with safe_open(path, framework="pt") as reader, tempfile.TemporaryDirectory(prefix="rbe-model-") as folder:
        _check_sound(reader, path)
        config = _write_config(reader, path, folder)
        auto = transformers.AutoModelForCausalLM if is_causal_lm(config) else transformers.AutoModel
        with hf_guard.content_errors(path, CONFIG_FILE):
            hf_config = transformers.AutoConfig.from_pretrained(folder, **hf_guard.NO_CODE)
        _, buffers = hf_guard.model_memory(auto, hf_config, dtype, path)  # parameters come from the file
        hf_guard.check_memory(buffers, path, f"the buffers of the model its {CONFIG_FILE} describes")
        with hf_guard.content_errors(path, f"model from its {CONFIG_FILE}"), _parameters_on_meta():
            model = auto.from_config(hf_config, dtype=dtype, **hf_guard.NO_CODE)
        report = LoadReport(path=path, cache_bytes=cache_bytes)
        _fill(model, reader, report, device, dtype, DecodedCache(cache_bytes) if cache_bytes else None, kernel)
        tokenizer = _tokenizer(reader, path, folder, transformers) if with_tokenizer else None
    _return_freed_memory()
    model.eval()
    model.rbe_report = report
    model.rbe_source = path
    if not quiet:
        print(report)
    return (model, tokenizer) if with_tokenizer else model


def _return_freed_memory() -> None:
    """Hands the heap that decoding at load freed back to the system (glibc keeps it otherwise, and the
    process's resident memory would count it long after the load)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def _transformers():
    _, transformers = TORCH_MODELS.require()
    transformers.logging.set_verbosity_error()
    return transformers


CHECKSUM_WORDS = "checksum mismatch"  # how Reader.verify words a section whose CRC-32 fails
DIGEST_WORDS = "sha256 digest"  # and a tensor or file whose decoded bytes fail their digest


def _check_sound(reader: Reader, path: str) -> None:
    """Every section's checksum, before any module exists: a damaged file fails here, not mid-build."""
    problems = list(reader.verify())
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        # bytes that fail their checksum are a ChecksumError, as safe_open raises for them
        failed = any(CHECKSUM_WORDS in problem or DIGEST_WORDS in problem for problem in problems)
        error = ChecksumError if failed else FormatError
        raise error(f"{path}: damaged: {problems[0]}{more}; rbe verify lists every problem")


def _write_config(reader: Reader, path: str, folder: str) -> dict:
    if CONFIG_FILE not in reader.files():
        raise UsageError(
            f"{path}: holds no {CONFIG_FILE}; load_model needs a container converted from a Hugging "
            "Face model directory (rbe_loaders.torch.load_state_dict reads the tensors alone)"
        )
    data = reader.read_file(CONFIG_FILE)
    config = hf_guard.parse_json(data, path, f"the embedded {CONFIG_FILE}")
    hf_guard.check_config(config, {name: tuple(reader.entry(name).shape) for name in reader.keys()}, path)
    with open(os.path.join(folder, CONFIG_FILE), "wb") as fh:
        fh.write(data)
    return config


@contextlib.contextmanager
def _parameters_on_meta():
    """Parameters registered while building go to the meta device (buffers, such as rotary tables, stay real).

    torch.empty reserves pages without touching them and the meta copy frees
    them, so building the model never makes the weights resident.
    """
    register = nn.Module.register_parameter

    def on_meta(module, name, param):
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def _fill(model: nn.Module, reader: Reader, report: LoadReport, device, dtype, cache, kernel: str) -> None:
    """Replaces mapped Linear / Embedding modules and decodes every other parameter and buffer at load."""
    names = _stored_names(model, reader)
    _check_shapes(model, reader, names, report.path)
    uses = []  # (module name, module, stored tensor)
    for module_name, module in list(model.named_modules()):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            weight = f"{module_name}.weight" if module_name else "weight"
            stored = names.get(weight) or _tied_source(model, module_name, names)
            if stored is not None:
                if tuple(module.weight.shape) != tuple(reader.entry(stored).shape):  # a tied head
                    raise InputError(
                        f"{report.path}: tensor {stored!r} has shape {list(reader.entry(stored).shape)}, "
                        f"but the model its {CONFIG_FILE} describes needs {list(module.weight.shape)} "
                        f"for {weight!r}"
                    )
                uses.append((module_name, module, reader.stored_entry(stored).name))
    multiplied = {target for _, module, target in uses if isinstance(module, nn.Linear)}
    looked_up = {target for _, module, target in uses if isinstance(module, nn.Embedding)}
    decoders: dict[str, nn.Module | None] = {}  # stored tensor -> its decoder, shared by tied uses
    for module_name, module, target in uses:
        if target not in decoders:
            # a table only looked up never runs the int4 kernel: do not hold its copy
            decoders[target] = build_decoder(
                reader, target, device, lookups=target in looked_up, kernel=kernel if target in multiplied else "exact"
            )
            if decoders[target] is not None:
                report.add(
                    target,
                    f"on the fly: {decoders[target].form}",
                    decoders[target].resident_bytes(),
                    _dense_bytes(reader, target),
                )
        decoder = decoders[target]
        if decoder is None:
            continue
        if isinstance(module, nn.Linear):
            bias = _decoded(reader, names[f"{module_name}.bias"], device, dtype) if module.bias is not None else None
            replacement = CompressedLinear(decoder, bias, cache)
        else:
            replacement = CompressedEmbedding(decoder, module.padding_idx, dtype)
        _set_module(model, module_name, replacement)
    shared = shared_bytes([d for d in decoders.values() if d is not None])
    if shared:
        report.add("(shared seed basis tables)", "on the fly: read by the seed decoders", shared, 0)
    _decode_the_rest(model, reader, names, report, device, dtype)


def _stored_names(model: nn.Module, reader: Reader) -> dict[str, str]:
    """{model parameter or persistent buffer name: the container's tensor name}, allowing for the base
    model prefix that checkpoints of a bare encoder leave out (or keep)."""
    keys = set(reader.keys())
    prefix = getattr(model, "base_model_prefix", "") or ""
    found = {}
    for name in list(dict(model.named_parameters(remove_duplicate=False))) + list(model.state_dict()):
        for candidate in (name, name.removeprefix(prefix + "."), f"{prefix}.{name}"):
            if candidate in keys:
                found[name] = candidate
                break
    return found


def _check_shapes(model: nn.Module, reader: Reader, names: dict[str, str], path: str) -> None:
    """Every stored tensor the model takes has the shape of the parameter or buffer it fills."""
    wanted = dict(model.named_parameters(remove_duplicate=False))
    wanted.update((name, buffer) for name, buffer in model.named_buffers(remove_duplicate=False) if name in names)
    for name, tensor in wanted.items():
        stored = names.get(name)
        if stored is not None and tuple(reader.entry(stored).shape) != tuple(tensor.shape):
            raise InputError(
                f"{path}: tensor {stored!r} has shape {list(reader.entry(stored).shape)}, but the "
                f"model its {CONFIG_FILE} describes needs {list(tensor.shape)} for {name!r}"
            )


def _tied_source(model: nn.Module, module_name: str, names: dict[str, str]) -> str | None:
    """The stored token embedding for an output head tied to it and absent from the file."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    tied = getattr(model.config, "tie_word_embeddings", False)
    if not tied or head is None or model.get_submodule(module_name) is not head:
        return None
    embedding_name = next((n for n, m in model.named_modules() if m is model.get_input_embeddings()), None)
    return names.get(f"{embedding_name}.weight") if embedding_name is not None else None


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def _dense_bytes(reader: Reader, name: str) -> int:
    entry = reader.entry(name)
    return int(np.prod(entry.shape)) * entry.dtype.itemsize


def _decoded(reader: Reader, name: str, device, dtype) -> torch.Tensor:
    """One tensor decoded by the numpy reference, as ``dtype`` floats (other dtypes kept) on ``device``."""
    tensor = reader.get_tensor(name)  # a torch tensor: the reader is safe_open(..., framework="pt")
    if tensor.is_floating_point():
        tensor = tensor.to(dtype)
    return tensor.to(device)


def _decode_the_rest(
    model: nn.Module, reader: Reader, names: dict[str, str], report: LoadReport, device, dtype
) -> None:
    """Every parameter still on meta (and persistent buffer in the file) from the container, decoded once."""
    done: dict[str, torch.Tensor] = {}  # stored tensor -> decoded, so tied parameters share one tensor
    for module_name, module in model.named_modules():
        for pname, param in list(module._parameters.items()):
            if param is None or param.device.type != "meta":
                continue
            full = f"{module_name}.{pname}" if module_name else pname
            stored = names.get(full)
            if stored is None and isinstance(module, nn.Linear) and pname == "weight":
                stored = _tied_source(model, module_name, names)
            if stored is None:
                raise InputError(f"{report.path}: holds no tensor for the model's parameter {full!r}")
            target = reader.stored_entry(stored).name
            if target not in done:
                done[target] = _decoded(reader, target, device, dtype)
                reason = decode_at_load_reason(reader, target)
                report.add(
                    target,
                    "decoded at load" + (f" ({reason})" if reason else ""),
                    done[target].numel() * done[target].element_size(),
                    _dense_bytes(reader, target),
                )
            module._parameters[pname] = nn.Parameter(done[target], requires_grad=False)
        for bname, buffer in list(module._buffers.items()):
            full = f"{module_name}.{bname}" if module_name else bname
            if full in names and bname not in module._non_persistent_buffers_set:
                module._buffers[bname] = _decoded(reader, names[full], device, buffer.dtype)
            elif buffer is not None and buffer.device != device:
                module._buffers[bname] = buffer.to(device)


def _tokenizer(reader: Reader, path: str, folder: str, transformers):
    """AutoTokenizer on the container's tokenizer files, written to ``folder`` beside its config."""
    present = [name for name in TOKENIZER_FILES if name in reader.files()]
    if not present:
        raise UsageError(f"{path}: holds no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...)")
    for name in present:
        with open(os.path.join(folder, name), "wb") as fh:
            for piece in reader.iter_file(name):  # streamed, its digest checked
                fh.write(piece)
    hf_guard.check_tokenizer_folder(folder, path)
    with hf_guard.content_errors(path, "tokenizer"):
        return transformers.AutoTokenizer.from_pretrained(folder, **hf_guard.NO_CODE)


# -- saving -----------------------------------------------------------------------------


def save_model(model: nn.Module, path: str | os.PathLike, *, force: bool = False) -> None:
    """Writes a model that ``load_model`` returned back to ``path`` as the .rbe it came from.

    Every tensor decoded at load must still equal the container's (the
    compressed modules hold the stored parts themselves); a changed parameter
    is a UsageError naming it, since re-encoding is the converter's job
    (``rbe convert``).  The output is written to a temporary file and renamed;
    an existing ``path`` is replaced only with ``force``.
    """
    source = getattr(model, "rbe_source", None)
    if source is None:
        raise UsageError("save_model takes a model returned by load_model")
    changed = _changed_tensors(model, source)
    if changed:
        raise UsageError(
            f"the model's tensors differ from {source}: {', '.join(changed[:5])}"
            f"{' ...' if len(changed) > 5 else ''}; convert its saved checkpoint with rbe convert"
        )
    with open(source, "rb") as src, atomic_file(os.fspath(path), force) as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
    with Reader(path) as check:  # the copy must verify as the source did
        check.keys()


def _changed_tensors(model: nn.Module, source: str) -> list[str]:
    with safe_open(source, framework="pt") as reader:
        names = _stored_names(model, reader)
        changed = []
        for name, param in model.named_parameters():
            stored = names.get(name)
            if stored is None:
                continue
            reference = _decoded(reader, reader.stored_entry(stored).name, param.device, param.dtype)
            if not torch.equal(reference, param.detach()):
                changed.append(name)
    return changed
