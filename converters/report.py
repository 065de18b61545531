"""What ``rbe info`` prints: per-tensor codecs, sizes and bits per weight.

Sizes count every stored byte of a tensor's sections; the file total adds the
header, manifest, embedded files, padding and footer, so the table never claims
more compression than the file on disk shows.
"""

from __future__ import annotations

import math
import os

from rbeformat import Reader


def _stored(blob) -> int:
    return sum(c.length for c in blob.chunks)


def tensor_rows(r: Reader) -> list[dict]:
    rows = []
    for entry in r.manifest.tensors.values():
        n = math.prod(entry.shape)
        raw = n * entry.dtype.itemsize
        if entry.alias_of:
            rows.append({"name": entry.name, "dtype": entry.dtype.name, "shape": list(entry.shape),
                         "codec": f"alias of {entry.alias_of}", "raw_bytes": raw, "stored_bytes": 0,
                         "ratio": None, "bits_per_weight": 0.0, "quality": "exact (alias)"})
            continue
        stored = _stored(entry.blob)
        lossless = entry.blob.codec is not None and entry.blob.codec.lossless
        rows.append({"name": entry.name, "dtype": entry.dtype.name, "shape": list(entry.shape),
                     "codec": entry.blob.codec_record["name"], "raw_bytes": raw, "stored_bytes": stored,
                     "ratio": raw / stored if stored else None,
                     "bits_per_weight": 8 * stored / n if n else 0.0,
                     "quality": "lossless (bit-exact)" if lossless else "lossy"})
    return rows


def totals(r: Reader) -> dict:
    rows = tensor_rows(r)
    weights = sum(math.prod(row["shape"]) for row in rows)
    tensor_bytes = sum(row["raw_bytes"] for row in rows)
    stored = sum(row["stored_bytes"] for row in rows)
    files = sum(_stored(f.blob) for f in r.manifest.files.values())
    size = os.path.getsize(r.path)
    lossless = all(row["quality"] != "lossy" for row in rows)
    return {"tensors": len(rows), "weights": weights, "tensor_bytes": tensor_bytes,
            "tensor_stored_bytes": stored, "embedded_file_bytes": files, "file_bytes": size,
            "overhead_bytes": size - stored - files,
            "ratio": tensor_bytes / size if size else 0.0,
            "bits_per_weight": 8 * size / weights if weights else 0.0,
            "tensor_bits_per_weight": 8 * stored / weights if weights else 0.0,
            "quality": "lossless (bit-exact)" if lossless else "lossy"}


def info_json(r: Reader) -> dict:
    return {"file": r.path, "version": list(r.version), "producer": r.manifest.producer,
            "metadata": r.metadata(), "totals": totals(r), "tensors": tensor_rows(r),
            "files": [{"path": f.path, "role": f.role, "size": f.blob.items, "stored_bytes": _stored(f.blob)}
                      for f in r.manifest.files.values()]}


def info_table(r: Reader) -> str:
    rows = tensor_rows(r)
    head = ("tensor", "dtype", "shape", "codec", "stored", "ratio", "bits/w")
    body = [(row["name"], row["dtype"], "x".join(map(str, row["shape"])) or "scalar", row["codec"],
             _human(row["stored_bytes"]), f"{row['ratio']:.3f}" if row["ratio"] else "-",
             f"{row['bits_per_weight']:.3f}") for row in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(head)]
    widths[0] = min(widths[0], 60)

    def fmt(cells):
        out = []
        for i, (cell, w) in enumerate(zip(cells, widths)):
            cell = cell if len(cell) <= w else "..." + cell[-(w - 3):]
            out.append(cell.ljust(w) if i < 4 else cell.rjust(w))
        return "  ".join(out)

    lines = [fmt(head), fmt(["-" * w for w in widths])] + [fmt(b) for b in body]
    t = totals(r)
    lines += ["", f"files: {len(r.manifest.files)} embedded ({_human(t['embedded_file_bytes'])} stored)"]
    for f in sorted(r.manifest.files.values(), key=lambda f: f.path):
        lines.append(f"  {f.path}  ({f.role}, {_human(f.blob.items)} -> {_human(_stored(f.blob))})")
    lines += [
        "",
        f"format {r.version[0]}.{r.version[1]}, written by {r.manifest.producer}",
        f"{t['tensors']} tensors, {t['weights']:,} weights, {_human(t['tensor_bytes'])} as stored dtypes",
        f"file {_human(t['file_bytes'])} (tensors {_human(t['tensor_stored_bytes'])}, "
        f"files {_human(t['embedded_file_bytes'])}, header/manifest/padding {_human(t['overhead_bytes'])})",
        f"ratio {t['ratio']:.4f} (tensor bytes / file size), {t['bits_per_weight']:.3f} bits per weight "
        f"over the whole file, {t['tensor_bits_per_weight']:.3f} for tensor data alone",
        f"quality: {t['quality']}",
    ]
    return "\n".join(lines)


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)
