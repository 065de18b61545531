"""The folder transformers reads: a container's data files and safetensors weights, written or linked.

Only what ``rbeformat.embedded.hf_guard`` lets transformers read: data files
(``DATA_FILES``) and safetensors weights under names transformers loads
(``model.safetensors``, or shards with an index written by rbe itself), never a
.py file, never a pickle (``write_container_folder``, ``stage_directory``);
each folder's config.json checked (``check_folder``) and the model loaded
from it only as the guard allows (``load_pretrained``).
"""

from __future__ import annotations

import json
import math
import os
import re

from rbeformat import InputError
from rbeformat.embedded.hf_guard import (
    CONFIG_FILE,
    DATA_FILES,
    NO_CODE,
    SAFE_WEIGHTS,
    WEIGHTS,
    WEIGHTS_INDEX,
    check_config,
    check_memory,
    check_shapes,
    check_tokenizer_folder,
    content_errors,
    meta_model,
    model_bytes,
    parse_json,
    small_file,
)

_SHARD = re.compile(r"[^/\\]+\.safetensors")


# -- the folder transformers reads ----------------------------------------------------


def _index(weight_map: dict[str, str], total: int) -> bytes:
    return json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2).encode()


def _chosen_shards(shards: list[str], index: dict | None) -> list[str]:
    """The top-level shards transformers would load: model.safetensors alone, else those an index names
    (when it names only top-level shards there are), else every top-level shard."""
    top = [s for s in shards if _SHARD.fullmatch(s)]
    if WEIGHTS in top:
        return [WEIGHTS]
    if index is not None:
        weight_map = index.get("weight_map")
        if isinstance(weight_map, dict):
            named = {v for v in weight_map.values() if isinstance(v, str)}
            if named and named <= set(top):
                return sorted(named)
    return sorted(top)


def _read_index(data: bytes | None) -> dict | None:
    if data is None:
        return None
    try:
        value = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


def write_container_folder(reader, folder: str, source: str, *, verify: bool = True) -> dict[str, tuple]:
    """Writes into the empty ``folder`` what transformers needs of a container, and nothing else.

    The container's data files (``DATA_FILES``, top level) and its weights:
    the safetensors files transformers would load, byte for byte as ``rbe
    decode`` writes them, with an index rbe writes when they are not one
    ``model.safetensors``; a container without a safetensors layout gets one
    ``model.safetensors`` of all its tensors.  Never a .py file or a pickle.
    Returns {tensor name: shape} of the weights written.
    """
    from .decode import exported_graph_parts, write_shard
    from .safetensors_io import build_header

    graph_files, graph_tensors = exported_graph_parts(reader)
    files = {path: entry for path, entry in reader.files().items() if path not in graph_files}
    for name in DATA_FILES:
        entry = files.get(name)
        if entry is not None and entry.role != "safetensors-header":
            with open(os.path.join(folder, name), "wb") as fh:
                for data in reader.iter_file(name, verify=verify):
                    fh.write(data)
    shards = [path for path, entry in files.items() if entry.role == "safetensors-header"]
    index = _read_index(reader.read_file(WEIGHTS_INDEX) if WEIGHTS_INDEX in files else None)
    chosen = _chosen_shards(shards, index)
    shapes: dict[str, tuple] = {}
    if not shards:  # tensors without a safetensors layout (save_file): one model.safetensors, as rbe decode
        names = [n for n in reader.keys() if n not in graph_tensors]
        header = build_header(
            [(n, reader.entry(n).dtype.name, reader.entry(n).shape) for n in names], reader.metadata()
        )
        with open(os.path.join(folder, WEIGHTS), "wb") as fh:
            write_shard(reader, header, names, fh.write, verify, None)
        return {n: tuple(reader.entry(n).shape) for n in names}
    if not chosen:
        raise InputError(f"{source}: holds no .safetensors weights at its top level, where transformers looks for them")
    weight_map, total = {}, 0
    for shard in chosen:
        names = files[shard].tensors
        with open(os.path.join(folder, shard), "wb") as fh:
            write_shard(reader, reader.read_file(shard), names, fh.write, verify, None)
        for name in names:
            entry = reader.entry(name)
            shapes[name] = tuple(entry.shape)
            weight_map[name] = shard
            total += math.prod(entry.shape) * entry.dtype.itemsize
    if chosen != [WEIGHTS]:
        with open(os.path.join(folder, WEIGHTS_INDEX), "wb") as fh:
            fh.write(_index(weight_map, total))
    return shapes


def stage_directory(model_dir: str, folder: str) -> dict[str, tuple]:
    """Fills the empty ``folder`` with links to what transformers needs of a model directory, and nothing
    else (as ``write_container_folder``: data files, the safetensors weights it would load, an index rbe
    writes); returns {tensor name: shape} of those weights, from their headers."""
    from .safetensors_io import read_header

    top = sorted(name for name in os.listdir(model_dir) if os.path.isfile(os.path.join(model_dir, name)))
    for name in DATA_FILES:
        if name in top:
            os.symlink(os.path.abspath(os.path.join(model_dir, name)), os.path.join(folder, name))
    shards = [name for name in top if name.endswith(".safetensors")]
    index = None
    if WEIGHTS_INDEX in top:
        with open(os.path.join(model_dir, WEIGHTS_INDEX), "rb") as fh:
            index = _read_index(fh.read(1 << 26))
    chosen = _chosen_shards(shards, index)
    if not chosen:
        raise InputError(
            f"{model_dir}: no .safetensors weights at its top level; transformers loads "
            f"{WEIGHTS} (rbe never loads pickled weights such as pytorch_model.bin)"
        )
    shapes, weight_map, total = {}, {}, 0
    for shard in chosen:
        full = os.path.join(model_dir, shard)
        os.symlink(os.path.abspath(full), os.path.join(folder, shard))
        for t in read_header(full).tensors:
            shapes[t.name] = tuple(t.shape)
            weight_map[t.name] = shard
            total += t.end - t.begin
    if chosen != [WEIGHTS]:
        with open(os.path.join(folder, WEIGHTS_INDEX), "wb") as fh:
            fh.write(_index(weight_map, total))
    return shapes


def link_data_files(source_dir: str, folder: str) -> None:
    """Gives ``folder`` the data files of ``source_dir`` it lacks (config and tokenizer files; never weights,
    code or pickles)."""
    for name in DATA_FILES:
        full = os.path.join(source_dir, name)
        if os.path.isfile(full) and not os.path.lexists(os.path.join(folder, name)):
            os.symlink(os.path.abspath(full), os.path.join(folder, name))


def folder_shapes(folder: str) -> dict[str, tuple]:
    """{tensor name: shape} of the safetensors weights a folder written or staged here holds."""
    from .safetensors_io import read_header

    names = (
        [WEIGHTS]
        if os.path.exists(os.path.join(folder, WEIGHTS))
        else sorted(n for n in os.listdir(folder) if n.endswith(".safetensors"))
    )
    return {t.name: tuple(t.shape) for n in names for t in read_header(os.path.join(folder, n)).tensors}


def check_folder(folder: str, source: str, shapes: dict[str, tuple] | None = None) -> dict:
    """Reads and checks the config.json (and tokenizer_config.json) of a folder written or staged here;
    returns the config."""
    path = os.path.join(folder, CONFIG_FILE)
    if not os.path.isfile(path):
        raise InputError(f"{source}: no {CONFIG_FILE}; a model needs its Hugging Face config to be loaded")
    config = parse_json(small_file(path, source, CONFIG_FILE), source, CONFIG_FILE)
    check_config(config, folder_shapes(folder) if shapes is None else shapes, source)
    check_tokenizer_folder(folder, source)
    return config


# -- loading --------------------------------------------------------------------------


def load_pretrained(auto, folder: str, source: str, **kwargs):
    """``auto.from_pretrained`` on a folder written or staged here (``check_folder`` passed): the model
    built on the meta device first, its memory (parameters in ``dtype``, float32 for "auto", and buffers)
    checked against the limit and the weights' shapes against it; then loaded from safetensors, no code run."""
    import torch
    import transformers

    with content_errors(source, CONFIG_FILE):
        hf_config = transformers.AutoConfig.from_pretrained(folder, **NO_CODE)
    dtype = kwargs.get("dtype")
    model = meta_model(auto, hf_config, dtype if isinstance(dtype, torch.dtype) else torch.float32, source)
    params, buffers = model_bytes(model)
    check_memory(params + buffers, source, f"the model its {CONFIG_FILE} describes")
    check_shapes(model, folder_shapes(folder), source)
    del model
    with content_errors(source, "model"):
        return auto.from_pretrained(folder, config=hf_config, **SAFE_WEIGHTS, **kwargs)
