"""Which chain each tensor of a source gets, and the decisions around it, for any input format.

``choose_chains`` applies a policy (``compress/recipe.py``) to every tensor of a
``TensorSource`` (``converters/sources/``): a rule's chain, wrapped in ``transpose``
where the weight is stored input x output (``input_axis_grouped``), tensors whose
codec shares state grouped.  Around it: the calibration methods the rules ask for
(``calibration_methods``) and the statistics they need (``calibrate_for``, kept as
``Statistics``), mixed precision's upgrades (``mixed_precision``,
``compress/mixed.py``) and head pruning (``prune_heads``, ``compress/heads.py``).
Writing the container is ``converters/pipeline.py``'s.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from rbeformat import UsageError
from rbeformat.chain import Chain
from rbeformat.codecs.transpose import Transpose
from rbeformat.values import from_float32, to_float32

from ..progress import NoProgress
from .recipe import Policy, Rule
from .roles import TensorRole

if TYPE_CHECKING:
    from ..sources import TensorSource


def choose_chains(plan: TensorSource, policy: Policy) -> tuple[dict, dict]:
    """Each tensor's chain: ({name: chain} for codecs that share nothing, {group: members} for the rest).

    A codec that declares shared state (``TensorCodec.shared_group``, e.g. the
    base of ``normdelta``) groups the tensors that share one state; the
    converter needs no knowledge of the codec.  Refuses a policy that asks for
    chains but changes no tensor, before anything is written.  Roles as
    ``policy_roles`` gives them.
    """
    roles = policy_roles(plan, policy)
    alone, groups = {}, {}
    for t in plan.tensors:
        rule = policy.choose_rule(t.name, t.dtype, t.shape, roles.get(t.name))
        if rule is None:
            continue
        chain = input_axis_grouped(rule.chain, rule, roles.get(t.name))
        key = chain.codec.shared_group(t.dtype, tuple(t.shape))
        if key is None:
            alone[t.name] = chain
        else:
            groups.setdefault((chain.codec.name, t.dtype, tuple(t.shape), key), []).append((t, chain))
    if not policy.lossless and not alone and not groups:
        raise UsageError(
            f"{plan.root or '.'}: the codec chain, recipe or preset applies to no tensor (a chain takes "
            "floating-point tensors its codec accepts; --codec takes the 2-D ones); nothing written"
        )
    return alone, groups


def needs_transpose(chain: Chain, rule: Rule, role: TensorRole | None) -> bool:
    """Whether a weight stored input x output should get ``transpose(values=chain)``: its chain
    groups along the last (output) axis, and its rule did not select it by ``input_last``
    (a rule that does gets exactly the chain it names)."""
    return (
        role is not None
        and role.input_last is False
        and rule.input_last is None
        and not chain.lossless
        and chain.codec.groups_last_axis()
    )


def input_axis_grouped(chain: Chain, rule: Rule, role: TensorRole | None) -> Chain:
    """The chain a tensor gets: wrapped in ``transpose`` where ``needs_transpose`` says, so
    that the groups run along the weight's input axis, as quantization (and ONNX Runtime's
    MatMulNBits) wants them."""
    if not needs_transpose(chain, rule, role):
        return chain
    return Chain(Transpose(), {"values": chain})


def chosen_rules(plan: TensorSource, policy: Policy) -> dict[str, tuple[object, Rule]]:
    """{tensor name: (tensor, rule)} for every tensor a rule encodes (roles as for ``choose_chains``)."""
    roles = policy_roles(plan, policy)
    chosen = {}
    for t in plan.tensors:
        rule = policy.choose_rule(t.name, t.dtype, t.shape, roles.get(t.name))
        if rule is not None:
            chosen[t.name] = (t, rule)
    return chosen


def calibration_methods(plan: TensorSource, policy: Policy, check_encoders: bool = True) -> dict[str, str]:
    """{tensor name: calibration method} for the tensors whose rule asks for one; with ``check_encoders``,
    a UsageError when a rule's codec has no encoder for its method (ONNX Runtime's calibration leaves
    that to the writer)."""
    if not any(rule.calibration for rule in policy.rules):
        return {}
    methods = {}
    for name, (_, rule) in chosen_rules(plan, policy).items():
        if rule.calibration:
            for chain in (rule.chain, *rule.upgrades) if check_encoders else ():
                if rule.calibration not in chain.codec.calibrations:
                    raise UsageError(
                        f"tensor {name!r}: {chain.codec.name} has no {rule.calibration!r} "
                        f"encoder (it has: {', '.join(chain.codec.calibrations) or 'none'})"
                    )
            methods[name] = rule.calibration
    return methods


def mixed_precision(
    plan: TensorSource,
    policy: Policy,
    stats: Statistics,
    names: set[str],
    pruned: dict | None = None,
    text=None,
    threads: int | None = None,
    stage=None,
) -> dict:
    """{tensor name: upgrade chain} for the tensors of ``names`` that mixed precision upgrades
    (``converters/compress/mixed.py``); codecs that share state across tensors are never swapped.
    Scores come from the survey (``stats.candidates``) or are computed here; ``pruned`` holds
    the tensors head pruning changed (scored here as pruned; a survey scored them before).
    With ``budget_sensitivity = "model"`` each score is the model's drift on ``text`` (the
    calibration text) with that tensor alone encoded (``converters/compress/sensitivity.py``).  Roles
    as for ``choose_chains``.  ``stage`` (``pipeline.Reporter.stage``) shows the scoring's progress."""
    if policy.budget_bits is None:
        return {}
    from .mixed import candidate, pick

    pruned = pruned or {}
    roles = policy_roles(plan, policy)
    upgradable = {
        name: entry for name, entry in chosen_rules(plan, policy).items() if entry[1].upgrades and name in names
    }
    to_score = {name: entry for name, entry in upgradable.items() if name not in stats.candidates}
    probe = None

    def score(name: str, t, rule: Rule):
        x = to_float32(pruned[name] if name in pruned else plan.read(name), t.dtype)
        measure = (lambda decoded: probe.drift(name, decoded)) if probe else None
        if needs_transpose(rule.chain, rule, roles.get(name)):
            # Scored as the chains will encode it: the transpose's values, measured back in place.
            x, measure = np.ascontiguousarray(x.T), measure and (lambda decoded: probe.drift(name, decoded.T))
        return candidate(name, x, rule.chain, rule.upgrades, stats.kept.get(name), policy.budget_counts, measure)

    model_runs = policy.budget_sensitivity == "model"
    cost = _probe_cost(plan_roles(plan)) if model_runs else lambda name, t, rule: math.prod(t.shape)
    costs = {name: cost(name, t, rule) for name, (t, rule) in to_score.items()}
    shown = ("block runs", "{n:.0f}/{total:.0f}", 1.0) if model_runs else ("M weights", "{n:.1f}/{total:.1f}", 1e6)
    scores = {name: stats.candidates[name] for name in upgradable if name in stats.candidates}
    with stage(sum(costs.values()), "score", *shown) if stage else NoProgress() as bar:
        if model_runs and to_score:
            from .calibrate import torch as calibrate
            from .sensitivity import ModelProbe

            bar.label("running the model on the probe text")
            probe = ModelProbe(plan.root, text or calibrate.default_text(), threads)
            bar.update(0)  # the pace starts here: the probe's run is the stage's setup, not its units
        for index, (name, (t, rule)) in enumerate(to_score.items()):
            bar.label(f"tensor {index + 1}/{len(to_score)}: {name}")
            scores[name] = score(name, t, rule)
            bar.update(costs[name])
    scored = [scores[name] for name in upgradable]  # in the model's order, as pick breaks ties
    return {
        name: input_axis_grouped(upgradable[name][1].upgrades[level - 1], upgradable[name][1], roles.get(name))
        for name, level in pick(scored, policy.budget_bits).items()
    }


def _probe_cost(roles: dict):
    """What scoring a tensor by the model's drift costs, in block runs: at each level of its rule, the
    blocks from its own to the last (``sensitivity.ModelProbe.drift``), and about one more for its
    encoding; a tensor outside the blocks runs them all."""
    blocks = 1 + max((r.layer for r in roles.values() if r.layer is not None), default=0)

    def cost(name: str, t, rule: Rule) -> int:
        role = roles.get(name)
        start = role.layer if role is not None and role.layer is not None else 0
        return (1 + len(rule.upgrades)) * (blocks - start + 1)

    return cost


def prune_heads(plan: TensorSource, policy: Policy, stats) -> tuple[dict[str, np.ndarray], str | None]:
    """The tensors that the policy's ``prune_heads`` changes, in their stored dtype, and a summary
    line (``converters/compress/heads.py``); ({}, None) without it.  The o-projections' calibration
    statistics score the heads, so their rule must calibrate."""
    if not policy.prune_heads:
        return {}, None
    from . import heads

    roles = plan_roles(plan)
    config = plan.config() or {}
    stats = stats if isinstance(stats, Statistics) else Statistics.of(stats)
    _check_prune_heads(roles, stats.methods)
    attention = {"attn_q", "attn_k", "attn_v", "attn_o", "attn_qkv", "linear_bias"}
    weights = {
        name: to_float32(plan.read(name), plan.tensor(name).dtype)
        for name, r in roles.items()
        if r.role in attention and r.layer is not None
    }
    try:
        scores = stats.head_scores or heads.head_scores(config, roles, stats.kept, weights)
        chosen = heads.select_share(scores, policy.prune_heads)
        changed = heads.prune(config, roles, weights, chosen)
    except ValueError as exc:
        raise UsageError(f"prune_heads: {exc}") from None
    stored = {name: from_float32(array, plan.tensor(name).dtype) for name, array in changed.items()}
    return stored, heads.summary(config, chosen)


@dataclass
class Statistics:
    """What calibration measured on the original model, as the converter keeps it.

    ``methods``: every calibrated tensor's method.  ``kept``: the Calibrations
    held for encoding: all of them (``calibrate.collect``), or, after a survey,
    only those of the weights outside the blocks.  A survey (``calibrate.survey``)
    holds one block's statistics at a time and keeps only the decisions they
    feed: mixed precision's scores (``candidates``) and each layer's head scores.
    """

    methods: dict[str, str]
    kept: dict
    candidates: dict = field(default_factory=dict)
    head_scores: dict = field(default_factory=dict)

    @classmethod
    def of(cls, calibrations: dict) -> Statistics:
        """Every tensor's statistics held (``calibrate.collect``): decisions are computed from them."""
        return cls({name: c.method for name, c in calibrations.items()}, dict(calibrations))


def _check_prune_heads(roles: dict, methods: dict[str, str]) -> None:
    """prune_heads scores heads with the o-projections' statistics: each must be calibrated."""
    o_weights = [name for name, r in roles.items() if r.role == "attn_o"]
    missing = [name for name in o_weights if name not in methods]
    if not o_weights or missing:
        raise UsageError(
            "prune_heads scores heads with the calibration statistics of the attention output "
            'projections: give the attn_o rule calibration = "gptq"'
            + (f" (none for {missing[0]})" if missing else " (this model has none)")
        )


def calibrate_for(
    plan: TensorSource,
    policy: Policy,
    text=None,
    threads: int | None = None,
    progress=None,
    sequential: bool = True,
    label=None,
    encoders=None,
    state=None,
) -> Statistics:
    """The calibration statistics the policy's rules ask for (torch and transformers run the model).

    For a sequential conversion, a survey: block by block, scoring as it goes,
    so that memory holds one block's statistics; otherwise every statistic at once.
    ``progress(n)`` counts windows' worth of work; ``label(text)`` says where the survey is;
    ``encoders`` (``ray_encode.RayEncoders``) scores mixed precision's candidates elsewhere;
    ``state`` (``resume.ResumeState``) keeps the survey's progress after each block and goes
    on from what it kept.
    """
    methods = calibration_methods(plan, policy)
    if policy.prune_heads:  # refused before the model runs, not after
        _check_prune_heads(plan_roles(plan), methods)
    if not methods:
        return Statistics({}, {})
    from .calibrate import torch as calibrate

    text = text or calibrate.default_text()
    if not sequential or (policy.budget_sensitivity == "model" and policy.budget_bits is not None):
        # The model's drift is measured on calibrated encodes: every Hessian is held at once.
        return Statistics.of(calibrate.collect(plan.root, methods, text, threads, progress))
    stats = Statistics(dict(methods), {})
    start, hidden, after_block = 0, None, None
    if state is not None:
        kept = state.load_survey()
        if kept is not None:
            start, stats.candidates, stats.head_scores, hidden = kept[0] + 1, kept[1], kept[2], kept[3]
    score, scored = _scorer(plan, policy, stats, encoders)
    if state is not None:

        def after_block(index: int, next_hidden: list) -> None:
            scored()  # the scores computed elsewhere are in before they are kept
            state.save_survey(index, stats, next_hidden)

    stats.kept = calibrate.survey(
        plan.root, methods, text, score, threads, progress, label, start=start, hidden=hidden, after_block=after_block
    )
    scored()
    return stats


def _scorer(plan: TensorSource, policy: Policy, stats: Statistics, encoders=None):
    """What a survey does with one weight's statistics: mixed precision's and head pruning's scores;
    and what waits for the scores computed elsewhere (``encoders``), at most its window at once."""
    from .mixed import candidate

    chosen = chosen_rules(plan, policy)
    roles = plan_roles(plan) if policy.prune_heads else {}
    geometry = None
    if policy.prune_heads:
        from . import heads

        geometry = heads.heads_of(plan.config() or {})

    def score(name: str, calibration) -> None:
        t, rule = chosen[name]
        role = roles.get(name)
        wants_heads = role is not None and role.role == "attn_o" and role.input_last is not False
        upgrades = rule.upgrades and policy.budget_bits is not None
        if upgrades and encoders is not None:  # scored elsewhere, reading the tensor there
            pending.append((name, encoders.candidate(plan, name, rule.chain, rule.upgrades, calibration, counts)))
            while len(pending) > encoders.window:
                scored_one()
            upgrades = False
        if not upgrades and not wants_heads:
            return
        x = to_float32(plan.read(name), t.dtype)  # read once for both scores
        if upgrades:
            stats.candidates[name] = candidate(name, x, rule.chain, rule.upgrades, calibration, counts)
        if wants_heads:
            try:
                stats.head_scores[role.layer] = heads.layer_scores(x.astype(np.float64), calibration.hessian, geometry)
            except ValueError as exc:
                raise UsageError(f"prune_heads: {exc}") from None

    pending: deque = deque()
    counts = policy.budget_counts

    def scored_one() -> None:
        name, resolve = pending.popleft()
        stats.candidates[name] = resolve()

    def scored() -> None:
        while pending:
            scored_one()

    return score, scored


def plan_roles(plan: TensorSource) -> dict[str, TensorRole]:
    """Every tensor's role: from the headers and the directory's config.json, or an ONNX model's graph."""
    return plan.roles


def policy_roles(plan: TensorSource, policy: Policy) -> dict[str, TensorRole]:
    """The roles the policy's rules see: a graph's always (an ONNX model's MatMul weights are stored
    input x output whatever the rules), names' and config's only for a policy with role rules."""
    return plan.roles if plan.roles_from_graph or policy.uses_roles else {}


def read_config(plan: TensorSource) -> dict | None:
    """The model's config.json (None when the input has none); InputError when it is not a JSON object."""
    return plan.config()
