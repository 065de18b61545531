"""Structured pruning of attention heads by importance, stored by the ``slices`` codec.

An attention head h of a layer reads its slice of the q, k and v projections'
outputs and writes through its input columns S = [h d, (h + 1) d) of the
o-projection W_o (d the head size).  Its importance is the energy it adds to
the layer's output on the calibration text: with H = E[x x^T] the second
moments of the o-projection's input (``calibrate.collect``),

    score(h) = tr(W_o[:, S] H[S, S] W_o[:, S]^T) / tr(W_o H W_o^T),

normalised by the layer's whole output energy so that layers compare.  The
lowest-scored heads of the whole model are pruned, never every head of one
layer.  A pruned head's columns of W_o become zero; without grouped-query
attention its rows of q, k and v (and of their biases) too, since nothing
else reads them; with it (fewer key/value heads than query heads) the k and
v rows of a group only once every query head of the group is pruned.  The
tensors keep their shapes, so the decoded model loads as before, and
``slices`` (axis 1 for W_o, axis 0 for q, k, v) stores only what is left.

Layer 0's last head (0.3) stays, so the fourth head pruned is layer 1's 0.5:

>>> select({0: np.array([0.1, 0.2, 0.3]), 1: np.array([0.5, 0.05, 0.6])}, 4)
{0: [0, 1], 1: [0, 1]}
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .roles import TensorRole

QKV = ("attn_q", "attn_k", "attn_v")


@dataclass(frozen=True)
class Heads:
    """The attention geometry of a model: query heads, key/value heads, size of one head."""

    heads: int
    kv_heads: int
    head_dim: int

    @property
    def grouped(self) -> bool:
        """Grouped-query attention: several query heads share one key/value head."""
        return self.kv_heads < self.heads


@dataclass(frozen=True)
class Layer:
    """The attention tensors of one block: role (attn_q ... attn_o, attn_qkv) -> tensor name, and
    role -> whether the weight's input axis is the last one (False: Conv1D, stored input x output)."""

    weights: dict[str, str]
    orientation: dict[str, bool]  # role -> input_last

    @property
    def o(self) -> str:
        return self.weights["attn_o"]


def heads_of(config: dict) -> Heads:
    """The head geometry a config.json gives (BERT, Llama and GPT-2 key names)."""
    heads = _first(config, "num_attention_heads", "n_head")
    hidden = _first(config, "hidden_size", "n_embd")
    if heads is None or hidden is None:
        raise ValueError("the model config gives no num_attention_heads and hidden_size")
    kv = _first(config, "num_key_value_heads") or heads
    head_dim = _first(config, "head_dim") or hidden // heads
    if heads % kv:
        raise ValueError(f"{heads} attention heads cannot share {kv} key/value heads evenly")
    return Heads(heads, kv, head_dim)


def _first(config: dict, *keys: str) -> int | None:
    return next((config[k] for k in keys if type(config.get(k)) is int and config[k] > 0), None)


def attention_layers(roles: dict[str, TensorRole]) -> dict[int, Layer]:
    """Block index -> its attention tensors, for the blocks that have an o-projection."""
    found: dict[int, dict[str, str]] = {}
    orientation: dict[int, dict[str, bool]] = {}
    for name, role in roles.items():
        if role.layer is not None and role.role in (*QKV, "attn_o", "attn_qkv"):
            found.setdefault(role.layer, {})[role.role] = name
            orientation.setdefault(role.layer, {})[role.role] = role.input_last is not False
    return {i: Layer(found[i], orientation[i]) for i in sorted(found) if "attn_o" in found[i]}


# -- importance ----------------------------------------------------------------------


def _o_matrix(layer: Layer, weights: dict[str, np.ndarray]) -> np.ndarray:
    """W_o as (out, in), whatever its storage (Conv1D stores input x output)."""
    w = np.asarray(weights[layer.o], np.float64)
    return w if layer.orientation["attn_o"] else w.T


def layer_scores(w_o: np.ndarray, hessian: np.ndarray, geometry: Heads) -> np.ndarray:
    """Each head's output energy tr(W_S H_SS W_S^T) over the layer's tr(W H W^T)."""
    inputs = geometry.heads * geometry.head_dim
    if w_o.shape[1] != inputs or hessian.shape != (inputs, inputs):
        raise ValueError(
            f"an o-projection of {w_o.shape} with a Hessian of {hessian.shape} does not fit "
            f"{geometry.heads} heads of {geometry.head_dim}"
        )
    # tr(W_S H_SS W_S^T) = sum over S x S of (W^T W) * H, elementwise.
    energy = (w_o.T @ w_o) * np.asarray(hessian, np.float64)
    d = geometry.head_dim
    per_head = np.array([energy[h * d : (h + 1) * d, h * d : (h + 1) * d].sum() for h in range(geometry.heads)])
    total = energy.sum()
    return per_head / total if total > 0 else np.zeros(geometry.heads)


def head_scores(
    config: dict, roles: dict[str, TensorRole], hessians: dict[str, Any], weights: dict[str, np.ndarray]
) -> dict[int, np.ndarray]:
    """Block index -> the normalised score of each of its heads.

    ``hessians`` maps each o-projection weight's name to E[x x^T] of its input
    (an array, or a ``Calibration`` as ``calibrate.collect`` returns).
    """
    geometry = heads_of(config)
    out = {}
    for index, layer in attention_layers(roles).items():
        if layer.o not in hessians:
            raise ValueError(f"no calibration Hessian for {layer.o}")
        hessian = getattr(hessians[layer.o], "hessian", hessians[layer.o])
        out[index] = layer_scores(_o_matrix(layer, weights), np.asarray(hessian), geometry)
    return out


def select(scores: dict[int, np.ndarray], count: int) -> dict[int, list[int]]:
    """The ``count`` lowest-scored heads over all layers, leaving every layer at least one head."""
    ranked = sorted((float(s), layer, head) for layer, row in scores.items() for head, s in enumerate(row))
    room = {layer: len(row) - 1 for layer, row in scores.items()}
    chosen: dict[int, list[int]] = {}
    for _, layer, head in ranked:
        if count <= 0:
            break
        if room[layer] > 0:  # the layer's last head stays, however low it scores
            room[layer] -= 1
            count -= 1
            chosen.setdefault(layer, []).append(head)
    return {layer: sorted(heads) for layer, heads in sorted(chosen.items())}


def choose_heads(
    config: dict,
    roles: dict[str, TensorRole],
    hessians: dict[str, Any],
    weights: dict[str, np.ndarray],
    fraction: float,
) -> dict[int, list[int]]:
    """Block index -> the heads to prune: ``fraction`` of all heads (rounded), lowest scores first.

    Layers without pruned heads are left out.  Fewer heads are chosen when
    the fraction would leave some layer with none.
    """
    _check_fraction(fraction)
    return select_share(head_scores(config, roles, hessians, weights), fraction)


def _check_fraction(fraction: float) -> None:
    if not 0 <= fraction < 1:
        raise ValueError(f"the fraction of heads to prune must be in [0, 1), not {fraction!r}")


def select_share(scores: dict[int, np.ndarray], fraction: float) -> dict[int, list[int]]:
    """``select`` of ``fraction`` of all heads (rounded), from scores already computed."""
    _check_fraction(fraction)
    total = sum(len(row) for row in scores.values())
    return select(scores, int(np.floor(fraction * total + 0.5)))


# -- the pruned tensors --------------------------------------------------------------


def _head_span(head: int, head_dim: int, offset: int = 0) -> slice:
    return slice(offset + head * head_dim, offset + (head + 1) * head_dim)


def _zero_outputs(w: np.ndarray, spans: list[slice], input_last: bool) -> np.ndarray:
    """A copy with the output rows in ``spans`` zeroed (output columns for a transposed weight or a bias)."""
    out = np.array(w, np.float32)
    for span in spans:
        if out.ndim == 1 or input_last:
            out[span] = 0
        else:
            out[:, span] = 0
    return out


def _zero_inputs(w: np.ndarray, spans: list[slice], input_last: bool) -> np.ndarray:
    """A copy with the input columns in ``spans`` zeroed (input rows for a transposed weight)."""
    out = np.array(w, np.float32)
    for span in spans:
        if input_last:
            out[:, span] = 0
        else:
            out[span] = 0
    return out


def _bias(name: str, weights: dict[str, np.ndarray]) -> str | None:
    """The bias beside a ``....weight``, if the checkpoint has one."""
    bias = name[: -len("weight")] + "bias" if name.endswith(".weight") else None
    return bias if bias in weights else None


def _output_spans(geometry: Heads, heads: list[int]) -> dict[str, list[slice]]:
    """Role -> the output rows of q, k, v to zero for the pruned ``heads`` of one layer."""
    d = geometry.head_dim
    if not geometry.grouped:
        return {role: [_head_span(h, d) for h in heads] for role in QKV}
    # A key/value head goes only with every query head that reads it.
    per_group = geometry.heads // geometry.kv_heads
    groups = [g for g in range(geometry.kv_heads) if set(range(g * per_group, (g + 1) * per_group)) <= set(heads)]
    kv = [_head_span(g, d) for g in groups]
    return {"attn_q": [], "attn_k": kv, "attn_v": list(kv)}


def _fused_spans(geometry: Heads, spans: dict[str, list[slice]]) -> list[slice]:
    """The same rows in a fused q|k|v projection, q first, then k, then v."""
    q_rows, kv_rows = geometry.heads * geometry.head_dim, geometry.kv_heads * geometry.head_dim
    offsets = {"attn_q": 0, "attn_k": q_rows, "attn_v": q_rows + kv_rows}
    return [slice(offsets[role] + s.start, offsets[role] + s.stop) for role, found in spans.items() for s in found]


def _prune_layer(layer: Layer, geometry: Heads, heads: list[int], weights: dict[str, np.ndarray]) -> dict:
    out = {
        layer.o: _zero_inputs(
            weights[layer.o], [_head_span(h, geometry.head_dim) for h in heads], layer.orientation["attn_o"]
        )
    }
    spans = _output_spans(geometry, heads)
    targets = [(role, spans[role]) for role in QKV if role in layer.weights]
    if "attn_qkv" in layer.weights:
        targets.append(("attn_qkv", _fused_spans(geometry, spans)))
    for role, found in targets:
        if not found:
            continue
        name = layer.weights[role]
        out[name] = _zero_outputs(weights[name], found, layer.orientation[role])
        bias = _bias(name, weights)
        if bias is not None:
            out[bias] = _zero_outputs(weights[bias], found, True)
    return out


def prune(
    config: dict, roles: dict[str, TensorRole], weights: dict[str, np.ndarray], pruned: dict[int, list[int]]
) -> dict[str, np.ndarray]:
    """Tensor name -> its pruned float32 copy, for the tensors that change (see the module docstring)."""
    geometry = heads_of(config)
    layers = attention_layers(roles)
    out: dict[str, np.ndarray] = {}
    for index, heads in sorted(pruned.items()):
        if not heads:
            continue
        if index not in layers:
            raise ValueError(f"block {index} has no attention o-projection")
        if not all(type(h) is int and 0 <= h < geometry.heads for h in heads) or len(set(heads)) == geometry.heads:
            raise ValueError(
                f"block {index}: heads {heads} must be distinct indices below {geometry.heads}, and not all of them"
            )
        out.update(_prune_layer(layers[index], geometry, sorted(set(heads)), weights))
    return out


def summary(config: dict, pruned: dict[int, list[int]], layers: int | None = None) -> str:
    """One line for the command line: how many heads went, and where."""
    geometry = heads_of(config)
    layers = layers if layers is not None else _first(config, "num_hidden_layers", "n_layer")
    count = sum(len(h) for h in pruned.values())
    of = f" of {geometry.heads * layers} ({100 * count / (geometry.heads * layers):.1f}%)" if layers else ""
    where = "; ".join(f"{i}: {', '.join(map(str, h))}" for i, h in sorted(pruned.items()) if h) or "none"
    return f"pruned {count}{of} attention heads by calibration importance; by layer {where}"
