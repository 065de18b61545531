"""The contract of tensor codecs: lossy (or structural) transforms of a whole tensor.

A tensor codec turns a float32 tensor into named *parts* (small numpy arrays:
packed codes, scales, factors, indices) plus a few JSON parameters, and back.
Each part is stored by the container like a tensor of its own: losslessly by
default, or by another tensor codec named in the chain (for example the
factors of a low-rank codec quantized to 4 bits).  This module knows nothing
of the container; the container knows nothing of codec math.

A codec is a frozen dataclass whose fields are declared with
``fields.setting`` (validator, description, role).  A concrete codec writes:

* ``part_specs(params, shape, where)``: exactly which parts decoding needs,
  from the config, the params and the shape alone.  The reader checks the
  stored parts against it before decoding, so a hostile file cannot make a
  decoder index out of bounds; the bit cost (``bit_cost``) is derived from it.
* ``encode_array(x, refs)`` and ``decode_parts(parts, params, shape, where,
  refs)``, which mirror each other; ``encode`` and ``decode`` here wrap them
  with the checks every codec shares.
* optionally ``accepts`` (the shapes it takes), ``check_settings`` (rules
  between fields), ``formula`` (the decode formula a loader runs), and the
  three methods of shared state (``shared_group``, ``build_shared``,
  ``bind_shared``) when tensors share stored state (a norm base today).

Every concrete subclass with a ``name`` registers itself; ``registry`` imports
every module of this package, so adding a codec is adding its file.
"""

from __future__ import annotations

import dataclasses
import math
from abc import ABC, abstractmethod
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from ...errors import FormatError
from ...spec import DTYPES
from ..util.arrays import check_shape
from .base import require_keys
from .fields import ROLES, describe_settings, fields_by_role


@dataclass(frozen=True)
class PartSpec:
    """The dtype (an rbe dtype name such as "U8", "F16", "F32") and shape of a part."""

    dtype: str
    shape: tuple[int, ...]

    @property
    def bits(self) -> int:
        """Bits of the part stored raw."""
        return 8 * DTYPES[self.dtype].itemsize * math.prod(self.shape)


@dataclass
class Encoded:
    """What ``encode`` returns: the parts and the per-tensor parameters."""

    parts: dict[str, np.ndarray]
    params: dict[str, Any]


@dataclass(frozen=True)
class DecodePlan:
    """What a runtime needs to decode a tensor without this package's code.

    ``formula`` names one decode formula of the codec's specification file
    (``spec/codecs/<file>.md``); ``parts`` are the arrays it reads, with their
    dtypes and shapes; ``constants`` are the numbers it needs (the stored
    config and the tensor's params).  A loader maps formulas to operators
    from this declaration alone.
    """

    formula: str
    parts: dict[str, PartSpec]
    constants: dict[str, Any]


@dataclass(frozen=True)
class Calibration:
    """What an encoder may know of a tensor's use, measured on calibration data.

    For a Linear weight W (out x in, the input axis last), ``hessian`` is
    E[x x^T] over the layer's inputs x (in x in).  ``method`` names what the
    encoder does with it: ``gptq`` (error compensation, see ``gptq``) or
    ``wanda`` (importance |w| * sqrt(E[x_j^2]) for pruning).  Calibration
    changes only what the encoder chooses; decoding never sees it.
    ``samples``, when given, are the inputs x themselves (tokens x in, float32),
    kept where they are few beside the input width: an output error computed
    from them costs tokens / in of one computed from ``hessian``.
    """

    method: str
    hessian: np.ndarray
    samples: np.ndarray | None = None

    @property
    def input_norms(self) -> np.ndarray:
        """sqrt(E[x_j^2]) per input column: how strongly each column of W is used."""
        return np.sqrt(np.maximum(np.diag(self.hessian), 0.0))


REGISTERED: dict[str, type[TensorCodec]] = {}


@dataclass(frozen=True)
class TensorCodec(ABC):
    """float32 tensor -> parts + params -> float32 tensor."""

    name: ClassVar[str]
    # True when decoding reproduces every accepted input bit for bit (see is_lossless).
    lossless: ClassVar[bool] = False
    must_understand: ClassVar[bool] = True
    # Parts that a chain may hand to another codec (the rest stay lossless).
    chainable_parts: ClassVar[tuple[str, ...]] = ()
    # Whether encode refuses NaN and infinities (codecs that pass values through set False).
    finite_only: ClassVar[bool] = True
    # Calibration methods (Calibration.method) the encoder uses; see encode_calibrated.
    calibrations: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, register: bool = True, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "name" not in cls.__dict__ or not register:  # register=False: a codec for tests only
            return
        if cls.name in REGISTERED:
            raise RuntimeError(
                f"tensor codec name {cls.name!r} is used by {REGISTERED[cls.name].__name__} and {cls.__name__}"
            )
        REGISTERED[cls.name] = cls

    def __post_init__(self) -> None:
        """Validates every setting; a bad one is a ValueError naming the parameter."""
        try:
            for f in fields_by_role(type(self), *ROLES):
                where = f"{self.name}.{f.name} ({f.metadata['doc']})"
                object.__setattr__(self, f.name, f.metadata["check"](getattr(self, f.name), where))
            self.check_settings(self.name)
        except FormatError as exc:
            raise ValueError(str(exc)) from None

    def check_settings(self, where: str) -> None:  # noqa: B027 (a hook: most codecs have no such rules)
        """Rules between settings (FormatError); each field was checked on its own already."""

    # -- configuration -----------------------------------------------------------
    def config(self) -> dict[str, Any]:
        """The JSON-able configuration stored in the manifest (absent optional settings left out)."""
        return {
            f.name: getattr(self, f.name)
            for f in fields_by_role(type(self), "stored", "recorded")
            if getattr(self, f.name) is not None
        }

    @classmethod
    def from_config(cls, config: Any, where: str) -> TensorCodec:
        """Builds the codec from a manifest configuration, validating every stored field.

        Recorded encoder settings are accepted whatever their value and left
        out: they never affect decoding.
        """
        stored = fields_by_role(cls, "stored")
        required = {f.name for f in stored if f.default is not None}
        optional = {f.name for f in stored if f.default is None} | {f.name for f in fields_by_role(cls, "recorded")}
        require_keys(config, where, required, optional)
        values = {f.name: f.metadata["check"](config[f.name], f"{where}.{f.name}") for f in stored if f.name in config}
        try:
            return cls(**values)
        except ValueError as exc:
            raise FormatError(f"{where}: {exc}") from None

    @classmethod
    def settings_help(cls) -> str:
        """The settings a user may give, with what each means."""
        return describe_settings(cls)

    def describe(self) -> dict[str, Any]:
        """The codec's manifest record."""
        return {"name": self.name, "must_understand": self.must_understand, "config": self.config()}

    def is_lossless(self) -> bool:
        """Whether this configuration decodes every accepted input bit for bit."""
        return self.lossless

    def chainable(self) -> tuple[str, ...]:
        """The parts a chain may transform in this configuration."""
        return self.chainable_parts

    def accepts(self, shape: tuple[int, ...]) -> bool:
        """Whether this codec can encode a tensor of this shape (recipes skip others)."""
        return len(shape) >= 1 and math.prod(shape) > 0

    def groups_last_axis(self) -> bool:
        """Whether the codec cuts each row (the last axis) into groups, blocks or vectors of its own.

        A converter reads it to store a weight kept input x output transposed, so that the
        groups run along its input axis (``transpose(values=...)``); decoding never does."""
        return False

    def references(self) -> list[str]:
        """Names of other tensors this codec reads (e.g. a shared base vector)."""
        return []

    # -- parts -------------------------------------------------------------------
    @abstractmethod
    def part_specs(self, params: Any, shape: tuple[int, ...], where: str) -> dict[str, PartSpec]:
        """Validates ``params`` for a tensor of ``shape``; returns the parts decode needs."""

    def bit_cost(self, params: Any, shape: tuple[int, ...]) -> int:
        """Exact bits of every part stored raw (packed parts count their padding to whole bytes)."""
        return sum(spec.bits for spec in self.part_specs(params, tuple(shape), self.name).values())

    def formula(self, params: Any) -> str:
        """The name of the decode formula, as the codec's specification file gives it."""
        return self.name

    def decode_plan(self, params: Any, shape: tuple[int, ...], where: str) -> DecodePlan:
        """The decode as data: formula, parts with dtypes and shapes, constants (see DecodePlan)."""
        specs = self.part_specs(params, tuple(shape), where)
        stored = {f.name: getattr(self, f.name) for f in fields_by_role(type(self), "stored")}
        return DecodePlan(self.formula(params), specs, {**stored, **(params or {})})

    # -- encoding and decoding ---------------------------------------------------
    def decode_memory(self, params: Any, shape: tuple[int, ...]) -> int:
        """The most bytes ``decode_parts`` holds at once besides its parts, its float32 result included.

        The reader checks this, with the parts and the conversion to the
        tensor's dtype, against its memory budget before decoding
        (rbeformat.budget); ``params`` and ``shape`` have passed
        ``part_specs``.  Codecs state what their decode allocates; this
        default allows the result and two temporaries of its size.
        """
        return 12 * math.prod(shape)

    def encode(
        self, x: np.ndarray, refs: dict[str, np.ndarray] | None = None, calibration: Calibration | None = None
    ) -> Encoded:
        """Encodes a float32 array; ``refs`` holds the decoded referenced tensors.

        With ``calibration`` the encoder chooses its codes for the tensor's
        use (the method must be one of ``calibrations``).  Raises ValueError
        when the codec cannot represent the tensor.
        """
        x = np.asarray(x, dtype=np.float32)
        if not self.accepts(tuple(x.shape)):
            raise ValueError(f"{self.name} cannot encode a tensor of shape {tuple(x.shape)}")
        if self.finite_only and not np.isfinite(x).all():
            raise ValueError(f"{self.name} cannot encode NaN or infinite values")
        if calibration is None:
            encoded = self.encode_array(x, refs or {})
        elif calibration.method not in self.calibrations:
            raise ValueError(
                f"{self.name} has no {calibration.method!r} encoder (it has: {', '.join(self.calibrations) or 'none'})"
            )
        else:
            encoded = self.encode_calibrated(x, refs or {}, calibration)
        # An encoder bug shows here, not later as a file its own reader refuses.
        check_parts(encoded.parts, self.part_specs(encoded.params, tuple(x.shape), self.name), self.name)
        return encoded

    @abstractmethod
    def encode_array(self, x: np.ndarray, refs: dict[str, np.ndarray]) -> Encoded:
        """Encodes a float32 array the codec accepts (finite, when finite_only)."""

    def decode(
        self,
        parts: dict[str, np.ndarray],
        params: Any,
        shape: tuple[int, ...],
        where: str,
        refs: dict[str, np.ndarray] | None = None,
    ) -> np.ndarray:
        """Rebuilds the float32 tensor; FormatError (never another exception) on bad input."""
        shape = check_shape(shape, f"{where}.shape")
        check_parts(parts, self.part_specs(params, shape, where), where)
        return self.decode_parts(parts, params, shape, where, refs or {})

    def encode_calibrated(self, x: np.ndarray, refs: dict[str, np.ndarray], calibration: Calibration) -> Encoded:
        """Encodes with calibration statistics (for codecs that list methods in ``calibrations``)."""
        raise NotImplementedError(f"{self.name} has no calibrated encoder")

    def part_calibration(self, part: str, calibration: Calibration, encoded: Encoded) -> Calibration | None:
        """The calibration that the chain of ``part`` may use, given this tensor's ``calibration``.

        None (the default): a part's chain encodes without calibration, since
        most parts (scales, factors, codes) are not weights applied to the
        calibration inputs.  A codec whose part is such a weight (the kept
        slices of a pruned matrix) returns the statistics of that part's inputs.
        """
        return None

    @abstractmethod
    def decode_parts(
        self, parts: dict[str, np.ndarray], params: Any, shape: tuple[int, ...], where: str, refs: dict[str, np.ndarray]
    ) -> np.ndarray:
        """Rebuilds the tensor from parts already checked against part_specs.

        Must raise FormatError when the values in the parts are inconsistent,
        e.g. an index past the end of a codebook.
        """

    # -- state shared across tensors ---------------------------------------------
    def shared_group(self, dtype: str, shape: tuple[int, ...]) -> Hashable | None:
        """Tensors whose codecs of this name return one key share one stored state.

        None (the default): this codec shares nothing.  A converter loads the
        members of each group, calls ``build_shared`` once on them, stores the
        result as internal tensors, and encodes each member with
        ``bind_shared``; it needs no knowledge of the codec.
        """
        return None

    @classmethod
    def shares_state(cls) -> bool:
        """Whether this codec declares shared state (overrides shared_group)."""
        return cls.shared_group is not TensorCodec.shared_group

    def build_shared(self, members: list[np.ndarray], dtype: str, shape: tuple[int, ...]) -> dict[str, np.ndarray]:
        """The shared state of one group: internal tensor name (``rbe:...``) -> float32 array."""
        raise NotImplementedError(f"{self.name} shares no state")

    def bind_shared(self, names: list[str]) -> TensorCodec:
        """This codec referring to the stored shared tensors ``names`` (as build_shared named them)."""
        raise NotImplementedError(f"{self.name} shares no state")

    def with_settings(self, **changes: Any) -> TensorCodec:
        """A copy with some settings changed (validated again)."""
        return dataclasses.replace(self, **changes)


def check_parts(parts: Any, specs: dict[str, PartSpec], where: str) -> None:
    """The parts must be exactly those of ``specs``: same names, numpy dtypes and shapes."""
    if not isinstance(parts, dict) or set(parts) != set(specs):
        found = sorted(parts) if isinstance(parts, dict) else type(parts).__name__
        raise FormatError(f"{where}: expected parts {sorted(specs)}, found {found}")
    for name, spec in specs.items():
        part = parts[name]
        expected = np.dtype(DTYPES[spec.dtype].numpy_storage)
        if not isinstance(part, np.ndarray) or part.dtype != expected or part.shape != spec.shape:
            got = (str(part.dtype), part.shape) if isinstance(part, np.ndarray) else type(part).__name__
            raise FormatError(f"{where}: part {name!r} should be {spec.dtype} {spec.shape}, found {got}")
