"""What replaces a compressed weight in the graph ONNX Runtime runs: one rewriter per codec, one table.

A tensor codec declares the decode formula of each stored tensor
(``TensorCodec.formula``, the ``formula`` of its ``decode_plan``; the names of
``spec/codecs/<codec>.md``).  ``REWRITERS`` maps each formula that ONNX
Runtime can compute on the stored codes to its rewriter; ``LOOK_THROUGH``
maps a formula that only rearranges one part (``transpose``: the tensor is
its part ``values`` transposed) to that part, whose own formula is looked up
in ``REWRITERS``.  ``plan_rewrite`` resolves a weight through the two tables
and calls the rewriter; a weight whose formula has no row stays dense, the
codec's name given as the reason.

A rewriter is ``rewriter(r, name, view, uses, flipped, readers, peers)``:

* ``view`` (``base.CodecView``): the mapped transform, the part prefix that
  reaches it ("" or "values."), whether the tensor is it transposed, and
  its formula;
* ``uses``: (node position, node, input index) of every node reading the
  initializer; ``flipped``: the graph reads the tensor transposed (a Hugging
  Face Linear weight, stored output x input, is an exported MatMul's input x
  output B); ``readers``: the same for every tensor of the graph;
* ``peers(r, tensor)``: the view of another tensor of the file when this
  same rewriter maps it (state shared between weights, such as ``seed``'s
  basis tables, is worth holding only for enough of them).

It returns a ``base.Rewrite``, or a string saying why the weight stays
dense (the report prints it).  Its node-use predicates are in ``uses``.

A new codec with an ONNX Runtime mapping is one new rewriter module here and
one row per formula in ``REWRITERS``.

* ``gquant``: ``gquant.sym`` and ``gquant.asym`` as MatMulNBits and
  GatherBlockQuantized;
* ``seed``: ``seed`` rebuilt by standard operators from one basis table
  shared per (S, C, P).
"""

from __future__ import annotations

from rbeformat import Reader

from . import gquant, seed
from .base import CodecView, LookThrough, Rewrite, formula_of

REWRITERS = {
    "gquant.sym": gquant.plan_gquant,
    "gquant.asym": gquant.plan_gquant,
    "seed": seed.plan_seed,
}
LOOK_THROUGH = {
    "transpose": LookThrough("values", transposed=True),
}


def codec_view(r: Reader, name: str) -> CodecView | None:
    """The view of tensor ``name`` whose formula has a row in ``REWRITERS``: its own transform, or
    the part a ``LOOK_THROUGH`` row names; None when neither is mapped."""
    transform = r.stored_entry(name).transform
    if transform is None:
        return None
    formula = formula_of(transform)
    if formula in REWRITERS:
        return CodecView(transform, "", False, formula)
    through = LOOK_THROUGH.get(formula)
    part = transform.parts.get(through.part) if through is not None else None
    if part is None or part.transform is None:
        return None
    inner = formula_of(part.transform)
    if inner not in REWRITERS:
        return None
    return CodecView(part.transform, through.part + ".", through.transposed, inner)


def plan_rewrite(
    r: Reader, name: str, uses: list[tuple[int, object, int]], flipped: bool = False, readers: dict | None = None
) -> Rewrite | str:
    """The compressed form of weight ``name`` given the nodes reading it, or why it must be dense.
    ``flipped``: the graph reads the tensor transposed (a Linear weight of a Hugging Face checkpoint,
    stored output x input, which an exported MatMul reads input x output)."""
    view = codec_view(r, name)
    if view is None:
        return r.stored_entry(name).transform.codec.name
    rewriter = REWRITERS[view.formula]

    def peers(reader: Reader, tensor: str) -> CodecView | None:
        other = codec_view(reader, tensor)
        return other if other is not None and REWRITERS[other.formula] is rewriter else None

    return rewriter(r, name, view, uses, flipped, readers or {}, peers)
