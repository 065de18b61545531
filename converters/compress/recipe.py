"""Which codec chain each tensor gets: ``--codec SPEC``, a ``--recipe FILE`` or a ``--preset NAME``.

A recipe is a TOML file of rules tried in order; the first rule that matches a
tensor decides its chain.  A rule selects tensors by name (``match``, a
shell-style ``fnmatch`` pattern) or by role (``role = "attn_v"`` or ``roles =
[...]``, see ``converters/compress/roles.py``: token_embedding, position_embedding,
token_type_embedding, attn_q, attn_k, attn_v, attn_o, attn_qkv, mlp_up,
mlp_gate, mlp_down, norm_weight, norm_bias, linear_bias, lm_head, linear,
other), or both, and may narrow the choice with

* ``ndim``: only tensors of that many dimensions;
* ``layers``: only tensors of those blocks (``[0, 1, -1]``; negative indices
  count from the last block); tensors outside the blocks never match;
* ``input_last``: only Linear-like weights whose input axis is (true) or is not
  (false: GPT-2's transposed Conv1D, an ONNX MatMul's weight) the last one, the
  axis group quantization groups along.

A weight stored input x output that a rule *without* ``input_last`` takes, with
a chain whose codec groups along the last axis (``gquant`` with groups,
``palette`` by row or group, ``vq``, ``seed``), is stored as
``transpose(values=CHAIN)`` so that its groups run along the input axis
(``compress.plan.input_axis_grouped``); a rule with ``input_last = false`` gets exactly
the chain it names.

``calibration = "gptq" | "wanda"`` asks for a calibration-aware encoder
for the rule's tensors (``Policy.choose_rule`` hands the rule to the
converter).  ``upgrade = "CHAIN"`` names a costlier chain for the rule's
tensors (or ``upgrade = ["CHAIN", ...]`` several, in order of cost), and a top-level ``budget_bits`` the average bit cost per weight over
all tensors of such rules: the tensors where the upgrade removes the most
output error per extra bit get it (mixed precision, ``converters/compress/mixed.py``); ``budget_counts``
says how: ``"raw"`` (the default: bit cost with parts stored raw) or ``"stored"`` (the
bytes lossless coding stores for the parts), and ``budget_sensitivity`` how the error an upgrade
removes is measured: ``"layer"`` (the default: the layer's own output error on the calibration
text) or ``"model"`` (how far the whole model's outputs move on the calibration text when that
tensor alone takes the chain, ``converters/compress/sensitivity.py``).
A top-level ``prune_heads`` (a fraction in [0, 1)) asks for that share of all
attention heads to be pruned, the least important on the calibration text
first (``converters/compress/heads.py``; the ``slices`` codec stores what is left).
A recipe may carry a one-line top-level ``description`` and say which models it
``suits``: ``"any"`` (the default), ``"decoders"`` (causal LMs) or ``"encoders"``
(sentence encoders); ``rbe presets`` shows both.
Tensors no rule matches stay lossless, as do integer tensors and tensors the
chosen codec cannot take (``accepts``)::

    description = "4-bit Linear layers, 6-bit embeddings"

    [[rule]]
    roles = ["token_embedding", "lm_head"]
    codec = "gquant(bits=6, group=64)"

    [[rule]]
    roles = ["attn_v", "mlp_down"]
    layers = [0, -1]
    codec = "gquant(bits=6, group=64)"

    [[rule]]
    match = "*.weight"
    ndim = 2
    codec = "gquant(bits=4, group=64, mode=asym)"

    [[rule]]
    role = "norm_weight"
    codec = "normdelta(mode=bits)"

Built-in presets are such files in ``converters/compress/presets/`` (``rbe presets``
lists them, ``compress/catalog.py``; ``policy_from_preset``).  Their names are
case-insensitive.  A level ``qN`` with an ``encoder-qN`` file beside it stands for
that recipe on an encoder (``policy_for_model``, by config.json's family,
``roles.model_family``; an .onnx graph by its outputs, in ``pipeline``): on all-MiniLM-L6-v2 ``q4``'s 6-bit word embeddings, half of
the weights, made the file 5.6 bits per weight, ``encoder-q4``'s 4.5.
"""

from __future__ import annotations

import difflib
import fnmatch
import hashlib
import json
import re
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, replace
from importlib import resources
from importlib.resources.abc import Traversable

from rbeformat import UsageError
from rbeformat.chain import Chain, parse_chain
from rbeformat.codecs.registry import TENSOR_CODECS
from rbeformat.spec import DTYPES

from .roles import ROLES, TensorRole, model_family

CALIBRATIONS = ("gptq", "wanda")
RULE_KEYS = ("match", "role", "roles", "ndim", "layers", "input_last", "codec", "calibration", "upgrade")
TOP_LEVEL_KEYS = ("description", "suits", "budget_bits", "budget_counts", "budget_sensitivity", "prune_heads", "rule")
SUITS = ("any", "decoders", "encoders")  # which models a recipe is made for (what rbe presets shows)
DESCRIBING_KEYS = ("description", "suits")  # what says what a recipe is for, not what it encodes
BUDGET_COUNTS = ("raw", "stored")  # converters/compress/mixed.py
BUDGET_SENSITIVITIES = ("layer", "model")  # converters/compress/mixed.py, converters/compress/sensitivity.py


@dataclass
class Rule:
    pattern: str | None  # None: any name (the rule selects by role)
    chain: Chain
    ndim: int | None = None
    roles: frozenset[str] | None = None
    layers: tuple[int, ...] | None = None
    input_last: bool | None = None
    calibration: str | None = None
    upgrades: tuple[Chain, ...] = ()  # ever costlier chains mixed precision may give some tensors

    @property
    def uses_roles(self) -> bool:
        return self.roles is not None or self.layers is not None or self.input_last is not None

    def matches(self, name: str, shape: tuple[int, ...], role: TensorRole | None = None) -> bool:
        """Whether the rule takes this tensor; a rule that asks about roles takes none without one."""
        if self.pattern is not None and not fnmatch.fnmatchcase(name, self.pattern):
            return False
        if self.ndim is not None and len(shape) != self.ndim:
            return False
        if not self.uses_roles:
            return True
        if role is None:
            return False
        if self.roles is not None and role.role not in self.roles:
            return False
        if self.input_last is not None and role.input_last is not self.input_last:
            return False
        return self.layers is None or _in_layers(role, self.layers)


def _in_layers(role: TensorRole, layers: tuple[int, ...]) -> bool:
    if role.layer is None or role.num_layers is None:
        return False
    return any(role.layer == (i if i >= 0 else role.num_layers + i) for i in layers)


@dataclass
class Policy:
    """Maps a tensor to its rule and chain (None: lossless)."""

    rules: list[Rule]
    description: str = ""
    budget_bits: float | None = None  # average bit cost per weight over the tensors of rules with an upgrade
    budget_counts: str = "raw"  # how budget_bits counts: "raw" (bit_cost) or "stored" (after lossless coding)
    budget_sensitivity: str = "layer"  # what an upgrade's gain is measured on: the "layer" or the whole "model"
    prune_heads: float | None = None  # the fraction of all attention heads to prune (converters/compress/heads.py)
    suits: str = "any"  # one of SUITS
    preset: str | None = None  # the built-in preset's name, for a policy from one

    def choose_rule(self, name: str, dtype: str, shape: tuple[int, ...], role: TensorRole | None = None) -> Rule | None:
        """The rule that encodes this tensor, or None when it stays lossless."""
        if not DTYPES[dtype].is_float or dtype.startswith("F8") or dtype == "F64":
            return None
        for rule in self.rules:
            if rule.matches(name, shape, role):
                if rule.chain.lossless or not rule.chain.codec.accepts(tuple(shape)):
                    return None
                return rule
        return None

    def choose(self, name: str, dtype: str, shape: tuple[int, ...], role: TensorRole | None = None) -> Chain | None:
        rule = self.choose_rule(name, dtype, shape, role)
        return rule.chain if rule is not None else None

    @property
    def lossless(self) -> bool:
        return all(r.chain.lossless for r in self.rules)

    @property
    def uses_roles(self) -> bool:
        """Whether choosing needs each tensor's role (``roles.classify``)."""
        return any(r.uses_roles for r in self.rules)

    @property
    def calibrates(self) -> bool:
        """Whether encoding runs the model (the ``hf`` extra: torch and transformers)."""
        return any(r.calibration for r in self.rules) or self.budget_sensitivity == "model" or bool(self.prune_heads)


def lossless_policy() -> Policy:
    return Policy([])


def policy_from_codec(spec: str) -> Policy:
    """``--codec SPEC``: the chain for every 2-D floating-point tensor."""
    return Policy([Rule("*", parse_chain(spec, TENSOR_CODECS), ndim=2)])


def policy_from_recipe(path: str) -> Policy:
    """``--recipe FILE``: rules from a TOML file."""
    try:
        with open(path, "rb") as fh:
            doc = tomllib.load(fh)
    except OSError as exc:
        raise UsageError(f"{path}: cannot read recipe ({exc.strerror})") from None
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"{path}: not valid TOML ({exc})") from None
    return policy_from_document(doc, path)


def policy_from_document(doc: dict, where: str) -> Policy:
    """The policy of a parsed recipe; ``where`` names it in errors."""
    unknown = set(doc) - set(TOP_LEVEL_KEYS)
    if unknown:
        raise UsageError(f"{where}: unknown top-level key(s) {sorted(unknown)} (valid: {', '.join(TOP_LEVEL_KEYS)})")
    description = doc.get("description", "")
    if not isinstance(description, str):
        raise UsageError(f"{where}: 'description' must be a string")
    suits = doc.get("suits", "any")
    if suits not in SUITS:
        raise UsageError(f"{where}: 'suits' must be one of {', '.join(map(repr, SUITS))}")
    rules = doc.get("rule", [])
    if not isinstance(rules, list):
        raise UsageError(f"{where}: 'rule' must be an array of tables ([[rule]])")
    parsed = [_rule(raw, f"{where}: rule {i + 1}") for i, raw in enumerate(rules)]
    budget = doc.get("budget_bits")
    upgrades = any(r.upgrades for r in parsed)
    if budget is not None and (type(budget) not in (int, float) or not 0 < budget <= 64):
        raise UsageError(f"{where}: 'budget_bits' must be a number of bits per weight in (0, 64]")
    if (budget is None) == upgrades:
        raise UsageError(f"{where}: 'budget_bits' and rules with 'upgrade' go together")
    counts = doc.get("budget_counts", "raw")
    if counts not in BUDGET_COUNTS or (budget is None and "budget_counts" in doc):
        raise UsageError(
            f"{where}: 'budget_counts' must be one of {', '.join(map(repr, BUDGET_COUNTS))}, beside a 'budget_bits'"
        )
    sensitivity = doc.get("budget_sensitivity", "layer")
    if sensitivity not in BUDGET_SENSITIVITIES or (budget is None and "budget_sensitivity" in doc):
        raise UsageError(
            f"{where}: 'budget_sensitivity' must be one of "
            f"{', '.join(map(repr, BUDGET_SENSITIVITIES))}, beside a 'budget_bits'"
        )
    return Policy(
        parsed,
        description,
        budget_bits=None if budget is None else float(budget),
        budget_counts=counts,
        budget_sensitivity=sensitivity,
        prune_heads=_prune_heads(doc, where),
        suits=suits,
    )


def _prune_heads(doc: dict, where: str) -> float | None:
    value = doc.get("prune_heads")
    if value is not None and (type(value) not in (int, float) or not 0 <= value < 1):
        raise UsageError(f"{where}: 'prune_heads' must be the fraction of attention heads to prune, in [0, 1)")
    return None if value is None else float(value)


def _rule(raw, where: str) -> Rule:
    if not isinstance(raw, dict):
        raise UsageError(f"{where}: must be a table")
    unknown = set(raw) - set(RULE_KEYS)
    if unknown:
        raise UsageError(f"{where}: unknown key(s) {sorted(unknown)} (valid: {', '.join(RULE_KEYS)})")
    if not isinstance(raw.get("codec"), str):
        raise UsageError(f"{where}: needs a string key 'codec'")
    pattern = raw.get("match")
    if pattern is not None and not isinstance(pattern, str):
        raise UsageError(f"{where}: 'match' must be a string pattern")
    roles = _roles(raw, where)
    if pattern is None and roles is None:
        raise UsageError(f"{where}: needs 'match' (a name pattern), 'role' or 'roles' to say which tensors it takes")
    return Rule(
        pattern,
        _chain(raw["codec"], where),
        _ndim(raw, where),
        roles,
        _layers(raw, where),
        _input_last(raw, where),
        _calibration(raw, where),
        _upgrades(raw, where),
    )


def _upgrades(raw: dict, where: str) -> tuple[Chain, ...]:
    """``upgrade``: a codec chain, or a list of them in order of cost."""
    upgrade = raw.get("upgrade")
    if upgrade is None:
        return ()
    chains = [upgrade] if isinstance(upgrade, str) else upgrade
    if not isinstance(chains, list) or not chains or not all(isinstance(c, str) for c in chains):
        raise UsageError(f"{where}: 'upgrade' must be a codec chain or a list of codec chains")
    return tuple(_chain(c, where) for c in chains)


def _chain(text: str, where: str) -> Chain:
    try:
        return parse_chain(text, TENSOR_CODECS)
    except UsageError as exc:
        raise UsageError(f"{where}: {exc}") from None


def _roles(raw: dict, where: str) -> frozenset[str] | None:
    if "role" in raw and "roles" in raw:
        raise UsageError(f"{where}: give 'role' or 'roles', not both")
    if "role" in raw:
        names = [raw["role"]] if isinstance(raw["role"], str) else None
        if names is None:
            raise UsageError(f"{where}: 'role' must be a string, one of {', '.join(ROLES)}")
    elif "roles" in raw:
        names = raw["roles"]
        if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
            raise UsageError(f"{where}: 'roles' must be a non-empty list of role names")
    else:
        return None
    unknown = [n for n in names if n not in ROLES]
    if unknown:
        raise UsageError(f"{where}: unknown role(s) {unknown} (valid: {', '.join(ROLES)})")
    return frozenset(names)


def _ndim(raw: dict, where: str) -> int | None:
    ndim = raw.get("ndim")
    if ndim is not None and (type(ndim) is not int or ndim < 0):
        raise UsageError(f"{where}: 'ndim' must be a non-negative integer")
    return ndim


def _layers(raw: dict, where: str) -> tuple[int, ...] | None:
    layers = raw.get("layers")
    if layers is None:
        return None
    if not isinstance(layers, list) or not layers or not all(type(i) is int for i in layers):
        raise UsageError(f"{where}: 'layers' must be a non-empty list of layer indices (negative: from the end)")
    return tuple(layers)


def _input_last(raw: dict, where: str) -> bool | None:
    value = raw.get("input_last")
    if value is not None and not isinstance(value, bool):
        raise UsageError(f"{where}: 'input_last' must be true or false")
    return value


def _calibration(raw: dict, where: str) -> str | None:
    value = raw.get("calibration")
    if value is not None and value not in CALIBRATIONS:
        raise UsageError(f"{where}: 'calibration' must be one of {', '.join(map(repr, CALIBRATIONS))}, not {value!r}")
    return value


# -- built-in presets -----------------------------------------------------------------


ENCODER_PREFIX = "encoder-"  # encoder-qN: the level qN's recipe for encoders


def _preset_files() -> dict[str, Traversable]:
    folder = resources.files(__package__).joinpath("presets")
    return {f.name[: -len(".toml")]: f for f in folder.iterdir() if f.name.endswith(".toml")}


def preset_names() -> list[str]:
    return sorted(_preset_files())


def preset_name(name: str) -> str:
    """The built-in preset ``name`` names, in any case; a usage error suggests the closest names."""
    names = preset_names()
    by_lower = {n.lower(): n for n in names}
    if name.lower() in by_lower:
        return by_lower[name.lower()]
    typed = name.lower()
    starting = [n for n in names if n.startswith(typed)] if len(typed) >= 3 else []  # minilm: minilm-layerwise
    close = _nearest_levels(typed, names) or starting[:3] or difflib.get_close_matches(typed, names, n=3)
    guess = f" (did you mean {' or '.join(map(repr, close))}?)" if close else ""
    raise UsageError(f"unknown preset {name!r}{guess}; available: {', '.join(names)}")


def _nearest_levels(typed: str, names: list[str]) -> list[str]:
    """For a level that does not exist (q9, encoder-q7), the levels nearest in bits."""
    typed_level = re.fullmatch(r"(encoder-)?q(\d)", typed)
    if not typed_level:
        return []
    prefix, bits = typed_level.group(1) or "", int(typed_level.group(2))
    levels = {int(m.group(1)): n for n in names if (m := re.fullmatch(re.escape(prefix) + r"q(\d+)", n))}
    if not levels:
        return []
    nearest = min(abs(level - bits) for level in levels)
    return [levels[level] for level in sorted(levels) if abs(level - bits) == nearest]


def _preset_document(name: str) -> dict:
    try:
        return tomllib.loads(_preset_files()[name].read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise UsageError(f"preset {name!r}: cannot read the installed preset ({exc}); reinstall rbe") from None


def policy_from_preset(name: str) -> Policy:
    """``--preset NAME``: a recipe shipped with rbe, its name in any case."""
    name = preset_name(name)
    return replace(policy_from_document(_preset_document(name), f"preset {name!r}"), preset=name)


def preset_descriptions() -> dict[str, str]:
    """Each preset's one-line description, by name."""
    return {name: policy_from_preset(name).description for name in preset_names()}


def encoder_variant(name: str) -> str | None:
    """The recipe the level ``name`` stands for on an encoder (``encoder-q4`` for ``q4``), or None."""
    variant = ENCODER_PREFIX + preset_name(name)
    return variant if variant in _preset_files() else None


def resolve_preset(name: str, family_kind: str | None) -> str:
    """The preset that ``--preset NAME`` encodes a model of this family (``roles.ModelFamily.kind``) with."""
    variant = encoder_variant(name)
    return variant if variant is not None and family_kind == "encoder" else preset_name(name)


def policy_for_model(policy: Policy, config: Callable[[], dict | None]) -> tuple[Policy, str | None]:
    """The policy a model is encoded with, and a line for the user when it is not the preset named.

    A level with an encoder recipe (``q4``, ``q3``) becomes that recipe on an encoder: the
    generic level's 6-bit embeddings and head serve a causal LM's logits, but half of a small
    encoder's weights are its word embeddings.  ``config`` (the model's config.json, or None) is
    read only for such a level.  Inputs without a config.json keep the level here (an .onnx file's
    graph says what it is: ``pipeline`` resolves its level).
    """
    variant = encoder_variant(policy.preset) if policy.preset else None
    if variant is None:
        return policy, None
    family = model_family(config())
    if family is None or family.kind != "encoder":
        return policy, None
    return policy_from_preset(variant), f"rbe: preset {policy.preset} -> {variant} for a {family.name} encoder"


def recipe_fingerprint(name: str) -> str:
    """The sha256 of what a preset encodes with: its parsed rules and settings, not its comments,
    description or ``suits``; a measurement counts for the preset while this stays the same."""
    doc = {k: v for k, v in _preset_document(preset_name(name)).items() if k not in DESCRIBING_KEYS}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()
