"""When in training a mode leads or trails the stock loss: a results.csv column of each mode's runs minus
the reference's on the same seed, epoch by epoch, averaged over seeds and over bins of epochs.

    python bench/curves.py bench/results/converged --modes nwd nwd-safit_sharp --seeds 0 1 2
    python bench/curves.py bench/results/converged --modes nwd --column "val/AP50-95 Platelets" --bin 10

Reads OUT/runs/<mode>-s<seed>/results.csv as bench/compare.py writes them (modes by their labels there);
a metric column is in percent. Prints a markdown table: one row per mode, one column per bin of epochs.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

from yolo_sizeloss.report import markdown_table
from yolo_sizeloss.results_csv import read_columns

METRIC_PREFIXES = ("metrics/", "val/AP")  # columns in [0, 1], shown in percent


def epoch_gaps(runs: Path, mode: str, reference: str, seeds: list[int], column: str) -> list[float]:
    """Per epoch, the mean over ``seeds`` of (mode - reference) in ``column``, as far as every run reached."""
    per_seed = []
    for seed in seeds:
        a, b = (read_columns(runs / f"{label}-s{seed}" / "results.csv") for label in (mode, reference))
        if column not in a or column not in b:
            raise ValueError(f"{column!r} is not a column of both {mode}-s{seed} and {reference}-s{seed}")
        per_seed.append([x - y for x, y in zip(a[column], b[column])])
    epochs = min(map(len, per_seed))
    scale = 100 if column.startswith(METRIC_PREFIXES) else 1
    return [scale * statistics.mean(gaps[e] for gaps in per_seed) for e in range(epochs)]


def binned(values: list[float], width: int) -> list[float]:
    """Means of consecutive bins of ``width`` values (the last may be shorter)."""
    return [statistics.mean(values[i:i + width]) for i in range(0, len(values), width)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", help="a bench/compare.py output folder (its runs/ are read)")
    p.add_argument("--modes", nargs="+", required=True, help="mode labels as in OUT/runs/<mode>-s<seed>")
    p.add_argument("--reference", default="baseline")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--column", default="metrics/mAP50-95(B)", help="a results.csv column (default: val mAP50-95)")
    p.add_argument("--bin", type=int, default=6, help="epochs per bin (default 6)")
    args = p.parse_args(argv)
    if args.bin < 1:
        p.error(f"--bin {args.bin}: must be at least 1")
    runs = Path(args.out) / "runs"
    try:
        gaps = {mode: binned(epoch_gaps(runs, mode, args.reference, args.seeds, args.column), args.bin)
                for mode in args.modes}
    except (FileNotFoundError, ValueError) as e:
        print(f"curves.py: {e}", file=sys.stderr)
        return 2
    bins = max(map(len, gaps.values()))
    header = ["mode", *(f"ep {i * args.bin + 1}-{(i + 1) * args.bin}" for i in range(bins))]
    print(markdown_table(header, [[mode, *(f"{v:+.1f}" for v in values)] for mode, values in gaps.items()]))
    print(f"\n{args.column}: mode - {args.reference} on the same seed, mean over seeds {args.seeds} and over "
          f"bins of {args.bin} epochs.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
