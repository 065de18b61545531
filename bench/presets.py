"""rbe's built-in presets beside reproduced anchors: size, bits per weight and model quality, one run.

For each model (SmolLM2-135M, all-MiniLM-L6-v2) every built-in preset
(``rbe_converters.compress.recipe.preset_names()``) is converted to a real .rbe file by
``rbe convert MODEL OUT --preset NAME`` in a child process, exactly as a user
runs it (calibration included), whose wall time and peak RSS are measured;
the file is then decoded and scored by the protocols of ``rbe_converters.evaluate.quality``
(the measures ``rbe eval`` uses).  Beside them, in the same run, anchors
quantize the Linear weights of a copy of the dense model: plain round-to-nearest,
GGUF's quantizers (``gguf`` package), HQQ and ONNX Runtime's
``MatMulNBitsQuantizer`` (RTN and GPTQ), each where it is installed.

    python -m bench.presets                                  # everything (hours on 2 cores)
    python -m bench.presets --models minilm                  # all-MiniLM-L6-v2 only
    python -m bench.presets --models smollm2 --quick         # 2 presets, 2 windows, fewer anchors
    python -m bench.presets --models minilm --record         # also the record rbe presets prints

ONNX Runtime's GPTQ gets the input second moments of every Linear weight,
collected once on rbe's calibration text.  Prints one table, writes
bench/out/presets.json and bench/out/presets.png (``-quick`` added to the
names for --quick); each preset row names the recipe the preset ran on that
model (``recipe.policy_for_model``: ``q4`` is ``encoder-q4`` on an encoder) and
its fingerprint.  ``--record`` then writes the record ``rbe presets`` prints
(``bench/preset_record.py``).
"""

from __future__ import annotations

import argparse
import copy
import gc
import importlib.metadata
import json
import logging
import math
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from rbe_converters.compress.calibrate import torch as calibrate
from rbe_converters.compress.plan import calibration_methods
from rbe_converters.compress.recipe import policy_for_model, policy_from_preset, preset_names, recipe_fingerprint
from rbe_converters.evaluate import quality
from rbe_converters.evaluate.eval import (
    EmbeddingMeasure,
    EvalOptions,
    PerplexityMeasure,
    decode_to_directory,
    linear_weights,
    rbe_sizes,
    safetensors_bytes,
    safetensors_sizes,
)
from rbe_converters.evaluate.report import tensor_rows
from rbe_converters.sources import open_source
from rbeformat import Reader
from rbeformat.chain import parse_chain
from rbeformat.codecs.registry import TENSOR_CODECS
from rbeformat.embedded.config import is_causal_lm

from .models import minilm_dir, smollm2_dir
from .ratedistortion import OUT_DIR, gguf_anchor, hqq_anchor, hqq_version, rtn
from .rss import library_command, run_measured

MODELS = {"smollm2": ("SmolLM2-135M", smollm2_dir), "minilm": ("all-MiniLM-L6-v2", minilm_dir)}
QUICK_PRESETS = ("q8", "q4")
# Presets for sentence-embedding encoders: their end-to-end drift survey runs the model once per
# tensor and level, which on a causal LM (logits over the vocabulary) is far slower than on an encoder.
ENCODER_PRESETS = ("encoder-q4", "encoder-q3", "encoder-q2")
QUICK_WINDOWS = 2
QUICK_CALIBRATION_WINDOWS = 4
EXACT_LIMIT = 0.30  # SmolLM2: a larger share of bit-exact Linear weights means the Q4_1 grid did the work
GOAL_RSS_BYTES = 8e9
GOAL_WALL_S = 45 * 60
SMOLLM2_CAVEAT = (
    "SmolLM2 caveat: its fp32 weights are dequantized from a Q4_1 GGUF, so every 32-wide block of a Linear\n"
    "row lies on a 4-bit grid. A 4-bit quantizer with 32-wide groups (GGUF Q4_0 among the anchors) can\n"
    "reproduce much of it exactly: such rows are listed apart and count toward no goal, and any row whose\n"
    f"decoded Linear weights are over {EXACT_LIMIT:.0%} bit-equal to the original is flagged GRID."
)


# -- anchors ------------------------------------------------------------------------


@dataclass
class Anchor:
    name: str
    quick: bool = False
    # quantize(name, weight (out x in, float32)) -> (stored bits, dequantized weight); None: not available
    quantize: Callable | None = None
    unavailable: str = ""  # why quantize is None
    four_bit_g32: bool = False
    checks: dict = field(default_factory=dict)  # filled while quantizing; see note()

    def note(self) -> str:
        if "differ" not in self.checks:
            return ""
        return (
            f"{self.checks['differ']:,} of its {self.checks['weights']:,} weights differ from ORT's RTN at "
            f"this block size (by up to {self.checks['max_diff_vs_rtn']:.1e})"
        )


def from_ratedistortion(run_of: Callable) -> Callable:
    """bench.ratedistortion's anchors (run(x) -> bits, decode, seconds) as quantize(name, x)."""

    def quantize(_name: str, x: np.ndarray):
        bits, decode, _ = run_of(x)
        return bits, decode()

    return quantize


def gguf_missing(type_name: str) -> str:
    """Why the installed gguf cannot quantize to this type ('' when it can)."""
    import gguf
    from gguf import quants

    qtype = getattr(gguf.GGMLQuantizationType, type_name)
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    try:
        quants.quantize(np.zeros((1, block), np.float32), qtype)
    except NotImplementedError:
        return (
            f"gguf {importlib.metadata.version('gguf')} has no {type_name} quantizer (quants.quantize raises "
            "NotImplementedError)"
        )
    return ""


def ort_version() -> str | None:
    try:
        from onnxruntime.quantization import matmul_nbits_quantizer  # noqa: F401

        return importlib.metadata.version("onnxruntime")
    except Exception:  # any import failure means: not usable here
        return None


def ort_bits(shape: tuple[int, int], block: int) -> int:
    """Bits of MatMulNBits' 4-bit asymmetric format for an (out x in) weight of fp32 scales:
    per row, ceil(in / block) blocks of block/2 code bytes and a 4-byte scale, and the 4-bit
    zero points packed two to a byte."""
    out_f, in_f = shape
    blocks = -(-in_f // block)
    return 8 * out_f * (blocks * (block // 2 + 4) + (blocks + 1) // 2)


def ort_quantize(block: int, hessians: dict | None, checks: dict | None = None) -> Callable:
    """ONNX Runtime's MatMulNBitsQuantizer, 4-bit asymmetric, blocks along the input axis.

    Each Linear weight becomes the initializer of a one-node MatMul graph (Y = X W^T,
    as the layer computes it).  RTN (``DefaultWeightOnlyQuantConfig``, ORT's own
    block quantizer) needs nothing else.  GPTQ (``GPTQWeightOnlyQuantConfig``) also
    needs the layer's inputs: it is fed the rows of H^(1/2), whose Gram matrix is the
    H that ``calibrate.collect`` measured on the calibration text (ORT's GPTQ uses
    only X^T X, and its damping is relative, so the scale of H does not matter).  Its
    packing of zero points fails on an odd number of blocks per row, so for GPTQ the
    input axis is padded with zero weights (dead inputs, which GPTQ leaves alone) to an
    even count, the pad is cut off again, and the bits are counted for the unpadded
    shape by ``ort_bits``.  The dequantized weight is read back by running the
    quantized MatMulNBits node on the identity matrix.  With ``checks``, GPTQ also
    records in it how far its weights lie from ORT's RTN of the same weight
    (``differ`` of ``weights`` by more than 1e-6 of the largest weight, ``max_diff_vs_rtn``).
    """
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper
    from onnxruntime.quantization import matmul_nbits_quantizer as mnq
    from onnxruntime.quantization.calibrate import CalibrationDataReader

    logging.getLogger("onnxruntime").setLevel(logging.ERROR)

    class OneBatch(CalibrationDataReader):
        def __init__(self, feed):
            self.feeds = [feed]

        def get_next(self):
            return self.feeds.pop() if self.feeds else None

    def quantize(name: str, x: np.ndarray):
        out_f, in_f = x.shape
        width = in_f
        if hessians is not None:
            blocks = -(-in_f // block)
            width = (blocks + blocks % 2) * block
        w = np.zeros((width, out_f), np.float32)
        w[:in_f] = x.T
        node = helper.make_node("MatMul", ["X", "W"], ["Y"], name="linear")
        graph = helper.make_graph(
            [node],
            "linear",
            [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["n", width])],
            [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["n", out_f])],
            [numpy_helper.from_array(w, "W")],
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        if hessians is None:
            config = mnq.DefaultWeightOnlyQuantConfig(block_size=block, is_symmetric=False)
        else:
            h = np.zeros((width, width))
            h[:in_f, :in_f] = hessians[name]
            e, v = np.linalg.eigh(h)
            root = (np.sqrt(np.clip(e, 0, None))[:, None] * v.T).astype(np.float32)
            config = mnq.GPTQWeightOnlyQuantConfig(calibration_data_reader=OneBatch({"X": root}))
        quantizer = mnq.MatMulNBitsQuantizer(model, block_size=block, is_symmetric=False, algo_config=config)
        with _quiet_stdout():  # its GPTQ path prints a progress bar
            quantizer.process()
        quantized = quantizer.model.model
        if [n.op_type for n in quantized.graph.node] != ["MatMulNBits"]:
            raise RuntimeError(f"MatMulNBitsQuantizer left {[n.op_type for n in quantized.graph.node]}")
        session = ort.InferenceSession(quantized.SerializeToString(), providers=["CPUExecutionProvider"])
        y = np.ascontiguousarray(session.run(None, {"X": np.eye(width, dtype=np.float32)})[0][:in_f].T)
        if hessians is None:  # unpadded: the format's bits are its initializers
            return 8 * sum(numpy_helper.to_array(t).nbytes for t in quantized.graph.initializer), y
        if checks is not None:
            _, plain = rtn_of(name, x)
            diff = np.abs(y - plain)
            checks["max_diff_vs_rtn"] = max(checks.get("max_diff_vs_rtn", 0.0), float(diff.max()))
            checks["differ"] = checks.get("differ", 0) + int(np.count_nonzero(diff > 1e-6 * np.abs(x).max()))
            checks["weights"] = checks.get("weights", 0) + x.size
        return ort_bits(x.shape, block), y

    rtn_of = ort_quantize(block, None) if hessians is not None else None
    return quantize


class _quiet_stdout:
    def __enter__(self):
        self.saved, sys.stdout = sys.stdout, open(os.devnull, "w")

    def __exit__(self, *exc):
        sys.stdout.close()
        sys.stdout = self.saved


def anchors(hessians: dict | None) -> list[Anchor]:
    out = [
        Anchor(f"RTN int{b} g{g}", quick=(b, g) == (4, 64), quantize=from_ratedistortion(rtn(b, g, "sym")))
        for b in (4, 3)
        for g in (64, 128)
    ]
    for t in ("Q4_0", "Q4_K", "Q5_0", "Q8_0"):
        missing = gguf_missing(t)
        out.append(
            Anchor(
                f"GGUF {t}",
                quick=t in ("Q4_0", "Q8_0"),
                unavailable=missing,
                four_bit_g32=t == "Q4_0",
                quantize=None if missing else from_ratedistortion(gguf_anchor(t)),
            )
        )
    hqq = hqq_version()
    out.append(
        Anchor(
            "HQQ 4b g64",
            quick=True,
            quantize=from_ratedistortion(hqq_anchor(4, 64)) if hqq else None,
            unavailable="" if hqq else "hqq does not import here",
        )
    )
    ort_ok = ort_version()
    for kind, block, quick in (("RTN", 128, True), ("RTN", 64, False), ("GPTQ", 128, False)):
        why = "" if ort_ok else "onnxruntime's quantization tools do not import here"
        if not why and kind == "GPTQ" and hessians is None:
            why = "needs calibration statistics (not collected in this run)"
        anchor = Anchor(f"ORT MatMulNBits {kind} 4b g{block}", quick=quick, unavailable=why)
        if not why:
            anchor.quantize = ort_quantize(block, hessians if kind == "GPTQ" else None, anchor.checks)
        out.append(anchor)
    return out


# -- measuring ----------------------------------------------------------------------


@dataclass
class Row:
    model: str
    name: str
    kind: str  # dense, preset, anchor
    linear_bpw: float | None = None
    file_bpw: float | None = None
    file_bytes: int | None = None
    estimated_size: bool = False  # anchors: Linear payload + the other tensors as stored in fp32
    ratio: float | None = None
    scores: dict = field(default_factory=dict)
    encode_s: float | None = None
    peak_rss: int | None = None  # presets: the conversion's peak RSS in bytes
    exact_share: float | None = None
    calibrated: bool = False
    four_bit_g32: bool = False
    note: str = ""
    recipe: str | None = None  # presets: the recipe the preset ran on this model
    recipe_fingerprint: str | None = None  # recipe.recipe_fingerprint of it at the time of the run

    @property
    def grid(self) -> bool:
        return (
            self.model == "smollm2"
            and self.kind != "dense"
            and self.exact_share is not None
            and self.exact_share > EXACT_LIMIT
        )

    @property
    def apart(self) -> bool:
        """Reported apart and counted toward no goal: SmolLM2 4-bit rows with 32-wide groups."""
        return self.model == "smollm2" and self.four_bit_g32

    @property
    def measured(self) -> bool:
        return bool(self.scores)


def parameter(model, name: str):
    """The torch parameter of a checkpoint tensor (names may carry or lack the base model prefix)."""
    prefix = getattr(model, "base_model_prefix", "") or ""
    for candidate in (name, f"{prefix}.{name}", name.removeprefix(prefix + ".")):
        try:
            return model.get_parameter(candidate)
        except AttributeError:
            continue
    raise KeyError(f"{name}: no such parameter in the model")


def exact_share(model, dense, names: list[str]) -> float:
    """The share of the Linear weights whose value in ``model`` is bit-equal to ``dense``'s."""
    import torch

    same = total = 0
    for name in names:
        a, b = parameter(model, name).detach(), parameter(dense, name).detach()
        same += int((a.view(torch.int32) == b.view(torch.int32)).sum())
        total += a.numel()
    return same / total


def four_bit_g32(rbe_path: str, linear: set) -> bool:
    """Whether any Linear weight's top codec is 4-bit with groups of 32."""
    with Reader(rbe_path, verify_checksums=False) as r:
        for row in tensor_rows(r):
            if row["name"] in linear and "(" in row["codec"]:
                try:
                    cfg = parse_chain(row["codec"], TENSOR_CODECS).codec.config()
                except Exception:  # a chain this build cannot parse is not 4-bit g32 as far as we know
                    continue
                if cfg.get("bits") == 4 and cfg.get("group") == 32:
                    return True
    return False


class ModelRun:
    """One model: its measure, its dense reference, its Linear weights, the statistics ORT's GPTQ uses."""

    def __init__(self, key: str, windows: int, calibration_windows: int, log):
        self.key, self.log = key, log
        self.dir = MODELS[key][1]()
        self.config = quality.read_config(self.dir)
        self.causal = is_causal_lm(self.config)
        self.tokenizer = quality.load_tokenizer(self.dir)
        options = EvalOptions(windows=windows)
        self.measure = (PerplexityMeasure if self.causal else EmbeddingMeasure)(self.tokenizer, options)
        self.sizes = safetensors_sizes(self.dir)
        self.reference_bytes = safetensors_bytes(self.dir)
        self.linear = linear_weights(self.sizes, self.config)
        self.linear_names = [n for n in self.sizes.tensors if n in self.linear]
        self.dense = quality.load_model(self.dir, self.causal)
        self.calibration_windows = calibration_windows
        self.hessians: dict[str, np.ndarray] = {}
        self.calibration_record: dict | None = None

    def score(self, model) -> dict:
        return self.measure.score(model)

    def dense_row(self) -> Row:
        sizes = self.sizes.row(self.reference_bytes, self.linear)
        return Row(
            self.key,
            "dense fp32 (safetensors)",
            "dense",
            sizes["linear_bits_per_weight"],
            sizes["bits_per_weight"],
            sizes["file_bytes"],
            False,
            sizes["ratio"],
            self.score(self.dense),
            exact_share=1.0,
        )

    def calibrate(self, text: calibrate.CalibrationText) -> None:
        """Input second moments of every Linear weight on rbe's calibration text, for ORT's GPTQ."""
        t0 = time.perf_counter()
        calibrations = calibrate.collect(self.dir, {n: "gptq" for n in self.linear_names}, text)
        self.hessians = {n: c.hessian for n, c in calibrations.items()}
        ids = self.tokenizer(text.text, add_special_tokens=False)["input_ids"]
        window = min(text.window, getattr(self.dense.config, "max_position_embeddings", None) or text.window)
        self.calibration_record = {
            "source": text.source,
            "text_sha256": quality.fingerprint(text.text),
            "tokens": len(ids),
            "window": window,
            "windows": min(text.windows, len(ids) // window),
            "weights": len(self.hessians),
            "seconds": time.perf_counter() - t0,
        }
        self.log(
            f"  calibration: {self.calibration_record['windows']} windows of {window} tokens, "
            f"{self.calibration_record['seconds']:.1f} s"
        )

    def preset_row(self, name: str, workdir: str) -> Row:
        """``rbe convert --preset NAME`` (``pipeline.convert_model``) in a child process (wall time, peak RSS),
        then decoded and scored."""
        path = os.path.join(workdir, f"{name}.rbe")
        cmd = library_command(
            "convert", self.dir, path, preset=name, force=True, calibration_windows=self.calibration_windows
        )
        run = run_measured(cmd)
        if run.returncode != 0:
            raise RuntimeError(f"rbe convert exited {run.returncode}: {run.stderr.strip()[-300:]}")
        policy, _ = policy_for_model(policy_from_preset(name), lambda: self.config)
        calibrated = bool(calibration_methods(open_source(self.dir), policy))
        sizes = rbe_sizes(path).row(self.reference_bytes, self.linear)
        g32 = four_bit_g32(path, self.linear)
        target = decode_to_directory(path, os.path.join(workdir, "decoded"), None, self.dir)
        os.remove(path)
        try:
            model = quality.load_model(target, self.causal)
            scores, share = self.score(model), exact_share(model, self.dense, self.linear_names)
        finally:
            shutil.rmtree(target)
        del model
        gc.collect()
        return Row(
            self.key,
            name,
            "preset",
            sizes["linear_bits_per_weight"],
            sizes["bits_per_weight"],
            sizes["file_bytes"],
            False,
            sizes["ratio"],
            scores,
            encode_s=run.wall_s,
            peak_rss=run.peak_rss,
            exact_share=share,
            calibrated=calibrated,
            four_bit_g32=g32,
            recipe=policy.preset,
            recipe_fingerprint=recipe_fingerprint(policy.preset),
        )

    def anchor_row(self, anchor: Anchor) -> Row:
        import torch

        model = copy.deepcopy(self.dense)
        bits = 0
        t0 = time.perf_counter()
        with torch.no_grad():
            for name in self.linear_names:
                param = parameter(model, name)
                b, y = anchor.quantize(name, param.detach().numpy().astype(np.float32, copy=True))
                bits += b
                param.copy_(torch.from_numpy(np.asarray(y, np.float32).reshape(param.shape)))
        encode_s = time.perf_counter() - t0
        n_linear = sum(math.prod(self.sizes.tensors[n][1]) for n in self.linear_names)
        other_bytes = sum(stored for n, (_, _, stored) in self.sizes.tensors.items() if n not in self.linear)
        weights = sum(math.prod(shape) for _, shape, _ in self.sizes.tensors.values())
        file_bytes = round(bits / 8 + other_bytes)
        row = Row(
            self.key,
            anchor.name,
            "anchor",
            bits / n_linear,
            8 * file_bytes / weights,
            file_bytes,
            True,
            self.reference_bytes / file_bytes,
            self.score(model),
            encode_s,
            exact_share=exact_share(model, self.dense, self.linear_names),
            four_bit_g32=anchor.four_bit_g32,
            note=anchor.note(),
        )
        del model
        gc.collect()
        return row


def heaviest(rows: list[Row]) -> tuple[Row, str] | None:
    """SmolLM2's slowest calibrated conversion (or its slowest when none calibrates), and why it was taken."""
    mine = [r for r in rows if r.model == "smollm2" and r.kind == "preset" and r.encode_s is not None]
    calibrated = [r for r in mine if r.calibrated]
    if calibrated:
        return max(calibrated, key=lambda r: r.encode_s), "the slowest calibrated preset of this run"
    if mine:
        return max(mine, key=lambda r: r.encode_s), "no preset of this run calibrates: its slowest preset"
    return None


# -- output -------------------------------------------------------------------------


def _f(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def cells(r: Row) -> list[str]:
    s = r.scores
    size = "-" if r.file_bytes is None else ("~" if r.estimated_size else "") + f"{r.file_bytes / 1e6:.2f}"
    flags = [f for f, on in (("GRID", r.grid), ("g32", r.apart)) if on]
    encode = _f(r.encode_s, ".1f") + (" c" if r.calibrated else "")
    return [
        MODELS[r.model][0],
        r.name,
        r.kind,
        _f(r.linear_bpw, ".3f"),
        _f(r.file_bpw, ".3f"),
        size,
        _f(r.ratio, ".2f"),
        _f(s.get("perplexity"), ".3f"),
        "-" if "perplexity_change_pct" not in s else f"{s['perplexity_change_pct']:+.2f}%",
        _f(s.get("mean_cosine"), ".4f"),
        _f(s.get("nn_agreement"), ".3f"),
        encode,
        "-" if r.peak_rss is None else f"{r.peak_rss / 1e9:.2f}",
        "-" if r.exact_share is None else f"{100 * r.exact_share:.1f}%",
        " ".join(flags),
        r.note,
    ]


HEAD = [
    "model",
    "row",
    "kind",
    "Linear b/w",
    "file b/w",
    "size MB",
    "ratio",
    "perplexity",
    "ppl change",
    "mean cosine",
    "NN agr.",
    "encode s",
    "RSS GB",
    "exact",
    "flags",
    "note",
]


def table(rows: list[Row]) -> str:
    body, last = [], None
    for r in rows:
        if last is not None and (r.model, r.apart) != last:
            body.append(None)
        last = (r.model, r.apart)
        body.append(cells(r))
    widths = [max(len(h), *(len(b[i]) for b in body if b)) for i, h in enumerate(HEAD)]

    def fmt(c):
        return "  ".join(v.ljust(w) if i < 3 or i >= 14 else v.rjust(w) for i, (v, w) in enumerate(zip(c, widths)))

    return "\n".join([fmt(HEAD), fmt(["-" * w for w in widths])] + ["" if b is None else fmt(b) for b in body])


def order(rows: list[Row]) -> list[Row]:
    """Per model: dense, then the counted rows by Linear bits, then SmolLM2's 4-bit g32 rows, then the unmeasured."""

    def key(r: Row):
        return (
            list(MODELS).index(r.model),
            r.kind != "dense",
            not r.measured,
            r.apart,
            r.linear_bpw if r.linear_bpw is not None else math.inf,
            r.name,
        )

    return sorted(rows, key=key)


def goals(rows: list[Row]) -> list[str]:
    """The issue's goals, each with the best preset row that counts for it (met or not)."""
    lines = []
    counted = [r for r in rows if r.kind == "preset" and r.measured and not r.apart and not r.grid]

    def best(cands, key):
        return min(cands, key=key) if cands else None

    smol = [r for r in counted if r.model == "smollm2"]
    if any(r.model == "smollm2" for r in rows):
        for limit, target in ((4.5, 5), (3.5, 25), (2.5, 100)):
            b = best([r for r in smol if r.linear_bpw <= limit], lambda r: r.scores["perplexity_change_pct"])
            got = (
                "no preset"
                if b is None
                else (f"{b.name}: {b.linear_bpw:.3f} b/w, {b.scores['perplexity_change_pct']:+.2f}%")
            )
            ok = b is not None and b.scores["perplexity_change_pct"] <= target
            lines.append(
                f"  SmolLM2 Linear <= {limit} b/w at <= +{target}% perplexity: {got} -> {'met' if ok else 'not met'}"
            )
        fits = [r for r in smol if r.scores["perplexity_change_pct"] <= 8]
        b = max(fits, key=lambda r: r.ratio) if fits else None
        got = (
            "no preset within +8%"
            if b is None
            else (f"{b.name}: ratio {b.ratio:.2f}, {b.scores['perplexity_change_pct']:+.2f}%")
        )
        lines.append(
            f"  SmolLM2 whole file >= 8x smaller at <= +8% perplexity: best ratio {got} -> "
            f"{'met' if b is not None and b.ratio >= 8 else 'not met'}"
        )
    mini = [r for r in counted if r.model == "minilm"]
    if any(r.model == "minilm" for r in rows):
        for limit, cos, nn in ((4.5, 0.995, 0.95), (3.5, 0.98, None)):
            cands = [r for r in mini if r.file_bpw <= limit]
            b = best(cands, lambda r: -r.scores["mean_cosine"])
            got = (
                "no preset"
                if b is None
                else (
                    f"{b.name}: {b.file_bpw:.3f} b/w, cosine "
                    f"{b.scores['mean_cosine']:.4f}, NN {b.scores['nn_agreement']:.3f}"
                )
            )
            ok = any(r.scores["mean_cosine"] >= cos and (nn is None or r.scores["nn_agreement"] >= nn) for r in cands)
            want = f"cosine >= {cos}" + (f" and NN >= {nn}" if nn else "")
            lines.append(f"  MiniLM whole file <= {limit} b/w with {want}: best {got} -> {'met' if ok else 'not met'}")
    return lines


def plot(rows: list[Row], models: list[str], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(models), figsize=(8 * len(models), 6), squeeze=False)
    for ax, key in zip(axes[0], models):
        mine = [r for r in rows if r.model == key and r.measured]
        metric, label = (
            ("perplexity", "perplexity (lower is better)")
            if key == "smollm2"
            else ("mean_cosine", "mean cosine to the dense model's embeddings")
        )
        dense = next((r for r in mine if r.kind == "dense"), None)
        if dense is not None:
            ax.axhline(
                dense.scores[metric],
                color="black",
                linestyle="--",
                linewidth=1,
                label=f"dense fp32: {dense.scores[metric]:.4g} (32 b/w)",
            )
        for kind, marker, colour in (("preset", "o", "tab:blue"), ("anchor", "s", "tab:orange")):
            pts = [r for r in mine if r.kind == kind]
            for apart in (False, True):
                sel = [r for r in pts if (r.apart or r.grid) == apart]
                if not sel:
                    continue
                what = f"{kind}s" + (" (4-bit g32 or >30% bit-exact: not counted)" if apart else "")
                ax.scatter(
                    [r.linear_bpw for r in sel],
                    [r.scores[metric] for r in sel],
                    marker=marker,
                    s=45,
                    facecolors="none" if apart else colour,
                    edgecolors=colour,
                    label=what,
                    zorder=3,
                )
            for r in pts:
                ax.annotate(
                    r.name,
                    (r.linear_bpw, r.scores[metric]),
                    textcoords="offset points",
                    xytext=(4, 4),
                    fontsize=7,
                    color=colour,
                )
        if key == "smollm2":
            ax.set_yscale("log")
        ax.set_xlabel("bits per weight, Linear weights (stored bytes; anchors: their format's payload)")
        ax.set_ylabel(label)
        ax.set_title(MODELS[key][0], fontsize=10)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def environment() -> dict:
    versions = {}
    for pkg in ("numpy", "torch", "transformers", "gguf", "hqq", "onnxruntime", "onnx", "matplotlib"):
        try:
            versions[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            versions[pkg] = None
    return {"cpu_count": os.cpu_count(), "machine": platform.machine(), "python": platform.python_version(), **versions}


# -- main ---------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.presets", description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="smollm2,minilm", help="comma-separated: smollm2, minilm")
    parser.add_argument(
        "--presets",
        help=f"comma-separated preset names (default: every built-in preset; --quick: {', '.join(QUICK_PRESETS)})",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"{QUICK_WINDOWS} perplexity windows, {QUICK_CALIBRATION_WINDOWS} calibration windows, "
        "2 presets, the quick anchors",
    )
    parser.add_argument(
        "--windows",
        type=int,
        help=f"perplexity windows of 512 tokens (default {quality.DEFAULT_WINDOWS}, --quick {QUICK_WINDOWS})",
    )
    parser.add_argument(
        "--calibration-windows",
        type=int,
        help=f"calibration windows (default {calibrate.DEFAULT_WINDOWS}, --quick {QUICK_CALIBRATION_WINDOWS})",
    )
    parser.add_argument("--no-anchors", action="store_true", help="presets only")
    parser.add_argument("--out", default=OUT_DIR, help="output folder (default bench/out)")
    parser.add_argument(
        "--record", action="store_true", help="then write the record rbe presets prints (bench/preset_record.py)"
    )
    args = parser.parse_args(argv)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    if args.record and (args.quick or args.presets or args.windows or args.calibration_windows):
        parser.error("--record records every preset at the default settings: no --quick, --presets or windows")
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if [m for m in models if m not in MODELS] or not models:
        parser.error(f"--models: choose from {', '.join(MODELS)}")
    available = preset_names()
    if args.presets:
        presets = [p.strip() for p in args.presets.split(",") if p.strip()]
    else:
        presets = [p for p in QUICK_PRESETS if p in available] if args.quick else available
    unknown = [p for p in presets if p not in available]
    if unknown:
        parser.error(f"unknown preset(s) {unknown}; built in: {', '.join(available)}")
    windows = args.windows or (QUICK_WINDOWS if args.quick else quality.DEFAULT_WINDOWS)
    default_text = calibrate.default_text()
    text = calibrate.CalibrationText(
        default_text.text,
        default_text.source,
        calibrate.DEFAULT_WINDOW,
        args.calibration_windows or (QUICK_CALIBRATION_WINDOWS if args.quick else calibrate.DEFAULT_WINDOWS),
    )
    import torch
    import transformers

    torch.set_num_threads(os.cpu_count() or 1)
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()

    rows: list[Row] = []
    protocols, calibration = {}, {}
    os.makedirs(args.out, exist_ok=True)
    workdir = tempfile.mkdtemp(prefix="presets-", dir=args.out)
    started = time.perf_counter()
    try:
        for key in models:
            log(f"{MODELS[key][0]}:")
            run = ModelRun(key, windows, text.windows, log)
            rows.append(run.dense_row())
            protocols[key] = run.measure.protocol()
            if not args.no_anchors and not args.quick and ort_version() is not None:
                run.calibrate(text)  # for ORT's GPTQ
                calibration[key] = run.calibration_record
            jobs = [(p, None) for p in presets]
            if not args.no_anchors:
                jobs += [
                    (None, a) for a in anchors(run.hessians or None) if a.quick or not args.quick or a.quantize is None
                ]
            for preset, anchor in jobs:
                name = preset or anchor.name
                t0 = time.perf_counter()
                try:
                    if anchor is not None and anchor.quantize is None:
                        row = Row(key, name, "anchor", note=f"not measured: {anchor.unavailable}")
                    elif preset in ENCODER_PRESETS and run.causal:
                        row = Row(key, name, "preset", note="not run: a preset for sentence-embedding encoders")
                    elif anchor is not None:
                        row = run.anchor_row(anchor)
                    else:
                        row = run.preset_row(preset, workdir)
                except Exception as exc:  # a preset that does not apply is a result to report
                    row = Row(
                        key,
                        name,
                        "preset" if preset else "anchor",
                        note=f"not measured: {type(exc).__name__}: {' '.join(str(exc).split())[:160]}",
                    )
                rows.append(row)
                log(f"  {name}: {row.note or cells(row)[3:14]} ({time.perf_counter() - t0:.0f} s)")
            del run
            gc.collect()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    rows = order(rows)
    print(table(rows))
    notes = [
        "",
        "Linear b/w: stored bits of the Linear weights (attention and MLP projections by tensor role, not",
        "embeddings or lm_head) / their count, for presets from the container's stored sections as rbe eval",
        "counts them; anchors quantize only those weights and count their format's payload (RTN: codes +",
        "fp16 scale per group; GGUF: block bytes, Q4_0 4.5, Q5_0 5.5, Q8_0 8.5; HQQ: codes + fp16 scale and",
        "zero per group; ORT: its initializers, codes + fp32 scales + 4-bit zero points).",
        "file b/w, size MB (decimal), ratio (fp32 safetensors bytes / size): presets the whole .rbe file;",
        "anchors (~) their Linear payload plus every other tensor as the fp32 file stores it.",
        "exact: share of Linear weights the decoded model holds bit-equal to the original.",
        "encode s: presets: wall time of `rbe convert MODEL OUT --preset NAME` in a child process, calibration",
        "included (c: the preset calibrates), RSS GB its peak resident memory; anchors: quantize + dequantize",
        "of the Linear weights (ORT GPTQ: with statistics collected once, listed below, not counted).",
        "flags: GRID = SmolLM2 row over 30% bit-exact; g32 = SmolLM2 4-bit with 32-wide groups, listed apart.",
        "Models run in float32 on the CPU.",
    ]
    for key, p in protocols.items():
        if p["measure"] == "perplexity":
            notes.append(
                f"{MODELS[key][0]}: perplexity, {p['windows']} windows of {p['window']} tokens (stride "
                f"{p['stride']}) from token 0 of the {p['text']} (sha256 {p['text_sha256']})"
            )
        else:
            notes.append(
                f"{MODELS[key][0]}: mean cosine and nearest-neighbour agreement of mean-pooled embeddings, "
                f"{p['count']} sentences ({p['sentences']}, sha256 {p['sentences_sha256']})"
            )
    for key, c in calibration.items():
        notes.append(
            f"{MODELS[key][0]} calibration: {c['windows']} windows of {c['window']} tokens of the "
            f"{c['source']} (sha256 {c['text_sha256']}), {c['seconds']:.1f} s, once, for ORT's GPTQ"
        )
    print("\n".join(notes))
    if "smollm2" in models:
        print("\n" + SMOLLM2_CAVEAT)
    chosen = heaviest(rows)
    rss = None
    if chosen is not None:
        row, why = chosen
        ok = row.encode_s <= GOAL_WALL_S and row.peak_rss <= GOAL_RSS_BYTES
        rss = {
            "preset": row.name,
            "why": why,
            "wall_s": row.encode_s,
            "peak_rss_bytes": row.peak_rss,
            "cpu_count": os.cpu_count(),
            "goal": {"wall_s": GOAL_WALL_S, "peak_rss_bytes": GOAL_RSS_BYTES},
        }
        print(
            f"\nHeaviest conversion: `rbe convert SmolLM2 OUT --preset {row.name}` ({why}), a child process on "
            f"{os.cpu_count()} cores: wall {row.encode_s:.1f} s ({row.encode_s / 60:.1f} min), peak RSS "
            f"{row.peak_rss / 1e9:.2f} GB; goal under 45 min and 8 GB: {'met' if ok else 'NOT met'}"
        )
    print("\nGoals (preset rows only; SmolLM2 4-bit g32 and GRID rows never count):")
    print("\n".join(goals(rows)))

    suffix = "-quick" if args.quick else ""
    png = os.path.join(args.out, f"presets{suffix}.png")
    plot(rows, models, png)
    path = os.path.join(args.out, f"presets{suffix}.json")
    with open(path, "w") as fh:
        json.dump(
            {
                "environment": environment(),
                "quick": args.quick,
                "presets": presets,
                "protocols": protocols,
                "calibration": calibration,
                "peak_rss": rss,
                "wall_s": time.perf_counter() - started,
                "rows": [
                    {**row.__dict__, "model_name": MODELS[row.model][0], "grid": row.grid, "apart": row.apart}
                    for row in rows
                ],
            },
            fh,
            indent=1,
        )
    log(f"wrote {os.path.relpath(path)} and {os.path.relpath(png)} ({time.perf_counter() - started:.0f} s)")
    if args.record:
        from .preset_record import merged, read_record, record_from_run, write_record

        with open(path) as fh:
            command = f"python -m bench.presets --models {','.join(models)}{' --no-anchors' if args.no_anchors else ''}"
            run = record_from_run(json.load(fh), f"{command} --record")
        write_record(merged(read_record(), run))
        log("wrote the record rbe presets prints (converters/compress/presets/measured.json)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
