"""How a node reads a weight: the uses a rewriter can replace.

A use is ``(node, index)``: the node, and the position of the weight among
its inputs.  Only standard-domain nodes count; a rewriter maps a weight when
every one of its uses is of a kind it replaces.
"""

from __future__ import annotations

from onnx import helper


def _attribute(node, name: str, default):
    for attr in node.attribute:
        if attr.name == name:
            return helper.get_attribute_value(attr)
    return default


def _standard(node) -> bool:
    return node.domain in ("", "ai.onnx")


def matmul_use(node, index: int) -> bool:
    return node.op_type == "MatMul" and _standard(node) and index == 1


def gemm_use(node, index: int) -> bool:
    """Gemm(A, W, C) with W (N, K) as a Linear weight: transB=1, alpha 1, and beta 1 if C is given."""
    if node.op_type != "Gemm" or not _standard(node) or index != 1:
        return False
    has_bias = len(node.input) > 2 and node.input[2] != ""
    return (
        _attribute(node, "transB", 0) == 1
        and _attribute(node, "transA", 0) == 0
        and _attribute(node, "alpha", 1.0) == 1.0
        and (not has_bias or _attribute(node, "beta", 1.0) == 1.0)
    )


def gather_use(node, index: int) -> bool:
    return node.op_type == "Gather" and _standard(node) and index == 0 and _attribute(node, "axis", 0) == 0


def transpose_use(node, index: int) -> bool:
    return node.op_type == "Transpose" and _standard(node) and _attribute(node, "perm", [1, 0]) in ([1, 0], (1, 0))


def tied_uses(uses: list, readers: dict):
    """(Gathers, Transposes, the MatMuls reading those) for a table that is also an output head
    through a Transpose (a tied embedding, as torch exports it); None for any other readers."""
    gathers = [u for u in uses if gather_use(u[1], u[2])]
    through = [u for u in uses if transpose_use(u[1], u[2])]
    if not through or len(gathers) + len(through) != len(uses):
        return None
    matmuls = [m for _, node, _ in through for m in readers.get(node.output[0], [])]
    if not matmuls or not all(matmul_use(node, index) for _, node, index in matmuls):
        return None
    return gathers, through, matmuls
