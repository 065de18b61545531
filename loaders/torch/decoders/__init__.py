"""Stored tensors rebuilt by torch at each use, from their codec parts kept compressed in memory.

>>> from rbe_loaders.torch.decoders import build_decoder, decode_at_load_reason   # doctest: +SKIP
>>> with Reader("model.rbe") as r:
...     dec = build_decoder(r, "model.layers.0.mlp.up_proj.weight")  # None: decode it at load
...     y = dec.linear(x)               # x @ W.T, W never held
...     w = dec()                       # the dense float32 tensor, as Reader.get_tensor gives it

``build_decoder`` gives a ``WeightDecoder`` (``base``): a ``torch.nn.Module``
holding one stored tensor's codec parts as buffers and rebuilding the tensor
with torch ops at each ``forward``, ``rows``, ``linear`` or ``matmul``;
``base`` says how exact each is, ``gquant`` describes its int4 kernel.

The table
---------
``DECODERS`` maps a decode formula to the decoder class that runs it, one row
per formula.  A stored transform's formula is the one its codec declares for
its params (``TensorCodec.formula(params)``, the ``formula`` of its
``decode_plan``, named by the codec's file in the spec): the codec's name by
default, ``gquant.sym`` / ``gquant.asym`` by mode, ``sparse.mask`` /
``sparse.deltas`` by index structure.  The rows, and what each decoder keeps:

=============  =========  ====================================================
formula        module     what its decoder keeps
=============  =========  ====================================================
gquant.sym     gquant     packed codes (uint8), scales in their stored dtype
gquant.asym    gquant     packed codes, scales and zeros in their stored dtype
transpose      transpose  its ``values`` part
lowrank        lowrank    A, B and the residual, each a part
palette        palette    packed indices, codebooks in their stored dtype
vq             vq         packed indices, codebook and scales (F16 parts)
sparse.mask    sparse     values; the packed mask
sparse.deltas  sparse     values; the packed delta codes
nm24           sparse     packed 13-bit pattern codes, values
seed           seed       seeds, packed coefficient and exponent codes; the
                          basis u(s) of every seed from one table shared per
                          (S, C, P) and device
=============  =========  ====================================================

Giving torch a new codec (or a new formula of one) is one decoder module
here, a ``base.WeightDecoder`` subclass built from a ``base.Site``, and one
row per formula it runs.  A tensor stored plainly, or whose top codec's
formula has no row or that reads other tensors (``normdelta``), gets no
decoder: ``build_decoder`` returns None and ``decode_at_load_reason`` says
why (the caller decodes the tensor at load).  A chained part whose codec has
no row is decoded once, at build (``WeightDecoder.hold``).

Index values that could point past a table (vq indices, seeds, nm24 pattern
codes, sparse index structures) are checked once at build, as the reference
decode checks them, so that the torch ops never index out of bounds; a
malformed part raises ``rbeformat.FormatError``.  Non-finite scales, zeros
and codebooks are refused at build as the reference refuses them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from rbeformat import FormatError, RbeError, Reader
from rbeformat.manifest import Transform

from .base import Options, Site, WeightDecoder
from .gquant import GQuantDecoder
from .lowrank import LowRankDecoder
from .palette import PaletteDecoder
from .seed import SeedDecoder
from .sparse import NM24Decoder, SparseDecoder
from .transpose import TransposeDecoder
from .vq import VQDecoder

# -- the table ------------------------------------------------------------------------------

DECODERS: dict[str, Callable[[Site], WeightDecoder]] = {
    "gquant.sym": GQuantDecoder,
    "gquant.asym": GQuantDecoder,
    "transpose": TransposeDecoder,
    "lowrank": LowRankDecoder,
    "palette": PaletteDecoder,
    "vq": VQDecoder,
    "sparse.mask": SparseDecoder,
    "sparse.deltas": SparseDecoder,
    "nm24": NM24Decoder,
    "seed": SeedDecoder,
}


def _row(transform: Transform) -> Callable[[Site], WeightDecoder] | None:
    """The decoder class of the formula ``transform``'s codec declares for its params; None if it has no row."""
    return DECODERS.get(transform.codec.formula(transform.params))


def _unmapped(transform: Transform) -> str | None:
    codec = transform.codec
    if codec.references():
        return f"{codec.name} reads other tensors ({', '.join(codec.references())})"
    if _row(transform) is None:
        return f"{codec.name} has no torch mapping"
    return None


def _build(site: Site) -> WeightDecoder | None:
    if _unmapped(site.transform) is not None:
        return None
    return _row(site.transform)(site)


# -- the entry points -----------------------------------------------------------------------


def decode_at_load_reason(reader: Reader, name: str) -> str | None:
    """Why ``build_decoder`` gives no decoder for tensor ``name`` (the caller decodes it at load); None if it does."""
    transform = reader.stored_entry(name).transform
    if transform is None:
        return "stored losslessly"
    return _unmapped(transform)


def build_decoder(
    reader: Reader, name: str, device="cpu", *, kernel: str = "int4", tables: dict | None = None, lookups: bool = True
) -> WeightDecoder | None:
    """The decoder of tensor ``name`` with its buffers on ``device``, or None (see ``decode_at_load_reason``).

    ``kernel="int4"`` lets gquant Linear weights run ``linear`` on the CPU int4 kernel where it fits
    (about 0.3% of the output scale off the exact product); ``"exact"`` keeps every path exact.
    ``tables`` holds the shared seed basis tables (default: a module-level cache).  ``lookups=False``
    says only ``linear`` / ``matmul`` will be asked for (a Linear weight, not an embedding table):
    a gquant weight on the int4 kernel then keeps the kernel's buffers alone.
    """
    if kernel not in ("int4", "exact"):
        raise ValueError(f"kernel must be 'int4' or 'exact', not {kernel!r}")
    if decode_at_load_reason(reader, name) is not None:
        return None
    stored = reader.stored_entry(name)
    site = Site(
        reader,
        stored.name,
        "",
        stored.transform,
        tuple(stored.shape),
        stored.dtype.name,
        Options(torch.device(device), kernel, tables, build=_build, lookups=lookups),
    )
    try:
        return _build(site)
    except RbeError:  # rbe's own errors say what they mean (some are also ValueErrors or KeyErrors)
        raise
    except (ValueError, TypeError, KeyError, IndexError, OverflowError) as exc:
        raise FormatError(
            f"{site.where}: malformed {stored.transform.codec.name} data ({type(exc).__name__}: {exc})"
        ) from None


def shared_bytes(decoders: Iterable[WeightDecoder]) -> int:
    """Bytes of the shared tables that ``decoders`` read, each table once."""
    tables = {}
    for decoder in decoders:
        tables.update(decoder.shared_tensors())
    return sum(t.numel() * t.element_size() for t in tables.values())
