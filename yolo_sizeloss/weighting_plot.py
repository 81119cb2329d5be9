"""Where the size-aware weight went, epoch by epoch: a plot of a run's weighting columns in results.csv.

Written as ``weighting.png`` beside Ultralytics' ``results.png``. Panels, each only when its columns
exist: feedback's shares ``r`` (small objects' share of the box loss) and ``q`` (their share of the
matched instances), feedback's gain ``G``, and the mean weight on small and on other anchors per term.
Faster R-CNN runs keep one feedback state per stage (``feedback/rpn/r``, ``feedback/roi/gain``, ...):
each stage's columns join the same panels.
"""

from __future__ import annotations

from pathlib import Path

from yolo_sizeloss.results_csv import read_columns

PANELS = (  # (title, the column prefix, the last parts of the column names it plots)
    ("feedback shares", "feedback/", ("r", "q")),
    ("feedback gain G", "feedback/", ("gain",)),
    ("mean weight per anchor", "sizeloss/", ("box_w_small", "box_w_other", "cls_w_small", "cls_w_other")),
)
PLOT_FILE = "weighting.png"


def plot_weighting(run_dir: str | Path) -> Path | None:
    """Plot the run's per-epoch weighting columns (those of ``PANELS`` that results.csv has) to
    ``run_dir/weighting.png`` and return its path; a run without such columns (the stock loss, or a
    method that records none) gets a plot that says so. None when results.csv is missing."""
    run_dir = Path(run_dir)
    results = run_dir / "results.csv"
    if not results.is_file():
        return None
    columns = read_columns(results)
    panels = [(title, [c for c in columns if c.startswith(prefix) and c.rsplit("/", 1)[1] in parts])
              for title, prefix, parts in PANELS]
    panels = [(title, names) for title, names in panels if names]

    from matplotlib.figure import Figure  # not pyplot: the caller's backend and open figures stay untouched

    path = run_dir / PLOT_FILE
    if not panels:
        fig = Figure(figsize=(5, 1.6))
        fig.text(0.5, 0.5, f"{run_dir.name}: no per-epoch weighting columns in results.csv\n"
                           "(the stock loss, or a method that records none)", ha="center", va="center")
        fig.savefig(path, dpi=110)
        return path
    epochs = columns.get("epoch") or list(range(1, len(next(iter(columns.values()))) + 1))
    fig = Figure(figsize=(5 * len(panels), 3.8), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)
    for ax, (title, names) in zip(axes[0], panels):
        for name in names:
            ax.plot(epochs, columns[name], marker=".", label=name.split("/", 1)[1])
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{run_dir.name}: size-aware weighting per epoch", fontsize=11)
    fig.savefig(path, dpi=110)
    return path
