"""Seed-coded Linear weights in ONNX Runtime, their codes kept compressed.

Formula ``seed`` (spec/codecs/seed.md), for MatMul weights and ``transB=1`` Gemm
weights.  A ``seed`` block is u(s) (C x P integers, a fixed function of its seed s; see
``rbeformat.codecs.seed``) times P coefficients scaled by a power of two.  One
int16 table holding u(s) for every seed the width S allows is shared by every
weight of the same (S, C, P); each weight keeps only its seeds (uint16),
coefficient codes and exponent codes (uint8).  In the graph::

    basis  = Cast(Gather(table, seeds))                        (rows, blocks, C, P)
    scaled = (Cast(coeffs) - 2**(Q-1)) * Gather(scales, exps)  (rows, blocks, P)
    W      = Reshape(Einsum(basis, scaled))                    [K, N]
    out    = MatMul(A, W)

Every product is a small integer times a power of two and every sum stays
below 2**24 units of the block's scale, as in the reference decode, so W is
the dense decode bit for bit.  W exists only while the node runs.  A table
larger than the dense weights it serves is not worth holding: those weights
are decoded to dense at build, and the report says why.

The price is time: W is rebuilt at every run.  Two 1024 x 1024 weights
(C = 8, P = 3, S = 12) hold 2.5 MiB after ``InferenceSession`` against 16.4 MiB
dense, but a batch of 5 rows takes about 50 ms on one thread against 0.4 ms
dense, Einsum (small batched products) taking 44 ms of it; Mul + ReduceSum in
its place measured no faster.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from rbeformat import Reader
from rbeformat.codecs import seed as seed_codec
from rbeformat.codecs.util import bitpack
from rbeformat.embedded.onnx import read_graph
from rbeformat.errors import FormatError

from .base import CodecView, Peers, Rewrite, part_shape
from .uses import gemm_use, matmul_use

SEED_MIN_OPSET = 12  # Einsum


@dataclass
class SeedBlocks:
    """A seed-coded matrix V (rows, cols) as its codes per block of C along cols."""

    block: int  # C
    rank: int  # P
    seed_bits: int  # S
    coef_bits: int  # Q
    exp_bits: int  # E
    exp_bias: int
    seeds: np.ndarray  # uint16 (rows, cols // C)
    coeffs: np.ndarray  # uint8 codes (rows, cols // C, P)
    exponents: np.ndarray  # uint8 codes (rows, cols // C, 1)

    @property
    def table_key(self) -> tuple[int, int, int]:
        return self.seed_bits, self.block, self.rank


def read_seed(r: Reader, name: str, prefix: str, transform) -> SeedBlocks:
    """The parts of the seed ``transform`` reached by ``prefix`` of tensor ``name``, unpacked."""
    codec = transform.codec
    rows, cols = part_shape(r, name, prefix)
    blocks = rows * cols // codec.block
    where = f"tensor {name!r}"

    def unpacked(part: str, bits: int, count: int) -> np.ndarray:
        return bitpack.unpack(r.get_part(name, prefix + part), bits, count, f"{where}.{part}")

    seeds = unpacked("seeds", codec.seed_bits, blocks)
    if blocks and int(seeds.min()) == 0:  # as the reference decode: seed 0 is invalid
        raise FormatError(f"{where}.seeds: seed 0 is invalid (block {int(np.argmin(seeds))})")
    coeffs = unpacked("coeffs", codec.coef_bits, blocks * codec.rank)
    exponents = unpacked("exponents", codec.exp_bits, blocks)
    grid = (rows, cols // codec.block)
    return SeedBlocks(
        codec.block,
        codec.rank,
        codec.seed_bits,
        codec.coef_bits,
        codec.exp_bits,
        transform.params["exp_bias"],
        seeds.astype(np.uint16).reshape(grid),
        coeffs.astype(np.uint8).reshape(*grid, codec.rank),
        exponents.astype(np.uint8).reshape(*grid, 1),
    )


def seed_table_name(key: tuple[int, int, int]) -> str:
    return "rbe:seed_basis:{}:{}:{}".format(*key)


def seed_table_bytes(key: tuple[int, int, int]) -> int:
    seed_bits, block, rank = key
    return 2**seed_bits * block * rank * (1 if seed_bits <= 8 else 2)


def seed_table(key: tuple[int, int, int]):
    """u(s) for every seed s as (2**S, C, P) integers: int8 while they fit (S <= 8), else int16."""
    table = seed_codec.basis_table(key[1], key[2], key[0])
    return numpy_helper.from_array(table.astype(np.int8 if key[0] <= 8 else np.int16), seed_table_name(key))


def seed_initializers(weight: SeedBlocks, shape_kn: tuple[int, int], tag: str) -> tuple[list, list]:
    """The weight's own initializers (codes, its scale per exponent code, the [K, N] shape) and the
    shared ones (the basis table, the coefficient centre, two int64 constants)."""
    shift = weight.exp_bias + weight.seed_bits - 1
    scales = np.ldexp(np.float32(1), np.arange(2**weight.exp_bits) - shift).astype(np.float32)
    own = [
        numpy_helper.from_array(weight.seeds, f"{tag}:seeds"),
        numpy_helper.from_array(weight.coeffs, f"{tag}:coeffs"),
        numpy_helper.from_array(weight.exponents, f"{tag}:exponents"),
        numpy_helper.from_array(scales, f"{tag}:scales"),
        numpy_helper.from_array(np.array(shape_kn, np.int64), f"{tag}:shape"),
    ]
    centre = f"rbe:seed_centre:{weight.coef_bits}"
    shared = [
        seed_table(weight.table_key),
        numpy_helper.from_array(np.array(2.0 ** (weight.coef_bits - 1), np.float32), centre),
        numpy_helper.from_array(np.array(0, np.int64), "rbe:int64:0"),
        numpy_helper.from_array(np.array([1], np.int64), "rbe:int64:[1]"),
    ]
    return own, shared


def input_ones_nodes(a_name: str, at: str) -> list:
    """Nodes making ``{at}:ones`` = [1] from the activations' first element, at no cost.

    ONNX Runtime constant-folds at session creation every node whose inputs
    are all initializers (and Shape of a static input), which would leave the
    dense matrix resident.  Expanding each code initializer by this [1], which
    no folder can know before a run, keeps the decode in the graph.
    """
    return [
        helper.make_node("Flatten", [a_name], [f"{at}:flat"], name=f"{at}/flat", axis=0),
        helper.make_node("Gather", [f"{at}:flat", "rbe:int64:0"], [f"{at}:first"], name=f"{at}/first", axis=1),
        helper.make_node("IsNaN", [f"{at}:first"], [f"{at}:nan"], name=f"{at}/nan"),
        helper.make_node("Cast", [f"{at}:nan"], [f"{at}:nan64"], name=f"{at}/nan64", to=TensorProto.INT64),
        helper.make_node("Mul", [f"{at}:nan64", "rbe:int64:0"], [f"{at}:zero"], name=f"{at}/zero"),
        helper.make_node("Add", [f"{at}:zero", "rbe:int64:[1]"], [f"{at}:ones"], name=f"{at}/ones"),
    ]


def seed_nodes(weight: SeedBlocks, codes_hold_wt: bool, tag: str, a_name: str, out_name: str) -> list:
    """Nodes computing out = A @ W, W [K, N] decoded from the codes in the graph.

    ``codes_hold_wt``: the codes hold W^T (N, K), blocks along K; else W, blocks along N.
    """
    at = f"rbe:{out_name}"
    nodes = input_ones_nodes(a_name, at)
    for part in ("seeds", "coeffs", "exponents"):
        nodes.append(helper.make_node("Expand", [f"{tag}:{part}", f"{at}:ones"], [f"{at}:{part}"], name=f"{at}/{part}"))
    # rows r, blocks b: basis (r, b, C, P), coefficients times their scale (r, b, P)
    equation = "rbcp,rbp->bcr" if codes_hold_wt else "rbcp,rbp->rbc"
    nodes += [
        helper.make_node("Cast", [f"{at}:seeds"], [f"{at}:seeds64"], name=f"{at}/seeds64", to=TensorProto.INT64),
        helper.make_node(
            "Gather",
            [seed_table_name(weight.table_key), f"{at}:seeds64"],
            [f"{at}:basis_int"],
            name=f"{at}/basis",
            axis=0,
        ),
        helper.make_node("Cast", [f"{at}:basis_int"], [f"{at}:basis"], name=f"{at}/basis_float", to=TensorProto.FLOAT),
        helper.make_node(
            "Cast", [f"{at}:exponents"], [f"{at}:exponents64"], name=f"{at}/exponents64", to=TensorProto.INT64
        ),
        helper.make_node(
            "Gather", [f"{tag}:scales", f"{at}:exponents64"], [f"{at}:block_scales"], name=f"{at}/block_scales", axis=0
        ),
        helper.make_node("Cast", [f"{at}:coeffs"], [f"{at}:codes"], name=f"{at}/codes", to=TensorProto.FLOAT),
        helper.make_node(
            "Sub", [f"{at}:codes", f"rbe:seed_centre:{weight.coef_bits}"], [f"{at}:q"], name=f"{at}/centre"
        ),
        helper.make_node("Mul", [f"{at}:q", f"{at}:block_scales"], [f"{at}:scaled"], name=f"{at}/scale"),
        helper.make_node(
            "Einsum", [f"{at}:basis", f"{at}:scaled"], [f"{at}:blocks"], name=f"{at}/einsum", equation=equation
        ),
        helper.make_node("Reshape", [f"{at}:blocks", f"{tag}:shape"], [f"{at}:weight"], name=f"{at}/weight"),
        helper.make_node("MatMul", [a_name, f"{at}:weight"], [out_name], name=f"{at}/matmul"),
    ]
    return nodes


def seed_form(key: tuple[int, int, int]) -> str:
    return "seed: shared basis table (S={}, C={}, P={}) + Gather + Einsum".format(*key)


def _rewrite_seed(weight: SeedBlocks, codes_hold_wt: bool, uses: list, name: str) -> Rewrite:
    """``codes_hold_wt``: the codes hold W^T (N, K) rather than W (K, N) (see ``seed_nodes``)."""
    tag = f"rbe:{name}"
    rows, blocks = weight.seeds.shape
    cols = blocks * weight.block
    own, shared = seed_initializers(weight, (cols, rows) if codes_hold_wt else (rows, cols), tag)
    nodes = {}
    for position, node, _ in uses:
        has_bias = node.op_type == "Gemm" and len(node.input) > 2 and node.input[2] != ""
        out = f"rbe:{node.output[0]}:linear" if has_bias else node.output[0]
        nodes[position] = seed_nodes(weight, codes_hold_wt, tag, node.input[0], out)
        if has_bias:
            nodes[position].append(
                helper.make_node("Add", [out, node.input[2]], [node.output[0]], name=f"rbe:{node.output[0]}/bias")
            )
    return Rewrite(seed_form(weight.table_key), own, nodes, shared)


def _key(codec) -> tuple[int, int, int]:
    return codec.seed_bits, codec.block, codec.rank


def dense_served(r: Reader, peers: Peers) -> dict[tuple[int, int, int], int]:
    """Per basis table (S, C, P), the dense bytes of the file's seed-coded tensors (those ``peers`` sees)."""
    served: dict[tuple[int, int, int], int] = {}
    for stored in {r.stored_entry(name).name for name in r.keys()}:
        view = peers(r, stored)
        if view is not None:
            entry = r.stored_entry(stored)
            key = _key(view.transform.codec)
            served[key] = served.get(key, 0) + math.prod(entry.shape) * entry.dtype.itemsize
    return served


def default_opset(r: Reader) -> int:
    model = read_graph(r, verify=False)
    return next((op.version for op in model.opset_import if op.domain in ("", "ai.onnx")), 1)


_facts: dict = {}  # one file's (opset, tables served), read once for all its weights


def file_facts(r: Reader, peers: Peers) -> tuple[int, dict]:
    stat = os.stat(r.path)
    key = (r.path, stat.st_mtime_ns, stat.st_size)
    if key not in _facts:
        _facts.clear()
        _facts[key] = default_opset(r), dense_served(r, peers)
    return _facts[key]


def plan_seed(
    r: Reader, name: str, view: CodecView, uses: list, flipped: bool, readers: dict, peers: Peers
) -> Rewrite | str:
    """The shared-table form of seed weight ``name``, or why it must be dense (the table's rewriter
    for ``seed``; see ``rewriters``).

    ``flipped``: the graph's initializer is the tensor transposed; ``peers``: the file's other
    seed-coded tensors, whose dense bytes a shared table serves.
    """
    entry = r.stored_entry(name)
    transform, prefix, transposed = view.transform, view.prefix, view.transposed
    key = _key(transform.codec)
    if entry.dtype.name != "F32" or len(entry.shape) != 2:
        return f"seed on {entry.dtype.name} {list(entry.shape)}: mapped only for 2-D float32 weights"
    opset, served = file_facts(r, peers)
    if opset < SEED_MIN_OPSET:
        return f"seed needs Einsum (opset {SEED_MIN_OPSET}); the graph has opset {opset}"
    table, dense = seed_table_bytes(key), served.get(key, 0)
    if table > dense:
        return (
            f"seed: the shared basis table (S={key[0]}, C={key[1]}, P={key[2]}) takes {table:,} bytes, "
            f"more than the {dense:,} dense bytes of the weights it would serve"
        )
    matmul = bool(uses) and all(matmul_use(node, index) for _, node, index in uses)
    gemm = bool(uses) and all(gemm_use(node, index) for _, node, index in uses)
    if matmul or gemm:
        # A MatMul computes A @ B, a transB=1 Gemm A @ B.T; transpose(values=...) and a flipped
        # initializer each transpose what the codes hold.
        codes_hold_wt = (transposed != flipped) != gemm
        return _rewrite_seed(read_seed(r, name, prefix, transform), codes_hold_wt, uses, name)
    kinds = ", ".join(sorted({node.op_type for _, node, _ in uses})) or "no node"
    return f"seed; mapped when every reader is a MatMul's B or a transB=1 Gemm's B, here read by {kinds}"
