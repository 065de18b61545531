"""The ``transpose`` tensor codec: a matrix stored as its transpose, for a chain to encode.

Group quantization (``gquant``), ``vq`` and ``palette`` work along a tensor's
last axis.  A Linear weight stored input x output (an ONNX MatMul's B input,
GPT-2's Conv1D) has its *output* axis last, so their groups would mix the
weights of different inputs, which hurts accuracy and matches no runtime's
4-bit kernel (ONNX Runtime's MatMulNBits groups along the input axis).
``transpose(values=gquant(bits=4, group=32))`` hands the chain the matrix as
output x input instead, so the groups run along the input axis.

A 2-D tensor W (rows x cols) has one part, ``values`` (F32, cols x rows):

    values[j, i] = W[i, j]          (encode)
    W^[i, j]     = values[j, i]     (decode, exact)

``values`` is an ordinary chainable part: stored losslessly, or encoded by
the chain named for it.  The codec itself chooses nothing; calibration of a
weight stored input x output (input second moments H, inputs x inputs) is
handed unchanged to the chain of ``values``, whose last axis is then the input.

>>> w = np.arange(6, dtype=np.float32).reshape(2, 3)
>>> enc = Transpose().encode(w)
>>> enc.parts["values"].tolist(), enc.params
([[0.0, 3.0], [1.0, 4.0], [2.0, 5.0]], {})
>>> Transpose().decode(enc.parts, enc.params, w.shape, "w").tolist()
[[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from .core.base import require_keys
from .core.tensor import Calibration, Encoded, PartSpec, TensorCodec
from .util.arrays import is_matrix, matrix_shape


@dataclass(frozen=True)
class Transpose(TensorCodec):
    """W stored as W^T in the part ``values``; see the module docstring."""

    name = "transpose"
    lossless = True  # values are copied; only a chain on them loses anything
    chainable_parts = ("values",)
    # It chooses nothing itself; calibration is handed on to the chain of ``values``.
    calibrations = ("gptq", "wanda")
    finite_only = False  # values are copied, NaN and infinities included

    def accepts(self, shape: tuple[int, ...]) -> bool:
        return is_matrix(shape)

    def part_specs(self, params: Any, shape: tuple[int, ...], where: str) -> dict[str, PartSpec]:
        """32 * rows * cols bits stored raw."""
        rows, cols = matrix_shape(shape, where, "transpose")
        require_keys(params, f"{where}.params", set())
        return {"values": PartSpec("F32", (cols, rows))}

    def encode_array(self, x: np.ndarray, refs: dict[str, np.ndarray]) -> Encoded:
        return Encoded({"values": np.ascontiguousarray(x.T)}, {})

    def encode_calibrated(self, x: np.ndarray, refs: dict[str, np.ndarray], calibration: Calibration) -> Encoded:
        """The same part; the calibration only has to fit, since part_calibration hands it on.

        The statistics are of the inputs, which index the rows of x (stored input x output).
        """
        inputs = x.shape[0]
        if calibration.hessian.shape != (inputs, inputs):
            raise ValueError(
                f"calibration of shape {calibration.hessian.shape} does not fit a matrix stored "
                f"input x output with {inputs} inputs"
            )
        return self.encode_array(x, refs)

    def part_calibration(self, part: str, calibration: Calibration, encoded: Encoded) -> Calibration | None:
        """For ``values`` (output x input): the same input statistics, now along its last axis."""
        return calibration if part == "values" else None

    def decode_memory(self, params: Any, shape: tuple[int, ...]) -> int:
        return 4 * math.prod(shape)  # the transposed copy

    def decode_parts(
        self, parts: dict[str, np.ndarray], params: Any, shape: tuple[int, ...], where: str, refs: dict[str, np.ndarray]
    ) -> np.ndarray:
        return np.ascontiguousarray(parts["values"].T)
