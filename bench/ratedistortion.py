"""Rate-distortion of rbe's lossy tensor codecs on real Linear weights, beside standard anchors.

For each model, the 2-D weights of the attention and MLP projections (embeddings,
norms and biases left out) are encoded by every method at several settings.  rbe's
codecs are measured as they are really stored: each setting writes a real container
with ``rbeformat.Writer.add_transformed``, and its cost is the sum of the stored
chunk lengths of every part of every tensor (codes, scales, codebooks, seeds,
indices, after rbe's lossless compression of the parts).  Anchors computed in the
same run on the same weights: round-to-nearest with absmax (symmetric) or min/max
(asymmetric) fp16 scales, GGUF's own quantizers from the ``gguf`` package, and HQQ
when it is installed.

    python -m bench.ratedistortion                      # MiniLM and SmolLM2-135M
    python -m bench.ratedistortion --quick              # MiniLM only, fewer settings
    python -m bench.ratedistortion --models smollm2

One table is printed; its rows and every per-tensor measurement go to
bench/out/ratedistortion.json and one plot per model to
bench/out/ratedistortion-<model>.png (``-quick`` is added to the names for --quick).
``--from-json bench/out/ratedistortion.json`` rebuilds the report from a saved run.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import math
import os
import platform
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from rbe_converters.safetensors_io import read_header
from rbeformat import Reader, Writer
from rbeformat.chain import parse_chain
from rbeformat.codecs.registry import TENSOR_CODECS
from rbeformat.manifest import blobs_of

from .models import minilm_dir, smollm2_dir

OUT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "out")
MODELS = {"minilm": ("all-MiniLM-L6-v2", minilm_dir), "smollm2": ("SmolLM2-135M", smollm2_dir)}
DECODE_REPEATS = 2
# An rbe setting whose encoding of all the weights is projected (from its time on the
# first layer) to take longer than --budget-s continues on every 10th layer only, from
# the first: on SmolLM2 layers 0, 10 and 20, about as many weights as all of MiniLM's.
SUBSET_LAYER_STRIDE = 10
VECTOR_FAMILIES = ("rbe vq", "rbe seed")
SMOLLM2_CAVEAT = (
    "SmolLM2 caveat: these fp32 weights are the dequantized Q4_1 GGUF the model ships as, so every\n"
    "32-wide block of a row lies on a 4-bit grid (at most 16 values, value = q*d + m). A 4-bit\n"
    "asymmetric method with 32-wide groups (rbe gquant 4b asym g32, RTN asym 4b g32, GGUF Q4_1)\n"
    "reproduces them almost exactly: an artefact of the source, not a property of the codec.\n"
    "Compare 4-bit methods at other group sizes here, and treat MiniLM (genuine fp32) as the fair\n"
    "test of 4-bit methods."
)


# -- data -------------------------------------------------------------------------------

LAYER = re.compile(r"\.layers?\.(\d+)\.")


def is_linear(name: str, shape: tuple[int, ...]) -> bool:
    """2-D projection weights of attention and MLP blocks (no embeddings, norms, biases, head)."""
    low = name.lower()
    return (
        len(shape) == 2
        and low.endswith(".weight")
        and "embed" not in low
        and "norm" not in low
        and "lm_head" not in low
        and LAYER.search(name) is not None
    )


def load_linear(model_dir: str) -> list[tuple[str, np.ndarray]]:
    """The fp32 Linear weights of ``model.safetensors``, in file order, as float32 arrays."""
    path = os.path.join(model_dir, "model.safetensors")
    st = read_header(path)
    data = np.memmap(path, dtype=np.uint8, mode="r")
    out = []
    for t in st.tensors:
        if t.dtype == "F32" and is_linear(t.name, tuple(t.shape)):
            raw = data[st.data_start + t.begin : st.data_start + t.end]
            out.append((t.name, np.array(raw).view("<f4").reshape(t.shape).astype(np.float32)))
    del data
    return out


def layer_of(name: str) -> int:
    return int(LAYER.search(name).group(1))


# -- methods ----------------------------------------------------------------------------


@dataclass
class Method:
    family: str  # a line of the plot
    label: str  # the table's method column
    setting: str
    quick: bool = False
    chain: str | None = None  # rbe methods
    run: Callable | None = None  # anchors: run(x) -> (bits, decode(), encode seconds)


@dataclass
class Result:
    model: str
    method: Method
    # name -> (stored bits, raw payload bits, squared error, squared norm, weights)
    per_tensor: dict[str, tuple[float, float, float, float, int]] = field(default_factory=dict)
    encode_s: float = 0.0
    decode_s: float = 0.0
    note: str = ""
    error: str | None = None

    def aggregate(self, names: list[str] | None = None) -> dict:
        names = list(self.per_tensor) if names is None else [n for n in names if n in self.per_tensor]
        bits, raw, err2, norm2, count = (sum(self.per_tensor[n][i] for n in names) for i in range(5))
        rel = math.sqrt(err2 / norm2) if norm2 else float("nan")
        return {
            "bpw": bits / count if count else float("nan"),
            "raw_bpw": raw / count if count else float("nan"),
            "rel_error": rel,
            "snr_db": -20 * math.log10(rel) if rel > 0 else float("inf"),
            "weights": count,
        }


def gquant_settings(quick: bool) -> list[Method]:
    must = {(4, 32, "sym"), (4, 64, "asym"), (5, 32, "sym"), (3, 64, "asym"), (2, 64, "asym")}
    grid = [(b, g, "sym") for b in (2, 3, 4, 5, 6, 8) for g in (32, 64, 128)]
    grid += [(b, g, "asym") for b in (2, 3, 4, 5) for g in (32, 64, 128)] + [(2, 256, "asym"), (3, 256, "asym")]
    out = []
    for bits, group, mode in grid:
        extra = "" if mode == "sym" else ", mode=asym"
        out.append(
            Method(
                f"rbe gquant {mode}",
                "rbe gquant",
                f"{bits}b {mode} g{group}",
                quick=(bits, group, mode) in must,
                chain=f"gquant(bits={bits}, group={group}{extra})",
            )
        )
    dq = "gquant(bits=8, group=0)"
    for bits, group, mode, quick in (
        (4, 32, "sym", True),
        (4, 64, "asym", False),
        (3, 64, "asym", False),
        (2, 32, "asym", False),
    ):
        side = f"scales={dq}" if mode == "sym" else f"mode=asym, scales={dq}, zeros={dq}"
        out.append(
            Method(
                "rbe gquant dq",
                "rbe gquant+dq",
                f"{bits}b {mode} g{group} dq8",
                quick=quick,
                chain=f"gquant(bits={bits}, group={group}, {side})",
            )
        )
    return out


def other_rbe_settings() -> list[Method]:
    out = []
    for bits, quick in ((2, True), (3, False), (4, True)):
        out.append(
            Method("rbe palette", "rbe palette", f"{bits}b row", quick=quick, chain=f"palette(bits={bits}, scope=row)")
        )
    for bits in (3, 4, 5, 6):
        out.append(Method("rbe palette", "rbe palette", f"{bits}b tensor", chain=f"palette(bits={bits}, scope=tensor)"))
    for dim, bits, quick in ((8, 12, False), (4, 8, True), (4, 10, False), (2, 6, False), (2, 8, True)):
        out.append(Method("rbe vq", "rbe vq", f"d{dim} k{2**bits}", quick=quick, chain=f"vq(dim={dim}, bits={bits})"))
    for text, setting, quick in seed_settings():
        out.append(Method("rbe seed", "rbe seed", setting, quick=quick, chain=text))
    q4 = "gquant(bits=4, group=64, mode=asym)"
    for rank_bits, res_bits, quick in ((0.5, 2, True), (0.5, 3, False)):
        out.append(
            Method(
                "rbe lowrank+res",
                "rbe lowrank+res",
                f"{rank_bits} bpw factors + {res_bits}b residual",
                quick=quick,
                chain=f"lowrank(bits={rank_bits}, factor_bits=4.5, A={q4}, B={q4}, "
                f"residual=gquant(bits={res_bits}, group=64, mode=asym))",
            )
        )
    return out


def seed_settings() -> list[tuple[str, str, bool]]:
    """(chain, setting, quick) for the seed codec at 4, 3 and 2 bits per weight.

    A block of C weights costs (seed_bits + rank * coef_bits + exp_bits) / C bits:
    (16 + 3*4 + 4) / 8 = 4, (16 + 4*4 + 4) / 12 = 3, (16 + 4*3 + 4) / 16 = 2.
    """
    out = []
    for block, rank, coef, quick in ((8, 3, 4, False), (12, 4, 4, True), (16, 4, 3, False)):
        bpw = (16 + rank * coef + 4) / block
        out.append(
            (
                f"seed(block={block}, rank={rank}, coef_bits={coef}, exp_bits=4, seed_bits=16)",
                f"{bpw:g} bpw C{block} P{rank} Q{coef}",
                quick,
            )
        )
    return out


# -- anchors (numpy, not rbe) -------------------------------------------------------------


def _groups(x: np.ndarray, group: int | None) -> tuple[np.ndarray, int, int]:
    """(rows * groups, g) view, edge-padded so a short last group keeps its own min/max."""
    rows, n = x.shape
    g = n if group is None else group
    ng = -(-n // g)
    if ng * g != n:
        x = np.pad(x, ((0, 0), (0, ng * g - n)), mode="edge")
    return x.reshape(rows * ng, g), ng, g


def rtn(bits: int, group: int | None, mode: str) -> Callable:
    """Round-to-nearest: absmax sym scale or min/max asym scale and offset, fp16, per group."""

    def run(x: np.ndarray):
        rows, n = x.shape
        t0 = time.perf_counter()
        w, ng, g = _groups(x, group)
        if mode == "sym":
            top = 2 ** (bits - 1) - 1
            s = (np.abs(w).max(axis=1) / top).astype(np.float16).astype(np.float32)
            inv = np.divide(1, s, out=np.zeros_like(s), where=s > 0)[:, None]
            q = np.clip(np.rint(w * inv), -top - 1, top).astype(np.int8)
            m = None
        else:
            top = 2**bits - 1
            m = w.min(axis=1).astype(np.float16).astype(np.float32)
            s = ((w.max(axis=1) - m) / top).astype(np.float16).astype(np.float32)
            inv = np.divide(1, s, out=np.zeros_like(s), where=s > 0)[:, None]
            q = np.clip(np.rint((w - m[:, None]) * inv), 0, top).astype(np.uint8)
        enc = time.perf_counter() - t0

        def decode():
            y = q.astype(np.float32) * s[:, None]
            if m is not None:
                y += m[:, None]
            return y.reshape(rows, ng * g)[:, :n]

        side = 16 if mode == "sym" else 32
        return bits * x.size + side * rows * ng, decode, enc

    return run


def gguf_anchor(type_name: str) -> Callable:
    import gguf
    from gguf import quants

    qtype = getattr(gguf.GGMLQuantizationType, type_name)

    def run(x: np.ndarray):
        t0 = time.perf_counter()
        q = quants.quantize(x, qtype)
        enc = time.perf_counter() - t0
        return q.nbytes * 8, lambda: quants.dequantize(q, qtype).reshape(x.shape), enc

    return run


def hqq_anchor(bits: int, group: int) -> Callable:
    import torch
    from hqq.core.quantize import Quantizer

    def run(x: np.ndarray):
        t0 = time.perf_counter()
        wq, meta = Quantizer.quantize(
            torch.from_numpy(x),
            nbits=bits,
            group_size=group,
            axis=1,
            device="cpu",
            compute_dtype=torch.float32,
            bitpack=False,
        )
        # Scales and zeros are stored as fp16 (HQQ's default compute dtype), codes as bits-bit integers.
        meta["scale"] = meta["scale"].half().float()
        meta["zero"] = meta["zero"].half().float()
        enc = time.perf_counter() - t0

        def decode():
            with torch.no_grad():
                return Quantizer.dequantize(wq, meta).numpy().reshape(x.shape)

        return bits * x.size + 32 * (x.size // group), decode, enc

    return run


def hqq_version() -> str | None:
    try:
        import hqq.core.quantize  # noqa: F401

        return importlib.metadata.version("hqq")
    except Exception:  # any import failure means: not usable here
        return None


def anchor_settings() -> list[Method]:
    out = []
    for mode in ("sym", "asym"):
        for bits in (2, 3, 4):
            for group in (32, 64, 128, None):
                g = "row" if group is None else f"g{group}"
                quick = (bits, group) in ((4, 32), (4, 64), (3, 64), (2, 64))
                out.append(
                    Method(f"RTN {mode}", f"RTN {mode}", f"{bits}b {g}", quick=quick, run=rtn(bits, group, mode))
                )
    for t in ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"):
        out.append(Method("GGUF", "GGUF", t, quick=t in ("Q4_0", "Q5_0", "Q8_0"), run=gguf_anchor(t)))
    if hqq_version():
        for bits in (4, 3, 2):
            out.append(Method("HQQ", "HQQ", f"{bits}b g64", quick=bits == 4, run=hqq_anchor(bits, 64)))
    return out


# -- running ------------------------------------------------------------------------------


def _instrument(chain, clock: dict) -> None:
    """Times every encode and decode call of the chain's codecs (the writer decodes to measure error)."""
    if chain.codec is None:
        return
    codec = chain.codec
    encode, decode = codec.encode, codec.decode

    def timed(fn, key):
        def call(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                clock[key] += time.perf_counter() - t0

        return call

    codec.encode, codec.decode = timed(encode, "encode"), timed(decode, "decode")
    for part in chain.parts.values():
        _instrument(part, clock)


def run_rbe(
    result: Result, tensors: list[tuple[str, np.ndarray]], workdir: str, budget_s: float, limit_s: float
) -> None:
    """Writes the tensors through the chain into a container, then reads them back.

    The first layer goes first; if all the tensors are projected to take longer than
    ``budget_s``, only the layers of the deterministic subset follow it.
    """
    chain = parse_chain(result.method.chain, TENSOR_CODECS)
    clock = {"encode": 0.0, "decode": 0.0}
    _instrument(chain, clock)
    path = os.path.join(workdir, "rd.rbe")
    layers = sorted({layer_of(n) for n, _ in tensors})
    first = [(n, x) for n, x in tensors if layer_of(n) == layers[0]]
    rest = [(n, x) for n, x in tensors if layer_of(n) != layers[0]]
    subset_layers = layers[::SUBSET_LAYER_STRIDE]
    total = sum(x.size for _, x in tensors)
    done = []
    t0 = time.perf_counter()
    with Writer(path, force=True) as w:
        for stage, group in enumerate((first, rest)):
            if stage == 1 and len(subset_layers) < len(layers):
                projected = (time.perf_counter() - t0) * total / sum(x.size for _, x in first)
                if projected > budget_s:
                    group = [(n, x) for n, x in group if layer_of(n) in subset_layers]
                    result.note = (
                        f"layers {','.join(map(str, subset_layers))} only (all layers: "
                        f"~{projected / 60:.0f} min projected)"
                    )
            for name, x in group:
                if time.perf_counter() - t0 > limit_s:
                    result.note = f"stopped after {len(done)} tensors: over {limit_s:.0f} s"
                    break
                w.add_transformed(name, "F32", x, chain, dedup=False)
                done.append((name, x))
            if result.note.startswith("stopped"):
                break
    # The writer decodes every tensor once to record its error; that is not encoding.
    result.encode_s = time.perf_counter() - t0 - clock["decode"]
    best = math.inf
    with Reader(path) as r:
        for rep in range(DECODE_REPEATS):
            spent = 0.0
            for name, x in done:
                t = time.perf_counter()
                y = r.get_tensor(name)
                spent += time.perf_counter() - t
                if rep == 0:
                    entry = r.stored_entry(name)
                    stored = sum(c.length for _, blob in blobs_of(entry.transform) for c in blob.chunks)
                    result.per_tensor[name] = (8.0 * stored, float(raw_bits(entry.transform)), *_errors(x, y), x.size)
                del y
            best = min(best, spent)
    result.decode_s = best
    os.remove(path)


def run_anchor(result: Result, tensors: list[tuple[str, np.ndarray]]) -> None:
    best = [0.0] * DECODE_REPEATS
    for name, x in tensors:
        bits, decode, enc = result.method.run(x)
        result.encode_s += enc
        for rep in range(DECODE_REPEATS):
            t = time.perf_counter()
            y = decode()
            best[rep] += time.perf_counter() - t
            if rep == 0:
                result.per_tensor[name] = (float(bits), float(bits), *_errors(x, y), x.size)
            del y
    result.decode_s = min(best)


def raw_bits(transform) -> int:
    """Bits of the parts as the codecs hand them over, before rbe's lossless packing."""
    total = 0
    for part in transform.parts.values():
        if part.transform is not None:
            total += raw_bits(part.transform)
        else:
            total += 8 * part.dtype.itemsize * math.prod(part.shape)
    return total


def _errors(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    x64 = x.astype(np.float64)
    d = np.asarray(y, dtype=np.float64).reshape(x.shape) - x64
    return float(np.einsum("ij,ij->", d, d)), float(np.einsum("ij,ij->", x64, x64))


def run_model(key: str, quick: bool, budget_s: float, limit_s: float, log) -> list[Result]:
    title, locate = MODELS[key]
    tensors = load_linear(locate())
    log(f"{title}: {len(tensors)} Linear weights, {sum(x.size for _, x in tensors):,} values")
    methods = gquant_settings(quick) + other_rbe_settings() + anchor_settings()
    if quick:
        methods = [m for m in methods if m.quick]
    results = []
    workdir = tempfile.mkdtemp(prefix="rbe-rd-")
    try:
        for method in methods:
            result = Result(key, method)
            results.append(result)
            if method.chain is not None:
                name = method.chain.split("(")[0]
                if name not in TENSOR_CODECS:
                    result.error = f"codec {name!r} is not in this rbe (not registered); skipped"
                    log(f"  {method.label} {method.setting}: {result.error}")
                    continue
            t0 = time.perf_counter()
            try:
                if method.chain is not None:
                    run_rbe(result, tensors, workdir, budget_s, limit_s)
                else:
                    run_anchor(result, tensors)
            except Exception as exc:  # a failing codec is a result to report, not a reason to stop
                result.error = f"{type(exc).__name__}: {exc}"
                result.per_tensor.clear()
            status = result.error or (
                f"{result.aggregate()['bpw']:.3f} bpw, rel.err {result.aggregate()['rel_error']:.4f} {result.note}"
            )
            log(f"  {method.label} {method.setting}: {status} ({time.perf_counter() - t0:.1f} s)")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return results


# -- output -------------------------------------------------------------------------------


def row_of(result: Result) -> dict:
    agg = result.aggregate()
    mb = agg["weights"] * 4 / 1e6
    return {
        "model": MODELS[result.model][0],
        "key": result.model,
        "family": result.method.family,
        "method": result.method.label,
        "setting": result.method.setting,
        "chain": result.method.chain,
        **agg,
        "encode_mb_s": mb / result.encode_s if result.encode_s else None,
        "decode_mb_s": mb / result.decode_s if result.decode_s else None,
        "tensors": len(result.per_tensor),
        "note": result.note,
    }


def table(rows: list[dict]) -> str:
    head = (
        "model",
        "method",
        "setting",
        "bits/weight",
        "rel. error",
        "SNR dB",
        "encode MB/s",
        "decode MB/s",
        "raw b/w",
    )
    body, last = [], None
    for r in rows:
        if last is not None and r["model"] != last:
            body.append(None)
        last = r["model"]
        setting = r["setting"] + (" *" if r["note"] else "")
        body.append(
            (
                r["model"],
                r["method"],
                setting,
                f"{r['bpw']:.3f}",
                f"{r['rel_error']:.4f}",
                f"{r['snr_db']:.1f}",
                _speed(r["encode_mb_s"]),
                _speed(r["decode_mb_s"]),
                f"{r['raw_bpw']:.3f}",
            )
        )
    widths = [max(len(h), *(len(b[i]) for b in body if b)) for i, h in enumerate(head)]

    def fmt(cells):
        return "  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    lines = [fmt(head), fmt(["-" * w for w in widths])]
    lines += ["" if b is None else fmt(b) for b in body]
    return "\n".join(lines)


def _speed(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:.2f}" if v < 10 else f"{v:.0f}"


def comparisons(results: list[Result]) -> list[str]:
    lines = []
    ok = [r for r in results if not r.error and r.per_tensor]
    by_model = {}
    for r in ok:
        by_model.setdefault(r.model, []).append(r)

    def desc(r: Result, names=None) -> str:
        a = r.aggregate(names)
        return f"[{r.method.label} {r.method.setting}] ({a['bpw']:.3f} bpw, rel.err {a['rel_error']:.4f})"

    mini = by_model.get("minilm", [])
    if mini:
        lines.append("MiniLM, rbe against GGUF at the same budget:")
        for budget, gtype in ((4.5, "Q4_0"), (5.5, "Q5_0")):
            rbe = [
                r
                for r in mini
                if r.method.family.startswith("rbe") and r.aggregate()["bpw"] <= budget + 1e-9 and not r.note
            ]
            anchor = [r for r in mini if r.method.family == "GGUF" and r.method.setting == gtype]
            if not rbe or not anchor:
                lines.append(f"  <= {budget} bpw: missing rows (rbe: {len(rbe)}, {gtype}: {len(anchor)})")
                continue
            best = min(rbe, key=lambda r: r.aggregate()["rel_error"])
            e1, e2 = best.aggregate()["rel_error"], anchor[0].aggregate()["rel_error"]
            verdict = "rbe lower" if e1 < e2 else "rbe NOT lower"
            lines.append(
                f"  <= {budget} bpw: best rbe {desc(best)} vs {desc(anchor[0])}: {verdict} ({e1 / e2:.2f}x the error)"
            )
    for key, rs in by_model.items():
        low = sorted(
            (r for r in rs if r.method.family in VECTOR_FAMILIES and r.aggregate()["bpw"] < 2.5),
            key=lambda r: r.aggregate()["bpw"],
        )
        lines.append(
            f"{MODELS[key][0]}, below 2.5 bpw: vq/seed against scalar quantizers at no more bits "
            "(each on the same tensors):"
        )
        if not low:
            lines.append("  no vq or seed row below 2.5 bpw")
            continue
        rtn = [r for r in rs if r.method.family in ("RTN sym", "RTN asym")]
        scalar = [r for r in rs if r.method.family.startswith("rbe gquant")]

        def best_at(cands, names, limit):
            fit = [r for r in cands if r.aggregate(names)["bpw"] <= limit + 1e-9]
            return min(fit, key=lambda r: r.aggregate(names)["rel_error"]) if fit else None

        for r in low:
            names, a = list(r.per_tensor), r.aggregate()
            where = f", on {r.note.split(' (')[0]}" if r.note else ""
            lines.append(f"  {desc(r)}{where}:")
            for cands, what in ((rtn, "best RTN"), (scalar, "best rbe gquant")):
                other = best_at(cands, names, a["bpw"])
                if other is not None:
                    e2 = other.aggregate(names)["rel_error"]
                    lines.append(
                        f"    {what} at <= {a['bpw']:.4f} bpw: {desc(other, names)}: its error "
                        f"{a['rel_error'] / e2:.2f}x, {'lower' if a['rel_error'] < e2 else 'NOT lower'}"
                    )
                    continue
                cheapest = min(cands, key=lambda c: c.aggregate(names)["bpw"], default=None)
                text = f"    {what} at <= {a['bpw']:.4f} bpw: none"
                if cheapest is not None:
                    text += f" (cheapest {cheapest.aggregate(names)['bpw']:.4f} bpw)"
                up = best_at(cands, names, 2.5)
                if up is not None:
                    e2 = up.aggregate(names)["rel_error"]
                    text += (
                        f"; best up to 2.5 bpw: {desc(up, names)}: its error {a['rel_error'] / e2:.2f}x "
                        f"at {up.aggregate(names)['bpw'] - a['bpw']:.3f} fewer bits"
                    )
                lines.append(text)
    return lines


def plot(rows: list[dict], key: str, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mine = [r for r in rows if r["key"] == key]
    fig, ax = plt.subplots(figsize=(10, 6.5))
    families = sorted({r["family"] for r in mine}, key=lambda f: (not f.startswith("rbe"), f))
    markers = "os^vD<>ph*XP"
    colours = plt.get_cmap("tab20").colors
    for i, fam in enumerate(families):
        pts = sorted((r["bpw"], r["rel_error"]) for r in mine if r["family"] == fam and r["rel_error"] > 0)
        if not pts:
            continue
        front, best = [], math.inf  # the lower envelope: lowest error at no more bits
        for b, e in pts:
            if e < best:
                front.append((b, e))
                best = e
        style = "-" if fam.startswith("rbe") else "--"
        colour = colours[(2 * i) % 20 if i < 10 else (2 * i + 1) % 20]
        ax.plot(*zip(*front), style, marker=markers[i % len(markers)], color=colour, label=fam, alpha=0.9)
        ax.plot(*zip(*pts), markers[i % len(markers)], color=colour, alpha=0.35, linestyle="none")
    ax.set_yscale("log")
    ax.set_xlabel("bits per weight (all stored bytes, side streams included)")
    ax.set_ylabel("relative error  sqrt(sum |W - W^|^2 / sum |W|^2)")
    ax.set_title(
        f"{MODELS[key][0]}: rate-distortion on Linear weights "
        "(lines: lower envelope of each family; faint: every setting)",
        fontsize=10,
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    foot = []
    partial = [f"{r['method']} {r['setting']}" for r in mine if r["note"]]
    if partial:
        foot.append("on part of the layers only: " + "; ".join(partial))
    exact = [f"{r['method']} {r['setting']}" for r in mine if r["rel_error"] == 0]
    if exact:
        foot.append("error 0, not drawn on the log scale: " + "; ".join(exact))
    if foot:
        fig.text(0.01, 0.005, "\n".join(foot), fontsize=7, va="bottom", wrap=True)
    fig.tight_layout(rect=(0, 0.03 * len(foot), 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def environment(threads: int) -> dict:
    versions = {}
    for pkg in ("numpy", "gguf", "hqq", "torch", "matplotlib"):
        try:
            versions[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            versions[pkg] = None
    return {
        "cpu_count": os.cpu_count(),
        "threads": threads,
        "machine": platform.machine(),
        "python": platform.python_version(),
        "decode_repeats": DECODE_REPEATS,
        "subset_layer_stride": SUBSET_LAYER_STRIDE,
        "rbe_tensor_codecs": sorted(TENSOR_CODECS),
        **versions,
    }


def save(path: str, results: list[Result], rows: list[dict], env: dict) -> None:
    """The table's rows, plus every measurement per tensor (so the report can be rebuilt)."""
    measured = [
        {
            "model": r.model,
            "family": r.method.family,
            "method": r.method.label,
            "setting": r.method.setting,
            "chain": r.method.chain,
            "encode_s": r.encode_s,
            "decode_s": r.decode_s,
            "note": r.note,
            "error": r.error,
            "per_tensor": {n: list(v) for n, v in r.per_tensor.items()},
        }
        for r in results
    ]
    with open(path, "w") as fh:
        json.dump(
            {
                "environment": env,
                "rows": rows,
                "not_measured": [m for m in measured if m["error"]],
                "measurements": measured,
                "per_tensor_fields": ["stored_bits", "raw_bits", "squared_error", "squared_norm", "weights"],
            },
            fh,
            indent=1,
        )


def load(path: str) -> tuple[list[Result], dict]:
    with open(path) as fh:
        data = json.load(fh)
    results = []
    for m in data["measurements"]:
        r = Result(
            m["model"],
            Method(m["family"], m["method"], m["setting"], chain=m["chain"]),
            {n: tuple(v) for n, v in m["per_tensor"].items()},
            m["encode_s"],
            m["decode_s"],
            m["note"],
            m["error"],
        )
        results.append(r)
    return results, data["environment"]


def report(results: list[Result], models: list[str], env: dict, suffix: str, log) -> list[dict]:
    """Prints the table, notes and comparisons, draws the plots; returns the table's rows."""
    good = [r for r in results if not r.error and r.per_tensor]
    rows = sorted((row_of(r) for r in good), key=lambda r: (list(MODELS).index(r["key"]), r["bpw"], r["rel_error"]))
    print(table(rows))
    notes = [
        "",
        "bits/weight: every stored byte of every part (codes, scales, codebooks, indices), after rbe's",
        "lossless packing of the parts, per Linear weight; anchors count their raw payload (fp16 scales).",
        "raw b/w: the same before the lossless packing (packed codes and fp16/fp32 side streams as the codec",
        "hands them over); the gap to bits/weight is what entropy coding of the parts saves.",
        "rel. error: sqrt(sum |W - W^|^2 / sum |W|^2) over all Linear weights; SNR dB = -20 log10(rel. error).",
        "encode/decode MB/s: MB (10^6 bytes) of fp32 weights per second; rbe encode is writing the container",
        "less the writer's own verification decode, rbe decode is Reader.get_tensor (best of "
        f"{env['decode_repeats']} passes).",
    ]
    noted = [r for r in rows if r["note"]]
    if noted:
        notes.append(
            f"* measured on part of the weights; the row aggregates only those (an rbe setting projected "
            f"to encode all weights in more than {env['budget_s']:.0f} s continues after the first layer on "
            f"every {env['subset_layer_stride']}th layer only):"
        )
        notes += [f"  {r['model']} {r['method']} {r['setting']}: {r['note']}, {r['weights']:,} weights" for r in noted]
    if not env.get("hqq"):
        notes.append("HQQ not installable here: no HQQ rows.")
    for r in results:
        if r.error:
            notes.append(f"not measured: {MODELS[r.model][0]} {r.method.label} {r.method.setting}: {r.error}")
    print("\n".join(notes))
    if "smollm2" in models:
        print("\n" + SMOLLM2_CAVEAT)
    print("\nComparisons")
    print("\n".join(comparisons(results)))

    os.makedirs(OUT_DIR, exist_ok=True)
    for key in models:
        path = os.path.join(OUT_DIR, f"ratedistortion-{key}{suffix}.png")
        plot(rows, key, path)
        log(f"plot: {os.path.relpath(path)}")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="MiniLM only, fewer settings")
    parser.add_argument("--models", default="minilm,smollm2", help="comma-separated: minilm, smollm2")
    parser.add_argument(
        "--budget-s",
        type=float,
        default=900,
        help="an rbe setting projected to encode all weights for longer runs on every "
        f"{SUBSET_LAYER_STRIDE}th layer only",
    )
    parser.add_argument(
        "--limit-s",
        type=float,
        default=1800,
        help="stop a method's encoding after this many seconds and report it as too slow",
    )
    parser.add_argument(
        "--from-json", metavar="PATH", help="measure nothing: rebuild the table, comparisons and plots from a saved run"
    )
    args = parser.parse_args(argv)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    if args.from_json:
        results, env = load(args.from_json)
        models = [k for k in MODELS if any(r.model == k for r in results)]
        report(results, models, env, "-quick" if env.get("quick") else "", log)
        return 0
    models = ["minilm"] if args.quick else [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        parser.error(f"unknown model(s) {unknown}; choose from {list(MODELS)}")
    threads = max(1, min(8, os.cpu_count() or 1))
    try:
        import torch

        torch.set_num_threads(threads)
    except ImportError:
        pass
    results = []
    for key in models:
        results += run_model(key, args.quick, args.budget_s, args.limit_s, log)
    env = {**environment(threads), "budget_s": args.budget_s, "limit_s": args.limit_s, "quick": args.quick}
    suffix = "-quick" if args.quick else ""
    rows = report(results, models, env, suffix, log)
    path = os.path.join(OUT_DIR, f"ratedistortion{suffix}.json")
    save(path, results, rows, env)
    log(f"rows and per-tensor measurements: {os.path.relpath(path)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
