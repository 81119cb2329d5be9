"""A run's ``results.csv`` (one row per epoch, either family) as a resumed run must continue it."""

from __future__ import annotations

import csv
from pathlib import Path

from ultralytics.utils import LOGGER


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
