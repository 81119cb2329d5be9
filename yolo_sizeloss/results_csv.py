"""A run's ``results.csv`` (one row per epoch, either family): read, and continued as a resumed run must."""

from __future__ import annotations

import csv
import math
from pathlib import Path

from ultralytics.utils import LOGGER


def read_rows(path: Path) -> list[dict[str, str]]:
    """The rows of ``results.csv`` by column name, names stripped (Ultralytics pads them with spaces); none where
    the file is missing."""
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return [{str(k).strip(): v for k, v in row.items()} for row in csv.DictReader(f)]


def read_columns(path: Path) -> dict[str, list[float]]:
    """``read_rows`` as columns of floats (for plots and per-epoch differences); an empty or non-numeric
    cell is NaN."""
    rows = read_rows(path)
    return {name: [_number(row.get(name)) for row in rows] for name in (rows[0] if rows else ())}


def _number(cell: str | None) -> float:
    """A results.csv cell as a float, NaN when it is not a number (or missing from a short row)."""
    try:
        return float(cell)
    except (TypeError, ValueError):
        return math.nan


def continue_results(path: Path, epochs_done: int) -> float:
    """Keep the rows of ``results.csv`` up to epoch ``epochs_done`` (what the checkpoint being resumed
    holds) and drop later ones, written by a run killed after an epoch's row but before its
    checkpoint: resumed, that epoch is trained again and would otherwise appear twice. Returns the
    last kept row's ``time`` (seconds since the run started, so that the resumed rows continue it;
    0 without one); the log names the rows dropped."""
    if not path.is_file():
        return 0.0
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if not rows:
        return 0.0
    names = [name.strip() for name in rows[0]]
    epoch, time = names.index("epoch"), names.index("time") if "time" in names else None
    kept = [row for row in rows[1:] if row and float(row[epoch]) <= epochs_done]
    dropped = len(rows) - 1 - len(kept)
    if dropped:
        with open(path, "w", newline="") as f:
            f.writelines(",".join(row) + "\n" for row in [rows[0], *kept])
        LOGGER.info(f"{path}: dropped {dropped} row(s) past epoch {epochs_done}, the checkpoint's last epoch "
                    "(written before the run stopped, trained again now)")
    return float(kept[-1][time]) if kept and time is not None else 0.0


def widen_header(path: Path, names: list[str]) -> list[str]:
    """Give an existing ``results.csv`` every column of ``names`` before a row with those columns is
    appended, and return its header: a run resumed by a version that writes new columns keeps its earlier
    rows, blank in the new columns, instead of rows longer than their header. The header becomes
    ``names`` followed by any earlier column the new rows lack (kept, blank in the new rows, which
    CSV readers read as missing): a writer that puts values in the order of ``names`` (Ultralytics'
    ``save_metrics``) then lines up. A file whose header starts with ``names`` is left as it is."""
    if not path.is_file():
        return list(names)
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    old = [name.strip() for name in rows[0]] if rows else []
    if not rows or old[:len(names)] == list(names):
        return old or list(names)
    header = [*names, *(name for name in old if name not in names)]
    records = [dict(zip(old, row)) for row in rows[1:] if row]
    with open(path, "w", newline="") as f:
        f.writelines(",".join(header) + "\n")
        f.writelines(",".join(record.get(name, "") for name in header) + "\n" for record in records)
    added = [name for name in names if name not in old]
    LOGGER.info(f"{path}: columns reordered" + (f", {', '.join(added)} added (blank in the earlier rows)" if added else ""))
    return header


def append_row(path: Path, row: dict) -> None:
    """Append one epoch's ``row`` to ``results.csv`` (the header with the first row; widened first when
    ``row`` brings new columns)."""
    header = widen_header(path, list(row))
    new = not path.is_file()
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=header, restval="")
        if new:
            writer.writeheader()
        writer.writerow(row)


def class_ap_columns(names: dict[int, str], ap_by_class: dict[int, float]) -> dict[str, float]:
    """One column per class, ``val/AP50-95 <name>``: the epoch's AP50-95 of that class on the val split
    (NaN when val holds none of it), both families. Their mean over the classes val holds is the epoch's
    mAP50-95; the focus class's curve is what choosing a schedule or a variant on val reads, and it
    stays in results.csv when the checkpoints are gone. Not a ``metrics/`` column: Ultralytics'
    results.png plots every one of those, which would be one panel per class."""
    return {f"val/AP50-95 {name.replace(',', ' ')}": float(ap_by_class.get(k, float("nan"))) for k, name in names.items()}
