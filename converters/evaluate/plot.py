"""``rbe eval --plot``: every quality figure against bits per weight, readable with any number of files.

One panel per quality figure and per bits-per-weight measure: for encoders
mean cosine and nearest-neighbour agreement (two rows), for causal LMs
perplexity (one row), each against the whole file's bits per weight and the
Linear weights' (two columns).  No text is drawn beside the points, where
labels of close points would print over each other: each file has its own
colour and marker, the original a black star, and one legend under the panels
names every file with its figures.  ``plot_figure`` returns the matplotlib
figure (matplotlib is the ``bench`` and ``test`` extras'); ``write_plot`` saves it.
"""

from __future__ import annotations

import itertools
import os

from rbeformat import extras
from rbeformat.atomic import atomic_file, check_parent, check_target
from rbeformat.errors import UsageError

# (result key, axis label) of the quality figures each measure plots, one row of panels each.
QUALITY_PANELS = {
    "perplexity": [("perplexity", "perplexity (lower is better)")],
    "embeddings": [
        ("mean_cosine", "mean cosine to the original's embeddings"),
        ("nn_agreement", "nearest-neighbour agreement with the original"),
    ],
}
BITS_PANELS = [
    ("bits_per_weight", "bits per weight, whole file"),
    ("linear_bits_per_weight", "bits per weight, Linear weights"),
]
MARKERS = "osD^vP<>Xph"
COLOURS = [f"tab:{c}" for c in ("blue", "orange", "green", "red", "purple", "brown", "pink", "olive", "cyan", "gray")]


def check_plot_target(path: str, force: bool) -> None:
    """Before any measuring: the name says PNG, matplotlib is there and the plot may be written."""
    check_png_name(path)
    extras.PLOTS.require()
    check_target(path, force)
    check_parent(path)


def check_png_name(path: str) -> None:
    """The plot is always a PNG: a name that says otherwise (q.txt, q.rbe, q.svg) would mislead whoever opens it."""
    stem, extension = os.path.splitext(path)
    if extension.lower() != ".png":
        raise UsageError(
            f"--plot writes a PNG image: name it .png (e.g. {stem if extension else path}.png), not {path}"
        )


def point_styles(count: int) -> list[dict]:
    """Scatter styles of ``count`` compressed files, all different: each colour with one marker, then the
    next marker (10 colours x 11 markers before any repeats)."""
    pairs = itertools.cycle((colour, marker) for marker in MARKERS for colour in COLOURS)
    return [{"color": colour, "marker": marker, "s": 50} for colour, marker in itertools.islice(pairs, count)]


ORIGINAL_STYLE = {"color": "black", "marker": "*", "s": 180}


def legend_label(row: dict, measure: str) -> str:
    """What the legend says of one file: its path and every figure the panels show."""
    name = row["file"] + (" (original)" if row["role"] == "original" else "")
    if measure == "perplexity":
        figures = f"perplexity {row['perplexity']:.3f} ({row['perplexity_change_pct']:+.2f}%)"
    else:
        figures = f"cosine {row['mean_cosine']:.4f}, NN {row['nn_agreement']:.3f}"
    bits = [f"{row['bits_per_weight']:.2f} bits/w" if row["bits_per_weight"] is not None else "-"]
    if row["linear_bits_per_weight"] is not None:
        bits.append(f"Linear {row['linear_bits_per_weight']:.2f}")
    return f"{name}: {figures}; {', '.join(bits)}"


def plot_title(result: dict) -> str:
    p = result["protocol"]
    if result["measure"] == "perplexity":
        return (
            f"perplexity, {p['windows']} windows of {p['window']} tokens (stride {p['stride']}), "
            f"text sha256 {p['text_sha256']}; {result['runtime']}"
        )
    return (
        f"mean cosine and nearest-neighbour agreement of mean-pooled embeddings, {p['count']} sentences, "
        f"sha256 {p['sentences_sha256']}; {result['runtime']}"
    )


def plot_figure(result: dict):
    """The matplotlib figure of an ``evaluate`` result: a grid of quality x bits-per-weight panels and
    the legend naming each file (see the module doc)."""
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    rows, measure = result["rows"], result["measure"]
    panels = QUALITY_PANELS[measure]
    compressed_styles = iter(point_styles(sum(row["role"] != "original" for row in rows)))
    styles = [ORIGINAL_STYLE if row["role"] == "original" else next(compressed_styles) for row in rows]
    legend_rows = 1 + len(rows) // 2 if len(rows) > 8 else len(rows)  # two columns past 8 files
    fig, axes = plt.subplots(
        len(panels),
        len(BITS_PANELS),
        figsize=(12, 4 * len(panels) + 0.25 * legend_rows + 0.8),
        squeeze=False,
        layout="constrained",
    )
    for (key, y_label), panel_row in zip(panels, axes):
        for (x_key, x_label), ax in zip(BITS_PANELS, panel_row):
            for row, style in zip(rows, styles):
                if row[x_key] is not None and row[key] is not None:
                    ax.scatter(row[x_key], row[key], label=legend_label(row, measure), zorder=3, **style)
            ax.set_xlabel(x_label)
            ax.set_ylabel(y_label)
            ax.margins(x=0.08, y=0.12)
            ax.grid(alpha=0.3)
    handles, labels = _every_file(axes.flat)
    fig.legend(handles, labels, loc="outside lower center", ncol=2 if len(rows) > 8 else 1, fontsize=8, frameon=False)
    fig.suptitle(plot_title(result), fontsize=9)
    return fig


def _every_file(axes) -> tuple[list, list]:
    """One legend entry per file, from whichever panel drew it (a file without Linear weights is
    missing from the right-hand panels only)."""
    seen: dict[str, object] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            seen.setdefault(label, handle)
    return list(seen.values()), list(seen)


def write_plot(result: dict, path: str, force: bool) -> None:
    """``plot_figure`` saved as a PNG file at ``path`` (atomically; an existing file only with ``force``)."""
    import matplotlib.pyplot as plt

    fig = plot_figure(result)
    try:
        with atomic_file(path, force) as fh:
            fig.savefig(fh, format="png", dpi=120)
    finally:
        plt.close(fig)
