"""``gquant`` weights in ONNX Runtime's quantized kernels, their codes kept compressed.

Formulas ``gquant.sym`` and ``gquant.asym`` (spec/codecs/gquant.md):

* Linear weights grouped along their input axis (a MatMul weight stored as
  ``transpose(values=gquant(...))``, or a ``Gemm`` weight with ``transB=1``
  stored as ``gquant``) become ``com.microsoft.MatMulNBits``: 2-bit codes as
  2-bit, 3- and 4-bit as 4-bit, 8-bit as 8-bit (the kernel has those widths;
  narrower codes fit a wider field unchanged, with their own zero point), and
  5- to 7-bit codes as two 4-bit MatMulNBits on their high and low bits,
  summed (faster than the 8-bit kernel, same bytes).  ``sym`` is exactly the
  kernel's (c - z) * s; ``asym``'s float offset is added by a small second
  MatMul on the input's group sums (the kernel's float zero points run several
  times slower on the CPU).  The 8-bit kernel computes in float32 several
  times slower than a dense MatMul.
* embedding tables read by ``Gather`` become
  ``com.microsoft.GatherBlockQuantized`` (the same code widths); ``asym`` adds
  the gathered offsets, so each row is the reference decode bit for bit.
* a tied embedding (a table read by Gathers and, through a Transpose, by the
  output head's MatMul) becomes both, on the same codes.

The kernels' block is the largest power of two dividing the codec's group
(scales repeat when it is smaller).  Scales are float32, the kernels' compute
type.  Group sizes without a power-of-two block of at least 16, weights that
are not 2-D float32 and other readers stay dense, with the reason.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from rbeformat import Reader
from rbeformat.codecs.util.arrays import unpack_codes

from .base import MS_DOMAIN, CodecView, Peers, Rewrite, part_shape
from .uses import gather_use, gemm_use, matmul_use, tied_uses

GROUP0_BLOCK = 128  # a per-tensor scale (gquant group 0) repeats over blocks of this size
MIN_BLOCK = 16  # both kernels take power-of-two blocks from 16 up


# -- codes and scales in the kernels' layouts ------------------------------------------


def kernel_bits(bits: int) -> int:
    """The narrowest kernel width (2, 4 or 8) that holds ``bits``-bit codes unchanged."""
    return 2 if bits == 2 else 4 if bits <= 4 else 8


def block_for_group(group: int) -> int | None:
    """The largest power-of-two block of at least 16 dividing ``group``; None when there is none."""
    if group == 0:
        return GROUP0_BLOCK
    block = group & -group
    return block if block >= MIN_BLOCK else None


def pack_rows(codes: np.ndarray, bits: int) -> np.ndarray:
    """Codes (rows, n) as bytes (rows, ceil(n * bits / 8)), each row from a new byte, low bits first."""
    rows, n = codes.shape
    per_byte = 8 // bits
    padded = np.zeros((rows, -(-n // per_byte) * per_byte), np.uint8)
    padded[:, :n] = codes
    grouped = padded.reshape(rows, -1, per_byte)
    out = np.zeros(grouped.shape[:2], np.uint8)
    for i in range(per_byte):
        out |= grouped[..., i] << np.uint8(i * bits)
    return out


@dataclass
class GroupedCodes:
    """A 2-D ``gquant`` tensor (rows, n) as its codes and per-group floats, grouped along n."""

    bits: int
    mode: str
    group: int  # 0: one scale for the whole tensor
    codes: np.ndarray  # uint8 (rows, n)
    scales: np.ndarray  # (rows, groups) or (1,) for group 0, in the stored scale dtype
    offsets: np.ndarray | None  # asym: like scales

    @property
    def shape(self) -> tuple[int, int]:
        return self.codes.shape

    def per_block(self, values: np.ndarray, block: int) -> np.ndarray:
        """Per-group floats repeated for each ``block`` of the row: (rows, ceil(n / block)) float32."""
        rows, n = self.shape
        blocks = -(-n // block)
        if self.group == 0:
            return np.full((rows, blocks), np.float32(values.reshape(-1)[0]), np.float32)
        return values.astype(np.float32)[:, (np.arange(blocks) * block) // self.group]


def read_gquant(r: Reader, name: str, prefix: str, transform) -> GroupedCodes:
    """The parts of the gquant ``transform`` reached by ``prefix`` ("" or "values.") of tensor ``name``."""
    codec = transform.codec
    shape = part_shape(r, name, prefix)
    codes = unpack_codes(r.get_part(name, prefix + "codes"), codec.bits, math.prod(shape), f"tensor {name!r}")
    offsets = r.get_part(name, prefix + "zeros") if codec.mode == "asym" else None
    return GroupedCodes(
        codec.bits, codec.mode, codec.group, codes.reshape(shape), r.get_part(name, prefix + "scales"), offsets
    )


# -- MatMulNBits: a Linear weight (N out, K in) grouped along K ------------------------


def matmul_nbits_initializers(weight: GroupedCodes, block: int, tag: str) -> tuple[list, list, dict, bool]:
    """MatMulNBits' initializers for ``weight`` (N, K): all of them, (bits, input names) of each
    MatMulNBits (one, or two for split codes: see ``code_planes``), the shared attributes, and a flag
    saying the offsets are added apart (asym: see ``_offset_initializers``)."""
    n_out, k_in = weight.shape
    blocks = -(-k_in // block)
    inits, inputs = [], []
    for plane, (codes, bits, scale_factor, zero) in enumerate(code_planes(weight)):
        at = f"{tag}:{plane}" if plane else tag
        padded = np.zeros((n_out, blocks * block), np.uint8)
        padded[:, :k_in] = codes
        packed = pack_rows(padded.reshape(n_out * blocks, block), bits).reshape(n_out, blocks, block * bits // 8)
        scales = weight.per_block(weight.scales, block) * np.float32(scale_factor)  # a power of two: exact
        names = [f"{at}:codes", f"{at}:scales"]
        inits += [numpy_helper.from_array(packed, names[0]), numpy_helper.from_array(scales, names[1])]
        if zero != 2 ** (bits - 1):  # the kernel's default zero point
            names.append(f"{at}:zero_points")
            inits.append(numpy_helper.from_array(pack_rows(np.full((n_out, blocks), zero, np.uint8), bits), names[2]))
        inputs.append((bits, names))
    offsets_apart = weight.mode == "asym"
    if offsets_apart:
        inits += _offset_initializers(weight, tag)
    return inits, inputs, {"K": k_in, "N": n_out, "block_size": block}, offsets_apart


def code_planes(weight: GroupedCodes) -> list[tuple[np.ndarray, int, int, int]]:
    """(codes, kernel bits, scale factor, zero point) per MatMulNBits computing (c - z) * s.

    2-, 3-, 4- and 8-bit codes are one plane (3-bit in the 4-bit kernel with its
    own zero point).  5- to 7-bit codes c = h * 2**r + l (r = bits - 4) are two
    4-bit planes, because the 8-bit kernel computes several times slower on the
    CPU than two 4-bit ones: (c - z) * s = (h - 8) * (2**r * s) + l * s, since
    z = 2**(bits - 1) = 8 * 2**r; the same bytes as 8-bit codes.
    """
    centre = 2 ** (weight.bits - 1)
    if weight.bits <= 4 or weight.bits == 8:
        return [(weight.codes, kernel_bits(weight.bits), 1, centre)]
    low_bits = weight.bits - 4
    high = weight.codes >> np.uint8(low_bits)
    low = weight.codes & np.uint8((1 << low_bits) - 1)
    return [(high, 4, 2**low_bits, 8), (low, 4, 1, 0)]


def _offset_initializers(weight: GroupedCodes, tag: str) -> list:
    """For asym: a (K, groups) 0/1 matrix summing A over each group, and u (groups, N).

    An asym weight is c * s + o = (c - z) * s + u with u = o + z * s and z the
    centre 2**(bits-1): MatMulNBits computes A @ ((c - z) * s).T, and
    (A @ groups) @ u adds the rest.  The kernel's float zero points would take
    o directly, but on the CPU they run several times slower than integer ones,
    and at 8 bits they are refused; centring keeps both terms small, so that
    their sum loses no more than a rounding.  A group of scale 0 gets u = o.
    """
    n_out, k_in = weight.shape
    group = weight.group or k_in
    groups = -(-k_in // group)
    membership = (np.arange(k_in)[:, None] // group == np.arange(groups)[None, :]).astype(np.float32)
    centre = 2.0 ** (weight.bits - 1)
    u = weight.offsets.astype(np.float64) + centre * weight.scales.astype(np.float64)
    u_t = np.ascontiguousarray(np.broadcast_to(u.reshape(-1, groups), (n_out, groups)).T.astype(np.float32))
    return [
        numpy_helper.from_array(membership, groups_name(k_in, group)),
        numpy_helper.from_array(u_t, f"{tag}:offsets"),
    ]


def groups_name(k_in: int, group: int) -> str:
    """The group-sum matrix depends only on K and the group: weights that share them share it."""
    return f"rbe:groups:{k_in}:{group}"


def matmul_nbits_nodes(
    tag: str, attrs: dict, inputs: list[tuple[int, list[str]]], groups: str | None, a_name: str, out_name: str
) -> list:
    """Nodes computing out = A @ W.T on the packed codes (``inputs``: each MatMulNBits' bits and
    initializers, their products summed; ``groups``: the group-sum matrix's name when offsets are added apart)."""
    at = f"rbe:{out_name}"
    terms = [out_name] if len(inputs) == 1 and not groups else [f"{at}:product{i}" for i in range(len(inputs))]
    nodes = [
        helper.make_node(
            "MatMulNBits", [a_name] + names, [term], name=f"{at}/matmul{i or ''}", domain=MS_DOMAIN, bits=bits, **attrs
        )
        for i, ((bits, names), term) in enumerate(zip(inputs, terms))
    ]
    if groups:  # + sum over groups g of (sum of A over g) * u[n, g]
        nodes += [
            helper.make_node("MatMul", [a_name, groups], [f"{at}:group_sums"], name=f"{at}/sums"),
            helper.make_node(
                "MatMul", [f"{at}:group_sums", f"{tag}:offsets"], [f"{at}:offset_term"], name=f"{at}/offsets"
            ),
        ]
        terms.append(f"{at}:offset_term")
    if len(terms) > 1:
        nodes.append(helper.make_node("Sum", terms, [out_name], name=f"{at}/sum"))
    return nodes


def matmul_form(weight: GroupedCodes, block: int) -> str:
    planes = code_planes(weight)
    bits = planes[0][1]
    form = f"MatMulNBits {bits}-bit block {block}"
    if len(planes) > 1:
        form = f"2 x {form} ({weight.bits}-bit codes as high and low 4-bit parts)"
    elif weight.bits != bits:
        form += f" ({weight.bits}-bit codes)"
    return form + (", offsets as a group-sum MatMul" if weight.mode == "asym" else "")


def _rewrite_linear(weight: GroupedCodes, block: int, uses: list, name: str) -> Rewrite:
    tag = f"rbe:{name}"
    inits, inputs, attrs, offsets_apart = matmul_nbits_initializers(weight, block, tag)
    groups = groups_name(attrs["K"], weight.group or attrs["K"]) if offsets_apart else None
    nodes = {}
    for position, node, _ in uses:
        has_bias = node.op_type == "Gemm" and len(node.input) > 2 and node.input[2] != ""
        out = f"rbe:{node.output[0]}:linear" if has_bias else node.output[0]
        nodes[position] = matmul_nbits_nodes(tag, attrs, inputs, groups, node.input[0], out)
        if has_bias:
            nodes[position].append(
                helper.make_node("Add", [out, node.input[2]], [node.output[0]], name=f"rbe:{node.output[0]}/bias")
            )
    return Rewrite(matmul_form(weight, block), inits, nodes)


# -- GatherBlockQuantized: an embedding table (rows, dim) grouped along dim -------------


def gather_bits(weight: GroupedCodes) -> int:
    """Kernel width for a table: every row must start on a byte, else 8 bits."""
    bits = kernel_bits(weight.bits)
    return bits if weight.shape[1] * bits % 8 == 0 else 8


def gather_initializers(weight: GroupedCodes, block: int, tag: str) -> list:
    """Packed codes, float32 scales per block, zero points unless the kernel's default fits, and
    in asym mode the offsets (in their stored dtype) with each column's group."""
    rows, dim = weight.shape
    bits = gather_bits(weight)
    inits = [
        numpy_helper.from_array(pack_rows(weight.codes, bits), f"{tag}:codes"),
        numpy_helper.from_array(weight.per_block(weight.scales, block), f"{tag}:scales"),
    ]
    zero = 0 if weight.mode == "asym" else 2 ** (weight.bits - 1)  # asym: codes times scales, offsets added
    if zero != 2 ** (bits - 1):  # the kernel's default zero point
        blocks = -(-dim // block)
        inits.append(
            numpy_helper.from_array(pack_rows(np.full((rows, blocks), zero, np.uint8), bits), f"{tag}:zero_points")
        )
    if weight.mode == "asym" and weight.group == 0:
        inits.append(numpy_helper.from_array(weight.offsets.astype(np.float32).reshape(1), f"{tag}:offset"))
    elif weight.mode == "asym":
        inits += [
            numpy_helper.from_array(np.ascontiguousarray(weight.offsets), f"{tag}:offsets"),
            numpy_helper.from_array(np.arange(dim, dtype=np.int64) // weight.group, f"{tag}:columns"),
        ]
    return inits


def gather_nodes(weight: GroupedCodes, block: int, tag: str, inputs: list[str], indices: str, out_name: str) -> list:
    """Nodes computing out = decoded_table[indices], row for row exactly.

    asym adds each row's offsets, gathered in their stored dtype and then cast
    (a float16 table takes half the memory and widens exactly), spread over
    their groups' columns.
    """
    at = f"rbe:{out_name}"
    product = f"{at}:product" if weight.mode == "asym" else out_name
    nodes = [
        helper.make_node(
            "GatherBlockQuantized",
            [inputs[0], indices, *inputs[1:]],
            [product],
            name=f"{at}/gather",
            domain=MS_DOMAIN,
            bits=gather_bits(weight),
            block_size=block,
            gather_axis=0,
            quantize_axis=1,
        )
    ]
    if weight.mode == "asym" and weight.group == 0:
        nodes.append(helper.make_node("Add", [product, f"{tag}:offset"], [out_name], name=f"{at}/add_offset"))
    elif weight.mode == "asym":
        nodes += [
            helper.make_node(
                "Gather", [f"{tag}:offsets", indices], [f"{at}:row_offsets"], name=f"{at}/offsets", axis=0
            ),
            helper.make_node(
                "Cast", [f"{at}:row_offsets"], [f"{at}:row_offsets32"], name=f"{at}/cast", to=TensorProto.FLOAT
            ),
            helper.make_node(
                "Gather", [f"{at}:row_offsets32", f"{tag}:columns"], [f"{at}:spread"], name=f"{at}/spread", axis=-1
            ),
            helper.make_node("Add", [product, f"{at}:spread"], [out_name], name=f"{at}/add_offsets"),
        ]
    return nodes


def gather_form(weight: GroupedCodes, block: int) -> str:
    bits = gather_bits(weight)
    form = f"GatherBlockQuantized {bits}-bit block {block}"
    if weight.bits != bits:
        form += f" ({weight.bits}-bit codes)"
    return form + (", offsets gathered" if weight.mode == "asym" else "")


def _rewrite_table(weight: GroupedCodes, block: int, uses: list, name: str) -> Rewrite:
    tag = f"rbe:{name}:table"  # a tied embedding is also a MatMul's weight, packed apart under its own tag
    inits = gather_initializers(weight, block, tag)
    inputs = [t.name for t in inits if t.name.endswith((":codes", ":scales", ":zero_points"))]
    nodes = {
        position: gather_nodes(weight, block, tag, inputs, node.input[1], node.output[0]) for position, node, _ in uses
    }
    return Rewrite(gather_form(weight, block), inits, nodes)


# -- a tied table: lookups and output head on the same codes ---------------------------


def _rewrite_tied(weight: GroupedCodes, block: int, gathers: list, through: list, matmuls: list, name: str) -> Rewrite:
    """A tied table: its lookups as GatherBlockQuantized, the Transpose and MatMul of the head as
    one MatMulNBits on the same codes (a table row is a head's output row, grouped along K)."""
    parts = [_rewrite_linear(weight, block, matmuls, name)]
    if gathers:
        parts.append(_rewrite_table(weight, block, gathers, name))
    nodes = {position: [] for position, _, _ in through}  # the Transpose is no longer needed
    for part in parts:
        nodes.update(part.nodes)
    return Rewrite(" + ".join(part.form for part in parts), [i for part in parts for i in part.initializers], nodes)


# -- choosing a form per weight ----------------------------------------------------------


def plan_gquant(
    r: Reader, name: str, view: CodecView, uses: list, flipped: bool, readers: dict, peers: Peers
) -> Rewrite | str:
    """The kernels' form of gquant weight ``name`` given the nodes reading it, or why it must be dense
    (the table's rewriter for ``gquant.sym`` and ``gquant.asym``; see ``rewriters``)."""
    entry = r.stored_entry(name)
    transform, prefix = view.transform, view.prefix
    transposed = view.transposed != flipped
    if entry.dtype.name != "F32" or len(entry.shape) != 2:
        return f"gquant on {entry.dtype.name} {list(entry.shape)}: mapped only for 2-D float32 weights"
    block = block_for_group(transform.codec.group)
    if block is None:
        return f"gquant group {transform.codec.group} has no power-of-two block of 16 or more"
    if uses and transposed and all(matmul_use(node, index) for _, node, index in uses):
        return _rewrite_linear(read_gquant(r, name, prefix, transform), block, uses, name)
    if uses and not transposed and all(gemm_use(node, index) for _, node, index in uses):
        return _rewrite_linear(read_gquant(r, name, prefix, transform), block, uses, name)
    if uses and not transposed and all(gather_use(node, index) for _, node, index in uses):
        return _rewrite_table(read_gquant(r, name, prefix, transform), block, uses, name)
    tied = tied_uses(uses, readers) if not transposed else None
    if tied is not None:
        return _rewrite_tied(read_gquant(r, name, prefix, transform), block, *tied, name)
    kinds = ", ".join(sorted({node.op_type for _, node, _ in uses})) or "no node"
    wanted = "a MatMul's B (it is stored transposed)" if transposed else "a Gather table or a Gemm's transB=1 B"
    return f"gquant; mapped when every reader takes it as {wanted}, here read by {kinds}"
