"""What ``rbe info`` prints: per-tensor codecs, sizes and bits per weight.

Sizes count every stored byte of a tensor's sections; the file total adds the
header, manifest, embedded files, padding and footer, so the table never claims
more compression than the file on disk shows.  Sizes are printed in decimal
units (1 MB = 10^6 bytes), as the command's progress bars and summary show them.
"""

from __future__ import annotations

import json
import math
import os
import re

from rbeformat import RbeError, Reader
from rbeformat.chain import Chain
from rbeformat.manifest import Transform, blobs_of, check_json_text

from ..compress.roles import TensorRole, classify


def _stored(blob) -> int:
    return sum(c.length for c in blob.chunks)


def chain_text(transform: Transform) -> str:
    """The codec chain of a transformed tensor, as ``rbe convert --codec`` would take it."""
    return _chain(transform).text()


def _chain(transform: Transform) -> Chain:
    return Chain(
        transform.codec,
        {name: _chain(part.transform) for name, part in transform.parts.items() if part.transform is not None},
    )


def tensor_roles(r: Reader) -> dict[str, TensorRole]:
    """The role of every model tensor (``roles.classify``), from the names, the shapes and the
    embedded config.json; internal tensors, which serve codecs, have none."""
    tensors = {e.name: (e.dtype.name, tuple(e.shape)) for e in r.manifest.tensors.values() if not e.internal}
    return classify(tensors, _embedded_config(r))


def _embedded_config(r: Reader) -> dict | None:
    if "config.json" not in r.manifest.files:
        return None
    try:
        data = r.read_file("config.json")
        check_json_text(data, "file 'config.json'", r.max_memory)  # its parse within the memory limit
        config = json.loads(data)
    except (RbeError, UnicodeDecodeError, ValueError, RecursionError):
        return None  # a damaged config still lets info list the tensors; roles then come from names
    return config if isinstance(config, dict) else None


def tensor_rows(r: Reader) -> list[dict]:
    rows = []
    roles = tensor_roles(r)
    for entry in r.manifest.tensors.values():
        n = math.prod(entry.shape)
        raw = n * entry.dtype.itemsize
        role = roles[entry.name].role if entry.name in roles else None
        if entry.alias_of:
            rows.append(
                {
                    "name": entry.name,
                    "dtype": entry.dtype.name,
                    "shape": list(entry.shape),
                    "role": role,
                    "codec": f"alias of {entry.alias_of}",
                    "raw_bytes": raw,
                    "stored_bytes": 0,
                    "ratio": None,
                    "bits_per_weight": 0.0,
                    "internal": entry.internal,
                    "quality": "exact (alias)",
                    "larger_than_dense": False,
                }
            )
            continue
        stats = entry.extra.get("stats")
        stats = stats if isinstance(stats, dict) else {}
        if entry.transform is not None:
            stored = sum(_stored(blob) for _, blob in blobs_of(entry.transform))
            codec = chain_text(entry.transform)
            exact = stats.get("rel_error") == 0
            quality = "lossless (bit-exact)" if exact else _quality(stats)
        else:
            stored = _stored(entry.blob)
            codec = entry.blob.codec_record["name"]
            exact = entry.blob.codec is not None and entry.blob.codec.lossless
            quality = "lossless (bit-exact)" if exact else "lossy"
        if isinstance(stats.get("input"), dict):  # re-encoded from a file that stored it lossily
            quality = _quality_after_lossy_input(quality, exact, stats)
        rows.append(
            {
                "name": entry.name,
                "dtype": entry.dtype.name,
                "shape": list(entry.shape),
                "role": role,
                "codec": codec,
                "raw_bytes": raw,
                "stored_bytes": stored,
                "ratio": raw / stored if stored else None,
                "bits_per_weight": 8 * stored / n if n else 0.0,
                # A codec chain is meant to save space; storing more than the dense
                # tensor means its settings (a rank, a bit width) do not fit the shape.
                "larger_than_dense": entry.transform is not None and stored > raw,
                "internal": entry.internal,
                "quality": quality,
                **({"stats": stats} if stats else {}),
            }
        )
    return rows


def lossy_rows(r: Reader) -> list[dict]:
    """``tensor_rows`` of the model's tensors stored lossily (not an exported graph's constants)."""
    rows = [row for row in tensor_rows(r) if not row["internal"]]
    return [row for row in rows if not row["quality"].startswith(("lossless", "exact"))]


def larger_than_dense(rows: list[dict]) -> list[str]:
    """Names of the tensors a codec chain stores in more bytes than their dense form."""
    return [row["name"] for row in rows if row["larger_than_dense"]]


def _quality_after_lossy_input(quality: str, exact: bool, stats: dict) -> str:
    """A tensor whose input values were already lossy: its own figure is against those values; with
    both errors known, a bound on the error against what the input was made from."""
    rel = stats["input"].get("rel_error")
    there = f"weight rel.err {rel:.4f} there" if isinstance(rel, (int, float)) else "its error not recorded"
    if exact:
        return f"lossy in its input ({there}), stored exactly"
    bound = combined_rel_error(stats)
    in_all = f"; at most {bound:.4f} against what the input was made from" if bound is not None else ""
    return f"{quality} against lossy input values ({there}{in_all})"


def combined_rel_error(stats: dict) -> float | None:
    """A bound on a re-encoded tensor's error against the values its input was made from: with x those,
    x1 the input's, x2 this file's, |x2 - x| <= |x2 - x1| + |x1 - x| = r2 |x1| + r1 |x|, and
    |x1| <= (1 + r1) |x|, so the relative error is at most r1 + r2 (1 + r1).  None unless both known."""
    r1, r2 = stats.get("input", {}).get("rel_error"), stats.get("rel_error")
    if not isinstance(r1, (int, float)) or not isinstance(r2, (int, float)):
        return None
    return r1 + r2 * (1 + r1)


def _quality(stats: dict) -> str:
    rel, snr = stats.get("rel_error"), stats.get("snr_db")
    if not isinstance(rel, (int, float)) or not isinstance(snr, (int, float, type(None))):
        return "lossy"
    # A weight error, not the model's quality (perplexity, embeddings): rbe eval measures that.
    return f"weight rel.err {rel:.4f}, SNR {snr:.1f} dB" if snr is not None else f"weight rel.err {rel:.4f}"


def totals(r: Reader) -> dict:
    rows = tensor_rows(r)
    model_rows = [row for row in rows if not row["internal"]]
    weights = sum(math.prod(row["shape"]) for row in model_rows)
    tensor_bytes = sum(row["raw_bytes"] for row in model_rows)
    stored = sum(row["stored_bytes"] for row in rows)
    files = sum(_stored(f.blob) for f in r.manifest.files.values())
    size = os.path.getsize(r.path)
    lossless = all(row["quality"].startswith(("lossless", "exact")) for row in rows)
    lossy = [row for row in model_rows if not row["quality"].startswith(("lossless", "exact"))]
    return {
        "tensors": len(model_rows),  # the model's: a codec's shared state is counted apart
        "internal_tensors": len(rows) - len(model_rows),
        "weights": weights,
        "tensor_bytes": tensor_bytes,
        "tensor_stored_bytes": stored,
        "embedded_file_bytes": files,
        "file_bytes": size,
        "overhead_bytes": size - stored - files,
        "ratio": tensor_bytes / size if size else 0.0,
        "bits_per_weight": 8 * size / weights if weights else 0.0,
        "tensor_bits_per_weight": 8 * stored / weights if weights else 0.0,
        "quality": "lossless (bit-exact)" if lossless else _lossy_quality(lossy),
    }


def _rel_errors(rows: list[dict], stats_of) -> list[tuple[float, int, str]]:
    """(rel. error, weights, name) of the rows whose stats (``stats_of(row)``) record one."""
    found = []
    for row in rows:
        stats = stats_of(row)
        if isinstance(stats, dict) and isinstance(stats.get("rel_error"), (int, float)):
            found.append((stats["rel_error"], math.prod(row["shape"]), row["name"]))
    return found


def _mean(rels: list[tuple[float, int, str]]) -> float:
    return sum(r * n for r, n, _ in rels) / max(1, sum(n for _, n, _ in rels))


def _lossy_quality(lossy: list[dict]) -> str:
    """The file's quality line when some tensors are lossy.  The weighted rel. error of all of them,
    sqrt(sum err^2 / sum x^2), would need norms: the worst tensor and the weight-averaged one, both
    measured at encode time.  Values an input had already lost are said apart: this file's own
    figures are against them."""
    weights = sum(math.prod(row["shape"]) for row in lossy)
    head = f"lossy: {len(lossy)} tensors ({weights:,} weights)"
    tail = " (measured at encode on the weights; a model's quality is what rbe eval measures)"
    lossy_here = [row for row in lossy if not row["quality"].startswith("lossy in its input")]
    own = _rel_errors(lossy_here, lambda row: row.get("stats"))
    worst = max(own, default=(0, 0, ""))
    own_text = f"mean {_mean(own):.4f}, worst {worst[0]:.4f}{f' ({worst[2]})' if worst[2] else ''}"
    carried = [row for row in lossy if isinstance(row.get("stats", {}).get("input"), dict)]
    if not carried:
        return f"{head} via codec chains; weight rel.err {own_text}{tail}"
    before = _rel_errors(carried, lambda row: row["stats"]["input"])
    said = f"{head}; {len(carried)} were lossy in the input this file was encoded from (weight rel.err mean "
    said += f"{_mean(before):.4f} there)"
    if not lossy_here:
        return f"{said}, stored exactly here{tail}"
    bounds = [
        (combined_rel_error(row["stats"]), math.prod(row["shape"]), row["name"])
        for row in carried
        if combined_rel_error(row["stats"]) is not None
    ]
    in_all = f"; together at most {_mean(bounds):.4f} on average against what the input was made from" if bounds else ""
    return f"{said}; via codec chains here, weight rel.err against the input's values {own_text}{in_all}{tail}"


def info_json(r: Reader) -> dict:
    return {
        "file": r.path,
        "version": list(r.version),
        "producer": r.manifest.producer,
        "metadata": r.metadata(),
        "totals": totals(r),
        "tensors": sorted(tensor_rows(r), key=lambda row: name_order(row["name"])),
        "files": [
            {"path": f.path, "role": f.role, "size": f.blob.items, "stored_bytes": _stored(f.blob)}
            for f in r.manifest.files.values()
        ],
    }


def name_order(name: str) -> list:
    """A tensor name's sort key, numbers compared as numbers: ``layer.2`` before ``layer.10``.  Files
    of one model list their tensors in the same order whatever order they were written in."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", name)]


def info_table(r: Reader, summary_only: bool = False) -> str:
    """``rbe info``: a row per tensor (by name, numbers in order), the embedded files, then the
    summary; with ``summary_only`` the summary and a row per codec."""
    rows = sorted(tensor_rows(r), key=lambda row: name_order(row["name"]))
    if summary_only:
        return "\n".join(["by codec chain, largest stored first:"] + codec_table(rows) + [""] + summary_lines(r))
    head = ("tensor", "dtype", "shape", "role", "codec", "stored", "ratio", "bits/w", "quality")
    body = [
        (
            row["name"],
            row["dtype"],
            "x".join(map(str, row["shape"])) or "scalar",
            row["role"] or "-",
            row["codec"],
            human_bytes(row["stored_bytes"]),
            f"{row['ratio']:.3f}" if row["ratio"] else "-",
            f"{row['bits_per_weight']:.3f}",
            _quality_cell(row),
        )
        for row in rows
    ]
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(head)]
    widths[0] = min(widths[0], 60)
    widths[4] = min(widths[4], 60)

    def fmt(cells):
        out = []
        for i, (cell, w) in enumerate(zip(cells, widths)):
            cell = _clip(cell, w, keep_start=i == 4)
            out.append(cell.ljust(w) if i < 5 or i == 8 else cell.rjust(w))
        return "  ".join(out).rstrip()  # the last column is left-aligned: no padding after it

    lines = [fmt(head), fmt(["-" * w for w in widths])] + [fmt(b) for b in body]
    t = totals(r)
    lines += ["", f"files: {_files_count(r)} ({human_bytes(t['embedded_file_bytes'])} stored)"]
    for f in sorted(r.manifest.files.values(), key=lambda f: f.path):
        lines.append(f"  {f.path}  ({f.role}, {human_bytes(f.blob.items)} -> {human_bytes(_stored(f.blob))})")
    larger = larger_than_dense(rows)
    if larger:
        lines += [
            "",
            f"{_count(len(larger), 'tensor')} marked LARGER THAN DENSE: their codec chain stores more "
            "bytes than the dense tensor would take",
        ]
    return "\n".join(lines + [""] + summary_lines(r))


def _files_count(r: Reader) -> str:
    """How many files the container embeds, by role where there are several ("13 embedded: 12 files and
    1 safetensors layout"), so that a count a conversion printed for the directory's files adds up."""
    roles: dict[str, int] = {}
    for f in r.manifest.files.values():
        roles[f.role] = roles.get(f.role, 0) + 1
    count = f"{len(r.manifest.files)} embedded"
    if len(roles) < 2:
        return count
    words = {"file": ("file", "files"), "safetensors-header": ("safetensors layout", "safetensors layouts")}
    shown = [f"{n} {words.get(role, (role, role))[n != 1]}" for role, n in sorted(roles.items())]
    return count + ": " + " and ".join(shown)


def codec_table(rows: list[dict]) -> list[str]:
    """A row per codec chain (aliases, and codecs' shared state, apart): how many tensors and weights,
    stored bytes, bits per weight of those weights."""
    groups: dict[str, list[dict]] = {}
    for row in rows:
        key = "alias" if row["codec"].startswith("alias of") else row["codec"]
        groups.setdefault("shared state (internal)" if row["internal"] else key, []).append(row)
    head = ("codec", "tensors", "weights", "stored", "bits/w")
    body = []
    for codec, members in sorted(groups.items(), key=lambda kv: -sum(m["stored_bytes"] for m in kv[1])):
        weights = sum(math.prod(m["shape"]) for m in members)
        stored = sum(m["stored_bytes"] for m in members)
        bits = 8 * stored / weights if weights else 0.0
        body.append((codec, str(len(members)), f"{weights:,}", human_bytes(stored), f"{bits:.3f}"))
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(head)]
    widths[0] = min(widths[0], 70)

    def fmt(cells):
        cells = [_clip(c, w, keep_start=i == 0) for i, (c, w) in enumerate(zip(cells, widths))]
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return [fmt(head), fmt(["-" * w for w in widths])] + [fmt(b) for b in body]


def _clip(cell: str, width: int, keep_start: bool) -> str:
    """``cell`` cut to ``width`` with "...": a codec chain keeps its start (the codec's name comes first),
    a tensor name its end (the layer and the weight)."""
    if len(cell) <= width:
        return cell
    return cell[: width - 3] + "..." if keep_start else "..." + cell[-(width - 3) :]


def summary_lines(r: Reader) -> list[str]:
    """The summary ``rbe info`` ends with: format, counts, sizes, ratio, bits per weight, quality."""
    t = totals(r)
    return [
        f"format {r.version[0]}.{r.version[1]}, written by {r.manifest.producer}",
        f"{t['tensors']} tensors, {t['weights']:,} weights, {human_bytes(t['tensor_bytes'])} as stored dtypes"
        + (f" (and {_count(t['internal_tensors'], 'codec state')})" if t["internal_tensors"] else ""),
        f"file {human_bytes(t['file_bytes'])} (tensors {human_bytes(t['tensor_stored_bytes'])}, "
        f"files {human_bytes(t['embedded_file_bytes'])}, header/manifest/padding {human_bytes(t['overhead_bytes'])})",
        f"ratio {t['ratio']:.4f} (tensor bytes / file size), {t['bits_per_weight']:.3f} bits per weight "
        f"over the whole file, {t['tensor_bits_per_weight']:.3f} for tensor data alone",
        f"quality: {t['quality']}",
    ]


def _quality_cell(row: dict) -> str:
    return f"{row['quality']}; LARGER THAN DENSE" if row["larger_than_dense"] else row["quality"]


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def summary_line(path: str, t: dict) -> str:
    """``rbe convert``'s result line for the container at ``path`` with ``totals`` ``t``."""
    return (
        f"{path}: {human_bytes(t['tensor_bytes'])} of tensors -> {human_bytes(t['file_bytes'])} file, "
        f"ratio {t['ratio']:.4f}, {t['bits_per_weight']:.3f} bits per weight, quality: {t['quality']}"
    )


def human_bytes(n: float) -> str:
    """Decimal units, as in the progress bars: 1 kB = 1000 bytes, 1 MB = 10^6."""
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)
