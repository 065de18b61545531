"""The record of measured presets that ``rbe presets`` prints, made from a benchmark run.

``rbe presets`` never prints a number typed into code: it reads
``converters/compress/presets/measured.json`` (``rbe_converters.compress.catalog``),
which this module writes from one of

* a run of ``python -m bench.presets`` (its ``bench/out/presets.json``; ``python -m
  bench.presets --record`` writes the record at the end of the run): each preset row
  names the recipe the preset ran on that model and that recipe's fingerprint at the
  time of the run;
* the "Measured presets" table of ``docs/measurements.md``, the transcript of the run it
  describes, for a run whose presets.json was not kept: each row ran its own recipe, with
  the rules the preset files hold now (a row whose recipe changed since would be wrong:
  make the record from a new run instead).

    python -m bench.preset_record --run bench/out/presets.json
    python -m bench.preset_record --table docs/measurements.md

A run of some of the models replaces those models' rows and keeps the others'.

Each model of the record names the run's environment: CPU cores, Python, torch and
transformers versions, device, dtype and date (``ENVIRONMENT``), which the line above the
docs table shows.  ``python -m bench.readme_tables`` writes that table from the record
(``--check``: whether the docs still show it); ``table_rows`` reads the table back, so
that a test can check the two independently.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import sys

from rbe_converters.compress.recipe import preset_name, recipe_fingerprint
from rbe_converters.compress.roles import model_family
from rbe_converters.evaluate import quality

from .models import ROOT, minilm_dir, smollm2_dir

RECORD_PATH = os.path.join(ROOT, "converters", "compress", "presets", "measured.json")
TABLE_PAGE = os.path.join(ROOT, "docs", "measurements.md")
# The marker comment opening the generated table (bench/readme_tables.py writes the block).
TABLE_MARKER = "<!-- table: presets"
# The reference models: the key a run names them by, the name the docs and rbe presets show.
MODELS = {"smollm2": ("SmolLM2-135M", smollm2_dir), "minilm": ("all-MiniLM-L6-v2", minilm_dir)}
# What a starred encode time in the docs table means (its text under the table says so).
SHARED_CORES = "measured while another benchmark shared the cores"
# What the record says of the machine and versions a model's rows were measured with.  bench.presets
# measures on the CPU in float32 (the protocols of rbe eval), whatever the machine.
ENVIRONMENT = ("cpu_count", "python", "torch", "transformers", "device", "dtype", "date")
DEVICE, DTYPE = "CPU", "float32"
# The source of rows transcribed from the docs table (rbe presets prints it as "Measured by ...").
TABLE_SOURCE = 'python -m bench.presets (its rows as the "Measured presets" table of docs/measurements.md gives them)'


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


def record_from_run(run: dict, source: str, date: str | None = None) -> dict:
    """The record of a ``bench/out/presets.json``: its measured preset rows, their recipes and fingerprints,
    and the run's environment (``date``: the day of the run where the run does not name it; by default
    today, for the record ``bench.presets --record`` writes as the run ends)."""
    rows = [_run_row(row) for row in run["rows"] if row["kind"] == "preset" and row["scores"]]
    today = datetime.datetime.now(datetime.UTC).date().isoformat()
    environment = run_environment(run["environment"], date or today)
    return {"models": reference_models(rows, source, environment, run["protocols"]), "rows": rows}


def run_environment(measured: dict, date: str | None) -> dict:
    """The ``ENVIRONMENT`` of a run (keys it lacks are None), then whatever else it names (other packages,
    the machine's architecture)."""
    named = {"device": DEVICE, "dtype": DTYPE, "date": date} | measured
    return {key: named.get(key) for key in ENVIRONMENT} | {k: v for k, v in measured.items() if k not in ENVIRONMENT}


def file_date(path: str) -> str:
    """The day a file was last written (UTC), as YYYY-MM-DD: when a run's presets.json was written."""
    stamp = datetime.datetime.fromtimestamp(os.path.getmtime(path), datetime.UTC)
    return stamp.date().isoformat()


def environment_line(models: list[str], environment: dict) -> str:
    """The sentence above the docs table naming what ``models`` were measured with (``environment_from_line``
    reads it back): the date, CPU cores, Python, torch and transformers versions, device and dtype."""
    env = {key: environment.get(key) for key in ENVIRONMENT}
    when = f"{env['date']} " if env["date"] else ""
    cores = "?" if env["cpu_count"] is None else env["cpu_count"]
    versions = ", ".join(f"{name} {env[key] or NOT_RECORDED}" for key, name in VERSION_NAMES)
    return (
        f"{' and '.join(models)}: measured {when}on {cores} CPU cores, {versions}, "
        f"{env['device'] or '?'}, {env['dtype'] or '?'}."
    )


NOT_RECORDED = "not recorded"
VERSION_NAMES = (("python", "Python"), ("torch", "torch"), ("transformers", "transformers"))
_ENVIRONMENT_LINE = re.compile(
    r": measured (?:(?P<date>\d{4}-\d{2}-\d{2}) )?on (?P<cpu_count>\d+|\?) CPU cores, Python (?P<python>.+?), "
    r"torch (?P<torch>.+?), transformers (?P<transformers>.+?), (?P<device>[^,]+), (?P<dtype>[^,]+)\.$"
)


def environment_from_line(line: str) -> dict:
    """The ``ENVIRONMENT`` an ``environment_line`` names (None where it says not recorded or ?)."""
    m = _ENVIRONMENT_LINE.search(line)
    if not m:
        raise ValueError(f"not a line naming a record's environment: {line!r}")
    known = {k: (None if v in (NOT_RECORDED, "?") else v) for k, v in m.groupdict().items()}
    known["cpu_count"] = None if known["cpu_count"] is None else int(known["cpu_count"])
    return {key: known[key] for key in ENVIRONMENT}


# The scores a record keeps, in the order the table prints them (a run also has the changes against
# the original, which the table leaves out).
SCORES = ("perplexity", "perplexity_change_pct", "mean_cosine", "nn_agreement")


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
        "scores": {k: v for k, v in row["scores"].items() if k in SCORES},
        "exact_share": row["exact_share"] if row["model"] == "smollm2" else None,
        "encode_s": row["encode_s"],
        "encode_note": "",
    }


# -- from the docs table -------------------------------------------------------------------


def table_block(text: str) -> list[str]:
    """The lines of the generated presets table's block (``TABLE_MARKER``) of a docs page, up to its end."""
    if TABLE_MARKER not in text:
        raise ValueError(f"no generated presets table ({TABLE_MARKER} ... -->) on this page")
    return text.split(TABLE_MARKER, 1)[1].split("<!-- end table -->", 1)[0].splitlines()[1:]


def table_cells(text: str) -> list[list[str]]:
    """The cells of the generated presets table of a docs page, header left out."""
    table = [
        [cell.strip() for cell in line.strip().strip("|").split("|")]
        for line in table_block(text)
        if line.startswith("|")
    ]
    return [cells for cells in table[1:] if not set("".join(cells)) <= set("-: ")]


def table_environments(text: str) -> dict[str, dict]:
    """Each model's environment, by its key, from the lines above the table."""
    names = {name: key for key, (name, _) in MODELS.items()}
    out = {}
    for line in table_block(text):
        if ": measured " in line:
            models, _ = line.split(": measured ", 1)
            for name in models.split(" and "):
                out[names[name]] = environment_from_line(line)
    return out


def table_rows(text: str) -> list[dict]:
    """The table's rows as record rows (numbers as printed), without recipe fingerprints."""
    names = {name: key for key, (name, _) in MODELS.items()}
    rows = []
    for model, preset, linear, file_bpw, size, ratio, quality_cell, exact, encode in table_cells(text):
        seconds, starred = _seconds(encode)
        rows.append(
            {
                "model": names[model],
                "preset": preset.split()[0],  # "vq (uncalibrated)", "q4 (generic)"
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
    raise ValueError(f"docs table: a quality cell this reader does not know: {cell!r}")


def _seconds(cell: str) -> tuple[float, bool]:
    """'19 s', '5.4 min' or '9.6 min*' (starred: the cores were shared)."""
    m = re.fullmatch(r"([\d.]+) (s|min)(\*?)", cell)
    if not m:
        raise ValueError(f"docs table: an encode time this reader does not know: {cell!r}")
    return float(m.group(1)) * (60 if m.group(2) == "min" else 1), bool(m.group(3))


def record_from_table(text: str, source: str) -> dict:
    """The record of the docs table: each row ran its own preset, fingerprinted as the files are now; each
    model's environment as the line above the table names it."""
    rows = table_rows(text)
    for row in rows:
        row["recipe"] = preset_name(row["preset"])
        row["recipe_fingerprint"] = recipe_fingerprint(row["recipe"])
    environments = table_environments(text)
    models = reference_models(rows, source, {}, {})
    for key, model in models.items():
        model["environment"] = environments.get(key) or {k: None for k in ENVIRONMENT}
    return {"models": models, "rows": rows}


def write_record(record: dict, path: str = RECORD_PATH) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(record, fh, indent=1)
        fh.write("\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.preset_record", description=__doc__.split("\n\n")[0])
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--run", metavar="PRESETS_JSON", help="a run's bench/out/presets.json")
    where.add_argument(
        "--table", metavar="PAGE", help="a docs page whose generated presets table to record (docs/measurements.md)"
    )
    parser.add_argument("--out", default=RECORD_PATH, help="the record to write (default: the one rbe presets reads)")
    args = parser.parse_args(argv)
    if args.run:
        with open(args.run, encoding="utf-8") as fh:
            run = json.load(fh)
        record = record_from_run(
            run, f"python -m bench.presets, {os.path.basename(args.run)} of that run", file_date(args.run)
        )
        stale = [f"{r['model']} {r['preset']}" for r in record["rows"] if r["recipe_fingerprint"] is None]
        if stale:
            print(f"rows without their recipe's fingerprint (an older run), shown as not measured: {stale}")
    else:
        with open(args.table, encoding="utf-8") as fh:
            text = fh.read()
        record = record_from_table(text, TABLE_SOURCE)
    write_record(merged(read_record(args.out), record), args.out)
    print(f"wrote {os.path.relpath(args.out)}: {len(record['rows'])} rows")
    return 0


if __name__ == "__main__":
    sys.exit(main())
