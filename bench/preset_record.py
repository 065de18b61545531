"""The record of measured presets that ``rbe presets`` prints, made from a benchmark run.

``rbe presets`` never prints a number typed into code: it reads
``converters/compress/presets/measured.json`` (``rbe_converters.compress.catalog``),
which this module writes from one of

* a run of ``python -m bench.presets`` (its ``bench/out/presets.json``; ``python -m
  bench.presets --record`` writes the record at the end of the run): each preset row
  names the recipe the preset ran on that model and that recipe's fingerprint at the
  time of the run;
* the README's "Measured presets" table, the transcript of the run it describes, for
  a run whose presets.json was not kept: each row ran its own recipe, with the rules
  the preset files hold now (a row whose recipe changed since would be wrong: make the
  record from a new run instead).

    python -m bench.preset_record --run bench/out/presets.json
    python -m bench.preset_record --readme README.md

A run of some of the models replaces those models' rows and keeps the others'.

``readme_rows`` reads the table back, so that a test can check that the record and
the README say the same.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

from rbe_converters.compress.recipe import preset_name, recipe_fingerprint
from rbe_converters.compress.roles import model_family
from rbe_converters.evaluate import quality

from .models import ROOT, minilm_dir, smollm2_dir

RECORD_PATH = os.path.join(ROOT, "converters", "compress", "presets", "measured.json")
README_PATH = os.path.join(ROOT, "README.md")
# The reference models: the key a run names them by, the name the README and rbe presets show.
MODELS = {"smollm2": ("SmolLM2-135M", smollm2_dir), "minilm": ("all-MiniLM-L6-v2", minilm_dir)}
README_SECTION = "## Measured presets"
# What a starred encode time in the README's table means (its text under the table says so).
SHARED_CORES = "measured while another benchmark shared the cores"


def reference_models(rows: list[dict], source: str, environment: dict, protocols: dict) -> dict:
    """Each measured model: its name, its family (``roles.model_family`` of its config.json, which
    decides the recipe a preset resolves to on it) and where its rows come from."""
    out = {}
    for key in sorted({row["model"] for row in rows}, key=list(MODELS).index):
        name, directory = MODELS[key]
        family = model_family(quality.read_config(directory()))
        out[key] = {
            "name": name,
            "family": family.kind if family else None,
            "architecture": family.name if family else None,
            "source": source,
            "environment": environment,
            "protocol": protocols.get(key),
        }
    return out


def merged(old: dict, new: dict) -> dict:
    """The record ``old`` with the models of ``new`` (a run of some of the models) replaced by its rows."""
    kept = [row for row in old.get("rows", []) if row["model"] not in new["models"]]
    models = {k: v for k, v in old.get("models", {}).items() if k not in new["models"]} | new["models"]
    order = list(MODELS)
    return {
        "models": dict(sorted(models.items(), key=lambda kv: order.index(kv[0]))),
        "rows": sorted(kept + new["rows"], key=lambda row: order.index(row["model"])),
    }


def read_record(path: str = RECORD_PATH) -> dict:
    if not os.path.exists(path):
        return {}
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


# -- from a run of bench.presets ------------------------------------------------------------


def record_from_run(run: dict, source: str) -> dict:
    """The record of a ``bench/out/presets.json``: its measured preset rows, their recipes and fingerprints."""
    rows = [_run_row(row) for row in run["rows"] if row["kind"] == "preset" and row["scores"]]
    return {"models": reference_models(rows, source, run["environment"], run["protocols"]), "rows": rows}


def _run_row(row: dict) -> dict:
    return {
        "model": row["model"],
        "preset": row["name"],
        "recipe": row.get("recipe") or row["name"],
        "recipe_fingerprint": row.get("recipe_fingerprint"),  # None (an older run): matches no recipe
        "linear_bpw": row["linear_bpw"],
        "file_bpw": row["file_bpw"],
        "file_mb": row["file_bytes"] / 1e6,
        "ratio": row["ratio"],
        "scores": row["scores"],
        "exact_share": row["exact_share"] if row["model"] == "smollm2" else None,
        "encode_s": row["encode_s"],
        "encode_note": "",
    }


# -- from the README's table ----------------------------------------------------------------


def readme_table(text: str) -> list[list[str]]:
    """The cells of the first table of the README's "Measured presets" section, header left out."""
    section = text.split(README_SECTION, 1)[1]
    lines = section[section.index("\n|") + 1 :].splitlines()
    table = []
    for line in lines:
        if not line.startswith("|"):
            break
        table.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    return [cells for cells in table[1:] if not set("".join(cells)) <= set("-: ")]


def readme_rows(text: str) -> list[dict]:
    """The README's rows as record rows (numbers as printed), without recipe fingerprints."""
    names = {name: key for key, (name, _) in MODELS.items()}
    rows = []
    for model, preset, linear, file_bpw, size, ratio, quality_cell, exact, encode in readme_table(text):
        seconds, starred = _seconds(encode)
        rows.append(
            {
                "model": names[model],
                "preset": preset.split()[0],  # "vq (uncalibrated)"
                "linear_bpw": float(linear),
                "file_bpw": float(file_bpw),
                "file_mb": float(size.removesuffix(" MB")),
                "ratio": float(ratio),
                "scores": _scores(quality_cell),
                "exact_share": float(exact.removesuffix("%")) / 100 if exact else None,
                "encode_s": seconds,
                "encode_note": SHARED_CORES if starred else "",
            }
        )
    return rows


def _scores(cell: str) -> dict:
    """'ppl 12.251 (+0.14%)', 'ppl 20130 (unusable)' or 'cos 0.9997, NN 0.988'."""
    m = re.fullmatch(r"ppl ([\d.]+) \((?:([+-][\d.]+)%|unusable)\)", cell)
    if m:
        change = {} if m.group(2) is None else {"perplexity_change_pct": float(m.group(2))}
        return {"perplexity": float(m.group(1)), **change}
    m = re.fullmatch(r"cos ([\d.]+), NN ([\d.]+)", cell)
    if m:
        return {"mean_cosine": float(m.group(1)), "nn_agreement": float(m.group(2))}
    raise ValueError(f"README: a quality cell this reader does not know: {cell!r}")


def _seconds(cell: str) -> tuple[float, bool]:
    """'19 s', '5.4 min' or '9.6 min*' (starred: the cores were shared)."""
    m = re.fullmatch(r"([\d.]+) (s|min)(\*?)", cell)
    if not m:
        raise ValueError(f"README: an encode time this reader does not know: {cell!r}")
    return float(m.group(1)) * (60 if m.group(2) == "min" else 1), bool(m.group(3))


def record_from_readme(text: str, source: str) -> dict:
    """The record of the README's table: each row ran its own preset, fingerprinted as the files are now."""
    rows = readme_rows(text)
    for row in rows:
        row["recipe"] = preset_name(row["preset"])
        row["recipe_fingerprint"] = recipe_fingerprint(row["recipe"])
    cores = re.search(r"on (\d+) cores", text.split(README_SECTION, 1)[1])
    environment = {"cpu_count": int(cores.group(1)) if cores else None}
    return {"models": reference_models(rows, source, environment, {}), "rows": rows}


def write_record(record: dict, path: str = RECORD_PATH) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(record, fh, indent=1)
        fh.write("\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.preset_record", description=__doc__.split("\n\n")[0])
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--run", metavar="PRESETS_JSON", help="a run's bench/out/presets.json")
    where.add_argument("--readme", metavar="README", help="the README whose Measured presets table to record")
    parser.add_argument("--out", default=RECORD_PATH, help="the record to write (default: the one rbe presets reads)")
    args = parser.parse_args(argv)
    if args.run:
        with open(args.run, encoding="utf-8") as fh:
            run = json.load(fh)
        record = record_from_run(run, f"python -m bench.presets, {os.path.basename(args.run)} of that run")
        stale = [f"{r['model']} {r['preset']}" for r in record["rows"] if r["recipe_fingerprint"] is None]
        if stale:
            print(f"rows without their recipe's fingerprint (an older run), shown as not measured: {stale}")
    else:
        with open(args.readme, encoding="utf-8") as fh:
            text = fh.read()
        record = record_from_readme(
            text, 'the README\'s "Measured presets" table of python -m bench.presets (its presets.json was not kept)'
        )
    write_record(merged(read_record(args.out), record), args.out)
    print(f"wrote {os.path.relpath(args.out)}: {len(record['rows'])} rows")
    return 0


if __name__ == "__main__":
    sys.exit(main())
