"""Hugging Face checkpoints (a .safetensors file or a model directory) to rbe and back.

Every file of a model directory goes into the container under its relative
path; safetensors files are split into their tensors (encoded by the chosen
codec) plus their verbatim header, so decoding gives back each file byte for
byte.  Tensors equal to one already stored become aliases.
"""

from __future__ import annotations

import math
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from rbeformat import FormatError, InputError, Reader, UsageError, Writer
from rbeformat.atomic import atomic_directory, atomic_file
from rbeformat.chain import Chain
from rbeformat.codecs.core.base import Codec
from rbeformat.codecs.transpose import Transpose
from rbeformat.embedded.onnx import GRAPH_KEY, MAPPING_KEY, OWN_PREFIX
from rbeformat.manifest import check_json_text, unique_keys
from rbeformat.spec import DTYPES
from rbeformat.values import from_float32, to_float32

from .compress.recipe import Policy, Rule, lossless_policy
from .compress.roles import TensorRole, classify
from .safetensors_io import StFile, StTensor, build_header, read_header

Progress = Callable[[int], None]


@dataclass
class Plan:
    """What a conversion will read: safetensors files and other files, by relative path."""

    root: str
    safetensors: list[tuple[str, StFile]]
    others: list[tuple[str, str]]  # (relative path, absolute path)

    @property
    def total_bytes(self) -> int:
        st = sum(os.path.getsize(f.path) for _, f in self.safetensors)
        return st + sum(os.path.getsize(p) for _, p in self.others)


def plan_conversion(src: str) -> Plan:
    """Lists and validates what ``src`` holds, before any output is created."""
    if os.path.isfile(src):
        if not src.endswith(".safetensors"):
            raise InputError(f"{src}: expected a .safetensors file, a model directory or an .onnx file")
        return Plan(os.path.dirname(src), [(os.path.basename(src), read_header(src))], [])
    if not os.path.isdir(src):
        raise InputError(f"{src}: no such file or directory")
    safetensors, others = [], []
    for rel, full in _walk(src):
        if rel.endswith(".safetensors"):
            safetensors.append((rel, read_header(full)))
        else:
            others.append((rel, full))
    if not safetensors:
        raise InputError(f"{src}: no .safetensors file found in the directory")
    names: dict[str, str] = {}
    for rel, st in safetensors:
        for t in st.tensors:
            if t.name.startswith("rbe:"):
                raise InputError(f"{rel}: tensor {t.name!r} uses the prefix 'rbe:', which rbe reserves")
            if t.name in names:
                raise InputError(f"tensor {t.name!r} appears in both {names[t.name]} and {rel}")
            names[t.name] = rel
    return Plan(src, safetensors, others)


def _walk(root: str):
    """(relative POSIX path, absolute path) of every regular file, sorted.

    A symbolic link whose target lies outside ``root`` is refused (``links.check_link``; a
    Hugging Face cache snapshot's links into its blobs are allowed); a link to a directory
    inside ``root`` is not descended (its files are listed where they are).
    """
    from .links import allowed_roots, check_link

    roots = allowed_roots(root)
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in dirnames:
            check_link(os.path.join(dirpath, name), root, roots)
        for name in filenames:
            full = os.path.join(dirpath, name)
            check_link(full, root, roots)
            if not os.path.isfile(full):
                continue  # sockets, broken links and the like carry no model data
            rel = os.path.relpath(full, root).replace(os.sep, "/")
            found.append((rel, full))
    return sorted(found)


def convert(
    src: str,
    dst: str,
    *,
    force: bool = False,
    codec: Codec | None = None,
    policy: Policy | None = None,
    threads: int | None = None,
    progress: Progress | None = None,
    calibration_text=None,
    calibrations: dict | None = None,
    sequential: bool = True,
    blocks_progress: Progress | None = None,
    extra: Callable[[Writer], dict[str, str]] | None = None,
) -> list[str]:
    """Converts a .safetensors file or a HF model directory into one rbe file.

    ``codec`` is the lossless codec; ``policy`` picks a codec chain per tensor
    (default: everything lossless).  Rules that ask for calibration get the
    statistics of the original model on ``calibration_text`` (default: the
    calibration half of pydoc's topics) before anything is written: a survey
    block by block that keeps only the decisions of mixed precision and head
    pruning (``calibrate_for``), or ``calibrations`` given (a ``Statistics``, or
    ``calibrate.collect``'s dict).  With ``sequential`` (the default) the
    calibrated tensors are then encoded block by block, each block's statistics
    measured on what the blocks before it decode to (``calibrate.sequential``;
    ``blocks_progress`` is told of each block); without, all from the original
    model's statistics.  ``extra`` adds entries of its own after the directory's
    (an exported ONNX graph, ``onnx_export.ExportedGraph.add_to``) and returns
    metadata to add.  Returns notes for the user (what head pruning removed).
    """
    plan = plan_conversion(src)
    policy = policy or lossless_policy()
    if os.path.abspath(dst) == os.path.abspath(src):
        raise InputError("the output must not be the input")
    alone, groups = choose_chains(plan, policy)
    if calibrations is None:
        calibrations = calibrate_for(plan, policy, calibration_text, threads, sequential=sequential)
    stats = calibrations if isinstance(calibrations, Statistics) else Statistics.of(calibrations)
    pruned, pruning = prune_heads(plan, policy, stats)
    alone.update(mixed_precision(plan, policy, stats, set(alone), pruned, calibration_text, threads))
    with Writer(dst, force=force, codec=codec, threads=threads, progress=progress) as w:
        chains = store_shared(w, alone, groups)
        done = set()
        if sequential and stats.methods:
            done = _encode_sequentially(w, plan, chains, stats, calibration_text, threads, blocks_progress, pruned)
        elif stats.methods and set(stats.methods) - set(stats.kept):
            raise UsageError(
                "the calibration statistics of a survey hold no Hessians for the blocks; encode them sequentially"
            )
        first_metadata = None
        for rel, st in plan.safetensors:
            _add_safetensors(w, rel, st, chains, stats.kept, done, pruned)
            if first_metadata is None:
                first_metadata = st.metadata
        for rel, full in plan.others:
            _add_plain_file(w, rel, full)
        metadata = dict(first_metadata or {})
        if extra is not None:
            metadata.update(extra(w))
        w.set_metadata(metadata)
    return [pruning] if pruning else []


def _encode_sequentially(
    w: Writer,
    plan: Plan,
    chains: dict,
    stats: Statistics,
    text,
    threads: int | None,
    progress: Progress | None,
    pruned: dict,
) -> set[str]:
    """Stores the calibrated tensors block by block (``calibrate.sequential``); returns their names."""
    from .compress.calibrate import torch as calibrate

    tensors = {t.name: (st, t) for _, st in plan.safetensors for t in st.tensors}
    methods = {name: method for name, method in stats.methods.items() if name in chains}

    def encode(name: str, calibration) -> np.ndarray:
        st, t = tensors[name]
        chain, refs = chains[name]
        original = read_tensor(st, t)
        values = pruned.get(name, original)
        return w.add_transformed_decoded(
            name, t.dtype, values, chain, refs=refs, calibration=calibration, reference=original
        )

    calibrate.sequential(plan.root, methods, text or calibrate.default_text(), encode, stats.kept, threads, progress)
    return set(methods)


def _add_safetensors(
    w: Writer,
    rel: str,
    st: StFile,
    chains: dict,
    calibrations: dict,
    done: set[str] = frozenset(),
    pruned: dict | None = None,
) -> None:
    read_at, close = st.reader()
    try:
        for t in st.tensors:
            chain, refs = chains.get(t.name, (None, None))
            if t.name in done:  # stored already, block by block
                continue
            if chain is None:
                w.add_tensor(t.name, t.dtype, t.shape, lambda o, n, b=t.begin: read_at(b + o, n))
            else:
                original = _load(read_at, t)
                values = pruned[t.name] if pruned and t.name in pruned else original
                w.add_transformed(
                    t.name, t.dtype, values, chain, refs=refs, calibration=calibrations.get(t.name), reference=original
                )
    finally:
        close()
    header = st.header if st.exact else build_header([(t.name, t.dtype, t.shape) for t in st.tensors], st.metadata)
    w.add_safetensors_layout(rel, header, [t.name for t in st.tensors])


def _load(read_at, t: StTensor) -> np.ndarray:
    storage = np.dtype(DTYPES[t.dtype].numpy_storage)
    return np.frombuffer(read_at(t.begin, t.end - t.begin), storage).reshape(t.shape)


def choose_chains(plan: Plan, policy: Policy, roles: dict[str, TensorRole] | None = None) -> tuple[dict, dict]:
    """Each tensor's chain: ({name: chain} for codecs that share nothing, {group: members} for the rest).

    A codec that declares shared state (``TensorCodec.shared_group``, e.g. the
    base of ``normdelta``) groups the tensors that share one state; the
    converter needs no knowledge of the codec.  Refuses a policy that asks for
    chains but changes no tensor, before anything is written.  ``roles``
    (default: ``plan_roles``) lets another input format (ONNX) give roles of its own.
    """
    if roles is None:
        roles = plan_roles(plan) if policy.uses_roles else {}
    alone, groups = {}, {}
    for _, st in plan.safetensors:
        for t in st.tensors:
            rule = policy.choose_rule(t.name, t.dtype, t.shape, roles.get(t.name))
            if rule is None:
                continue
            chain = input_axis_grouped(rule.chain, rule, roles.get(t.name))
            key = chain.codec.shared_group(t.dtype, tuple(t.shape))
            if key is None:
                alone[t.name] = chain
            else:
                groups.setdefault((chain.codec.name, t.dtype, tuple(t.shape), key), []).append((st, t, chain))
    if not policy.lossless and not alone and not groups:
        raise UsageError(
            f"{plan.root or '.'}: the codec chain, recipe or preset applies to no tensor (a chain takes "
            "floating-point tensors its codec accepts; --codec takes the 2-D ones); nothing written"
        )
    return alone, groups


def needs_transpose(chain: Chain, rule: Rule, role: TensorRole | None) -> bool:
    """Whether a weight stored input x output should get ``transpose(values=chain)``: its chain
    groups along the last (output) axis, and its rule did not select it by ``input_last``
    (a rule that does gets exactly the chain it names)."""
    return (
        role is not None
        and role.input_last is False
        and rule.input_last is None
        and not chain.lossless
        and chain.codec.groups_last_axis()
    )


def input_axis_grouped(chain: Chain, rule: Rule, role: TensorRole | None) -> Chain:
    """The chain a tensor gets: wrapped in ``transpose`` where ``needs_transpose`` says, so
    that the groups run along the weight's input axis, as quantization (and ONNX Runtime's
    MatMulNBits) wants them."""
    if not needs_transpose(chain, rule, role):
        return chain
    return Chain(Transpose(), {"values": chain})


def chosen_rules(
    plan: Plan, policy: Policy, roles: dict[str, TensorRole] | None = None
) -> dict[str, tuple[StFile, StTensor, object]]:
    """{tensor name: (file, tensor, rule)} for every tensor a rule encodes (``roles`` as for ``choose_chains``)."""
    if roles is None:
        roles = plan_roles(plan) if policy.uses_roles else {}
    chosen = {}
    for _, st in plan.safetensors:
        for t in st.tensors:
            rule = policy.choose_rule(t.name, t.dtype, t.shape, roles.get(t.name))
            if rule is not None:
                chosen[t.name] = (st, t, rule)
    return chosen


def calibration_methods(plan: Plan, policy: Policy) -> dict[str, str]:
    """{tensor name: calibration method} for the tensors whose rule asks for one."""
    if not any(rule.calibration for rule in policy.rules):
        return {}
    methods = {}
    for name, (_, _, rule) in chosen_rules(plan, policy).items():
        if rule.calibration:
            for chain in (rule.chain, *rule.upgrades):
                if rule.calibration not in chain.codec.calibrations:
                    raise UsageError(
                        f"tensor {name!r}: {chain.codec.name} has no {rule.calibration!r} "
                        f"encoder (it has: {', '.join(chain.codec.calibrations) or 'none'})"
                    )
            methods[name] = rule.calibration
    return methods


def mixed_precision(
    plan: Plan,
    policy: Policy,
    stats: Statistics,
    names: set[str],
    pruned: dict | None = None,
    text=None,
    threads: int | None = None,
    roles: dict[str, TensorRole] | None = None,
) -> dict:
    """{tensor name: upgrade chain} for the tensors of ``names`` that mixed precision upgrades
    (``converters/compress/mixed.py``); codecs that share state across tensors are never swapped.
    Scores come from the survey (``stats.candidates``) or are computed here; ``pruned`` holds
    the tensors head pruning changed (scored here as pruned; a survey scored them before).
    With ``budget_sensitivity = "model"`` each score is the model's drift on ``text`` (the
    calibration text) with that tensor alone encoded (``converters/compress/sensitivity.py``).  ``roles``
    as for ``choose_chains``."""
    if policy.budget_bits is None:
        return {}
    from .compress.mixed import candidate, pick

    pruned = pruned or {}
    if roles is None:
        roles = plan_roles(plan) if policy.uses_roles else {}
    upgradable = {
        name: entry for name, entry in chosen_rules(plan, policy, roles).items() if entry[2].upgrades and name in names
    }
    probe = None
    if policy.budget_sensitivity == "model" and upgradable:
        from .compress.calibrate import torch as calibrate
        from .compress.sensitivity import ModelProbe

        probe = ModelProbe(plan.root, text or calibrate.default_text(), threads)

    def score(name: str, st, t, rule: Rule):
        x = to_float32(pruned[name] if name in pruned else read_tensor(st, t), t.dtype)
        measure = (lambda decoded: probe.drift(name, decoded)) if probe else None
        if needs_transpose(rule.chain, rule, roles.get(name)):
            # Scored as the chains will encode it: the transpose's values, measured back in place.
            x, measure = np.ascontiguousarray(x.T), measure and (lambda decoded: probe.drift(name, decoded.T))
        return candidate(name, x, rule.chain, rule.upgrades, stats.kept.get(name), policy.budget_counts, measure)

    scored = [stats.candidates.get(name) or score(name, st, t, rule) for name, (st, t, rule) in upgradable.items()]
    return {
        name: input_axis_grouped(upgradable[name][2].upgrades[level - 1], upgradable[name][2], roles.get(name))
        for name, level in pick(scored, policy.budget_bits).items()
    }


def prune_heads(plan: Plan, policy: Policy, stats) -> tuple[dict[str, np.ndarray], str | None]:
    """The tensors that the policy's ``prune_heads`` changes, in their stored dtype, and a summary
    line (``converters/compress/heads.py``); ({}, None) without it.  The o-projections' calibration
    statistics score the heads, so their rule must calibrate."""
    if not policy.prune_heads:
        return {}, None
    from .compress import heads

    roles = plan_roles(plan)
    config = read_config(plan) or {}
    stats = stats if isinstance(stats, Statistics) else Statistics.of(stats)
    _check_prune_heads(roles, stats.methods)
    tensors = {t.name: (st, t) for _, st in plan.safetensors for t in st.tensors}
    attention = {"attn_q", "attn_k", "attn_v", "attn_o", "attn_qkv", "linear_bias"}
    weights = {
        name: to_float32(read_tensor(*tensors[name]), tensors[name][1].dtype)
        for name, r in roles.items()
        if r.role in attention and r.layer is not None
    }
    try:
        scores = stats.head_scores or heads.head_scores(config, roles, stats.kept, weights)
        chosen = heads.select_share(scores, policy.prune_heads)
        changed = heads.prune(config, roles, weights, chosen)
    except ValueError as exc:
        raise UsageError(f"prune_heads: {exc}") from None
    stored = {name: from_float32(array, tensors[name][1].dtype) for name, array in changed.items()}
    return stored, heads.summary(config, chosen)


@dataclass
class Statistics:
    """What calibration measured on the original model, as the converter keeps it.

    ``methods``: every calibrated tensor's method.  ``kept``: the Calibrations
    held for encoding: all of them (``calibrate.collect``), or, after a survey,
    only those of the weights outside the blocks.  A survey (``calibrate.survey``)
    holds one block's statistics at a time and keeps only the decisions they
    feed: mixed precision's scores (``candidates``) and each layer's head scores.
    """

    methods: dict[str, str]
    kept: dict
    candidates: dict = field(default_factory=dict)
    head_scores: dict = field(default_factory=dict)

    @classmethod
    def of(cls, calibrations: dict) -> Statistics:
        """Every tensor's statistics held (``calibrate.collect``): decisions are computed from them."""
        return cls({name: c.method for name, c in calibrations.items()}, dict(calibrations))


def _check_prune_heads(roles: dict, methods: dict[str, str]) -> None:
    """prune_heads scores heads with the o-projections' statistics: each must be calibrated."""
    o_weights = [name for name, r in roles.items() if r.role == "attn_o"]
    missing = [name for name in o_weights if name not in methods]
    if not o_weights or missing:
        raise UsageError(
            "prune_heads scores heads with the calibration statistics of the attention output "
            'projections: give the attn_o rule calibration = "gptq"'
            + (f" (none for {missing[0]})" if missing else " (this model has none)")
        )


def calibrate_for(
    plan: Plan, policy: Policy, text=None, threads: int | None = None, progress=None, sequential: bool = True
) -> Statistics:
    """The calibration statistics the policy's rules ask for (torch and transformers run the model).

    For a sequential conversion, a survey: block by block, scoring as it goes,
    so that memory holds one block's statistics; otherwise every statistic at once.
    """
    methods = calibration_methods(plan, policy)
    if policy.prune_heads:  # refused before the model runs, not after
        _check_prune_heads(plan_roles(plan), methods)
    if not methods:
        return Statistics({}, {})
    from .compress.calibrate import torch as calibrate

    text = text or calibrate.default_text()
    if not sequential or (policy.budget_sensitivity == "model" and policy.budget_bits is not None):
        # The model's drift is measured on calibrated encodes: every Hessian is held at once.
        return Statistics.of(calibrate.collect(plan.root, methods, text, threads, progress))
    stats = Statistics(dict(methods), {})
    stats.kept = calibrate.survey(plan.root, methods, text, _scorer(plan, policy, stats), threads, progress)
    return stats


def _scorer(plan: Plan, policy: Policy, stats: Statistics):
    """What a survey does with one weight's statistics: mixed precision's and head pruning's scores."""
    from .compress.mixed import candidate

    chosen = chosen_rules(plan, policy)
    roles = plan_roles(plan) if policy.prune_heads else {}
    geometry = None
    if policy.prune_heads:
        from .compress import heads

        geometry = heads.heads_of(read_config(plan) or {})

    def score(name: str, calibration) -> None:
        st, t, rule = chosen[name]
        role = roles.get(name)
        wants_heads = role is not None and role.role == "attn_o" and role.input_last is not False
        if not (rule.upgrades and policy.budget_bits is not None) and not wants_heads:
            return
        x = to_float32(read_tensor(st, t), t.dtype)
        if rule.upgrades and policy.budget_bits is not None:
            stats.candidates[name] = candidate(name, x, rule.chain, rule.upgrades, calibration, policy.budget_counts)
        if wants_heads:
            try:
                stats.head_scores[role.layer] = heads.layer_scores(x.astype(np.float64), calibration.hessian, geometry)
            except ValueError as exc:
                raise UsageError(f"prune_heads: {exc}") from None

    return score


def plan_roles(plan: Plan) -> dict[str, TensorRole]:
    """Every tensor's role (``roles.classify``), from the headers and the directory's config.json."""
    tensors = {t.name: (t.dtype, t.shape) for _, st in plan.safetensors for t in st.tensors}
    return classify(tensors, read_config(plan))


def read_config(plan: Plan) -> dict | None:
    """The model's config.json (None when the input has none); InputError when it is not a JSON object."""
    import json

    path = next((full for rel, full in plan.others if rel == "config.json"), None)
    if path is None:
        return None
    try:
        with open(path, "rb") as fh:
            config = json.load(fh)
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror})") from None
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise InputError(f"{path}: not valid JSON, which tensor roles need ({str(exc)[:100]})") from None
    if not isinstance(config, dict):
        raise InputError(f"{path}: not a JSON object, which tensor roles need")
    return config


def store_shared(w: Writer, alone: dict, groups: dict) -> dict:
    """Stores each group's shared state as internal tensors, first; returns {name: (chain, refs)}.

    The members of a group are loaded together, once, to build their state.
    """
    chosen = {name: (chain, None) for name, chain in alone.items()}
    for (_, dtype, shape, _), members in sorted(groups.items(), key=lambda kv: str(kv[0])):
        values = [to_float32(read_tensor(st, t), dtype) for st, t, _ in members]
        shared = members[0][2].codec.build_shared(values, dtype, shape)
        for name, array in shared.items():
            w.add_array(name, np.ascontiguousarray(array, np.float32), dedup=False, internal=True)
        for _, t, chain in members:
            chosen[t.name] = (Chain(chain.codec.bind_shared(list(shared)), chain.parts), shared)
    return chosen


def read_tensor(st: StFile, t: StTensor) -> np.ndarray:
    read_at, close = st.reader()
    try:
        return _load(read_at, t)
    finally:
        close()


def _add_plain_file(w: Writer, rel: str, full: str) -> None:
    size = os.path.getsize(full)
    fd = os.open(full, os.O_RDONLY)
    try:
        w.add_file(rel, read_at=lambda o, n: os.pread(fd, n, o), size=size)
    finally:
        os.close(fd)


# -- decoding ---------------------------------------------------------------------------

from rbeformat.atomic import check_directory_target, check_target  # noqa: E402  (decoding's own checks)


def decode(
    src: str,
    dst: str,
    *,
    force: bool = False,
    verify: bool = True,
    threads: int | None = None,
    progress: Progress | None = None,
    max_memory: int | None = None,
) -> list[str]:
    """Decodes an rbe file to a HF directory, or to one .safetensors file if dst ends so.

    Into an existing directory (only with ``force``) it replaces just the files
    the container holds and returns the relative paths of the other files
    there, which it leaves alone.  ``progress`` receives tensor bytes as they
    are written; they add up to ``decoded_tensor_bytes``.  Embedded files and
    stored tensors are written a batch of chunks at a time, never held whole;
    ``max_memory`` is the Reader's memory limit (rbeformat.budget).
    """
    single = dst.endswith(".safetensors")
    if single:
        check_target(dst, force)
    else:
        check_directory_target(dst, force)
    with Reader(src, threads=threads, max_memory=max_memory) as r:
        if single:
            with atomic_file(dst, force) as fh:
                _write_single_safetensors(r, fh, verify, progress)
            return []
        with atomic_directory(dst, force, _directory_files(r)) as out:
            write_directory(r, out, verify, progress)
        return out.kept()


def decoded_tensor_bytes(r: Reader) -> int:
    """Bytes of tensor data a decode writes: every tensor a user sees, aliases included, densely."""
    return sum(math.prod(r.entry(name).shape) * r.entry(name).dtype.itemsize for name in r.keys())


# An ONNX graph exported at conversion (``rbe convert --onnx``, converters/onnx_export.py) is no part of the
# HF directory: its files (named by these metadata keys) and its own tensors are left out of a decode.
EXPORTED_GRAPH_KEYS = (GRAPH_KEY, MAPPING_KEY)


def exported_graph_parts(r: Reader) -> tuple[set[str], set[str]]:
    """(file paths, tensor names) of the exported ONNX graph a container carries beside a HF directory."""
    metadata = r.metadata()
    if MAPPING_KEY not in metadata:  # an .onnx input's graph is the model itself
        return set(), set()
    files = {metadata[key] for key in EXPORTED_GRAPH_KEYS if key in metadata}
    listed = {name for f in r.files().values() for name in f.tensors}
    tensors = {name for name in r.keys() if name.startswith(OWN_PREFIX) and name not in listed}
    return files, tensors


def _write_single_safetensors(r: Reader, fh, verify: bool, progress: Progress | None) -> None:
    shards = [f for f in r.files().values() if f.role == "safetensors-header"]
    if len(shards) == 1:
        header = r.read_file(shards[0].path)
        names = shards[0].tensors
    else:
        graph_tensors = exported_graph_parts(r)[1]
        names = [name for name in r.keys() if name not in graph_tensors]
        header = build_header([(n, r.entry(n).dtype.name, r.entry(n).shape) for n in names], r.metadata())
    write_shard(r, header, names, fh.write, verify, progress)


def write_shard(r: Reader, header: bytes, names: list[str], write, verify: bool, progress) -> None:
    _check_header_matches(r, header, names)
    write(struct.pack("<Q", len(header)))
    write(header)
    for name in names:
        for data in r.iter_tensor_bytes(name, verify=verify):
            write(data)
            if progress:
                progress(len(data))


def _check_header_matches(r: Reader, header: bytes, names: list[str]) -> None:
    """The stored header must describe exactly the listed tensors, back to back."""
    import json

    check_json_text(header, "stored safetensors header", r.max_memory)
    hook = unique_keys(lambda key: ValueError(f"the key {key!r:.80} appears twice"))
    try:
        obj = json.loads(header, object_pairs_hook=hook)
        obj.pop("__metadata__", None)
        pos = 0
        for name in names:
            entry, info = r.entry(name), obj.pop(name)
            size = math.prod(entry.shape) * entry.dtype.itemsize
            if (
                info["dtype"] != entry.dtype.name
                or tuple(info["shape"]) != entry.shape
                or info["data_offsets"] != [pos, pos + size]
            ):
                raise ValueError(name)
            pos += size
        if obj:
            raise ValueError("extra entries")
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
        raise FormatError(f"stored safetensors header does not match the tensors ({exc})") from None


# A container written by save_file has no safetensors layout: its tensors become this file.
_MERGED = "model.safetensors"


def _directory_files(r: Reader) -> list[str]:
    """The relative paths a directory decode writes; refuses a container that cannot be one."""
    graph_files, graph_tensors = exported_graph_parts(r)
    files = {path: f for path, f in r.files().items() if path not in graph_files}
    listed = {name for f in files.values() for name in f.tensors}
    # keys() omits internal tensors; an exported graph's own tensors belong to no file either
    unlisted = [name for name in r.keys() if name not in listed and name not in graph_tensors]
    if listed and unlisted:
        raise FormatError(
            f"tensors {unlisted[:3]} belong to no safetensors file of the directory; "
            "decode to a single .safetensors file instead"
        )
    if listed:
        return sorted(files)
    if _MERGED in files:
        raise FormatError(
            f"the container's tensors would be written to {_MERGED}, but it also holds a file "
            "of that name; decode to a single .safetensors file instead"
        )
    return sorted(files) + [_MERGED]


def write_directory(r: Reader, out, verify: bool, progress: Progress | None) -> None:
    graph_files = exported_graph_parts(r)[0]
    files = {path: f for path, f in r.files().items() if path not in graph_files}
    for path, entry in sorted(files.items()):
        with out.create(path) as fh:
            if entry.role == "safetensors-header":
                write_shard(r, r.read_file(path), entry.tensors, fh.write, verify, progress)
            else:
                _write_file(r, path, fh.write, verify)
    if not any(f.role == "safetensors-header" for f in files.values()):
        names = r.keys()
        header = build_header([(n, r.entry(n).dtype.name, r.entry(n).shape) for n in names], r.metadata())
        with out.create(_MERGED) as fh:
            write_shard(r, header, names, fh.write, verify, progress)


def _write_file(r: Reader, path: str, write, verify: bool) -> None:
    """An embedded file, written a batch of chunks at a time while hashed; a digest mismatch after the last
    raises ChecksumError, which discards the output being written."""
    for data in r.iter_file(path, verify=verify):
        write(data)
