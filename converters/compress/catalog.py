"""``rbe presets``: what each built-in preset is for, what it needs and what it measured.

Each preset's entry says which models it suits (its recipe's ``suits``), whether it
calibrates (runs the model, so needs the ``hf`` extra: torch and transformers), which
recipe it runs on an encoder (``recipe.encoder_variant``), and for each reference model
of the record what the recipe it runs there measured: the whole file's bits per
weight, the quality change against the fp32 model and the conversion's wall time.

The numbers come from ``presets/measured.json``, which ``bench/preset_record.py``
writes from a run of ``bench/presets.py``; nothing here is typed by hand.  A
measurement names the recipe it was taken on and that recipe's fingerprint
(``recipe.recipe_fingerprint``): it counts for a preset only while the recipe the preset
resolves to on that model still has that fingerprint, so a preset whose recipe changed
since the run shows as not yet measured, never with another recipe's numbers.
"""

from __future__ import annotations

import json
import re
import textwrap
from dataclasses import dataclass
from importlib import resources

from rbeformat import InputError

from .recipe import encoder_variant, policy_from_preset, preset_names, recipe_fingerprint, resolve_preset

RECORD = "measured.json"
EXTRA = "hf"  # pyproject.toml's extra with torch and transformers, which calibration runs
SUITS_WORDS = {"any": "any", "decoders": "decoder LLMs", "encoders": "sentence encoders"}
NOT_MEASURED = "not yet measured"
NOT_FOR_MODEL = "not for this model"  # an encoder-only preset on a decoder: never run there
LEGEND_WIDTH = 100


@dataclass
class Entry:
    """One preset: what it is for, and per reference model the record row of the recipe it runs there."""

    name: str
    description: str
    suits: str
    calibrates: bool
    encoder_recipe: str | None  # the recipe it runs on an encoder, when not itself
    measured: dict[str, dict | None]  # model key -> the record's row (None: not measured for this recipe)


def load_record() -> dict:
    """The record of measured presets (empty when the installation has none)."""
    path = resources.files(__package__).joinpath("presets", RECORD)
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {"models": {}, "rows": []}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"presets/{RECORD}: cannot read the installed record of measured presets ({exc})") from None
    return record


def measured_row(record: dict, model: str, preset: str) -> dict | None:
    """The record's row for what ``preset`` runs on ``model``: a row of the recipe it resolves to there
    with that recipe's current fingerprint (the preset's own row first), or None."""
    recipe = resolve_preset(preset, record["models"][model]["family"])
    fingerprint = recipe_fingerprint(recipe)
    rows = [
        r
        for r in record["rows"]
        if r["model"] == model and r["recipe"] == recipe and r["recipe_fingerprint"] == fingerprint
    ]
    rows.sort(key=lambda r: r["preset"] != preset)
    return rows[0] if rows else None


def catalog(record: dict | None = None) -> list[Entry]:
    """Every built-in preset's entry: the levels (lossless, q8 ... q2) first, then the rest by name."""
    record = load_record() if record is None else record
    entries = []
    for name in sorted(preset_names(), key=_order):
        policy = policy_from_preset(name)
        variant = encoder_variant(name)
        entries.append(
            Entry(
                name,
                policy.description,
                policy.suits,
                policy.calibrates or (variant is not None and policy_from_preset(variant).calibrates),
                variant,
                {model: measured_row(record, model, name) for model in record["models"]},
            )
        )
    return entries


def _order(name: str) -> tuple:
    level = re.fullmatch(r"q(\d+)", name)
    if name == "lossless":
        return (0, 0, name)
    return (1, -int(level.group(1)), name) if level else (2, 0, name)


# -- output ---------------------------------------------------------------------------------


def catalog_json(entries: list[Entry], record: dict) -> dict:
    """``rbe presets --json``."""
    return {
        "presets": [
            {
                "name": e.name,
                "description": e.description,
                "suits": e.suits,
                "calibrates": e.calibrates,
                "needs_extra": EXTRA if e.calibrates else None,
                "encoder_recipe": e.encoder_recipe,
                "measured": {model: _measured_json(row) for model, row in e.measured.items()},
            }
            for e in entries
        ],
        "models": record["models"],
    }


def _measured_json(row: dict | None) -> dict | None:
    if row is None:
        return None
    keys = ("recipe", "file_bpw", "linear_bpw", "file_mb", "ratio", "scores", "encode_s", "encode_note")
    return {k: row[k] for k in keys}


def catalog_table(entries: list[Entry], record: dict) -> str:
    """``rbe presets``: one line per preset, the record's models side by side, then what the columns mean
    and each preset's description."""
    models = record["models"]
    head = ["preset", "suits", "calibrates"]
    sub = ["", "", f"({EXTRA} extra)"]
    for model in models.values():
        quality = ["ppl"] if model["family"] == "decoder" else ["cosine", "NN"]
        head += [model["name"]] + [""] * (len(quality) + 1)
        sub += ["b/w", *quality, "time"]
    body = [_cells(e, models) for e in entries]
    spanning = (NOT_MEASURED, NOT_FOR_MODEL)
    widths = [max(len(row[i]) for row in [sub, *body] if row[i] not in spanning) for i in range(len(sub))]
    widths = _fit_groups(head, widths)
    lines = [_line(head, widths), _line(sub, widths)] + [_line(row, widths) for row in body]
    return "\n".join(lines + [""] + _legend(entries, record) + [""] + _descriptions(entries))


def _fit_groups(head: list[str], widths: list[int]) -> list[int]:
    """Widens a model's columns where its name is longer than they are together."""
    widths = list(widths)
    starts = [i for i, h in enumerate(head) if h] + [len(head)]
    for start, end in zip(starts, starts[1:]):
        span = sum(widths[start:end]) + 2 * (end - start - 1)
        widths[end - 1] += max(0, len(head[start]) - span)
    return widths


def _line(cells: list[str], widths: list[int]) -> str:
    text, start = "", 0
    for i, (cell, width) in enumerate(zip(cells, widths)):
        if cell:  # a model's name and "not yet measured" run on over the model's empty cells
            text = text.ljust(start) + (cell.ljust(width) if i < 3 or len(cell) > width else cell.rjust(width))
        start += width + 2
    return text.rstrip()


def _cells(entry: Entry, models: dict) -> list[str]:
    suits = SUITS_WORDS[entry.suits] + (f" (encoders: {entry.encoder_recipe})" if entry.encoder_recipe else "")
    cells = [entry.name, suits, "yes" if entry.calibrates else "no"]
    for key, model in models.items():
        row = entry.measured[key]
        n_quality = 1 if model["family"] == "decoder" else 2
        if row is None:
            unsuited = entry.suits == "encoders" and model["family"] == "decoder"
            cells += [NOT_FOR_MODEL if unsuited else NOT_MEASURED] + [""] * (n_quality + 1)
            continue
        cells += [f"{row['file_bpw']:.3f}", *_quality(row["scores"], model["family"]), _time(row)]
    return cells


def _quality(scores: dict, family: str | None) -> list[str]:
    if family == "decoder":
        change = scores.get("perplexity_change_pct")
        if change is None or change >= 1000:
            return [f"ppl {scores['perplexity']:.0f}"]  # unusable: the perplexity itself says more
        return [f"{change:+.2f}%" if abs(change) < 10 else f"{change:+.1f}%"]
    return [f"{scores['mean_cosine']:.4f}", f"{scores['nn_agreement']:.3f}"]


def _time(row: dict) -> str:
    seconds = row["encode_s"]
    text = f"{seconds:.0f} s" if seconds < 100 else f"{seconds / 60:.1f} min"
    return text + ("*" if row.get("encode_note") else "")


def _legend(entries: list[Entry], record: dict) -> list[str]:
    cores = {m["environment"].get("cpu_count") for m in record["models"].values()}
    where = f"on {cores.pop()} cores" if len(cores) == 1 and None not in cores else "on the run's machine"
    paragraphs = [
        "b/w: bits per weight of the whole file (rbe info's figure); ppl: perplexity change against the fp32 "
        "model; cosine, NN: mean cosine and nearest-neighbour agreement of sentence embeddings to the fp32 "
        f"model's (rbe eval's measures, on its default text); time: rbe convert --preset NAME {where}, CPU, "
        "calibration included.",
        f"calibrates: runs the model on calibration text, which needs the {EXTRA} extra (pip install "
        f"'rbe[{EXTRA}]': torch, transformers).",
        f"{NOT_MEASURED}: the recipe this preset runs on that model has no measurement (changed since the "
        "recorded run, or not run there).",
        f"{NOT_FOR_MODEL}: a preset for sentence encoders, not run on a decoder LLM.",
    ]
    notes = sorted({r["encode_note"] for e in entries for r in e.measured.values() if r and r.get("encode_note")})
    paragraphs += [f"*: {note}." for note in notes]
    variants = [e for e in entries if e.encoder_recipe]
    if variants:
        shown = ", ".join(f"{e.name} runs {e.encoder_recipe}" for e in variants)
        paragraphs.append(
            f"On an encoder (config.json: a BERT-family model; an .onnx graph that gives no logits) {shown}; on "
            "an .onnx input their mixed precision scores each layer's own error, not the model's drift "
            "(paraphrase-MiniLM-L3-v2.onnx's figures: docs/converting.md)."
        )
    for model in record["models"].values():
        date = model["environment"].get("date")
        paragraphs.append(f"{model['name']}: measured {f'on {date} ' if date else ''}by {model['source']}.")
    return [line for p in paragraphs for line in textwrap.wrap(p, LEGEND_WIDTH)]


def _descriptions(entries: list[Entry]) -> list[str]:
    width = max(len(e.name) for e in entries)
    return [f"{e.name.ljust(width)}  {e.description}" for e in entries]
